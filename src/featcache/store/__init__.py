"""HDF5 feature store: one self-describing file per (dataset, backbone).

* :class:`StoreWriter` commits row blocks atomically (resumable after a crash)
  and assembles a byte-deterministic HDF5 file, renamed into place.
* :class:`FeatureStore` reads it back as numpy or dask arrays.

The layout is documented in :mod:`featcache.store.schema`.
"""

from __future__ import annotations

from .errors import StaleStoreError, StoreError, StoreLockedError, StoreNotFoundError
from .reader import FeatureStore
from .schema import FORMAT, SPLIT_CODES, SPLITS, TASKS, LayerSpec
from .writer import StoreWriter

__all__ = [
    "FeatureStore",
    "StoreWriter",
    "LayerSpec",
    "StoreError",
    "StaleStoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "FORMAT",
    "SPLITS",
    "SPLIT_CODES",
    "TASKS",
]
