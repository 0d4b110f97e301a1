"""sha256 of a file's bytes: the one helper that hashes weights files and cached ONNX exports (the cached form for
files hashed at every up-to-date check: :func:`featcache.util.machine_records.cached_file_sha256`)."""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks.

    Parameters
    ----------
    path : path-like
        The file.
    chunk : int
        Bytes per read.

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
