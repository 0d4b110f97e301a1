"""featcache's cache root on this machine: ``$FEATCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/featcache``.

Each kind of entry has its folder under it: ONNX exports (``onnx/``,
:mod:`featcache.extract.onnx.cache`) and timm backbone specs (``timm-specs/``,
:mod:`featcache.extract.zoo.timm_spec_cache`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

#: Environment variable naming featcache's cache root.
CACHE_ENV = "FEATCACHE_CACHE_DIR"


def cache_root() -> Path:
    """``$FEATCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/featcache`` (``XDG_CACHE_HOME`` defaults to ``~/.cache``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "featcache"
