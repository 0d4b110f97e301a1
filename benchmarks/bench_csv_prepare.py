"""Time and peak memory of ``prepare`` of a CSV manifest of URLs (``data.source: csv``), each in a clean process.

    python benchmarks/bench_csv_prepare.py --rows 1000000 --repeats 3
    python benchmarks/bench_csv_prepare.py --rows 1000000 --repeats 3 --src /path/to/other/checkout/src

The CSV (``path,label``: HTTPS URLs, 100 classes) is written once; each repeat runs the ``prepare`` stage
(the CSV read and checked, ``manifest.csv``, ``manifest.classes.json`` and ``summary.json`` written) in a fresh
interpreter (``--src`` chooses which featcache it imports, for a same-run comparison of two checkouts) and
reports its wall time and peak RSS (``ru_maxrss`` of that child), less the interpreter and imports measured the
same way without the call, and the sha256 of the files it wrote (equal across checkouts: the same manifest).
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
start = time.perf_counter()
if sys.argv[1]:
    csv = Path(sys.argv[1])
    params = parse_params({"data": {"name": "urls", "source": "csv", "path": str(csv.parent), "csv": csv.name}})
    manifest = prepare(params, sys.argv[2])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
files = {name: hashlib.sha256((Path(sys.argv[2]) / name).read_bytes()).hexdigest()[:16]
         for name in ("manifest.csv", "manifest.classes.json", "summary.json")} if sys.argv[1] else {}
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "imports_mib": base / 1024,
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
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"),
                        help="the src folder of the featcache to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featcache-csv-") as tmp:
        csv_path = write_csv(Path(tmp) / "urls.csv", args.rows)
        baseline = run_child(None, args.src)["peak_mib"]
        runs = [run_child(csv_path, args.src, Path(tmp) / f"prepared{k}") for k in range(args.repeats)]
    assert all(run["rows"] == args.rows for run in runs)
    assert all(run["files"] == runs[0]["files"] for run in runs)
    seconds = statistics.median(run["seconds"] for run in runs)
    peak = statistics.median(run["peak_mib"] for run in runs)
    print(f"| {args.rows:,} rows | {seconds:.1f} s | {peak:.0f} MiB | {peak - baseline:.0f} MiB above the imports "
          f"({baseline:.0f} MiB) | {args.src} | {runs[0]['files']} |")


if __name__ == "__main__":
    main()
