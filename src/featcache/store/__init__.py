"""HDF5 feature store: one self-describing file per (dataset, backbone).

* :class:`StoreWriter` commits row blocks atomically (resumable after a crash)
  and assembles a byte-deterministic HDF5 file, renamed into place.
* :class:`FeatureStore` reads it back as numpy or dask arrays.

The layout is documented in :mod:`featcache.store.schema`.
"""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it; imported on first use (PEP 562), so
#: ``featcache.store.schema`` (params checks, listings) does not import h5py.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["StaleStoreError", "StoreError", "StoreLockedError", "StoreNotFoundError"], "errors"),
    "FeatureStore": "reader",
    **dict.fromkeys(["FORMAT", "LayerSpec", "SPLITS", "SPLIT_CODES", "TASKS"], "schema"),
    **dict.fromkeys(["StoreWriter", "parts_root"], "writer"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
