"""Does the block writer thread hold the GIL while it compresses a block? (on the CPU, no GPU needed)

In the extraction loop (``extract/blockloop.py``) a writer thread commits each
finished block (``store/blocks.write_block``: an HDF5 file, gzip level 1 with
shuffle) while the loop thread keeps launching the next forward and, on a GPU,
a decode thread feeds it. If h5py held the GIL through HDF5's filter pipeline,
every block commit would stall both for the whole write (tens of ms).

This measures what the loop thread sees while a background thread works: a
pure-Python loop stands in for the loop thread (kernel launches, batch
assembly), and its iteration rate and the time it spends stalled (gaps over
1 ms between two iterations) are compared with and without the background
thread. Two controls show the probe can tell: a thread
spinning in pure Python (holds the GIL: the loop's rate falls and its stalls
reach the interpreter's switch interval, 5 ms) and ``zlib.compress`` on the
block's bytes (releases the GIL)::

    python benchmarks/bench_writer_gil.py            # 3 repeats x 2 s per case, ~30 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.store.blocks import write_block

#: Rows of a block (``extract_run.block_rows``' default) and the layers of a resnet50 store (pool5, res4 pooled).
BLOCK_ROWS = 512
DIMS = {"features/0": 2048, "features/1": 1024}


def block_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """One committed block's arrays: ReLU-like float16 features (about half zeros), no bad rows."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {"fingerprint": np.array("bench"), "block": np.array(0, dtype=np.int64),
                                     "kept_rows": np.arange(BLOCK_ROWS, dtype=np.int64),
                                     "error_rows": np.zeros(0, dtype=np.int64),
                                     "error_reasons": np.zeros(0, dtype="<U1")}
    for key, dim in DIMS.items():
        arrays[key] = np.maximum(rng.standard_normal((BLOCK_ROWS, dim)), 0).astype(np.float16)
    return arrays


def loop_thread(seconds: float, stall_s: float = 1e-3) -> tuple[float, float, float]:
    """A pure-Python loop for ``seconds``: its iterations per second, the fraction of the time spent in
    stalls (gaps between two iterations over ``stall_s``: the thread waited for the GIL, or was descheduled)
    and the longest stall (ms)."""
    n, stalled, longest = 0, 0.0, 0.0
    last = time.perf_counter()
    end = last + seconds
    while last < end:
        now = time.perf_counter()
        gap = now - last
        if gap > stall_s:
            stalled += gap
            longest = max(longest, gap)
        last = now
        n += 1
    return n / seconds, stalled / seconds, longest * 1e3


def background_cases(folder: Path) -> dict[str, Callable[[threading.Event], None]]:
    """The background threads: the block writer and the two controls (each runs until its event is set)."""
    arrays = block_arrays()
    raw = b"".join(arrays[key].tobytes() for key in DIMS)

    def writer(stop: threading.Event) -> None:
        i = 0
        while not stop.is_set():
            write_block(folder / f"block-{i % 4}.h5", arrays, block_rows=BLOCK_ROWS, compression="gzip")
            i += 1

    def python_spin(stop: threading.Event) -> None:
        x = 0
        while not stop.is_set():
            for _ in range(10_000):
                x += 1

    def zlib_compress(stop: threading.Event) -> None:
        while not stop.is_set():
            zlib.compress(raw, 1)

    return {"block writer (write_block, gzip 1)": writer, "control: pure-Python thread (holds the GIL)": python_spin,
            "control: zlib.compress (releases the GIL)": zlib_compress}


def measure(seconds: float, repeats: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        arrays = block_arrays()
        started = time.perf_counter()
        for i in range(5):
            write_block(folder / f"alone-{i}.h5", arrays, block_rows=BLOCK_ROWS, compression="gzip")
        write_ms = (time.perf_counter() - started) / 5 * 1e3
        cases = background_cases(folder)
        rows: dict[str, list[tuple[float, float, float]]] = {"alone": [], **{name: [] for name in cases}}
        for _ in range(repeats):  # interleaved: alone, then each background case
            rows["alone"].append(loop_thread(seconds))
            for name, work in cases.items():
                stop = threading.Event()
                thread = threading.Thread(target=work, args=(stop,), daemon=True)
                thread.start()
                time.sleep(0.05)
                rows[name].append(loop_thread(seconds))
                stop.set()
                thread.join()
    alone = statistics.median(rate for rate, _, _ in rows["alone"])
    return {"block_write_ms": round(write_ms, 1), "switch_interval_ms": sys.getswitchinterval() * 1e3,
            "cases": {name: {"loop_rate_vs_alone": round(statistics.median(r for r, _, _ in runs) / alone, 3),
                             "stalled_fraction": round(statistics.median(f for _, f, _ in runs), 3),
                             "longest_stall_ms": round(statistics.median(m for _, _, m in runs), 1)}
                      for name, runs in rows.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = measure(args.seconds, args.repeats)
    print(f"one block ({BLOCK_ROWS} rows, dims {list(DIMS.values())}, float16) written alone: "
          f"{result['block_write_ms']} ms")
    print("| background thread | loop thread's rate vs alone | time stalled (gaps > 1 ms) | longest stall (ms) |")
    print("|---|---:|---:|---:|")
    for name, row in result["cases"].items():
        print(f"| {name} | {row['loop_rate_vs_alone']:.2f} | {row['stalled_fraction']:.1%} | "
              f"{row['longest_stall_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
