"""Time and peak memory of ``prepare`` of a CSV manifest of URLs (``data.source: csv``), each in a clean process.

    python benchmarks/bench_csv_prepare.py --rows 1000000 --repeats 3
    python benchmarks/bench_csv_prepare.py --rows 1000000 --repeats 3 --src /old/checkout/src --src src

The CSV (``path,label``: HTTPS URLs, 100 classes) is written once; each repeat runs the ``prepare`` stage
(the CSV read and checked, ``manifest.csv``, ``manifest.classes.json`` and ``summary.json`` written) in a fresh
interpreter for each ``--src`` in turn (which featcache it imports: two checkouts interleaved, for a same-run
comparison) and reports its wall time, CPU time (user + system: steadier than the wall time on a shared
machine) and peak RSS (``ru_maxrss`` of that child), less the interpreter and imports measured the same way
without the call, and the sha256 of the files written (the same for every run and checkout, or it fails).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import hashlib, json, resource, sys, time
from pathlib import Path
from featcache.pipeline.config import parse_params
from featcache.pipeline.prepare import prepare
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start, cpu = time.perf_counter(), time.process_time()
if sys.argv[1]:
    csv = Path(sys.argv[1])
    params = parse_params({"data": {"name": "urls", "source": "csv", "path": str(csv.parent), "csv": csv.name}})
    manifest = prepare(params, sys.argv[2])
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
files = {name: hashlib.sha256((Path(sys.argv[2]) / name).read_bytes()).hexdigest()[:16]
         for name in ("manifest.csv", "manifest.classes.json", "summary.json")} if sys.argv[1] else {}
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak / 1024, "imports_mib": base / 1024,
                  "rows": 0 if not sys.argv[1] else len(manifest), "files": files}))
"""


def write_csv(path: Path, rows: int) -> Path:
    """``rows`` URL rows of 100 classes."""
    with open(path, "w", encoding="utf-8") as out:
        out.write("path,label\n")
        for i in range(rows):
            out.write(f"https://images.example.org/collection/{i // 1000:04d}/img_{i:07d}.jpg,class_{i % 100}\n")
    return path


def run_child(csv_path: Path | None, src: str, out: Path | None = None) -> dict:
    """One clean interpreter: ``prepare`` of ``csv_path`` into ``out`` (None: the imports alone)."""
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-c", CHILD, str(csv_path or ""), str(out or "")], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--src", action="append",
                        help="the src folder of a featcache to measure (repeatable; default: this checkout's)")
    args = parser.parse_args()
    sources = args.src or [str(Path(__file__).resolve().parents[1] / "src")]
    runs: dict[str, list[dict]] = {src: [] for src in sources}
    with tempfile.TemporaryDirectory(prefix="featcache-csv-") as tmp:
        csv_path = write_csv(Path(tmp) / "urls.csv", args.rows)
        baselines = {src: run_child(None, src)["peak_mib"] for src in sources}
        for k in range(args.repeats):
            for src in sources:
                runs[src].append(run_child(csv_path, src, Path(tmp) / f"prepared{k}-{len(runs[src])}-{hash(src)}"))
    files = runs[sources[0]][0]["files"]
    assert all(run["rows"] == args.rows and run["files"] == files for done in runs.values() for run in done)
    for src, done in runs.items():
        seconds, cpu, peak = (statistics.median(run[key] for run in done)
                              for key in ("seconds", "cpu_seconds", "peak_mib"))
        print(f"| {args.rows:,} rows | {seconds:.1f} s | {cpu:.1f} s CPU | {peak:.0f} MiB | "
              f"{peak - baselines[src]:.0f} MiB above the imports ({baselines[src]:.0f} MiB) | {src} | {files} |")


if __name__ == "__main__":
    main()
