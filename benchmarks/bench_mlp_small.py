"""The MLP regressor against ridge on small training sets, with the shipped settings and step-budget variants.

A new-user audit fitted the heads on 53 training rows of cached EfficientNet-Lite0 features (a regression
target) and got MLP test RMSE 25.9 against ridge 6.8. This benchmark asks whether the MLP head is defective on
small data or just has too little of it. Each row fits, on the same rows with the same seeds:

- ``ridge``: ``make_head("logreg", "regression")`` (alpha chosen on val);
- ``plain``: the MLP with scikit-learn's StandardScaler swapped back in (the scaler of the audit's run);
- ``shipped``: the MLP as it ships (``ClippedScaler``), params.yaml's settings: (512,), dropout 0.2, lr 1e-3,
  batch 256, at most 100 epochs, patience 10;
- ``pat50``: as shipped, but early stopping waits at least 50 optimiser steps after the best epoch (below
  256 training rows an epoch is a single step, so patience 10 is 10 steps; the digits pipeline's 1,078 rows
  make 5 steps an epoch, i.e. 50 steps, so this variant would leave it unchanged);
- ``steps300``: ``pat50`` plus a budget of at least 300 steps (``max_epochs`` raised to match).

Both variants are written as constructor parameters (``patience``, ``max_epochs``) for the fixed number of
steps an epoch makes, so the library runs unpatched. Datasets: scikit-learn's bundled diabetes data (442 rows,
offline), ``make_friedman1`` (10 features, nonlinear), ``make_regression`` (100 features, 10 informative,
linear: ridge's home ground) and CNN-feature-like data (non-negative, sparse ReLU features of a 16-d latent,
192 or 1,280 dims, many nearly dead channels; target 15 + a nonlinear function of the latent). Validation rows
are a third of the training rows (at least 10); test rows are 1,000 (diabetes: the rest). With ``--store``,
a featcache store with a regression ``target`` is scored too, on its own train/val/test split.

    python benchmarks/bench_mlp_small.py --seeds 0 1 2 3 4
    python benchmarks/bench_mlp_small.py --store features/sizes/efficientnet_lite0.h5 --n-train 0
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from sklearn.datasets import load_diabetes, make_friedman1, make_regression
from sklearn.preprocessing import StandardScaler

import featcache.heads.preprocessing as preprocessing
from featcache.heads import make_head
from featcache.heads.training import iter_batches

SHIPPED = {"hidden_sizes": [512], "dropout": 0.2, "lr": 1e-3, "max_epochs": 100, "patience": 10, "n_threads": 1}
"""params.yaml's ``heads.mlp`` (batch_size is the head's default, 256); one thread (shared CPUs)."""

CLIPPED = preprocessing.ClippedScaler
"""The shipped scaler class (``plain`` swaps StandardScaler in for one fit)."""

VARIANTS = ("plain", "shipped", "pat50", "steps300")
DATASETS = ("diabetes", "friedman1", "linear100", "cnnlike192", "cnnlike1280")
Split6 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def steps_per_epoch(n_fit: int, batch_size: int = 256) -> int:
    """Optimiser steps in one epoch of ``n_fit`` rows (the heads drop a last batch of one row)."""
    return len(iter_batches(n_fit, batch_size, torch.Generator().manual_seed(0)))


def variant_params(variant: str, n_fit: int) -> dict:
    """MLP constructor parameters of ``variant`` for ``n_fit`` training rows."""
    params = dict(SHIPPED)
    spe = steps_per_epoch(n_fit)
    if variant in ("pat50", "steps300"):
        params["patience"] = max(params["patience"], math.ceil(50 / spe))
    if variant == "steps300":
        params["max_epochs"] = max(params["max_epochs"], math.ceil(300 / spe))
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
    """(X_train, y_train, X_val, y_val, X_test, y_test) of ``name``, or None when it has too few rows."""
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


def store_data(path: str, layer: str) -> Split6:
    """A featcache store's ``layer`` features and regression ``target`` on its train/val/test split."""
    import h5py

    from featcache.store.schema import SPLIT_CODES

    with h5py.File(path, "r") as f:
        split, y = f["split"][:], f["target"][:].astype(np.float64)
        X = f["features"][layer][:].astype(np.float32)
    train, val, test = (split == SPLIT_CODES[s] for s in ("train", "val", "test"))
    return X[train], y[train], X[val], y[val], X[test], y[test]


def rmse(head, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((head.predict(X) - y) ** 2)))


def fit_mlp(variant: str, data: Split6, seed: int) -> tuple[float, str]:
    """Test RMSE and ``best/run`` epochs of one MLP fit."""
    Xa, ya, Xv, yv, Xt, yt = data
    params = {**variant_params(variant, len(ya)), "random_state": seed}
    preprocessing.ClippedScaler = StandardScaler if variant == "plain" else CLIPPED  # what fit_preprocess builds
    try:
        head = make_head("mlp", "regression", params).fit(Xa, ya, Xv, yv)
    finally:
        preprocessing.ClippedScaler = CLIPPED
    return rmse(head, Xt, yt), f"{head.best_epoch_}/{len(head.history_)}"



def cases(args: argparse.Namespace) -> Iterator[tuple[str, int, int, Split6]]:
    """(dataset, n_train, seed, data) for every requested case."""
    for n_train in args.n_train:
        for name in args.datasets:
            for seed in args.seeds:
                data = make_data(name, n_train, seed)
                if data is not None:
                    yield name, n_train, seed, data
    if args.store:
        for layer in args.layers:
            data = store_data(args.store, layer)
            for seed in args.seeds:  # one split: the seeds vary the MLP only
                yield f"store:{layer}", len(data[1]), seed, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, nargs="*", default=[50, 200, 1000])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--store", help="a featcache store with a regression target")
    parser.add_argument("--layers", nargs="+", default=["pool", "block6"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="sklearn")  # ridge's ill-conditioned-matrix warnings on tiny data
    results: dict[tuple[str, int], list[dict]] = {}
    start = time.perf_counter()
    for name, n_train, seed, data in cases(args):
        Xa, ya, Xv, yv, Xt, yt = data
        row = {"ridge": rmse(make_head("logreg", "regression", {}).fit(Xa, ya, Xv, yv), Xt, yt)}
        for variant in VARIANTS:
            row[variant], row[variant + "_epochs"] = fit_mlp(variant, data, seed)
        results.setdefault((name, n_train), []).append(row)
        print(f"# {name} n={n_train} seed={seed} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else
                                                                f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s; test RMSE, mean over seeds {args.seeds} "
          "(MLP / ridge: geometric mean of the per-seed ratios)\n")
    print("| data | n train | spe | ridge | MLP plain | MLP shipped | MLP pat50 | MLP steps300 | "
          "shipped / ridge | pat50 / ridge | steps300 / ridge | shipped best/run epochs (seed 0) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for (name, n_train), rows in results.items():
        mean = {k: np.mean([r[k] for r in rows]) for k in ("ridge", *VARIANTS)}
        ratio = {v: np.exp(np.mean([np.log(r[v] / r["ridge"]) for r in rows])) for v in VARIANTS}
        print(f"| {name} | {n_train} | {steps_per_epoch(n_train)} | {mean['ridge']:.2f} | {mean['plain']:.2f} | "
              f"{mean['shipped']:.2f} | {mean['pat50']:.2f} | {mean['steps300']:.2f} | {ratio['shipped']:.3f} | "
              f"{ratio['pat50']:.3f} | {ratio['steps300']:.3f} | {rows[0]['shipped_epochs']} |")


if __name__ == "__main__":
    main()
