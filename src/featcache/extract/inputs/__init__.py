"""What is extracted: the manifest (ids, paths, labels/targets, splits) and the sources that build it."""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["Manifest", "ManifestError", "assign_splits"], "manifest"),
    **dict.fromkeys(["build_manifest", "from_csv", "from_folder", "write_digits"], "sources"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
