"""Benchmark the assembly of a sharded run: N x D float16 rows in committed blocks -> the final store.

Each phase runs in a clean child process (its ``ru_maxrss`` is that phase's
peak memory):

1. **write**: commit every block of N synthetic rows (what the workers of a
   sharded run do; each block file is compressed and fsynced);
2. **assemble**: a new ``StoreWriter`` finds every block committed and
   ``finalize()`` writes the final HDF5 file (fsynced) and renames it;
3. the same two phases with ``finalize(raw_chunks=False)``: what assembly
   cost when it decompressed and compressed every feature a second time.

Features are post-ReLU-like (half zeros, the rest |N(0, 1)|) in float16, from
a pool of 16 random blocks (drawing 4 GiB of random numbers would dominate the
run); feature generation is outside the timed calls. The page cache holds the
block files (24 GiB RAM), so the assembly reads them from memory; writes are
fsynced. Prints a markdown table.

Usage::

    python benchmarks/bench_assemble.py                       # 1,000,000 x 2,048, 2 repeats
    python benchmarks/bench_assemble.py --rows 100000 --repeats 3
    python benchmarks/bench_assemble.py --variants raw --src /path/to/older/featcache/src   # the old code
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

POOL = 16


def _kwargs(rows: int, dim: int, block_rows: int) -> dict:
    from featcache.store.schema import LayerSpec, canonical_json, sha256_text

    config = canonical_json({"bench": "assemble", "rows": rows, "dim": dim})
    return dict(ids=[f"{i:09d}" for i in range(rows)], splits=(np.arange(rows) % 3).astype(np.uint8),
                classes=["a", "b"], labels=(np.arange(rows) % 2).astype(np.int64), targets=None,
                layers=[LayerSpec("pool", "pool", dim, "avg", (dim, 7, 7), True)],
                attrs={"config": config, "config_sha256": sha256_text(config)},
                dtype="float16", block_rows=block_rows)


def _child(phase: str, out: str, rows: int, dim: int, block_rows: int, raw: bool) -> dict:
    from featcache.store.writer import StoreWriter

    result: dict = {}
    if phase == "write":
        rng = np.random.default_rng(0)
        pool = [np.where(rng.random((block_rows, dim)) < 0.5, 0.0, np.abs(rng.standard_normal((block_rows, dim))))
                .astype(np.float16) for _ in range(POOL)]
        seconds = 0.0
        with StoreWriter(out, **_kwargs(rows, dim, block_rows)) as writer:
            for block in writer.pending_blocks():
                span = writer.block_range(block)
                features = pool[block % POOL][: len(span)]
                started = time.perf_counter()
                writer.commit_block(block, np.arange(span.start, span.stop), {"pool": features})
                seconds += time.perf_counter() - started
        parts = Path(f"{out}.parts")
        result["block_bytes"] = sum(p.stat().st_size for p in parts.rglob("*") if p.is_file())
    else:
        started = time.perf_counter()
        with StoreWriter(out, **_kwargs(rows, dim, block_rows)) as writer:
            assert not writer.pending_blocks()
            if "raw_chunks" in inspect.signature(writer.finalize).parameters:
                writer.finalize(raw_chunks=raw)
            else:  # an older featcache (--src): npz blocks, every chunk compressed at assembly
                writer.finalize()
        seconds = time.perf_counter() - started
        result["store_bytes"] = Path(out).stat().st_size
    result.update(seconds=seconds, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def _run(phase: str, out: Path, args: argparse.Namespace, raw: bool) -> dict:
    command = [sys.executable, __file__, "--child", phase, "--out", str(out), "--rows", str(args.rows),
               "--dim", str(args.dim), "--block-rows", str(args.block_rows)] + ([] if raw else ["--no-raw"])
    env = dict(os.environ, PYTHONPATH=args.src) if args.src else None
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--block-rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the blocks and the store go (default: a temp dir)")
    parser.add_argument("--variants", default="raw,recompress",
                        help="raw: copy aligned chunks (default); recompress: finalize(raw_chunks=False)")
    parser.add_argument("--src", default=None, help="PYTHONPATH of the children: e.g. an older featcache's src/ "
                        "(its npz blocks, compressed at assembly) for a same-run baseline")
    parser.add_argument("--child", choices=("write", "assemble"))
    parser.add_argument("--out")
    parser.add_argument("--no-raw", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.out, args.rows, args.dim, args.block_rows, not args.no_raw)))
        return

    gib = args.rows * args.dim * 2 / 2**30
    free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free / 2**30
    print(f"# {args.rows:,} x {args.dim:,} float16 ({gib:.2f} GiB), block_rows {args.block_rows}, "
          f"load average {os.getloadavg()[0]:.1f}, free disk {free:.0f} GiB")
    print("| assembly | repeat | write blocks s | assemble s | assemble / write | assemble peak RSS MiB | "
          "blocks GiB | store GiB |")
    print("|---|---|---|---|---|---|---|---|")
    labels = {"raw": "raw chunk copy", "recompress": "recompress every chunk"}
    if args.src:
        labels = {"raw": f"{args.src} (its default)", "recompress": f"{args.src} (recompress)"}
    for repeat in range(args.repeats):
        for variant in args.variants.split(","):
            raw = variant == "raw"
            with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-assemble-") as tmp:
                out = Path(tmp) / "store.h5"
                write = _run("write", out, args, raw)
                assembled = _run("assemble", out, args, raw)
            print(f"| {labels[variant]} | {repeat + 1} | {write['seconds']:.1f} | "
                  f"{assembled['seconds']:.1f} | {assembled['seconds'] / write['seconds']:.2f} | "
                  f"{assembled['peak_rss_mib']:.0f} | {write['block_bytes'] / 2**30:.2f} | "
                  f"{assembled['store_bytes'] / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    main()
