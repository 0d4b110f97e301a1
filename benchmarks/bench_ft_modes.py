"""The fine-tuning modes on a small train split, with and without ``min_epoch_steps`` (epochs of >= N steps).

``finetune.defaults.min_epoch_steps: 32`` (params.yaml) multiplies a mode's ``epochs``, ``warmup_epochs`` and
``patience`` by ``ceil(32 / batches)`` when an epoch has fewer batches. Each run fine-tunes one mode (params.yaml's
``finetune.defaults`` updated with ``finetune.modes[mode]``, one torch thread, no bootstrap) on a prepared
manifest with ``min_epoch_steps`` set to each value asked for and ``selection_metric`` (the val metric that picks
the best epoch and stops early) to each of ``--selection-metrics`` (``default``: the config's), in its own process
(for its wall time), and prints one JSON line: test metric (RMSE or accuracy; classification also test log loss),
epochs run, best epoch, optimiser steps, wall seconds.
``--train-per-class N`` first writes a manifest of N random train rows per class (val and test kept).

    python benchmarks/bench_ft_modes.py data/prepared/digits/manifest.csv --train-per-class 20 --seeds 0 1
    python benchmarks/bench_ft_modes.py data/prepared/digits/manifest.csv --train-per-class 20 \
        --min-epoch-steps 32 --selection-metrics accuracy log_loss
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

MODES = ("frozen", "low_lr", "unfreeze", "scratch")


def subsample(manifest: Path, per_class: int, out_dir: Path, seed: int = 0) -> Path:
    """A copy of ``manifest`` with ``per_class`` random train rows per class (paths made absolute)."""
    from featcache.extract.inputs.manifest import classes_path

    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_class: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        row["path"] = str((manifest.parent / row["path"]).resolve())
        if row["split"] == "train":
            by_class.setdefault(row["label"], []).append(row)
    rng = random.Random(seed)
    kept = {id(row) for group in by_class.values() for row in rng.sample(group, min(per_class, len(group)))}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "manifest.csv"
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if row["split"] != "train" or id(row) in kept)
    if classes_path(manifest).is_file():
        shutil.copy(classes_path(manifest), classes_path(out))
    return out


def run_one(manifest: str, mode: str, min_epoch_steps: int, seed: int, params: str,
            selection_metric: str = "default") -> dict[str, Any]:
    """One fine-tune of ``mode`` as params.yaml sets it, with ``min_epoch_steps``, ``seed`` and ``selection_metric``
    (``"default"``: the config's) overridden."""
    from featcache.extract.inputs.manifest import Manifest
    from featcache.finetune.run import finetune
    from featcache.pipeline.finetune import mode_config

    section = yaml.safe_load(Path(params).read_text(encoding="utf-8"))["finetune"]
    section = {**section, "defaults": {**section["defaults"], "min_epoch_steps": min_epoch_steps, "seed": seed,
                                       "num_threads": 1}}
    if selection_metric != "default":
        section["defaults"]["selection_metric"] = selection_metric
    config = mode_config(section, mode, n_boot=0, progress=False)
    rows = Manifest.read(manifest)
    metric = "rmse" if rows.task == "regression" else "accuracy"
    start = time.perf_counter()
    result = finetune(rows, section["backbone"], section["weights"], config)
    extra = {} if metric == "rmse" else {"test_log_loss": round(float(result.metrics["log_loss"]), 4)}
    return {"manifest": manifest, "mode": mode, "min_epoch_steps": min_epoch_steps, "seed": seed,
            "selection": result.history[0]["metric"], "metric": metric,
            "test": round(float(result.metrics[metric]), 4), **extra, "epochs": result.epochs_run,
            "best": result.best_epoch, "steps": result.steps, "wall_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    """Run every (manifest, mode, min_epoch_steps, selection metric, seed), each in a subprocess; one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--min-epoch-steps", nargs="+", type=int, default=[32, 1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--selection-metrics", nargs="+", default=["default"],
                        help="val metric(s) that pick the best epoch (a SELECTION_METRICS name, or default)")
    parser.add_argument("--train-per-class", type=int, default=0, help="classification: subsample the train split")
    parser.add_argument("--work", default="bench_ft_modes", help="where subsampled manifests are written")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.manifests[0], args.modes[0], args.min_epoch_steps[0], args.seeds[0],
                                 args.params, args.selection_metrics[0])), flush=True)
        return
    manifests = [Path(m) for m in args.manifests]
    if args.train_per_class:
        manifests = [subsample(m, args.train_per_class, Path(args.work) / f"{i}") for i, m in enumerate(manifests)]
    for seed in args.seeds:
        for manifest in manifests:
            for mode in args.modes:
                for steps in args.min_epoch_steps:
                    for selection in args.selection_metrics:
                        subprocess.run([sys.executable, __file__, str(manifest), "--one", "--modes", mode,
                                        "--min-epoch-steps", str(steps), "--seeds", str(seed), "--params",
                                        args.params, "--selection-metrics", selection], check=True)


if __name__ == "__main__":
    main()
