"""Imbalanced classes: ``class_weight: balanced`` and ``train.metric: balanced_accuracy`` on cached features.

The digits feature store made imbalanced: half the classes (``--minority``, default 5-9) keep only
``--fraction`` of their TRAIN and VAL rows (a stratified draw per seed); the test split is kept whole, so
balanced accuracy and macro F1 are measured on all 357 test rows (with an imbalanced test split they are
the same quantities in expectation, measured on 3-7 rows per minority class). Each head runs with the
params.yaml settings (``heads.<name>``, one thread) in four variants, on the same rows:

- ``plain``: ``class_weight: null``, ``selection_metric: null`` (what ships);
- ``select``: ``selection_metric: balanced_accuracy`` only (``train.metric``);
- ``weighted``: ``class_weight: balanced`` only;
- ``both``: both.

Printed: one JSON line per (seed, head, variant) and a table of the means over seeds (test balanced
accuracy, macro F1, accuracy, the minority classes' mean recall).

    python benchmarks/bench_imbalance.py --seeds 0 1 2 --fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

from featcache.heads import make_head
from featcache.heads.metrics import metric_value
from featcache.store import FeatureStore

VARIANTS = {"plain": {}, "select": {"selection_metric": "balanced_accuracy"},
            "weighted": {"class_weight": "balanced"},
            "both": {"class_weight": "balanced", "selection_metric": "balanced_accuracy"}}
HEADS = ("logreg", "lightgbm", "mlp")


def imbalanced_rows(labels: np.ndarray, minority: list[int], fraction: float, seed: int) -> np.ndarray:
    """Indices into ``labels`` keeping every row of the other classes and ``fraction`` (at least 2) of each
    minority class's, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        if k in minority:
            rows = np.sort(rng.choice(rows, size=max(2, round(fraction * rows.size)), replace=False))
        keep.append(rows)
    return np.sort(np.concatenate(keep))


def head_params(params_path: Path, name: str) -> dict:
    """params.yaml's ``heads.<name>`` with one thread (the variants add their keys)."""
    section = dict((yaml.safe_load(params_path.read_text()).get("heads") or {}).get(name) or {})
    for key in ("n_jobs", "n_threads"):
        if key in section:
            section[key] = 1
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="features/digits/efficientnet_lite0.h5")
    parser.add_argument("--layer", default="block6")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--minority", type=int, nargs="+", default=[5, 6, 7, 8, 9])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    args = parser.parse_args()
    with FeatureStore(args.store) as store:
        data = {split: (store.read(args.layer, split), store.labels(split)) for split in ("train", "val", "test")}
    X_test, y_test = data["test"]
    n_classes = int(max(y.max() for _, y in data.values())) + 1
    results = []
    for seed in args.seeds:
        fit_rows = {split: imbalanced_rows(data[split][1], args.minority, args.fraction, seed + 100 * i)
                    for i, split in enumerate(("train", "val"))}
        X, y = (a[fit_rows["train"]] for a in data["train"])
        X_val, y_val = (a[fit_rows["val"]] for a in data["val"])
        for head in args.heads:
            for variant, extra in VARIANTS.items():
                estimator = make_head(head, "classification", {**head_params(Path(args.params), head), **extra,
                                                                "n_classes": n_classes})
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    estimator.fit(X, y, X_val, y_val)
                seconds = time.perf_counter() - start
                proba = estimator.predict_proba(X_test)
                recall = [float(np.mean(proba[y_test == k].argmax(axis=1) == k)) for k in args.minority]
                row = {"seed": seed, "head": head, "variant": variant, "n_train": int(y.size),
                       "n_val": int(y_val.size), "fit_s": round(seconds, 2),
                       **{name: metric_value("classification", name, y_test, proba, n_classes)
                          for name in ("balanced_accuracy", "macro_f1", "accuracy")},
                       "minority_recall": float(np.mean(recall))}
                print(json.dumps(row), flush=True)
                results.append(row)
    print(f"\n{args.layer}, minority classes {args.minority} at {args.fraction:g} of their train/val rows, "
          f"seeds {args.seeds}; test split whole ({y_test.size} rows); means over seeds\n")
    print("| head | variant | balanced accuracy | macro F1 | accuracy | minority recall | fit s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for head in args.heads:
        for variant in VARIANTS:
            rows = [r for r in results if r["head"] == head and r["variant"] == variant]
            mean = {key: float(np.mean([r[key] for r in rows])) for key in
                    ("balanced_accuracy", "macro_f1", "accuracy", "minority_recall", "fit_s")}
            print(f"| {head} | {variant} | {mean['balanced_accuracy']:.4f} | {mean['macro_f1']:.4f} | "
                  f"{mean['accuracy']:.4f} | {mean['minority_recall']:.4f} | {mean['fit_s']:.2f} |")


if __name__ == "__main__":
    main()
