"""Imbalanced classes: ``class_weight: balanced`` and ``train.metric: balanced_accuracy`` on cached features.

The digits feature store made imbalanced: half the classes (``--minority``, default 5-9) keep only
``--fraction`` of their TRAIN and VAL rows (a stratified draw per seed); the test split is kept whole, so
balanced accuracy and macro F1 are measured on all 357 test rows (with an imbalanced test split they are
the same quantities in expectation, measured on 3-7 rows per minority class). Each head runs with the
params.yaml settings (``heads.<name>``, one thread) in four variants, on the same rows:

- ``plain``: ``class_weight: null``, ``selection_metric: null`` (what ships);
- ``select``: ``selection_metric: balanced_accuracy`` only (``train.metric``);
- ``weighted``: ``class_weight: balanced`` only (knn: k chosen on balanced accuracy since that measurement, so
  its ``weighted`` rows equal ``both``);
- ``both``: both.

Two more for the grid-selected heads (``logreg``, ``knn``, ``sgd``: a value of C / k / alpha chosen on val), to
ask what their default criterion should be under ``class_weight: balanced`` (``--variants`` picks them):

- ``select_ll``: ``selection_metric: log_loss`` only (the val log loss, no class weights);
- ``weighted_ll``: ``class_weight: balanced`` and ``selection_metric: log_loss`` (the plain val log loss);
- ``weighted_wll``: ``class_weight: balanced``, the grid value chosen here on the class-weighted val log loss
  (each val row weighs its class's training weight, :func:`~featcache.heads.class_weight.balanced_weights`;
  ties: higher val accuracy, then the smaller value): one fit per grid value (``Cs: [C]`` / ``ks: [k]``),
  logreg's coarse-to-fine search by :func:`~featcache.heads.linear.log_grid_search` (not for ``sgd``, whose
  epoch would still follow its own criterion).

Printed: one JSON line per (seed, head, variant), a table of the means over seeds (test balanced
accuracy, macro F1, accuracy, the minority classes' mean recall) and the per-seed paired differences of
test balanced accuracy against ``--baseline`` (default ``weighted``: what ``class_weight: balanced`` alone gives).

    python benchmarks/bench_imbalance.py --seeds 0 1 2 --fraction 0.1
    python benchmarks/bench_imbalance.py --heads logreg knn --variants weighted both weighted_ll weighted_wll
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
from featcache.heads.class_weight import balanced_weights
from featcache.heads.knn import KNNBase
from featcache.heads.linear import DEFAULT_CS, log_grid_search
from featcache.heads.metrics import metric_value
from featcache.store import FeatureStore

VARIANTS = {"plain": {}, "select": {"selection_metric": "balanced_accuracy"},
            "weighted": {"class_weight": "balanced"},
            "both": {"class_weight": "balanced", "selection_metric": "balanced_accuracy"},
            "select_ll": {"selection_metric": "log_loss"},
            "weighted_ll": {"class_weight": "balanced", "selection_metric": "log_loss"},
            "weighted_wll": {"class_weight": "balanced"}}
#: Variants whose grid value this script chooses (on the class-weighted val log loss), per head: the grid's key.
BENCH_SELECTED = {"weighted_wll": {"logreg": "Cs", "knn": "ks"}}
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


def weighted_log_loss(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> float:
    """The val log loss, each row (n,) weighing ``weights[y]`` (K,): ``sum(w * ll) / sum(w)``."""
    p_true = proba[np.arange(y.size), y] / proba.sum(axis=1)
    w = weights[y]
    return float(np.sum(w * -np.log(np.clip(p_true, 1e-15, 1.0))) / w.sum())


def fit_on_weighted_ll(head: str, key: str, params: dict, data: tuple[np.ndarray, ...], n_classes: int):
    """The head fitted with the grid value (``params[key]``'s grid, or the head's default) of the lowest
    class-weighted val log loss (:func:`weighted_log_loss`, training-row class weights); one fit per value."""
    X, y, X_val, y_val = data
    weights = balanced_weights(y, n_classes)
    name = {"Cs": "C", "ks": "k"}[key]
    fitted = {}

    def evaluate(values: np.ndarray, stage: str) -> list[dict]:
        rows = []
        for value in values:
            value = int(value) if key == "ks" else float(value)
            extra = {key: [value], **({"refine": False} if key == "Cs" else {})}
            estimator = make_head(head, "classification", {**params, **extra}).fit(X, y, X_val, y_val)
            proba = estimator.predict_proba(X_val)
            fitted[value] = estimator
            rows.append({name: value, "wll": weighted_log_loss(y_val, proba, weights),
                         "acc": float(np.mean(proba.argmax(axis=1) == y_val))})
        return rows

    if key == "ks":
        grid = np.unique(np.asarray(params.get("ks", KNNBase.ks)))
        refine, points = False, 2
    else:
        grid = np.sort(np.asarray(params.get("Cs") or DEFAULT_CS, dtype=np.float64))
        refine, points = bool(params.get("refine", True)), int(params.get("refine_points", 3))
    best, _ = log_grid_search(grid, evaluate, lambda r: (r["wll"], -r["acc"], r[name]), name, refine, points)
    return fitted[int(best) if key == "ks" else best]


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
    parser.add_argument("--variants", nargs="+", default=["plain", "select", "weighted", "both"],
                        choices=list(VARIANTS))
    parser.add_argument("--baseline", default="weighted", choices=list(VARIANTS),
                        help="the variant the paired per-seed differences are taken against")
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
            for variant in variants_of(head, args.variants):
                params = {**head_params(Path(args.params), head), **VARIANTS[variant], "n_classes": n_classes}
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if head in BENCH_SELECTED.get(variant, {}):
                        key = BENCH_SELECTED[variant][head]
                        estimator = fit_on_weighted_ll(head, key, params, (X, y, X_val, y_val), n_classes)
                    else:
                        estimator = make_head(head, "classification", params).fit(X, y, X_val, y_val)
                seconds = time.perf_counter() - start
                proba = estimator.predict_proba(X_test)
                recall = [float(np.mean(proba[y_test == k].argmax(axis=1) == k)) for k in args.minority]
                row = {"seed": seed, "head": head, "variant": variant, "n_train": int(y.size),
                       "n_val": int(y_val.size), "fit_s": round(seconds, 2),
                       "chosen": getattr(estimator, "best_params_", None),
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
        for variant in variants_of(head, args.variants):
            rows = [r for r in results if r["head"] == head and r["variant"] == variant]
            mean = {key: float(np.mean([r[key] for r in rows])) for key in
                    ("balanced_accuracy", "macro_f1", "accuracy", "minority_recall", "fit_s")}
            print(f"| {head} | {variant} | {mean['balanced_accuracy']:.4f} | {mean['macro_f1']:.4f} | "
                  f"{mean['accuracy']:.4f} | {mean['minority_recall']:.4f} | {mean['fit_s']:.2f} |")

    print_paired(results, args.heads, args.variants, args.baseline)


def variants_of(head: str, variants: list[str]) -> list[str]:
    """``variants`` that ``head`` can run (a bench-selected one only for the heads it knows)."""
    return [v for v in variants if v not in BENCH_SELECTED or head in BENCH_SELECTED[v]]


def print_paired(results: list[dict], heads: list[str], variants: list[str], baseline: str) -> None:
    """Per-seed paired differences of test balanced accuracy, each variant minus ``baseline`` (same rows)."""
    print(f"\npaired per seed, test balanced accuracy minus {baseline}'s (points: x100)\n")
    print("| head | variant | mean Δ | sd Δ | t | better / worse / same | min Δ | max Δ | per seed |")
    print("|---|---|---:|---:|---:|---|---:|---:|---|")
    for head in heads:
        base = {r["seed"]: r["balanced_accuracy"] for r in results if r["head"] == head and r["variant"] == baseline}
        for variant in variants_of(head, variants):
            if variant == baseline or not base:
                continue
            d = 100 * np.array([r["balanced_accuracy"] - base[r["seed"]] for r in results
                                if r["head"] == head and r["variant"] == variant and r["seed"] in base])
            sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
            t = float(d.mean() / (sd / np.sqrt(d.size))) if d.size > 1 and sd > 0 else float("nan")
            print(f"| {head} | {variant} | {d.mean():+.2f} | {sd:.2f} | {t:+.1f} | {int((d > 0).sum())} / "
                  f"{int((d < 0).sum())} / {int((d == 0).sum())} | {d.min():+.2f} | {d.max():+.2f} | "
                  f"{' '.join(f'{x:+.1f}' for x in d)} |")


if __name__ == "__main__":
    main()
