"""The MLP heads against ridge / logistic regression on small training sets: epoch counting rules.

A new-user audit fitted the heads on 53 training rows of cached EfficientNet-Lite0 features (a regression
target) and got MLP test RMSE 25.9 against ridge 6.8 (the scaler: benchmarks/README.md). Below ``batch_size``
(256) training rows an epoch is one optimiser step, so a patience and an epoch budget counted in epochs
(params.yaml: patience 10, at most 100 epochs, tuned where an epoch is 5 steps) stop the network after a
handful of updates. Each row fits, on the same rows with the same seeds:

- ``ridge`` / ``logreg``: ``make_head("logreg", task, ...)`` (params.yaml's ``heads.logreg``);
- ``epochs``: the MLP with params.yaml's settings ((512,), dropout 0.2, lr 1e-3, batch 256, at most 100
  epochs, patience 10) counting plain epochs (``min_epoch_steps=1``: the loop before 2026-12-06);
- ``shipped``: the same, as it ships: ``patience`` and ``max_epochs`` count epochs of at least
  ``min_epoch_steps=4`` optimiser steps (x4 at one step an epoch, x2 at two; unchanged from 769 rows);
- ``batch4``: ``epochs`` with a smaller batch on small data instead, ``min(256, max(16, n // 4))`` (about
  four steps an epoch), for comparison.

Regression data: scikit-learn's bundled diabetes data (442 rows, offline), ``make_friedman1`` (10 features,
nonlinear), ``make_regression`` (100 features, 10 informative, linear: ridge's home ground) and
CNN-feature-like data (non-negative, sparse ReLU features of a 16-d latent, 192 or 1,280 dims; target 15 + a
nonlinear function of the latent); validation rows are a third of the training rows (at least 10), test rows
1,000 (diabetes: the rest). Classification data (``--task classification``): scikit-learn's 8x8 digits
(``digits64``, 64 pixel features; 500 test and 330 val rows held out per seed) and a digits feature store's
layers (``--store``, default the pipeline's ``features/digits/efficientnet_lite0.h5``: its own test rows);
stratified subsets of the train rows (``--n-train``, 0 or more than there are: all), val rows a third of them
(at least 20; all of them with all train rows). Scores: test RMSE, or test log loss and accuracy; MLP /
baseline is the geometric mean of the per-seed ratios.

    python benchmarks/bench_mlp_small.py --seeds 0 1 2 3 4
    python benchmarks/bench_mlp_small.py --task classification --n-train 50 100 200 500 0
    python benchmarks/bench_mlp_small.py --store features/sizes/efficientnet_lite0.h5 --n-train
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits, make_friedman1, make_regression
from sklearn.model_selection import train_test_split

from featcache.heads import make_head
from featcache.heads.metrics import log_loss_score
from featcache.heads.training import iter_batches

SHIPPED = {"hidden_sizes": [512], "dropout": 0.2, "lr": 1e-3, "max_epochs": 100, "patience": 10, "n_threads": 1}
"""params.yaml's ``heads.mlp`` (batch_size and min_epoch_steps are the head's defaults); one thread."""

LOGREG = {"refine": True, "max_iter": 1000}
"""params.yaml's ``heads.logreg`` (ridge takes neither: it runs its defaults)."""

VARIANTS = ("epochs", "shipped", "batch4")
REG_DATASETS = ("diabetes", "friedman1", "linear100", "cnnlike192", "cnnlike1280")
Split6 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def steps_per_epoch(n_fit: int, batch_size: int = 256) -> int:
    """Optimiser steps in one epoch of ``n_fit`` rows (the heads drop a last batch of one row)."""
    return len(iter_batches(n_fit, batch_size, torch.Generator().manual_seed(0)))


def variant_params(variant: str, n_fit: int) -> dict:
    """MLP constructor parameters of ``variant`` for ``n_fit`` training rows."""
    params = dict(SHIPPED)
    if variant in ("epochs", "batch4"):
        params["min_epoch_steps"] = 1
    if variant == "batch4":
        params["batch_size"] = min(256, max(16, n_fit // 4))
    return params


def cnn_like(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative sparse features (n, dim): ReLU of a random map of a 16-d latent; target (n,) around 15."""
    rng = np.random.default_rng(1000 + seed)
    z = rng.normal(size=(n, 16))
    weights = rng.normal(size=(16, dim)) / 4
    bias = rng.normal(-1.0, 0.7, size=dim)
    X = np.maximum(z @ weights + bias, 0) * rng.gamma(2, 1, size=dim)
    y = 15 + 4 * z[:, 0] + 3 * np.tanh(z[:, 1]) * z[:, 2] + 2 * z[:, 3] ** 2 + rng.normal(0, 1.0, n)
    return X.astype(np.float32), y


def make_data(name: str, n_train: int, seed: int, n_test: int = 1000) -> Split6 | None:
    """(X_train, y_train, X_val, y_val, X_test, y_test) of a regression set, or None when it has too few rows."""
    n_val = max(n_train // 3, 10)
    n = n_train + n_val + n_test
    if name == "diabetes":
        X, y = load_diabetes(return_X_y=True)
        if n_train + n_val + 50 > len(y):
            return None
        order = np.random.default_rng(seed).permutation(len(y))
        X, y = X[order], y[order]
    elif name == "friedman1":
        X, y = make_friedman1(n, n_features=10, noise=1.0, random_state=seed)
    elif name == "linear100":
        X, y = make_regression(n, n_features=100, n_informative=10, noise=10.0, random_state=seed)
    else:
        X, y = cnn_like(n, int(name.removeprefix("cnnlike")), seed)
    a, b = n_train, n_train + n_val
    return X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:]


def store_parts(path: str, layer: str, column: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """A featcache store's ``layer`` features and ``column`` (label or target): [train, val, test]."""
    import h5py

    from featcache.store.schema import SPLIT_CODES

    with h5py.File(path, "r") as f:
        split, y = f["split"][:], f[column][:]
        X = f["features"][layer][:].astype(np.float32)
    return [(X[split == SPLIT_CODES[s]], y[split == SPLIT_CODES[s]]) for s in ("train", "val", "test")]


def digits64(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits: [train (967), val (330), test (500)], stratified, per seed."""
    X, y = load_digits(return_X_y=True)
    Xa, Xt, ya, yt = train_test_split(X, y, test_size=500, stratify=y, random_state=seed)
    Xa, Xv, ya, yv = train_test_split(Xa, ya, test_size=330, stratify=ya, random_state=seed)
    return [(Xa, ya), (Xv, yv), (Xt, yt)]


def subset(X: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified subset of ``n`` rows (all rows when ``n`` is 0 or not fewer)."""
    if n <= 0 or n >= len(y):
        return X, y
    rows, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return X[rows], y[rows]


def score(head, task: str, X: np.ndarray, y: np.ndarray) -> dict:
    """Test RMSE, or test log loss and accuracy."""
    if task == "regression":
        return {"score": float(np.sqrt(np.mean((head.predict(X) - y) ** 2)))}
    return {"score": log_loss_score(y, head.predict_proba(X)), "acc": float(np.mean(head.predict(X) == y))}


def cell(rows: list[dict], key: str) -> str:
    """Mean test score of ``key`` over the seeds' ``rows`` (and mean accuracy, in brackets)."""
    text = f"{np.mean([r[key]['score'] for r in rows]):.3f}"
    return text + (f" ({np.mean([r[key]['acc'] for r in rows]):.3f})" if "acc" in rows[0][key] else "")


def cases(args: argparse.Namespace) -> Iterator[tuple[str, int, Split6]]:
    """(dataset, seed, data) for every requested case."""
    if args.task == "regression":
        for n_train in args.n_train:
            for name in args.datasets:
                for seed in args.seeds:
                    data = make_data(name, n_train, seed)
                    if data is not None:
                        yield name, seed, data
        if args.store:
            for layer in args.layers:
                (Xa, ya), (Xv, yv), (Xt, yt) = store_parts(args.store, layer, "target")
                for seed in args.seeds:  # one split: the seeds vary the MLP only
                    yield f"store:{layer}", seed, (Xa, ya, Xv, yv, Xt, yt)
        return
    stores = {layer: store_parts(args.store, layer, "label") for layer in args.layers} if args.store else {}
    for n_train in args.n_train:
        for name in ("digits64", *stores):
            for seed in args.seeds:
                (Xa, ya), (Xv, yv), (Xt, yt) = stores[name] if name in stores else digits64(seed)
                all_rows = n_train <= 0 or n_train >= len(ya)
                Xa, ya = subset(Xa, ya, n_train, seed)
                Xv, yv = (Xv, yv) if all_rows else subset(Xv, yv, max(len(ya) // 3, 20), seed)
                yield name if name == "digits64" else f"store:{name}", seed, (Xa, ya, Xv, yv, Xt, yt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("regression", "classification"), default="regression")
    parser.add_argument("--n-train", type=int, nargs="*", default=[50, 100, 200, 500])
    parser.add_argument("--datasets", nargs="*", default=list(REG_DATASETS), choices=REG_DATASETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--store", help="a featcache store (regression: with a target; classification: labels)")
    parser.add_argument("--layers", nargs="+", default=["pool", "block6"])
    args = parser.parse_args()
    if args.task == "classification" and args.store is None:
        args.store = "features/digits/efficientnet_lite0.h5"
    warnings.filterwarnings("ignore", module="sklearn")  # ridge's ill-conditioned-matrix warnings on tiny data
    torch.set_num_threads(1)
    base = "ridge" if args.task == "regression" else "logreg"
    results: dict[tuple[str, int], list[dict]] = {}
    start = time.perf_counter()
    for name, seed, data in cases(args):
        Xa, ya, Xv, yv, Xt, yt = data
        baseline = make_head("logreg", args.task, LOGREG if args.task == "classification" else {})
        row = {base: score(baseline.fit(Xa, ya, Xv, yv), args.task, Xt, yt)}
        for variant in VARIANTS:
            head = make_head("mlp", args.task, {**variant_params(variant, len(ya)), "random_state": seed})
            row[variant] = score(head.fit(Xa, ya, Xv, yv), args.task, Xt, yt)
            row[variant]["epochs"] = f"{head.best_epoch_}/{len(head.history_)}"
        results.setdefault((name, len(ya)), []).append(row)
        print(f"# {name} n={len(ya)} seed={seed} {row}", flush=True)
    what = "RMSE" if args.task == "regression" else "log loss (accuracy)"
    print(f"\n{time.perf_counter() - start:.0f} s; test {what}, mean over seeds {args.seeds}; MLP / {base}: "
          "geometric mean of the per-seed ratios; best/run epochs of seed 0\n")
    print(f"| data | n train | steps/epoch | {base} | " + " | ".join(f"MLP {v}" for v in VARIANTS) + " | "
          + " | ".join(f"{v} / {base}" for v in VARIANTS) + " | epochs: best/run | shipped: best/run |")
    print("|---|---:|---:|" + "---:|" * (1 + 2 * len(VARIANTS)) + "---|---|")
    for (name, n_train), rows in results.items():
        ratio = {v: np.exp(np.mean([np.log(r[v]["score"] / r[base]["score"]) for r in rows])) for v in VARIANTS}
        print(f"| {name} | {n_train} | {steps_per_epoch(n_train)} | {cell(rows, base)} | "
              + " | ".join(cell(rows, v) for v in VARIANTS) + " | " + " | ".join(f"{ratio[v]:.3f}" for v in VARIANTS)
              + f" | {rows[0]['epochs']['epochs']} | {rows[0]['shipped']['epochs']} |")


if __name__ == "__main__":
    main()
