"""Committed row blocks: one small HDF5 file per block, written atomically.

A block file holds what :meth:`StoreWriter.commit_block` received for rows
``[b * block_rows, min((b + 1) * block_rows, N))``::

    attrs: fingerprint (str, writer fingerprint: config + ids + geometry), block (int64)
    kept_rows       (M,) int64 absolute row indices that were extracted, ascending
    error_rows      (E,) int64 absolute row indices that were skipped, ascending
    error_reasons   (E,) str   why each skipped row was skipped
    features/<i>    (M, D_i)   features of layer number ``i``, in the store dtype, chunked
                               and filtered like the final store (:mod:`featcache.store.layout`)

The features are compressed here, once, where the block is committed (on a
dask worker too); the assembly copies every aligned chunk's stored bytes into
the final file (:mod:`featcache.store.assemble`).

Files are written to a temporary name in the same directory, flushed, fsynced
and renamed with :func:`os.replace`, so a process killed at any moment leaves
either a complete block file or none (plus a temporary file that the next
writer removes). Nothing is pickled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from .errors import StoreError
from .layout import block_chunk_rows, feature_dataset_options
from .schema import HDF5_LIBVER
from .validate import check_block_inputs

__all__ = [
    "BlockCommitter",
    "block_name",
    "feature_key",
    "fsync_dir",
    "iter_block_features",
    "parse_block_name",
    "read_block",
    "read_block_header",
    "write_block",
    "TMP_MARK",
]

logger = logging.getLogger(__name__)

#: Marker in the names of temporary block files (``block-000003.h5.tmp-1234``).
TMP_MARK = ".tmp-"

_PREFIX = "block-"
_SUFFIX = ".h5"
_STR = h5py.string_dtype("utf-8")
_HEADER = ("fingerprint", "block")


def block_name(block: int) -> str:
    """File name of block ``block``, e.g. ``block-000003.h5``."""
    return f"{_PREFIX}{block:06d}{_SUFFIX}"


def parse_block_name(name: str) -> int | None:
    """Block index of a committed block file name, or None for any other name."""
    if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
        return None
    digits = name[len(_PREFIX) : -len(_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def feature_key(index: int) -> str:
    """Dataset name of the ``index``-th layer's features inside a block file."""
    return f"features/{index}"


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_block(path: Path, arrays: Mapping[str, np.ndarray], *, block_rows: int,
                compression: str | None) -> None:
    """Write one block file atomically.

    Parameters
    ----------
    path : Path
        Final file name, e.g. ``out.h5.parts/<sha16>/block-000003.h5``.
    arrays : mapping of str to ndarray
        ``fingerprint`` (0-d str), ``block`` (0-d int), ``kept_rows``, ``error_rows``,
        ``error_reasons`` and ``features/<i>`` (see the module docstring); no object arrays.
    block_rows : int
        The writer's block size (sets the feature chunk shape, as in the final store).
    compression : {"gzip", "lzf", None}
        The store's filter.
    """
    for key, value in arrays.items():
        if value.dtype.hasobject:
            raise TypeError(f"block array {key!r} has dtype object; only plain dtypes are stored")
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with h5py.File(tmp, "w", libver=HDF5_LIBVER) as handle:
            handle.attrs["fingerprint"] = str(arrays["fingerprint"][()])
            handle.attrs["block"] = np.int64(arrays["block"])
            handle.create_dataset("kept_rows", data=np.asarray(arrays["kept_rows"], dtype=np.int64))
            handle.create_dataset("error_rows", data=np.asarray(arrays["error_rows"], dtype=np.int64))
            handle.create_dataset("error_reasons", data=np.asarray(arrays["error_reasons"]).astype(object),
                                  dtype=_STR)
            for key in sorted(k for k in arrays if k.startswith("features/")):
                value = arrays[key]
                chunk = block_chunk_rows(value.shape[1], value.dtype.itemsize, block_rows)
                handle.create_dataset(key, data=value, chunks=(chunk, value.shape[1]),
                                      maxshape=(None, value.shape[1]), **feature_dataset_options(compression))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_block_header(path: Path) -> tuple[str, int, int] | None:
    """Read a block file's fingerprint, index and row count cheaply.

    Parameters
    ----------
    path : Path
        A committed block file.

    Returns
    -------
    (fingerprint, block, n_rows) or None
        ``n_rows`` counts kept plus skipped rows. None if the file cannot be
        read as a block file (it is then treated as not committed).
    """
    try:
        with h5py.File(path, "r") as handle:
            fingerprint = str(handle.attrs["fingerprint"])
            block = int(handle.attrs["block"])
            n_rows = int(handle["kept_rows"].shape[0] + handle["error_rows"].shape[0])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("unreadable block file %s (%s); it will be extracted again", path, exc)
        return None
    return fingerprint, block, n_rows


def read_block(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load the named arrays of one block file.

    Parameters
    ----------
    path : Path
        A committed block file.
    keys : tuple of str
        Dataset names to load, e.g. ``("kept_rows", feature_key(0))``.

    Returns
    -------
    dict of str to ndarray
        ``error_reasons`` as a str array.
    """
    with h5py.File(path, "r") as handle:
        return {key: handle[key].asstr()[()] if key == "error_reasons" else handle[key][()] for key in keys}


def iter_block_features(paths: Sequence[Path], index: int) -> Iterator[h5py.Dataset]:
    """The ``index``-th layer's feature dataset of each block file, in order (each file open while in use).

    The assembly reads rows from them, or copies their stored chunks raw.
    """
    for path in paths:
        with h5py.File(path, "r") as handle:
            yield handle[feature_key(index)]


@dataclass(frozen=True)
class BlockCommitter:
    """Commits block files of one store; picklable, so another process (a dask worker) can use it.

    Made by :meth:`~featcache.store.writer.StoreWriter.block_committer`. It
    holds no lock and no file handle: only the facts that decide a block
    file's bytes (fingerprint, geometry, ids, layers, dtype) and the parts
    directory as an absolute path, so a committer in any process writes
    exactly the block file the writer itself would. The process holding the
    writer then counts such a block with
    :meth:`~featcache.store.writer.StoreWriter.adopt_block`.

    Attributes
    ----------
    parts_dir : Path
        Absolute folder of the block files.
    fingerprint : str
        The writer's fingerprint (config, ids, geometry).
    n_rows, block_rows : int
        N and rows per block.
    layers : tuple of LayerSpec
        Stored layers, in ``/features`` order.
    ids : tuple of str, (N,)
        Row ids.
    dtype : str
        Storage dtype of the features.
    compression : {"gzip", "lzf", None}
        The store's filter (block files compress their features like the store).
    """

    parts_dir: Path
    fingerprint: str
    n_rows: int
    block_rows: int
    layers: tuple[Any, ...]
    ids: tuple[str, ...]
    dtype: str
    compression: str | None = "gzip"
    _row_of: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_row_of"] = {}  # rebuilt on first use: do not ship N ids twice
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def n_blocks(self) -> int:
        """``ceil(n_rows / block_rows)``."""
        return -(-self.n_rows // self.block_rows)

    def block_range(self, block: int) -> range:
        """Rows ``[block * block_rows, min((block + 1) * block_rows, N))``."""
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.n_blocks:
            raise StoreError(
                f"block {block!r} out of range; allowed 0..{self.n_blocks - 1} "
                f"({self.n_rows} rows, block_rows={self.block_rows})"
            )
        start = int(block) * self.block_rows
        return range(start, min(start + self.block_rows, self.n_rows))

    def block_path(self, block: int) -> Path:
        """Where block ``block``'s file lives."""
        return self.parts_dir / block_name(block)

    def commit_block(self, block: int, kept_rows: np.ndarray, features: Mapping[str, np.ndarray],
                     errors: Sequence[tuple[str, str]] = ()) -> Path:
        """Write one block file atomically (see :meth:`StoreWriter.commit_block` for the arguments).

        Returns
        -------
        Path
            The committed block file.

        Raises
        ------
        StoreError
            If rows, ids, aliases or shapes are inconsistent.
        """
        rows = self.block_range(block)
        if not self._row_of:
            self._row_of.update((id_, row) for row, id_ in enumerate(self.ids))
        kept, feats, err_rows, reasons = check_block_inputs(
            block, rows, kept_rows, features, errors,
            layers=self.layers, ids=self.ids, row_of=self._row_of, dtype=np.dtype(self.dtype),
        )
        arrays: dict[str, np.ndarray] = {
            "fingerprint": np.array(self.fingerprint),
            "block": np.array(block, dtype=np.int64),
            "kept_rows": kept,
            "error_rows": err_rows,
            "error_reasons": reasons,
        }
        for i, arr in enumerate(feats):
            arrays[feature_key(i)] = arr
        path = self.block_path(block)
        write_block(path, arrays, block_rows=self.block_rows, compression=self.compression)
        logger.debug("committed block %d: %d kept, %d skipped", block, kept.size, err_rows.size)
        return path

    def check_block_file(self, block: int) -> str | None:
        """Why block ``block``'s file is not a committed block of this store; None if it is.

        The file must exist, be readable and carry this committer's
        fingerprint, the block index and the block's row count.
        """
        path = self.block_path(block)
        if not path.is_file():
            return "missing"
        header = read_block_header(path)
        if header is None:
            return "unreadable"
        expected = (self.fingerprint, block, len(self.block_range(block)))
        if header != expected:
            return f"of another run (block {header[1]}, {header[2]} rows, fingerprint {header[0][:12]})"
        return None
