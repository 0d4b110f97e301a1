"""Committed row blocks: one small ``.npz`` file per block, written atomically.

A block file holds what :meth:`StoreWriter.commit_block` received for rows
``[b * block_rows, min((b + 1) * block_rows, N))``::

    fingerprint     0-d str    writer fingerprint (config + ids + geometry)
    block           0-d int64  block index
    kept_rows       (M,) int64 absolute row indices that were extracted, ascending
    error_rows      (E,) int64 absolute row indices that were skipped, ascending
    error_reasons   (E,) str   why each skipped row was skipped
    feature__<i>    (M, D_i)   features of layer number ``i``, in the store dtype

Files are written to a temporary name in the same directory, flushed, fsynced
and renamed with :func:`os.replace`, so a process killed at any moment leaves
either a complete block file or none (plus a temporary file that the next
writer removes). Nothing is pickled: all arrays are numeric or fixed-width
unicode and are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = [
    "block_name",
    "feature_key",
    "fsync_dir",
    "parse_block_name",
    "read_block",
    "read_block_header",
    "write_block",
    "TMP_MARK",
]

logger = logging.getLogger(__name__)

#: Marker in the names of temporary block files (``block-000003.npz.tmp-1234``).
TMP_MARK = ".tmp-"

_PREFIX = "block-"
_SUFFIX = ".npz"


def block_name(block: int) -> str:
    """File name of block ``block``, e.g. ``block-000003.npz``."""
    return f"{_PREFIX}{block:06d}{_SUFFIX}"


def parse_block_name(name: str) -> int | None:
    """Block index of a committed block file name, or None for any other name."""
    if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
        return None
    digits = name[len(_PREFIX) : -len(_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def feature_key(index: int) -> str:
    """Array name of the ``index``-th layer's features inside a block file."""
    return f"feature__{index}"


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_block(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write one block file atomically.

    Parameters
    ----------
    path : Path
        Final file name, e.g. ``out.h5.parts/<sha16>/block-000003.npz``.
    arrays : mapping of str to ndarray
        The block's arrays (see the module docstring); no object arrays.
    """
    for key, value in arrays.items():
        if value.dtype.hasobject:
            raise TypeError(f"block array {key!r} has dtype object; only plain dtypes are stored")
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
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
        with np.load(path, allow_pickle=False) as npz:
            fingerprint = str(npz["fingerprint"][()])
            block = int(npz["block"][()])
            n_rows = int(npz["kept_rows"].shape[0] + npz["error_rows"].shape[0])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
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
        Array names to load, e.g. ``("kept_rows", "feature__0")``.

    Returns
    -------
    dict of str to ndarray
    """
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in keys}
