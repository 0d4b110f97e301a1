"""Benchmark the experiment loop: ``dvc exp run -S heads.logreg.max_iter=N`` on an up-to-date project.

Run it in a project where ``dvc repro`` has run and its results are committed
(``dvc status`` clean, e.g. after ``make repro`` and a commit). Each repeat sets
a value never used before (``max_iter`` = 999, 998, ...), so DVC's run cache
cannot restore the stages and they really run. For each repeat it prints the
wall time of the whole command, the stages DVC ran (expected: the two
``train@*-logreg`` stages and ``compare``) and the work those heads did (their
``fit_seconds + predict_seconds`` from the run sidecars), and their ratio. Then
it restores the workspace to the last commit (``dvc exp`` keeps each
experiment under ``refs/exps``; ``dvc exp remove --all-commits -A`` drops them).

Usage::

    python benchmarks/bench_exp.py              # 3 repeats in the current directory
    python benchmarks/bench_exp.py --repeats 5 --project /path/to/project
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path


def _stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def _work_seconds(project: Path, stages: list[str]) -> float:
    """fit + predict seconds of the heads whose train stages ran (from their ``.run.json`` sidecars)."""
    total = 0.0
    heads = {stage.rsplit("-", 1)[1] for stage in stages if stage.startswith("train@")}
    for sidecar in (project / "metrics").rglob("*.run.json"):
        info = json.loads(sidecar.read_text())
        if info.get("head") in heads:
            total += float(info.get("fit_seconds", 0.0)) + float(info.get("predict_seconds", 0.0))
    return total


def run(project: Path, repeats: int) -> list[dict]:
    """Time ``repeats`` experiments; the workspace is reset to HEAD after each."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    results = []
    for index in range(repeats):
        value = 999 - index
        start = time.perf_counter()
        done = subprocess.run(["dvc", "exp", "run", "-S", f"heads.logreg.max_iter={value}"], cwd=project, env=env,
                              capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"dvc exp run failed:\n{done.stdout}\n{done.stderr}")
        stages = _stages(done.stdout + done.stderr)
        results.append({"max_iter": value, "wall_s": wall, "stages": stages,
                        "work_s": _work_seconds(project, stages)})
        subprocess.run(["git", "checkout", "--", "."], cwd=project, check=True)  # back to the last commit
        subprocess.run(["dvc", "checkout", "-q"], cwd=project, env=env, check=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = run(args.project.resolve(), args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at the end\n")
    print("| max_iter | wall s | heads' fit+predict s | wall / work | stages run |")
    print("|---|---|---|---|---|")
    for row in results:
        ratio = row["wall_s"] / row["work_s"] if row["work_s"] else float("nan")
        print(f"| {row['max_iter']} | {row['wall_s']:.1f} | {row['work_s']:.2f} | {ratio:.1f}x | "
              f"{', '.join(row['stages'])} |")
    print(f"\nmedian wall: {statistics.median(row['wall_s'] for row in results):.1f} s")


if __name__ == "__main__":
    main()
