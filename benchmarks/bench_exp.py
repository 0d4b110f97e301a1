"""Benchmark the experiment loop: ``dvc exp run -S heads.logreg.max_iter=N`` on an up-to-date project.

Run it in a project where ``dvc repro`` has run and its results are committed
(``dvc status`` clean, e.g. after ``make repro`` and a commit). Each repeat sets
a value never used before (``max_iter`` = 999, 998, ...), so DVC's run cache
cannot restore the stages and they really run. For each repeat it prints the
wall time of the whole command, the stages DVC ran (expected: the two
``train@*-logreg`` stages and ``compare``) and the work those heads did (their
``fit_seconds + predict_seconds`` from the run sidecars), and their ratio. Right
after each experiment it reruns the commands of the stages DVC ran (from
``dvc.lock``) directly, one after the other, on the experiment's workspace:
their summed wall time is what the stage processes cost (start-up, imports,
work), and the rest of the experiment's wall time is DVC's own. Then
it restores the workspace to the last commit (``dvc exp`` keeps each
experiment under ``refs/exps``; ``dvc exp remove --all-commits -A`` drops them).

Usage::

    python benchmarks/bench_exp.py              # 3 repeats in the current directory
    python benchmarks/bench_exp.py --repeats 5 --project /path/to/project --first-value 899
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

import yaml


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


def _direct_seconds(project: Path, stages: list[str], env: dict[str, str]) -> float:
    """Wall seconds of running the commands of ``stages`` (from ``dvc.lock``) directly, one after the other."""
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    total = 0.0
    for stage in stages:
        start = time.perf_counter()
        subprocess.run(lock[stage]["cmd"], shell=True, cwd=project, env=env, check=True, capture_output=True)
        total += time.perf_counter() - start
    return total


def run(project: Path, repeats: int, first_value: int = 999) -> list[dict]:
    """Time ``repeats`` experiments; the workspace is reset to HEAD after each."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    results = []
    for index in range(repeats):
        value = first_value - index
        start = time.perf_counter()
        done = subprocess.run(["dvc", "exp", "run", "-S", f"heads.logreg.max_iter={value}"], cwd=project, env=env,
                              capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"dvc exp run failed:\n{done.stdout}\n{done.stderr}")
        stages = _stages(done.stdout + done.stderr)
        results.append({"max_iter": value, "wall_s": wall, "stages": stages,
                        "work_s": _work_seconds(project, stages),
                        "processes_s": _direct_seconds(project, stages, env)})
        subprocess.run(["git", "checkout", "--", "."], cwd=project, check=True)  # back to the last commit
        subprocess.run(["dvc", "checkout", "-q"], cwd=project, env=env, check=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--first-value", type=int, default=999,
                        help="max_iter of the first experiment (then one less each); use values never run before "
                             "in this project, or DVC's run cache restores the stages instead of running them")
    args = parser.parse_args()
    results = run(args.project.resolve(), args.repeats, args.first_value)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at the end\n")
    print("| max_iter | wall s | stage processes run directly s | DVC's own s | heads' fit+predict s | "
          "wall / work | stages run |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        ratio = row["wall_s"] / row["work_s"] if row["work_s"] else float("nan")
        print(f"| {row['max_iter']} | {row['wall_s']:.1f} | {row['processes_s']:.1f} | "
              f"{row['wall_s'] - row['processes_s']:.1f} | {row['work_s']:.2f} | {ratio:.1f}x | "
              f"{', '.join(row['stages'])} |")
    for name in ("wall_s", "processes_s", "work_s"):
        print(f"median {name}: {statistics.median(row[name] for row in results):.2f}")


if __name__ == "__main__":
    main()
