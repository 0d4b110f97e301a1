"""Lazy, picklable access to one HDF5 dataset for dask.

An h5py handle cannot be pickled, so dask.distributed cannot ship it to a
worker. :class:`H5Slice` holds only the file path and dataset name and opens
the file read-only for each slice it serves, which works with the threaded,
process and distributed schedulers alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:  # dask is imported only where a dask array is built
    import dask.array

__all__ = ["H5Slice", "dask_array"]

logger = logging.getLogger(__name__)

#: A dask chunk spans whole HDF5 chunks, up to about this many bytes.
DASK_CHUNK_TARGET_BYTES = 64 * 1024 * 1024


class H5Slice:
    """Array-like view of ``path[name]`` that opens the file on every read.

    Parameters
    ----------
    path : Path
        HDF5 file.
    name : str
        Dataset path inside the file, e.g. ``"features/pool"``.
    shape : tuple of int
        Dataset shape, e.g. (N, D).
    dtype : numpy dtype
        Dtype of the arrays returned (values are cast on read).
    """

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.path = str(path)
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return np.asarray(f[self.name][key], dtype=self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"H5Slice({self.path!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"


def dask_array(
    path: Path,
    name: str,
    shape: tuple[int, int],
    stored_chunk_rows: int,
    dtype: Any,
    rows_per_chunk: int | None = None,
) -> dask.array.Array:
    """Dask array over a row-chunked ``(N, D)`` dataset.

    Parameters
    ----------
    path : Path
        HDF5 file.
    name : str
        Dataset path, e.g. ``"features/pool"``.
    shape : (int, int)
        (N, D).
    stored_chunk_rows : int
        Rows per HDF5 chunk.
    dtype : numpy dtype
        Output dtype.
    rows_per_chunk : int, optional
        Rows per dask chunk. Default: a whole number of HDF5 chunks, about
        :data:`DASK_CHUNK_TARGET_BYTES` in ``dtype``.

    Returns
    -------
    dask.array.Array
        Shape (N, D), chunks ``(rows_per_chunk, D)``.
    """
    import dask.array as da
    from dask.base import tokenize

    n, d = shape
    if rows_per_chunk is None:
        stored = max(1, stored_chunk_rows)
        per_row = max(1, d * np.dtype(dtype).itemsize)
        rows_per_chunk = stored * max(1, DASK_CHUNK_TARGET_BYTES // (stored * per_row))
    rows_per_chunk = max(1, min(int(rows_per_chunk), max(n, 1)))
    stat = os.stat(path)
    token = tokenize(str(Path(path).resolve()), name, np.dtype(dtype).str, stat.st_size, stat.st_mtime_ns)
    source = H5Slice(path, name, shape, dtype)
    logger.debug("dask array over %s:%s with chunks of %d rows", path, name, rows_per_chunk)
    return da.from_array(
        source,
        chunks=(rows_per_chunk, d),
        name=f"featcache-{name.replace('/', '-')}-{token}",
        lock=False,
        asarray=True,
        fancy=False,
        meta=np.empty((0, 0), dtype=dtype),
    )
