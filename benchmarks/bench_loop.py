"""Benchmark of the iteration loop's fixed costs (issue #13 item 6).

Measured, each as a same-run comparison with the work it does (medians of
``--repeats`` runs, interleaved so that load changes hit every case alike):

1. ``featcache --help`` against ``python -c pass`` (interpreter start-up);
2. ``featcache check`` (params validation, no model);
3. a second ``featcache extract`` of 1,024 images with a warm ONNX export
   cache: fixed cost = wall time - images / throughput (the throughput is the
   one the command reports for its image loop), in seconds and as a ratio to
   the image work; the first (cold) extraction, which exports, is shown too;
4. the ``dvc exp run -S heads.logreg.max_iter=999`` timing on the digits after
   ``dvc repro`` is measured by ``benchmarks/bench_exp.py``; ``bench_dvc_exp``
   below is the place to fold its row into this table.

Run: ``PYTHONPATH=src python benchmarks/bench_loop.py [--repeats 5] [--images 1024]``.
Prints a Markdown table for ``benchmarks/README.md`` with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
CLASSES = ("red", "green", "blue", "grey")


def featcache_command() -> list[str]:
    """The ``featcache`` console script when installed, else ``python -m featcache.pipeline.cli``."""
    script = shutil.which("featcache")
    return [script] if script else [sys.executable, "-m", "featcache.pipeline.cli"]


def env() -> dict[str, str]:
    """This checkout's sources first, no analytics."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                DVC_NO_ANALYTICS="1")


def machine_line(note: str) -> str:
    """``Machine: <arch> <processor>, <N> CPUs, Python <version>; load average after the run a, b, c; <note>``: the
    line every benchmark table here ends with."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = " ".join(part for part in (platform.machine(), platform.processor()) if part)
    return (f"Machine: {cpu}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; load average after the run {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}; "
            f"{note}")


def timed(args: list[str], cwd: Path, environ: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one command (must succeed) and its stdout."""
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def write_images(root: Path, n_images: int, size: int = 64, seed: int = 0) -> None:
    """``n_images`` small PNGs in ``len(CLASSES)`` class folders."""
    rng = np.random.default_rng(seed)
    for index in range(n_images):
        name = CLASSES[index % len(CLASSES)]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 90, size=(size, size, 3))
        pixels[..., (index % len(CLASSES)) % 3] += 150
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index:05d}.png")


def write_params(work: Path, images: Path, cache: Path) -> Path:
    params = {
        "data": {"name": "loop", "source": "folder", "path": str(images),
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "extract": {"backend": "onnx", "batch_size": 64, "onnx_cache": str(cache)},
        "backbones": {BACKBONE: {"weights": "pretrained", "layers": ["pool"]}},
        "features": [{"backbone": BACKBONE, "layer": "pool"}],
        "train": {"heads": ["logreg"]},
        # as in the repository's params.yaml: `check` (and every stage) validates every head's section
        "heads": {"logreg": {"refine": True, "max_iter": 1000},
                  "lightgbm": {"n_estimators": 1000, "learning_rate": 0.05, "num_leaves": 15},
                  "mlp": {"hidden_sizes": [256], "max_epochs": 100}},
    }
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def extract_once(work: Path, environ: dict[str, str]) -> tuple[float, float, int]:
    """One ``featcache extract`` into a fresh store: (wall seconds, reported img/s, rows)."""
    out = work / "features" / "loop.h5"
    shutil.rmtree(out.parent, ignore_errors=True)
    seconds, stdout = timed([*featcache_command(), "extract", "--params", "params.yaml", "--backbone", BACKBONE,
                             "--manifest", "prepared/manifest.csv", "--out", str(out), "--no-progress"], work, environ)
    match = re.search(r"([\d,]+) rows written, [\d,]+ skipped, ([\d.]+) img/s", stdout)  # 1,797 rows
    if match is None:
        raise RuntimeError(f"no throughput in the extract output:\n{stdout}")
    return seconds, float(match.group(2)), int(match.group(1).replace(",", ""))


def bench_startup(work: Path, environ: dict[str, str], repeats: int) -> dict[str, list[float]]:
    """Interleaved repeats of ``python -c pass``, ``featcache --help`` and ``featcache check``."""
    cases = {"python -c pass": [sys.executable, "-c", "pass"],
             "featcache --help": [*featcache_command(), "--help"],
             "featcache check": [*featcache_command(), "check", "--params", "params.yaml"]}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, args in cases.items():
            times[name].append(timed(args, work, environ)[0])
    return times


def bench_dvc_exp(repeats: int) -> list[str]:
    """Place for the ``dvc exp run -S heads.logreg.max_iter=999`` row (measured by ``benchmarks/bench_exp.py``).

    Returns Markdown table rows; none yet: that benchmark needs a ``dvc repro``-ed checkout.
    """
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=1024)
    args = parser.parse_args()
    environ = env()
    with tempfile.TemporaryDirectory(prefix="featcache-bench-loop-") as tmp:
        work = Path(tmp)
        write_images(work / "images", args.images)
        write_params(work, work / "images", work / "onnx-cache")
        timed([*featcache_command(), "prepare", "--params", "params.yaml", "--out", "prepared"], work, environ)

        startup = bench_startup(work, environ, args.repeats)
        cold = extract_once(work, environ)  # exports and fills the cache
        warm = [extract_once(work, environ) for _ in range(args.repeats)]

    python = statistics.median(startup["python -c pass"])
    rows = []
    for name in ("featcache --help", "featcache check"):
        value = statistics.median(startup[name])
        rows.append(f"| `{name}` | {value:.2f} s (python -c pass: {python:.2f} s; {value / python:.1f}x) | < 1 s |")
    fixed = [seconds - n / rate for seconds, rate, n in warm]
    work_s = [n / rate for _, rate, n in warm]
    f_med, w_med = statistics.median(fixed), statistics.median(work_s)
    t_med = statistics.median(s for s, _, _ in warm)
    rate = statistics.median(r for _, r, _ in warm)
    rows.append(f"| second `featcache extract` of {warm[0][2]:,} images, warm ONNX cache | total {t_med:.1f} s = "
                f"images {w_med:.1f} s ({rate:.1f} img/s) + fixed **{f_med:.1f} s** (fixed/images = "
                f"{f_med / w_med:.2f}) | fixed < 4 s |")
    cold_fixed = cold[0] - cold[2] / cold[1]
    rows.append(f"| first (cold) extraction, export included | total {cold[0]:.1f} s, fixed {cold_fixed:.1f} s "
                f"(warm saves {cold_fixed - f_med:.1f} s) | |")
    rows += bench_dvc_exp(args.repeats)

    print(machine_line(f"medians of {args.repeats} runs"))
    print("| case | result | target |\n|---|---|---|")
    print("\n".join(rows))
    print("raw:", {name: [round(t, 2) for t in values] for name, values in startup.items()},
          "warm:", [(round(s, 2), round(r, 1)) for s, r, _ in warm], "cold:", (round(cold[0], 2), round(cold[1], 1)))


if __name__ == "__main__":
    main()
