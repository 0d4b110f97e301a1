"""Benchmark the experiment loop: ``dvc exp run -S heads.logreg.max_iter=N`` on an up-to-date project.

Run it in a project where ``dvc repro`` has run and its results are committed
(``dvc status`` clean, e.g. after ``make repro`` and a commit). Each repeat first
times a no-op ``dvc exp run`` (nothing changed: DVC's floor for an experiment),
then ``dvc exp run -S heads.logreg.max_iter=N`` with a value never used before
(``max_iter`` = 999, 998, ...), so DVC's run cache cannot restore the stages
and they really run; the two are interleaved, and the ratio of their medians is
the loop's cost in no-op experiments. The stages are checked from DVC's output:
the no-op must run none, the experiment exactly the ``train@*-logreg`` stages,
``compare`` and ``check`` (each "Running stage"), none restored from the run cache or
skipped; anything else stops the benchmark. For each repeat it prints the
wall time of the whole command, the stages DVC ran and the work those heads did
(their ``fit_seconds + predict_seconds`` from the run sidecars), and their ratio. Right
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


#: What DVC prints for a stage it did not run (restored from the run cache, or unchanged).
NOT_RUN = ("is cached - skipping run", "didn't change, skipping")


def _expected_stages(project: Path) -> set[str]:
    """The stages a logreg param change must run: every ``train@...-logreg`` stage of ``dvc.lock``, ``compare``,
    and ``check`` (it validates the whole ``params.yaml`` whenever any of it changes)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    return {name for name in lock if name.startswith("train@") and name.endswith("-logreg")} | {"compare", "check"}


def _check_ran(output: str, expected: set[str], what: str) -> list[str]:
    """The stages DVC ran; SystemExit unless they are exactly ``expected``, each run (not restored or skipped)."""
    stages = _stages(output)
    restored = [line for line in output.splitlines()
                if any(marker in line for marker in NOT_RUN) and line.split("'")[1:2] in ([name] for name in expected)]
    if set(stages) != expected or len(stages) != len(expected) or restored:
        raise SystemExit(f"{what}: expected DVC to run exactly {sorted(expected)}, it ran {stages}"
                         f"{'; not run: ' + '; '.join(restored) if restored else ''}\n{output}")
    return stages


def _exp_run(project: Path, env: dict[str, str], *args: str) -> tuple[float, str]:
    """Wall seconds and output (stdout + stderr) of ``dvc exp run ARGS``; SystemExit when it fails."""
    start = time.perf_counter()
    done = subprocess.run(["dvc", "exp", "run", *args], cwd=project, env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"dvc exp run {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return wall, done.stdout + done.stderr


def _reset(project: Path, env: dict[str, str]) -> None:
    """Back to the last commit (``dvc exp`` keeps each experiment under ``refs/exps``)."""
    subprocess.run(["git", "checkout", "--", "."], cwd=project, check=True)
    subprocess.run(["dvc", "checkout", "-q"], cwd=project, env=env, check=True)


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
    """Time ``repeats`` pairs (a no-op experiment, then one head param); the workspace is reset to HEAD after each."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    expected = _expected_stages(project)
    results = []
    for index in range(repeats):
        value = first_value - index
        noop_s, output = _exp_run(project, env)
        _check_ran(output, set(), "no-op dvc exp run (is the workspace clean and committed?)")
        _reset(project, env)
        wall, output = _exp_run(project, env, "-S", f"heads.logreg.max_iter={value}")
        stages = _check_ran(output, expected, f"dvc exp run -S heads.logreg.max_iter={value}")
        results.append({"max_iter": value, "noop_s": noop_s, "wall_s": wall, "stages": stages,
                        "work_s": _work_seconds(project, stages),
                        "processes_s": _direct_seconds(project, stages, env)})
        _reset(project, env)
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
          "wall / work | stages run | no-op exp run s (just before) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        ratio = row["wall_s"] / row["work_s"] if row["work_s"] else float("nan")
        print(f"| {row['max_iter']} | {row['wall_s']:.1f} | {row['processes_s']:.1f} | "
              f"{row['wall_s'] - row['processes_s']:.1f} | {row['work_s']:.2f} | {ratio:.1f}x | "
              f"{', '.join(row['stages'])} | {row['noop_s']:.2f} |")
    medians = {name: statistics.median(row[name] for row in results)
               for name in ("wall_s", "processes_s", "work_s", "noop_s")}
    for name, value in medians.items():
        print(f"median {name}: {value:.2f}")
    ran = ", ".join(sorted(_expected_stages(args.project.resolve())))
    print(f"one head param / no-op (medians): {medians['wall_s']:.2f} / {medians['noop_s']:.2f} = "
          f"{medians['wall_s'] / medians['noop_s']:.2f}x (every experiment ran {ran}, none restored or skipped; "
          "every no-op ran no stage)")


if __name__ == "__main__":
    main()
