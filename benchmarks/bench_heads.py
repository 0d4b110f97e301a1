"""Benchmark the heads on synthetic CNN-like features; print markdown tables.

1. The three in-memory heads with their defaults (logreg with its C search, LightGBM
   with early stopping, MLP) on ``--rows`` x ``--dim`` float16 features, 10 classes,
   70/15/15 train/val/test, ``--threads`` threads: fit and predict wall seconds, CPU
   seconds of the process (less sensitive to other load on a shared machine), test
   accuracy, chosen hyper-parameters, total fit seconds (target: < 60 s on 2 cores).
2. Out-of-core peak RSS: :class:`~featcache.heads.StreamingLogisticHead` fitted on N
   and 4N rows of a real HDF5 store (``--rss-rows`` N x ``--rss-dim``) read through
   dask, each in a fresh process (``ru_maxrss``), plus the in-memory contrast.

Classes are Gaussian blobs whose means lie in a random 64-dimensional subspace of the
features, with unit noise in every dimension (``--sep`` scales the means): learnable
but not trivial. Timings depend on the machine's load, printed with the results.

Usage::

    python benchmarks/bench_heads.py              # 20,000 x 2,048, N = 10,000 for RSS
    python benchmarks/bench_heads.py --quick      # 4,000 x 256, N = 5,000
    python benchmarks/bench_heads.py --rows 50000 --dim 1024 --skip-rss
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# OpenMP threads that spin-wait on descheduled peers make LightGBM with 2 threads many
# times slower on a CPU shared with other jobs; sleep instead (override by setting it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/_support: the synthetic store writer shared with the tests

from threadpoolctl import threadpool_limits  # noqa: E402

from _support.blob_store import peak_rss, write_store  # noqa: E402
from featcache.heads import fit_and_evaluate, make_head  # noqa: E402

HEADS = ("logreg", "lightgbm", "mlp")


def make_features(rows: int, dim: int, n_classes: int, sep: float, seed: int) -> dict[str, np.ndarray]:
    """Float16-rounded blobs (as a store would hold them), split 70/15/15; float32 out."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, min(64, dim))))
    means = (sep * rng.standard_normal((n_classes, basis.shape[1]))) @ basis.T
    y = rng.permutation(np.arange(rows) % n_classes)
    X = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 4096):  # float16 storage precision, generated in blocks
        stop = min(rows, start + 4096)
        block = means[y[start:stop]] + rng.standard_normal((stop - start, dim))
        X[start:stop] = block.astype(np.float16)
    a, b = int(0.7 * rows), int(0.85 * rows)
    return {"X_train": X[:a], "y_train": y[:a], "X_val": X[a:b], "y_val": y[a:b], "X_test": X[b:], "y_test": y[b:]}


def _params(name: str, threads: int) -> dict[str, int]:
    return {"n_jobs": threads} if name in ("logreg", "lightgbm") else {"n_threads": threads}


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def bench_heads(data: dict[str, np.ndarray], threads: int, n_classes: int) -> list[dict]:
    rows = []
    for name in HEADS:
        head = make_head(name, "classification", _params(name, threads))
        cpu = time.process_time()
        with threadpool_limits(limits=threads):
            result = fit_and_evaluate(head, "classification", data["X_train"], data["y_train"], data["X_val"],
                                      data["y_val"], data["X_test"], data["y_test"], n_classes=n_classes, n_boot=0)
        m = result.metrics
        rows.append({"head": name, "fit": m["fit_seconds"], "predict": m["predict_seconds"], "acc": m["accuracy"],
                     "cpu": time.process_time() - cpu, "params": _fmt_params(result.best_params)})
        print(f"  {name}: fit {m['fit_seconds']:.1f}s, acc {m['accuracy']:.4f}", file=sys.stderr, flush=True)
    return rows


def bench_rss(n: int, dim: int, workdir: Path) -> list[dict]:
    n_val = 2000
    start = time.perf_counter()
    path = write_store(workdir / "rss.h5", n=4 * n + n_val, dim=dim, n_classes=5, block_rows=1024, sep=0.5)
    print(f"  store {4 * n + n_val} x {dim} written in {time.perf_counter() - start:.1f}s "
          f"({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr, flush=True)
    rows = []
    for mode, n_rows in (("stream", n), ("stream", 4 * n), ("memory", n), ("memory", 4 * n)):
        rss, seconds, acc = peak_rss(path, n_rows, n_val, mode)
        rows.append({"rows": n_rows, "mode": mode, "rss": rss / 1024, "fit": seconds, "acc": acc,
                     "data": n_rows * dim * 4 / 2**20})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows in total (70/15/15 split)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--sep", type=float, default=0.4, help="scale of the class means (0.4: logreg ~0.9)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-rows", type=int, default=10_000, help="N of the peak-RSS runs (N and 4N)")
    parser.add_argument("--rss-dim", type=int, default=512)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--quick", action="store_true", help="4,000 x 256 and N = 5,000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.rss_rows = 4000, 256, 5000

    load_before = os.getloadavg()
    print(f"# bench_heads: {args.rows} x {args.dim} float16, {args.classes} classes, {args.threads} threads")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"load average at start: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}\n")
    data = make_features(args.rows, args.dim, args.classes, args.sep, args.seed)
    rows = bench_heads(data, args.threads, args.classes)
    n = {k: data[f"y_{k}"].size for k in ("train", "val", "test")}
    print(f"## In-memory heads (train/val/test = {n['train']}/{n['val']}/{n['test']})\n")
    print("| head | fit s | predict s | CPU s (fit+predict) | test accuracy | chosen params |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['head']} | {r['fit']:.1f} | {r['predict']:.2f} | {r['cpu']:.1f} | {r['acc']:.4f} "
              f"| {r['params']} |")
    print(f"| **total** | **{sum(r['fit'] for r in rows):.1f}** | {sum(r['predict'] for r in rows):.2f} | "
          f"{sum(r['cpu'] for r in rows):.1f} | | |\n")

    if not args.skip_rss:
        with tempfile.TemporaryDirectory() as tmp:
            rss_rows = bench_rss(args.rss_rows, args.rss_dim, Path(tmp))
        print(f"## Out-of-core peak RSS (StreamingLogisticHead, {args.rss_dim} dims, 1024-row chunks, "
              "fresh process each)\n")
        print("| train rows | mode | train features (float32) MiB | peak RSS MiB | fit s | val accuracy |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in rss_rows:
            print(f"| {r['rows']} | {r['mode']} | {r['data']:.0f} | {r['rss']:.0f} | {r['fit']:.1f} | {r['acc']:.4f} |")
        stream = [r["rss"] for r in rss_rows if r["mode"] == "stream"]
        memory = [r["rss"] for r in rss_rows if r["mode"] == "memory"]
        print(f"\npeak RSS 4N / N: stream {stream[1] / stream[0]:.3f}, in memory {memory[1] / memory[0]:.3f}\n")
    load_after = os.getloadavg()
    print(f"load average at end: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")


if __name__ == "__main__":
    main()
