"""Tiny synthetic store inputs shared by the store tests and their subprocesses.

Features are a pure function of the row index, so any subset of blocks can
be (re)committed in any process and the final bytes must not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from featcache.store import LayerSpec, StoreWriter
from featcache.store.schema import canonical_json, sha256_text

__all__ = ["N", "BLOCK_ROWS", "SKIP", "LAYERS", "CLASSES", "make_ids", "make_kwargs",
           "features_for", "commit", "write_all", "reason_for"]

N = 37
BLOCK_ROWS = 8
SKIP = frozenset({3, 20, 36})
CLASSES = ["cat", "dog", "eel"]
LAYERS = (
    LayerSpec(alias="pool", node="global_pool.flatten", dim=5, pooling="avg",
              map_shape=(5, 3, 3), post_relu=True),
    LayerSpec(alias="fc", node="classifier", dim=3, pooling="none", map_shape=(3,),
              post_relu=False),
)


def make_ids(n: int = N) -> list[str]:
    return [f"img/{i:04d}.png" for i in range(n)]


def make_config(**extract: Any) -> dict[str, Any]:
    base = {"backbone": "tiny", "extract": {"pooling": "avg", "size": 224, "layers": ["pool", "fc"]}}
    base["extract"].update(extract)
    return base


def make_kwargs(n: int = N, *, config: dict[str, Any] | None = None, dtype: str = "float16",
                regression: bool = False, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of StoreWriter (without path)."""
    cfg = canonical_json(config or make_config())
    rows = np.arange(n)
    kwargs: dict[str, Any] = dict(
        ids=make_ids(n),
        splits=(rows % 3).astype(np.uint8),
        classes=[] if regression else list(CLASSES),
        labels=None if regression else (rows % len(CLASSES)).astype(np.int64),
        targets=(rows * 0.5 - 1.0) if regression else None,
        layers=LAYERS,
        attrs={"config": cfg, "config_sha256": sha256_text(cfg), "backbone": "tiny",
               "weights_id": "random", "featcache_version": "0.1.0", "n_params": 1234,
               "ratio": 0.25, "channels_last": False},
        dtype=dtype,
        block_rows=BLOCK_ROWS,
        compression="gzip",
    )
    kwargs.update(overrides)
    return kwargs


def features_for(alias: str, rows: Iterable[int]) -> np.ndarray:
    """Deterministic (M, D) features of the given rows."""
    r = np.asarray(list(rows), dtype=np.float64)[:, None]
    if alias == "pool":
        return np.maximum(0.0, np.sin(r * 0.37 + np.arange(5)) * 20.0)
    return np.cos(r * 1.3 + np.arange(3)) * 3.0


def reason_for(id_: str) -> str:
    return f"cannot identify image file {id_!r}"


def commit(writer: StoreWriter, blocks: Iterable[int], skip: frozenset[int] = SKIP) -> None:
    """Commit the given blocks with rows in ``skip`` reported as errors."""
    for b in blocks:
        rows = writer.block_range(b)
        kept = [r for r in rows if r not in skip]
        errors = [(writer.ids[r], reason_for(writer.ids[r])) for r in rows if r in skip]
        feats = {s.alias: features_for(s.alias, kept) for s in LAYERS}
        writer.commit_block(b, np.asarray(kept, dtype=np.int64), feats, errors)


def write_all(path: Path, **kwargs: Any) -> Path:
    """One uninterrupted extraction to ``path``."""
    with StoreWriter(path, **make_kwargs(**kwargs)) as writer:
        commit(writer, writer.pending_blocks())
        return writer.finalize()
