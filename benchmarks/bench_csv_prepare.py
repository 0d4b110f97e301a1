"""Time and peak memory of reading a CSV manifest of URLs (``data.source: csv``), each run in a clean process.

    python benchmarks/bench_csv_prepare.py --rows 1000000 --repeats 3
    python benchmarks/bench_csv_prepare.py --rows 1000000 --repeats 3 --src /path/to/other/checkout/src

The CSV (``path,label``: HTTPS URLs, 100 classes) is written once; each repeat runs ``from_csv`` in a fresh
interpreter (``--src`` chooses which featcache it imports, for a same-run comparison of two checkouts) and
reports its wall time and peak RSS (``ru_maxrss`` of that child), less the interpreter and imports measured the
same way without the call.
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
import json, resource, sys, time
from featcache.extract.inputs.sources import from_csv
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
manifest = from_csv(sys.argv[1], {"train": 0.8, "val": 0.1, "test": 0.1}, 0) if sys.argv[1] else None
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "imports_mib": base / 1024,
                  "rows": 0 if manifest is None else len(manifest.ids)}))
"""


def write_csv(path: Path, rows: int) -> Path:
    """``rows`` URL rows of 100 classes."""
    with open(path, "w", encoding="utf-8") as out:
        out.write("path,label\n")
        for i in range(rows):
            out.write(f"https://images.example.org/collection/{i // 1000:04d}/img_{i:07d}.jpg,class_{i % 100}\n")
    return path


def run_child(csv_path: Path | None, src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-c", CHILD, str(csv_path or "")], capture_output=True, text=True,
                          env=env, check=True)
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
        runs = [run_child(csv_path, args.src) for _ in range(args.repeats)]
    assert all(run["rows"] == args.rows for run in runs)
    seconds = statistics.median(run["seconds"] for run in runs)
    peak = statistics.median(run["peak_mib"] for run in runs)
    print(f"| {args.rows:,} rows | {seconds:.1f} s | {peak:.0f} MiB | {peak - baseline:.0f} MiB above the imports "
          f"({baseline:.0f} MiB) | {args.src} |")


if __name__ == "__main__":
    main()
