"""Deterministic assembly of the final HDF5 store from committed blocks.

Everything that reaches the file is a pure function of the inputs, and every
HDF5 call happens in a fixed order, so equal inputs give equal bytes:

* fixed format bounds (:data:`~featcache.store.schema.HDF5_LIBVER`);
* no timestamps: ``track_times=False`` on datasets and groups;
* no creation-order indexes (``track_order`` off), attributes written sorted;
* fixed chunk shapes, computed from the shapes only (:func:`feature_chunk_rows`);
* feature rows are buffered and each chunk is written exactly once, in order.

No feature is compressed twice: a block file stores its features with the
store's own chunk shape and filters (:mod:`featcache.store.layout`), so every
final chunk that is one whole chunk of a block file (all of them when no row
before it was skipped) is copied as its compressed bytes (``read_direct_chunk``
/ ``write_direct_chunk``, the same allocation order and so the same bytes as
writing it); the others (behind a skipped row the chunk grid shifts) are
decompressed, regrouped and compressed here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import h5py
import numpy as np

from .errors import StoreError
from .layout import CHUNK_TARGET_BYTES, feature_chunk_rows, feature_dataset_options
from .schema import HDF5_LIBVER, SPLIT_CODES

__all__ = ["CHUNK_TARGET_BYTES", "feature_chunk_rows", "to_attr", "write_store"]

logger = logging.getLogger(__name__)

_STR = h5py.string_dtype("utf-8")
_ERRORS_DTYPE = np.dtype([("id", _STR), ("reason", _STR)])
_SPLIT_DTYPE = h5py.enum_dtype(dict(SPLIT_CODES), basetype="u1")


def to_attr(key: str, value: Any) -> Any:
    """Convert a Python value to something h5py stores portably as an attribute.

    Parameters
    ----------
    key : str
        Attribute name, for the error message.
    value : str, bool, int, float, numpy scalar or array, or a list of those

    Returns
    -------
    object
        ``str`` (stored as variable-length UTF-8), numpy scalar or array.

    Raises
    ------
    StoreError
        For None, mappings, object arrays and other unsupported values.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, np.integer)):
        return np.int64(value)
    if isinstance(value, (float, np.floating)):
        return np.float64(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and value:
        return np.array(list(value), dtype=_STR)
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf" and arr.ndim >= 1:
            return arr
    raise StoreError(
        f"attribute {key!r} has unsupported value {value!r} ({type(value).__name__}); "
        "allowed: str, bool, int, float, or a non-empty list of numbers or of str. "
        "Hint: JSON-encode structured values (see schema.canonical_json) or omit the key."
    )


def _write_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key in sorted(attrs):
        obj.attrs[key] = to_attr(key, attrs[key])


def _create_group(parent: h5py.Group, name: str) -> h5py.Group:
    """Create a group without timestamps or creation-order index (any h5py version)."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    h5py.h5g.create(parent.id, name.encode("utf-8"), gcpl=gcpl)
    return parent[name]


def _raw_copyable(src: Any, ds: h5py.Dataset, start: int, rows_left: int) -> bool:
    """Whether rows ``[start, start + C)`` of block dataset ``src`` are one stored chunk equal to the next of ``ds``."""
    if not isinstance(src, h5py.Dataset) or src.chunks != ds.chunks or src.dtype != ds.dtype:
        return False
    if (src.compression, src.compression_opts, src.shuffle) != (ds.compression, ds.compression_opts, ds.shuffle):
        return False
    chunk = ds.chunks[0]
    return start % chunk == 0 and min(chunk, src.shape[0] - start) == min(chunk, rows_left)


def _write_features(ds: h5py.Dataset, chunk_rows: int, sources: Iterable[Any], raw_chunks: bool = True
                    ) -> tuple[int, int]:
    """Stream ``(m, D)`` sources (arrays or block datasets) into ``ds``, writing each whole chunk once, in order.

    Returns
    -------
    (rows, raw) : tuple of int
        Rows written, and chunks copied as stored bytes.
    """
    n = ds.shape[0]
    buf = np.empty((chunk_rows, ds.shape[1]), dtype=ds.dtype)
    fill = pos = raw = 0
    for src in sources:
        taken = 0
        while taken < src.shape[0]:
            if raw_chunks and fill == 0 and _raw_copyable(src, ds, taken, n - pos):
                mask, data = src.id.read_direct_chunk((taken, 0))
                ds.id.write_direct_chunk((pos, 0), data, filter_mask=mask)
                step = min(chunk_rows, n - pos)
                pos, taken, raw = pos + step, taken + step, raw + 1
                continue
            take = min(chunk_rows - fill, src.shape[0] - taken)
            buf[fill : fill + take] = src[taken : taken + take]
            fill += take
            taken += take
            if fill == chunk_rows:
                ds[pos : pos + chunk_rows] = buf
                pos += chunk_rows
                fill = 0
    if fill:
        ds[pos : pos + fill] = buf[:fill]
        pos += fill
    return pos, raw


def write_store(
    path: Path,
    *,
    ids: Sequence[str],
    labels: np.ndarray,
    targets: np.ndarray,
    splits: np.ndarray,
    classes: Sequence[str],
    errors: Sequence[tuple[str, str]],
    layers: Sequence[Any],
    feature_sources: Callable[[int], Iterable[np.ndarray]],
    dtype: str,
    block_rows: int,
    compression: str | None,
    root_attrs: Mapping[str, Any],
    raw_chunks: bool = True,
) -> None:
    """Write a complete store to ``path`` (mode "w") and fsync it.

    Parameters
    ----------
    path : Path
        Target file, normally ``<output>.partial``; overwritten.
    ids : sequence of str, (n,)
        Kept ids in row order.
    labels : ndarray of int64, (n,)
    targets : ndarray of float64, (n,)
    splits : ndarray of uint8, (n,)
    classes : sequence of str, (K,)
    errors : sequence of (id, reason), (E,)
        Skipped inputs in row order.
    layers : sequence of LayerSpec
    feature_sources : callable
        ``feature_sources(i)`` yields the ``(m_b, D_i)`` features of layer ``i``
        block by block, as arrays or as block-file datasets (whose aligned
        chunks are copied raw); together they hold ``n`` rows.
    dtype : {"float16", "float32"}
    block_rows : int
    compression : {"lzf", "gzip", None}
    root_attrs : mapping
        Complete root attributes (caller's plus format, counts, complete).
    raw_chunks : bool
        Copy the aligned chunks of block datasets as stored bytes (default);
        False decompresses and compresses every chunk again (the same bytes,
        slower: for benchmarks and tests).
    """
    n = len(ids)
    np_dtype = np.dtype(dtype)
    plain = {"track_times": False}
    # No chunk cache: every chunk is written (allocated) when it is complete, in order, whether it was
    # compressed here or copied raw, so both give the same bytes (and no h5py cache default shapes the layout).
    with h5py.File(path, "w", libver=HDF5_LIBVER, track_order=False, rdcc_nbytes=0) as f:
        f.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=_STR, **plain)
        f.create_dataset("label", data=np.asarray(labels, dtype=np.int64), **plain)
        f.create_dataset("target", data=np.asarray(targets, dtype=np.float64), **plain)
        f.create_dataset(
            "split", data=np.asarray(splits, dtype=np.uint8), dtype=_SPLIT_DTYPE, **plain
        )
        f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=_STR, **plain)
        table = np.empty(len(errors), dtype=_ERRORS_DTYPE)
        for i, (eid, reason) in enumerate(errors):
            table[i] = (eid, reason)
        f.create_dataset("errors", data=table, **plain)

        group = _create_group(f, "features")
        group.attrs["layers"] = np.array([spec.alias for spec in layers], dtype=_STR)
        for i, spec in enumerate(layers):
            if n == 0:
                ds = group.create_dataset(spec.alias, shape=(0, spec.dim), dtype=np_dtype, **plain)
            else:
                rows = feature_chunk_rows(n, spec.dim, np_dtype.itemsize, block_rows)
                ds = group.create_dataset(spec.alias, shape=(n, spec.dim), dtype=np_dtype, chunks=(rows, spec.dim),
                                          **feature_dataset_options(compression))
                written, raw = _write_features(ds, rows, feature_sources(i), raw_chunks)
                logger.debug("layer %s: %d of %d chunks copied raw", spec.alias, raw, -(-n // rows))
                if written != n:
                    raise StoreError(
                        f"layer {spec.alias!r}: blocks hold {written} rows but {n} were "
                        "expected; the parts directory is inconsistent. Hint: delete "
                        f"{path.name.removesuffix('.partial')}.parts and rerun extraction."
                    )
            _write_attrs(
                ds,
                {
                    "dim": int(spec.dim),
                    "map_shape": np.asarray(spec.map_shape, dtype=np.int64),
                    "node": spec.node,
                    "pooling": spec.pooling,
                    "post_relu": bool(spec.post_relu),
                },
            )
        _write_attrs(f, root_attrs)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    logger.debug("assembled %s (%d rows, %d layers)", path, n, len(layers))
