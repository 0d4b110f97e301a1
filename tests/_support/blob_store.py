"""Write small synthetic HDF5 feature stores for the out-of-core heads tests and benchmark.

Classes are Gaussian blobs: class means drawn in a random ``subspace``-dimensional
subspace of the D features, unit noise everywhere. Rows are generated block by block
(seeded per block), so a store larger than memory could be written the same way.
Split by row index: ``row % 10`` in 0-5 train, 6-7 val, 8-9 test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.store import LayerSpec, StoreWriter
from featcache.store.schema import SPLIT_CODES, canonical_json, sha256_text

__all__ = ["LAYER", "make_blobs", "peak_rss", "split_codes", "write_store"]

LAYER = "pool"


def split_codes(n: int) -> np.ndarray:
    """Split code per row: 60 % train, 20 % val, 20 % test, interleaved."""
    r = np.arange(n) % 10
    out = np.full(n, SPLIT_CODES["train"], dtype=np.uint8)
    out[(r >= 6) & (r < 8)] = SPLIT_CODES["val"]
    out[r >= 8] = SPLIT_CODES["test"]
    return out


def _geometry(dim: int, n_classes: int, subspace: int, sep: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    basis, _ = np.linalg.qr(rng.standard_normal((dim, min(subspace, dim))))
    return sep * rng.standard_normal((n_classes, basis.shape[1])) @ basis.T  # (K, D) means


def make_blobs(rows: np.ndarray, labels: np.ndarray, means: np.ndarray, seed: int, block: int) -> np.ndarray:
    """Features (len(rows), D) of one block: class mean + unit Gaussian noise."""
    rng = np.random.default_rng([seed, 1, block])
    return means[labels[rows]] + rng.standard_normal((rows.size, means.shape[1]))


def write_store(
    path: Path, n: int = 2000, dim: int = 64, n_classes: int = 5, block_rows: int = 256,
    subspace: int = 16, sep: float = 1.0, seed: int = 0, dtype: str = "float16",
) -> Path:
    """Write an ``n`` x ``dim`` store with layer ``"pool"``; return its path.

    Labels are ``row % n_classes`` shuffled with ``seed``.
    """
    labels = np.random.default_rng([seed, 2]).permutation(np.arange(n) % n_classes).astype(np.int64)
    means = _geometry(dim, n_classes, subspace, sep, seed)
    config = canonical_json({"synthetic": {"n": n, "dim": dim, "k": n_classes, "sep": sep, "seed": seed}})
    layer = LayerSpec(alias=LAYER, node="synthetic", dim=dim, pooling="none", map_shape=(dim,), post_relu=False)
    with StoreWriter(
        path, ids=[f"r{i:07d}" for i in range(n)], splits=split_codes(n),
        classes=[f"c{k}" for k in range(n_classes)], labels=labels, targets=None, layers=[layer],
        attrs={"config": config, "config_sha256": sha256_text(config), "backbone": "synthetic",
               "weights_id": "none", "featcache_version": "0.1.0"},
        dtype=dtype, block_rows=block_rows, compression="lzf",
    ) as writer:
        for b in writer.pending_blocks():
            rows = np.asarray(writer.block_range(b), dtype=np.int64)
            writer.commit_block(b, rows, {LAYER: make_blobs(rows, labels, means, seed, b)})
        return writer.finalize()


# ----------------------------------------------------------------------------- peak RSS
RSS_CHILD = r"""
import resource, sys, time
import numpy as np
from featcache.store import FeatureStore
from featcache.heads.out_of_core import StreamingLogisticHead

path, n_rows, n_val, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
with FeatureStore(path) as fs:
    X = fs.to_dask("pool", None, rows_per_chunk=1024)
    y = fs.labels(None)
X_val, y_val = X[-n_val:], y[-n_val:]
X_tr, y_tr = X[:n_rows], y[:n_rows]
if mode == "memory":  # contrast: the whole training matrix in memory
    X_tr, X_val = X_tr.compute(), X_val.compute()
head = StreamingLogisticHead(alphas=[1e-4], max_epochs=1).fit(X_tr, y_tr, X_val, y_val)
acc = float(np.mean(head.predict(X_val) == y_val))
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm[0] if hwm else -1, time.perf_counter() - start, acc)
"""


def peak_rss(path: Path, n_rows: int, n_val: int, mode: str = "stream") -> tuple[int, float, float]:
    """Peak RSS (KiB), seconds and val accuracy of fitting StreamingLogisticHead in a fresh process.

    The first ``n_rows`` rows of ``path`` are the training rows and the last ``n_val``
    rows the validation rows (streamed in 1024-row chunks). ``mode="memory"``
    computes both into numpy first (the contrast that should grow with ``n_rows``).

    The child is a grandchild forked by ``/bin/sh``: Linux carries the pre-``execve``
    high-water mark into ``ru_maxrss``, so a child exec'ed straight from a large
    process (pytest with torch loaded) would report the parent's peak instead of its
    own. The child's ``VmHWM`` (per address space) must agree within 5 %.
    """
    import os
    import subprocess
    import sys

    import featcache

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(featcache.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", RSS_CHILD, str(path), str(n_rows),
         str(n_val), mode],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )
    rss, hwm, seconds, acc = out.stdout.split()[-4:]
    if int(hwm) > 0 and abs(int(rss) - int(hwm)) > 0.05 * int(hwm):
        raise AssertionError(f"ru_maxrss {rss} KiB disagrees with VmHWM {hwm} KiB: inherited high-water mark?")
    return int(rss), float(seconds), float(acc)
