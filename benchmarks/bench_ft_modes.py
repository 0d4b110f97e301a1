"""The fine-tuning modes on a small train split, with and without ``min_epoch_steps`` (epochs of >= N steps).

``finetune.defaults.min_epoch_steps: 32`` (params.yaml) multiplies a mode's ``epochs``, ``warmup_epochs`` and
``patience`` by ``ceil(32 / batches)`` when an epoch has fewer batches. Each run fine-tunes one mode (params.yaml's
``finetune.defaults`` updated with ``finetune.modes[mode]``, one torch thread, no bootstrap) on a prepared
manifest with ``min_epoch_steps`` set to each value asked for, in its own process (for its wall time), and
prints one JSON line: test metric (RMSE or accuracy), epochs run, best epoch, optimiser steps, wall seconds.
``--train-per-class N`` first writes a manifest of N random train rows per class (val and test kept).

    python benchmarks/bench_ft_modes.py data/prepared/digits/manifest.csv --train-per-class 20 --seeds 0 1
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


def run_one(manifest: str, mode: str, min_epoch_steps: int, seed: int, params: str) -> dict[str, Any]:
    """One fine-tune of ``mode`` as params.yaml sets it, with ``min_epoch_steps`` and ``seed`` overridden."""
    from featcache.extract.inputs.manifest import Manifest
    from featcache.finetune.run import finetune
    from featcache.pipeline.finetune import mode_config

    section = yaml.safe_load(Path(params).read_text(encoding="utf-8"))["finetune"]
    section = {**section, "defaults": {**section["defaults"], "min_epoch_steps": min_epoch_steps, "seed": seed,
                                       "num_threads": 1}}
    config = mode_config(section, mode, n_boot=0, progress=False)
    rows = Manifest.read(manifest)
    metric = "rmse" if rows.task == "regression" else "accuracy"
    start = time.perf_counter()
    result = finetune(rows, section["backbone"], section["weights"], config)
    return {"manifest": manifest, "mode": mode, "min_epoch_steps": min_epoch_steps, "seed": seed, "metric": metric,
            "test": round(float(result.metrics[metric]), 4), "epochs": result.epochs_run,
            "best": result.best_epoch, "steps": result.steps, "wall_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    """Run every (manifest, mode, min_epoch_steps, seed), each in a subprocess; print one JSON line per run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--min-epoch-steps", nargs="+", type=int, default=[32, 1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-per-class", type=int, default=0, help="classification: subsample the train split")
    parser.add_argument("--work", default="bench_ft_modes", help="where subsampled manifests are written")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.manifests[0], args.modes[0], args.min_epoch_steps[0], args.seeds[0],
                                 args.params)), flush=True)
        return
    manifests = [Path(m) for m in args.manifests]
    if args.train_per_class:
        manifests = [subsample(m, args.train_per_class, Path(args.work) / f"{i}") for i, m in enumerate(manifests)]
    for seed in args.seeds:
        for manifest in manifests:
            for mode in args.modes:
                for steps in args.min_epoch_steps:
                    subprocess.run([sys.executable, __file__, str(manifest), "--one", "--modes", mode,
                                    "--min-epoch-steps", str(steps), "--seeds", str(seed), "--params", args.params],
                                   check=True)


if __name__ == "__main__":
    main()
