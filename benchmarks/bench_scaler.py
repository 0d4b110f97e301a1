"""The heads' scaler with and without the range clip, on the features of a finished store.

``featcache.heads.preprocessing.ClippedScaler`` clips each feature to its training range before
standardising; the "plain" side swaps in scikit-learn's StandardScaler (what the heads used before).
Each (layer, head) is fitted on the store's train split, selected on val and scored on test, both sides in
the same process with the same seeds. Regression rows fit the regression twins on the class index as a
number (a sanity check that the clip does not hurt a regression head; not a meaningful task).

    python benchmarks/bench_scaler.py --store features/digits/efficientnet_lite0.h5
"""

from __future__ import annotations

import argparse
import time

import h5py
import numpy as np
from sklearn.metrics import accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

import featcache.heads.preprocessing as preprocessing
from featcache.heads import make_head
from featcache.store.schema import SPLIT_CODES

HEADS = {
    "classification": {"logreg": {"max_iter": 1000},
                       "mlp": {"hidden_sizes": [512], "max_epochs": 100, "patience": 10, "n_threads": 2}},
    "regression": {"logreg": {}, "mlp": {"hidden_sizes": [512], "max_epochs": 100, "patience": 10, "n_threads": 2}},
}
SCALERS = {"plain": StandardScaler, "clipped": preprocessing.ClippedScaler}


def largest_test_z(X: np.ndarray, split: np.ndarray) -> float:
    """The largest |z| of a val or test row under a plain StandardScaler fitted on the train rows."""
    scaler = StandardScaler().fit(X[split == SPLIT_CODES["train"]])
    return float(np.abs(scaler.transform(X[split != SPLIT_CODES["train"]])).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="features/digits/efficientnet_lite0.h5")
    parser.add_argument("--tasks", nargs="+", default=["classification", "regression"])
    args = parser.parse_args()
    with h5py.File(args.store, "r") as f:
        split, label = f["split"][:], f["label"][:]
        layers = {name: f["features"][name][:].astype(np.float32) for name in f["features"]}
    train, val, test = (split == SPLIT_CODES[s] for s in ("train", "val", "test"))
    print("| task | layer | max val/test z (plain) | head | scaler | accuracy | log loss / rmse | fit s |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    for task in args.tasks:
        y = label if task == "classification" else label.astype(np.float64)
        for layer, X in layers.items():
            z = largest_test_z(X, split)
            for head_name, params in HEADS[task].items():
                for scaler_name, scaler in SCALERS.items():
                    preprocessing.ClippedScaler = scaler  # what fit_preprocess builds
                    try:
                        head = make_head(head_name, task, params)
                        start = time.perf_counter()
                        head.fit(X[train], y[train], X[val], y[val])
                        seconds = time.perf_counter() - start
                    finally:
                        preprocessing.ClippedScaler = SCALERS["clipped"]
                    if task == "classification":
                        proba = head.predict_proba(X[test])
                        scores = (f"{accuracy_score(y[test], proba.argmax(1)):.4f}",
                                  f"{log_loss(y[test], proba, labels=head.classes_):.4f}")
                    else:
                        scores = ("", f"{np.sqrt(np.mean((head.predict(X[test]) - y[test]) ** 2)):.4f}")
                    print(f"| {task} | {layer} | {z:,.0f} | {head_name} | {scaler_name} | {scores[0]} | "
                          f"{scores[1]} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
