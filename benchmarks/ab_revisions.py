"""Same-run A/B of two git revisions on the CPU: "no regression" (or a speed-up) with a ratio.

Each side runs the benchmark in a fresh process with ``PYTHONPATH`` pointing
at that revision's ``src/`` (a temporary ``git worktree``); the benchmark code
is this checkout's for both. The sides alternate (A B, then B A) and each
reports the median of ``--repeats``. ``--bench``:

* ``extract`` (default): ``bench_extract.end_to_end`` (``extract_to_store``,
  torch on the CPU, the plan's loader, HDF5 store) on the same generated
  images, photo-sized JPEGs and 8x8 PNGs;
* ``decode-host``: ``bench_decode_host.host_rate``, the host cost of the
  device decode path's batch assembly (uniform and mixed image sizes) and of
  a reader's per-file work (read, probe, pack) and of the header probe alone.

::

    python benchmarks/ab_revisions.py --before 5f672b8 --images 256 --repeats 3
    python benchmarks/ab_revisions.py --bench decode-host --before 5f672b8 --repeats 5
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

ROOT = Path(__file__).resolve().parents[1]

#: One timed run in a child process: argv = images folder, kind, count; prints img/s.
CHILDREN = {
    "extract": """
import json, sys
sys.path.insert(0, {benchmarks!r})
import bench_extract
manifest = bench_extract.make_images(__import__("pathlib").Path(sys.argv[1]), int(sys.argv[3]), sys.argv[2])
print(json.dumps(bench_extract.end_to_end(manifest, 64, None)))
""",
    "decode-host": """
import json, sys
sys.path.insert(0, {benchmarks!r})
import torch
torch.set_num_threads(1)
import bench_decode_host
print(json.dumps(bench_decode_host.host_rate(sys.argv[2], int(sys.argv[3]))))
""",
}
#: The kinds each benchmark compares.
KINDS = {"extract": ("photo", "digits"), "decode-host": ("uniform", "mixed", "reader", "probe")}


def run(src: Path, folder: Path, kind: str, images: int, bench: str = "extract") -> float:
    """img/s of one run of ``bench`` with the library of ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = CHILDREN[bench].format(benchmarks=str(ROOT / "benchmarks"))
    out = subprocess.run([sys.executable, "-c", code, str(folder), kind, str(images)], env=env, check=True,
                         capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> dict:
    """Alternate the two revisions; print and return the medians and the after/before ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the A side")
    parser.add_argument("--bench", choices=sorted(CHILDREN), default="extract")
    parser.add_argument("--images", type=int, default=256, help="images per run (decode-host: per batch)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(worktree), args.before],
                       check=True)
        sides = {f"before ({args.before})": worktree / "src", "after (this checkout)": ROOT / "src"}
        kinds = KINDS[args.bench]
        rates: dict[str, dict[str, list[float]]] = {side: {kind: [] for kind in kinds} for side in sides}
        try:
            for repeat in range(args.repeats):
                for side in (list(sides) if repeat % 2 == 0 else list(reversed(sides))):
                    for kind in kinds:
                        rate = run(sides[side], Path(tmp) / f"{kind}-{repeat}-{len(rates[side][kind])}", kind,
                                   args.images, args.bench)
                        rates[side][kind].append(rate)
                        print(f"  repeat {repeat + 1}: {side} {kind} {rate:.1f} img/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    before, after = sides
    report = {kind: {"before": statistics.median(rates[before][kind]), "after": statistics.median(rates[after][kind]),
                     "runs": {side: rates[side][kind] for side in sides}} for kind in kinds}
    for kind, result in report.items():
        result["ratio"] = result["after"] / result["before"]
        print(f"{kind}: before {result['before']:.1f}, after {result['after']:.1f} img/s, after / before "
              f"{result['ratio']:.3f}")
    return report


if __name__ == "__main__":
    main()
