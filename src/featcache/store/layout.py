"""The on-disk layout of a feature dataset: chunk rows and filters, shared by block files and the final store.

A committed block file (:mod:`featcache.store.blocks`) stores its features with
the same chunk shape and filter pipeline as the final store
(:mod:`featcache.store.assemble`), so an aligned chunk is compressed once, where
the block is committed (on a dask worker, in parallel), and the assembly
copies its bytes raw (``read_direct_chunk`` / ``write_direct_chunk``) instead of
decompressing and compressing every feature a second time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHUNK_TARGET_BYTES", "GZIP_LEVEL", "block_chunk_rows", "feature_chunk_rows", "feature_dataset_options"]

#: gzip level of the feature datasets: fast, and deterministic (LZF is not: h5py's LZF
#: filter leaves its hash table uninitialised, so equal data can compress to other bytes).
GZIP_LEVEL = 1

#: Upper bound on the bytes of one feature chunk (before compression).
CHUNK_TARGET_BYTES = 4 * 1024 * 1024


def block_chunk_rows(dim: int, itemsize: int, block_rows: int) -> int:
    """Rows per chunk of a store with at least ``block_rows`` rows: ``block_rows``, lowered for wide layers.

    Parameters
    ----------
    dim : int
        Feature dimension D.
    itemsize : int
        Bytes per value (2 for float16).
    block_rows : int
        The writer's block size.

    Returns
    -------
    int
        ``min(block_rows, CHUNK_TARGET_BYTES // (dim * itemsize))``, >= 1.
    """
    by_bytes = max(1, CHUNK_TARGET_BYTES // max(1, dim * itemsize))
    return max(1, min(block_rows, by_bytes))


def feature_chunk_rows(n_rows: int, dim: int, itemsize: int, block_rows: int) -> int:
    """Rows per chunk of a ``(n_rows, dim)`` feature dataset: :func:`block_chunk_rows`, at most ``n_rows``.

    Parameters
    ----------
    n_rows, dim : int
        Dataset shape; ``n_rows`` >= 1.
    itemsize : int
        Bytes per value (2 for float16).
    block_rows : int
        The writer's block size.

    Returns
    -------
    int
        Chunk rows, >= 1.
    """
    return max(1, min(n_rows, block_chunk_rows(dim, itemsize, block_rows)))


def feature_dataset_options(compression: str | None) -> dict[str, Any]:
    """``create_dataset`` keywords of a feature dataset (filters, fill value, no timestamps).

    Parameters
    ----------
    compression : {"gzip", "lzf", None}
        gzip runs at :data:`GZIP_LEVEL`; any filter runs after byte shuffling.
    """
    return {
        "compression": compression,
        "compression_opts": GZIP_LEVEL if compression == "gzip" else None,
        "shuffle": compression is not None,
        "fillvalue": 0,
        "track_times": False,
    }
