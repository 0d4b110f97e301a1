"""Benchmark the weighted k-NN head against logistic regression on a real store; print markdown tables.

1. ``knn`` (its defaults: cosine, T = 0.07, k chosen on val from 1, 3, 5, 10, 20, 50) and
   ``logreg`` (params.yaml's section, one thread) on each ``--layers`` of ``--store``: fit and
   predict (``predict_proba`` of the test split) wall seconds, the best of ``--repeats`` runs,
   test accuracy and log loss, what each chose on val.
2. The saved rows' precision: the fitted k-NN head's training rows rounded to float16 (half
   the ``arrays.npz``) against the float32 it keeps: test predictions changed, largest
   probability difference, and the file sizes.

Usage::

    python benchmarks/bench_knn.py                  # features/digits/efficientnet_lite0.h5, pool and block6
    python benchmarks/bench_knn.py --store /work/main/features/digits/efficientnet_lite0.h5 --layers block6
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
import yaml
from threadpoolctl import threadpool_limits

from featcache.heads import make_head, save_head
from featcache.heads.metrics import metric_value
from featcache.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("logreg", "knn")


def head_params(params_path: Path, name: str) -> dict:
    """params.yaml's ``heads.<name>`` (empty for knn, which is not in it), one thread."""
    section = dict((yaml.safe_load(params_path.read_text()).get("heads") or {}).get(name) or {})
    return {**section, "n_jobs": 1} if name == "logreg" else section


def run_head(name: str, params: dict, data: dict, n_classes: int, repeats: int) -> dict:
    """Best-of-``repeats`` fit and predict seconds of one head, with its test scores."""
    fits, predicts = [], []
    for _ in range(repeats):
        head = make_head(name, "classification", {**params, "n_classes": n_classes})
        start = time.perf_counter()
        head.fit(*data["train"], *data["val"])
        fits.append(time.perf_counter() - start)
        start = time.perf_counter()
        proba = head.predict_proba(data["test"][0])
        predicts.append(time.perf_counter() - start)
    y_test = data["test"][1]
    return {"head": head, "proba": proba, "fit_s": min(fits), "predict_s": min(predicts),
            "accuracy": metric_value("classification", "accuracy", y_test, proba, n_classes),
            "log_loss": metric_value("classification", "log_loss", y_test, proba, n_classes),
            "chosen": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in head.best_params_.items())}


def float16_effect(head, proba: np.ndarray, X_test: np.ndarray) -> dict:
    """What rounding the saved training rows to float16 would change, and the two file sizes."""
    with tempfile.TemporaryDirectory() as tmp:
        size32 = (save_head(head, Path(tmp) / "f32") / "arrays.npz").stat().st_size
        kept = head.train_rows_
        try:
            head.train_rows_ = kept.astype(np.float16)
            size16 = (save_head(head, Path(tmp) / "f16") / "arrays.npz").stat().st_size
            head.train_rows_ = head.train_rows_.astype(np.float32)
            rounded = head.predict_proba(X_test)
        finally:
            head.train_rows_ = kept
    return {"changed": int(np.sum(rounded.argmax(axis=1) != proba.argmax(axis=1))),
            "max_diff": float(np.abs(rounded - proba).max()), "size32": size32, "size16": size16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="features/digits/efficientnet_lite0.h5")
    parser.add_argument("--layers", nargs="+", default=["pool", "block6"])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, {args.threads} BLAS thread(s), best of {args.repeats}\n")
    table, precision = [], []
    for layer in args.layers:
        with FeatureStore(args.store) as store:
            data = {split: (store.read(layer, split), store.labels(split)) for split in ("train", "val", "test")}
        n_classes = int(max(y.max() for _, y in data.values())) + 1
        with threadpool_limits(limits=args.threads):
            for name in HEADS:
                result = run_head(name, head_params(Path(args.params), name), data, n_classes, args.repeats)
                table.append((layer, data, name, result))
                if name == "knn":
                    precision.append((layer, float16_effect(result["head"], result["proba"], data["test"][0])))
    sizes = {layer: "/".join(str(len(d[s][1])) for s in ("train", "val", "test")) for layer, d, _, _ in table}
    print("| layer (dim) | head | fit s | predict s | test accuracy | test log loss | chosen on val |")
    print("|---|---|---:|---:|---:|---:|---|")
    for layer, data, name, r in table:
        print(f"| {layer} ({data['train'][0].shape[1]}) | {name} | {r['fit_s']:.3f} | {r['predict_s']:.3f} | "
              f"{r['accuracy']:.4f} | {r['log_loss']:.4f} | {r['chosen']} |")
    print(f"\nrows train/val/test: {sizes}\n")
    print("| layer | float16 rows: test predictions changed | max abs proba diff | arrays.npz float32 -> float16 |")
    print("|---|---:|---:|---|")
    for layer, e in precision:
        print(f"| {layer} | {e['changed']} | {e['max_diff']:.2e} | {e['size32'] / 2**20:.2f} MiB -> "
              f"{e['size16'] / 2**20:.2f} MiB |")


if __name__ == "__main__":
    sys.exit(main())
