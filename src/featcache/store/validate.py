"""Input checks of :class:`~featcache.store.writer.StoreWriter`.

Each check raises :class:`~featcache.store.errors.StoreError` naming the bad
value, what is allowed, and a hint, before any file is touched.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from .assemble import to_attr
from .errors import StoreError
from .schema import (
    COMPRESSIONS,
    DEFAULT_BLOCK_ROWS,
    FEATURE_DTYPES,
    POOLINGS,
    REQUIRED_ATTRS,
    RESERVED_ATTRS,
    SPLIT_CODES,
    LayerSpec,
    pooled_dim,
    sha256_text,
)

__all__ = [
    "check_attrs",
    "check_block_inputs",
    "check_ids",
    "check_layers",
    "check_options",
    "check_row_arrays",
    "format_blocks",
]

logger = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _few(values: Sequence[Any], k: int = 5) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:k])
    return f"[{shown}{', ...' if len(values) > k else ''}] ({len(values)} in all)"


def format_blocks(blocks: Sequence[int], limit: int = 20) -> str:
    """Compact list of block indices, e.g. ``"0-2, 5, 7-9"``."""
    spans: list[str] = []
    start = prev = None
    for b in list(blocks) + [None]:
        if start is not None and (b is None or b != prev + 1):
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if b is not None and start is None:
            start = b
        prev = b
    extra = f", ... ({len(spans) - limit} more ranges)" if len(spans) > limit else ""
    return ", ".join(spans[:limit]) + extra


def check_options(*, dtype: str, block_rows: int, compression: str | None) -> None:
    """Check the writer's storage options."""
    if str(dtype) not in FEATURE_DTYPES:
        raise StoreError(f"dtype {dtype!r} not allowed; allowed: {list(FEATURE_DTYPES)}")
    if not isinstance(block_rows, (int, np.integer)) or isinstance(block_rows, bool) or block_rows < 1:
        raise StoreError(f"block_rows must be an int >= 1, got {block_rows!r}; default {DEFAULT_BLOCK_ROWS}")
    if compression not in COMPRESSIONS:
        raise StoreError(f"compression {compression!r} not allowed; allowed: {list(COMPRESSIONS)}")


def check_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Check the caller's root attributes and return them as a plain dict."""
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(
            f"attrs lack {missing}; required: {list(REQUIRED_ATTRS)}. Hint: pass "
            "config=canonical_json(cfg) and config_sha256=sha256_text(config)."
        )
    reserved = sorted(k for k in attrs if k in RESERVED_ATTRS)
    if reserved:
        raise StoreError(
            f"attrs may not set {reserved}; the writer sets {list(RESERVED_ATTRS)} itself. "
            "Hint: drop these keys."
        )
    out = {str(k): v for k, v in attrs.items()}
    for key, value in out.items():
        to_attr(key, value)  # raises StoreError for unsupported values
    config, sha = out["config"], out["config_sha256"]
    if not isinstance(config, str) or not isinstance(sha, str):
        raise StoreError("attrs 'config' and 'config_sha256' must be str (JSON text, hex digest)")
    try:
        parsed = json.loads(config)
    except json.JSONDecodeError as exc:
        raise StoreError(f"attrs['config'] is not JSON ({exc}); hint: use canonical_json(cfg)") from None
    if not isinstance(parsed, dict):
        raise StoreError(f"attrs['config'] must be a JSON object, got {type(parsed).__name__}")
    if sha256_text(config) != sha:
        raise StoreError(
            f"config_sha256 {sha!r} is not the sha256 of attrs['config'] "
            f"({sha256_text(config)!r}). Hint: use schema.sha256_text(config)."
        )
    return out


def check_ids(ids: Sequence[str]) -> list[str]:
    """Return ids as a list after checking they are unique str."""
    out = list(ids)
    bad = [i for i in out if not isinstance(i, str) or not i]
    if bad:
        raise StoreError(f"ids must be non-empty str, got {_few(bad)}; hint: use manifest ids")
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = [i for i in out if i in seen or seen.add(i)]
        raise StoreError(f"ids must be unique, duplicates: {_few(dup)}; hint: dedupe the manifest")
    if any(a > b for a, b in zip(out, out[1:])):
        logger.warning("ids are not sorted; rows are stored in the given order")
    return out


def _row_array(name: str, value: Any, n: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise StoreError(f"{name} must have shape ({n},) like ids, got {arr.shape}")
    return arr


def check_row_arrays(
    ids: Sequence[str],
    splits: Any,
    labels: Any | None,
    targets: Any | None,
    classes: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check and convert the per-row arrays.

    Returns
    -------
    splits : ndarray of uint8, (N,)
    labels : ndarray of int64, (N,); -1 where unlabeled
    targets : ndarray of float64, (N,); NaN where absent
    """
    n = len(ids)
    if len(set(classes)) != len(classes):
        raise StoreError(f"classes must be unique, got {_few(list(classes))}")
    sp = _row_array("splits", splits, n)
    if sp.dtype.kind in "UO":
        unknown = sorted({str(s) for s in sp} - set(SPLIT_CODES))
        if unknown:
            raise StoreError(f"unknown split names {unknown}; allowed: {list(SPLIT_CODES)}")
        sp = np.array([SPLIT_CODES[str(s)] for s in sp], dtype=np.int64)
    if sp.dtype.kind not in "iu":
        raise StoreError(f"splits must be uint8 codes {SPLIT_CODES}, got dtype {sp.dtype}")
    bad = sorted(set(np.unique(sp).tolist()) - set(SPLIT_CODES.values()))
    if bad:
        raise StoreError(f"split codes {bad} not allowed; allowed: {SPLIT_CODES}")
    if labels is None:
        lab = np.full(n, -1, dtype=np.int64)
    else:
        lab = _row_array("labels", labels, n)
        if lab.dtype.kind not in "iu":
            raise StoreError(f"labels must be int64 class indices, got dtype {lab.dtype}")
        lab = lab.astype(np.int64)
        hi = len(classes) - 1
        bad = np.unique(lab[(lab < -1) | (lab > hi)]).tolist()
        if bad:
            raise StoreError(
                f"labels {bad[:5]} out of range; allowed -1 (none) to {hi} "
                f"({len(classes)} classes). Hint: pass the class names in index order."
            )
    if targets is None:
        tgt = np.full(n, np.nan, dtype=np.float64)
    else:
        tgt = _row_array("targets", targets, n)
        if tgt.dtype.kind not in "iuf":
            raise StoreError(f"targets must be float64, got dtype {tgt.dtype}")
        tgt = tgt.astype(np.float64)
    return sp.astype(np.uint8), lab, tgt


def check_layers(layers: Sequence[LayerSpec]) -> tuple[LayerSpec, ...]:
    """Check a sequence of LayerSpec and return it as a tuple."""
    layers = tuple(layers)
    if not layers:
        raise StoreError("layers is empty; give at least one LayerSpec")
    aliases = [getattr(s, "alias", None) for s in layers]
    if len(set(aliases)) != len(aliases):
        raise StoreError(f"layer aliases must be unique, got {aliases}")
    for spec in layers:
        alias = spec.alias
        if not isinstance(alias, str) or not alias or "/" in alias or alias in (".", ".."):
            raise StoreError(f"layer alias {alias!r} invalid; use a non-empty name without '/'")
        if not isinstance(spec.node, str) or not spec.node:
            raise StoreError(f"layer {alias!r}: node {spec.node!r} must be a non-empty str")
        if spec.pooling not in POOLINGS:
            raise StoreError(f"layer {alias!r}: pooling {spec.pooling!r} not in {list(POOLINGS)}")
        shape = tuple(spec.map_shape)
        if not shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
            raise StoreError(
                f"layer {alias!r}: map_shape {spec.map_shape!r} must be a non-empty tuple "
                "of positive ints, e.g. (1280, 7, 7) or (1280,)"
            )
        if not isinstance(spec.dim, (int, np.integer)) or spec.dim < 1:
            raise StoreError(f"layer {alias!r}: dim {spec.dim!r} must be an int >= 1")
        try:
            expected = pooled_dim(shape, spec.pooling)
        except ValueError as error:
            raise StoreError(f"layer {alias!r}: {error}") from None
        prefix = getattr(spec, "prefix_tokens", 0)
        if not isinstance(prefix, (int, np.integer)) or prefix < 0 or (prefix and (len(shape) != 2
                                                                                  or prefix >= shape[0])):
            raise StoreError(f"layer {alias!r}: prefix_tokens {prefix!r} must be 0, or for a token map (N, C) "
                             f"an int in 0..N-1 (map_shape {shape})")
        if spec.dim != expected:
            raise StoreError(
                f"layer {alias!r}: dim {spec.dim} does not match pooling {spec.pooling!r} of "
                f"map_shape {shape} (expected {expected}); hint: dim is the size after pooling"
            )
        if not isinstance(spec.post_relu, (bool, np.bool_)):
            raise StoreError(f"layer {alias!r}: post_relu {spec.post_relu!r} must be a bool")
    return layers


def check_block_inputs(
    block: int,
    rows: range,
    kept_rows: Any,
    features: Mapping[str, Any],
    errors: Sequence[tuple[str, str]],
    *,
    layers: Sequence[LayerSpec],
    ids: Sequence[str],
    row_of: Mapping[str, int],
    dtype: np.dtype,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """Check one block's inputs and normalise them to ascending row order.

    Returns
    -------
    kept : ndarray of int64, (M,)
        Kept rows, ascending.
    feats : list of ndarray, each (M, D_i), in ``dtype``
        Features in layer order, reordered like ``kept``.
    error_rows : ndarray of int64, (E,)
        Skipped rows, ascending.
    reasons : ndarray of str, (E,)
    """
    where = f"block {block} (rows {rows.start}..{rows.stop - 1})"
    kept = np.asarray(kept_rows)
    if kept.size == 0:
        kept = np.zeros(0, dtype=np.int64)
    if kept.ndim != 1 or kept.dtype.kind not in "iu":
        raise StoreError(f"{where}: kept_rows must be int64 (M,), got {kept.dtype} {kept.shape}")
    kept = kept.astype(np.int64)
    outside = kept[(kept < rows.start) | (kept >= rows.stop)]
    if outside.size:
        raise StoreError(
            f"{where}: kept_rows {_few(outside.tolist())} outside the block; "
            "hint: kept_rows are absolute row indices from writer.block_range(block)"
        )
    if np.unique(kept).size != kept.size:
        raise StoreError(f"{where}: kept_rows has duplicates")

    err_rows: list[int] = []
    reasons: list[str] = []
    for item in errors:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise StoreError(f"{where}: errors entry {item!r} must be an (id, reason) pair")
        eid, reason = item
        row = row_of.get(eid) if isinstance(eid, str) else None
        if row is None or row not in rows:
            raise StoreError(f"{where}: error id {eid!r} is not an id of this block")
        err_rows.append(row)
        reasons.append(str(reason))
    err = np.asarray(err_rows, dtype=np.int64)
    both = np.concatenate([kept, err])
    if np.unique(both).size != both.size:
        dup = sorted(set(kept.tolist()) & set(err_rows)) or sorted(
            r for r in set(err_rows) if err_rows.count(r) > 1
        )
        raise StoreError(f"{where}: ids both kept and skipped or skipped twice: "
                         f"{_few([ids[r] for r in dup])}")
    if both.size != len(rows):
        missing = sorted(set(rows) - set(both.tolist()))
        raise StoreError(
            f"{where} has {len(rows)} input rows but {kept.size} kept + {err.size} skipped = "
            f"{both.size}; unaccounted ids {_few([ids[r] for r in missing])}. Hint: list every "
            "row that failed in errors=[(id, reason)]"
        )

    expected = [s.alias for s in layers]
    missing_a = [a for a in expected if a not in features]
    extra_a = sorted(a for a in features if a not in expected)
    if missing_a or extra_a:
        raise StoreError(
            f"{where}: features for layers {list(features)}, expected {expected} "
            f"(missing {missing_a}, unknown {extra_a})"
        )
    order = np.argsort(kept, kind="stable")
    feats: list[np.ndarray] = []
    for spec in layers:
        arr = np.asarray(features[spec.alias])
        if arr.shape != (kept.size, spec.dim) or arr.dtype.kind not in "iuf":
            raise StoreError(
                f"{where}: features[{spec.alias!r}] is {arr.dtype} {arr.shape}, expected "
                f"float ({kept.size}, {spec.dim}) (one row per kept row, dim from LayerSpec)"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            cast = arr[order].astype(dtype)
        if cast.size and not np.isfinite(cast).all():
            bad_rows = kept[order][~np.isfinite(cast).all(axis=1)]
            overflow = bool(np.isfinite(arr).all()) and dtype == np.float16
            hint = (
                f"values exceed float16's max {_FLOAT16_MAX:g}; use dtype='float32'"
                if overflow
                else "the backbone produced NaN/inf; check the input preprocessing"
            )
            raise StoreError(
                f"{where}: features[{spec.alias!r}] not finite for ids "
                f"{_few([ids[r] for r in bad_rows])}; hint: {hint}"
            )
        feats.append(cast)
    err_order = np.argsort(err, kind="stable")
    reason_arr = np.array([reasons[i] for i in err_order], dtype=np.str_)
    if reason_arr.size == 0:
        reason_arr = np.zeros(0, dtype="<U1")
    return kept[order], feats, err[err_order], reason_arr
