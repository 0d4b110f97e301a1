"""Where the GPU extraction's time goes: each stage alone, then a ``torch.profiler`` trace of the real loop.

Made for the same device call as ``bench_gpu.py`` (``benchmarks/gpu_check.sh``)::

    python benchmarks/profile_gpu.py --out $OUT               # resnet50, 20 batches of 256 JPEGs
    python benchmarks/profile_gpu.py --smoke --out /tmp/p     # seconds on a CPU

1. **Stages alone** (img/s, each with its input already at hand): the readers
   (worker processes, or threads) delivering packed batches; the batched device
   decode; decode + orient + resize + crop; readers and decode chained
   (``iter_device_batches``, no forward); normalise + forward + copy-out of
   decoded device batches; and decode + resize of one batch of JPEGs of mixed
   sizes (about one size group per image, as real photos).
2. **Trace**, once per reader (worker processes, then threads): one warm-up
   extraction, then the same ``--batches`` batches through ``extract_to_store``
   (``extract.decode: gpu``, the engine's loop, HDF5 store) under
   ``torch.profiler`` (CPU and CUDA activities). The loop's own labels
   (``featcache.read_files``, ``featcache.device_decode``,
   ``featcache.wait_for_input``) and this script's (``featcache.forward``)
   show, per image, the time the main thread waits for input, the time spent
   decoding, and how much of the wall time the GPU runs kernels at all.

A stage or a trace that raises is reported with its error and the others go on
(one GPU call comes 15 minutes at a time). Writes ``profile_gpu.json`` (the
numbers), ``profile_gpu.md`` (tables), ``profile_gpu_ops.txt`` (top operators
of each trace) and ``profile_gpu_trace_<reader>.json.gz`` (open in Perfetto or
chrome://tracing) under ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench_gpu import device_name, make_jpegs, plan_for, sync, timed
from featcache.extract.decode.decoders import decode_each, gpu_decode_status, select_decoder
from featcache.extract.decode.device import DecodeStats, DeviceDecodeDataset, decode_items, iter_device_batches
from featcache.extract.decode.packing import READERS, iter_packed_batches
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.plan import build_runner
from featcache.extract.zoo.weights import load_backbone

#: Labels whose total time per image the summary reports (CPU time on the thread that records them).
LABELS = ("featcache.wait_for_input", "featcache.read_files", "featcache.device_decode", "featcache.forward")


class LabelledRunner:
    """A runner whose forwards are labelled ``featcache.forward`` in the trace (everything else delegated)."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def forward_pooled(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with record_function("featcache.forward"):
            return self._runner.forward_pooled(batch)

    def __call__(self, batch: Any) -> dict[str, Any]:
        with record_function("featcache.forward"):
            return self._runner(batch)


def guarded(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"error": ...}`` when it raises (printed with its traceback)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - reported in the results, the other steps go on
        print(f"  {what} failed: {type(error).__name__}: {error}", flush=True)
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def stages(manifest, mixed, runner, preprocess: Preprocessor, args: argparse.Namespace) -> dict[str, Any]:
    """img/s of each stage of the device-decode path alone, then chained (see the module docstring)."""
    dataset = DeviceDecodeDataset(manifest, preprocess)
    decoder = select_decoder(args.device)
    rows = list(range(len(manifest)))
    batches = [rows[start:start + args.batch_size] for start in range(0, len(rows), args.batch_size)]
    n = len(rows)
    held = list(iter_packed_batches(dataset, batches, num_workers=args.workers))
    decoded = [decode_items(items, dataset, decoder) for items in held]  # warm-up, and the forward's input
    steps: dict[str, Callable[[], Any]] = {}
    for reader in READERS:
        steps[f"read ({reader})"] = lambda reader=reader: sum(len(b.rows) for b in iter_packed_batches(
            dataset, batches, reader=reader, num_workers=args.workers))
    steps["decode"] = lambda: [decode_each(decoder, list(torch.split(b.data, [k for k in b.lengths if k])))
                               for b in held]
    steps["decode+resize"] = lambda: [decode_items(items, dataset, decoder) for items in held]
    mixed_dataset = DeviceDecodeDataset(mixed, preprocess)
    mixed_held = list(iter_packed_batches(mixed_dataset, [list(range(len(mixed)))], num_workers=args.workers))
    decode_items(mixed_held[0], mixed_dataset, decoder)  # warm-up
    steps["decode+resize, mixed sizes"] = lambda: decode_items(mixed_held[0], mixed_dataset, decoder)
    for reader in READERS:
        steps[f"read ({reader}) + decode"] = lambda reader=reader: [b for b in iter_device_batches(
            manifest, rows, preprocess=preprocess, device=args.device, batch_size=args.batch_size,
            num_workers=args.workers, reader=reader)]

    def forward() -> None:
        for _, images, _ in decoded:
            features = runner.forward_pooled(preprocess.normalize_batch(images))
            {k: v.cpu() for k, v in features.items()}

    forward()
    steps["forward + copy-out"] = forward
    counts = {stage: len(mixed) if "mixed" in stage else n for stage in steps}
    return {stage: guarded(stage, lambda fn=fn, stage=stage: timed(fn, counts[stage], args.device)[0])
            for stage, fn in steps.items()}


def profiler_options() -> dict[str, Any]:
    """``torch.profiler.profile`` options that record every thread, where this torch can.

    By default the profiler records only the thread that starts it: on CUDA the device loader reads and decodes
    in its own thread (``featcache.read_files`` and ``featcache.device_decode`` are recorded there), so without
    this their times are 0. ``_ExperimentalConfig(profile_all_threads=True)`` (torch 2.11 has it) records all
    threads; a torch without it traces the main thread only.
    """
    try:
        from torch.profiler import _ExperimentalConfig

        return {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError) as error:  # an older torch: its config takes no such argument
        print(f"  the profiler records the main thread only ({type(error).__name__}: {error})", flush=True)
        return {}


def busy_fraction(intervals: list[tuple[float, float]], wall_us: float) -> float:
    """The fraction of ``wall_us`` covered by the union of ``(start, end)`` intervals (µs)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered / wall_us if wall_us > 0 else 0.0


def trace(manifest, runner, preprocess: Preprocessor, work: Path, args: argparse.Namespace,
          out: Path, reader: str) -> dict[str, Any]:
    """Profile the extraction loop over every image with ``reader``; the per-image summary (writes the trace)."""
    n = len(manifest)
    labelled = LabelledRunner(runner)
    plan = plan_for(args, "gpu")
    stats: list[DecodeStats] = []  # one per run; the last is the profiled run's

    def loader(rows, batch_size):  # the engine's own device loader, with this reader
        stats.append(DecodeStats())
        return iter_device_batches(manifest, rows, preprocess=preprocess, device=args.device, batch_size=batch_size,
                                   num_workers=plan.num_workers, reader=reader, stats=stats[-1])

    def run() -> None:
        store = work / "profile.h5"
        store.unlink(missing_ok=True)
        extract_to_store(manifest, labelled, preprocess, store, plan=plan, config={"bench": "profile"},
                         batch_size=args.batch_size, block_rows=1024, progress=False, loader_factory=loader)

    run()  # warm-up: workers, cudnn autotuning, decoder initialisation
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities, **profiler_options()) as prof:
        rate, _ = timed(run, n, args.device)
    wall_us = n / rate * 1e6
    events = prof.events()
    kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA"]
    labels = {label: sum(e.cpu_time_total for e in events if e.name == label) / n for label in LABELS}
    raw = out / f"profile_gpu_trace_{reader}.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as source, gzip.open(str(raw) + ".gz", "wb") as target:
        shutil.copyfileobj(source, target)
    raw.unlink()
    sort = "self_cuda_time_total" if kernels else "self_cpu_time_total"
    with open(out / "profile_gpu_ops.txt", "a") as ops:  # one file for both traces (few files come back)
        ops.write(f"== files read by {reader}\n{prof.key_averages().table(sort_by=sort, row_limit=30)}\n")
    return {"images": n, "img_per_s": rate, "us_per_image": wall_us / n, "device_rows": stats[-1].device,
            "cpu_rows": stats[-1].cpu + stats[-1].rejected,
            "gpu_busy_fraction": busy_fraction(kernels, wall_us) if kernels else None,
            "us_per_image_by_label": labels}


def _rate_text(rate: Any) -> str:
    """A stage's img/s, its error (a failed stage), or the error of the whole stages step (under ``error``)."""
    if isinstance(rate, dict):
        return rate["error"]
    return rate if isinstance(rate, str) else f"{rate:,.0f}"


def markdown(report: dict) -> str:
    """Tables for ``benchmarks/README.md``."""
    lines = [f"{report['device_name']}, {report['backbone']}, {report['images']} JPEGs {report['image_size']}, batch "
             f"{report['batch_size']}, {report['workers']} workers; decoder: {report['decoder']}", "",
             "| stage alone | img/s |", "|---|---:|"]
    lines += [f"| {stage} | {_rate_text(rate)} |" for stage, rate in report["stages"].items()]
    for reader, t in report["traces"].items():
        if "error" in t:
            lines += ["", f"Trace, files read by {reader}: failed: {t['error']}"]
            continue
        busy = "n/a" if t["gpu_busy_fraction"] is None else f"{t['gpu_busy_fraction']:.0%}"
        lines += ["", f"Trace, files read by {reader}, {t['images']} images: {t['img_per_s']:,.0f} img/s, "
                  f"{t['us_per_image']:.0f} µs per image, GPU running kernels {busy} of the wall time; "
                  f"{t['device_rows']} rows decoded on the device, {t['cpu_rows']} on the CPU path.", "",
                  "| label (CPU time of its thread) | µs per image |", "|---|---:|"]
        lines += [f"| `{label}` | {us:.0f} |" for label, us in t["us_per_image_by_label"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Stages alone, then the trace; write the JSON, the tables and the trace under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="profile_gpu_out")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batches", type=int, default=20, help="batches of JPEGs (every step runs them all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of every step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.batch_size, args.workers, args.input_size = 2, 4, 0, 32
        args.backbone, args.device = "resnet18", "cpu" if args.device == "auto" else args.device
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.fp16 = args.device.startswith("cuda")
    args.images = args.batches * args.batch_size
    ok, decoder = gpu_decode_status(args.device)
    if not ok:
        raise SystemExit(f"GPU decode is not available on {args.device}: {decoder}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_gpu_ops.txt").unlink(missing_ok=True)  # the traces append to it
    work = Path(tempfile.mkdtemp(prefix="profile_gpu_"))
    started = time.perf_counter()
    try:
        image_size = (40, 30) if args.smoke else (500, 375)
        manifest = make_jpegs(work / "images", args.images, image_size, processes=1 if args.smoke else None)
        mixed = make_jpegs(work / "mixed", args.batch_size, image_size, processes=1 if args.smoke else None,
                           mixed=True)
        loaded = load_backbone(args.backbone, "random")
        preprocess = Preprocessor.from_spec(loaded.spec, input_size=args.input_size)
        runner, _ = build_runner(loaded, ["default"], plan_for(args, "gpu"), channels_last=True)
        report = {"device_name": device_name(args.device), "backbone": args.backbone, "images": args.images,
                  "image_size": "x".join(map(str, image_size)),
                  "batch_size": args.batch_size, "workers": args.workers, "decoder": decoder,
                  # setup that raises (reading, a warm-up) loses the stages alone: the traces still run
                  "stages": guarded("stages", lambda: stages(manifest, mixed, runner, preprocess, args)),
                  "traces": {reader: guarded(f"trace ({reader})", lambda reader=reader: trace(
                      manifest, runner, preprocess, work, args, out, reader)) for reader in READERS}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sync(args.device)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "profile_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "profile_gpu.md").write_text(table)
    print(table, flush=True)
    return report


if __name__ == "__main__":
    main()
