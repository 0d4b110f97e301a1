"""Extraction benchmarks: end-to-end vs pure forward, naive loop, ONNX vs torch, memory, malloc.

Run from the repo root (``make bench`` runs every benchmark)::

    python benchmarks/bench_extract.py                 # all cases, prints markdown tables
    python benchmarks/bench_extract.py --quick         # fewer images and repeats
    python benchmarks/bench_extract.py --case onnx --repeats 5

Every case runs with the glibc malloc tuning on (``extract_run.malloc_tuning: true``, the
pipeline's default) unless ``--no-malloc-tuning``; the ``malloc`` case compares both in
fresh processes.

Cases
-----
forward  pure forward throughput of the backbone (random input, channels_last and NCHW)
ratio    end-to-end ``extract_to_store`` (decode + preprocess + forward + HDF5 write) on
         generated images: tiny 8x8 digits-like PNGs and photo-sized 500x375 JPEGs;
         reported as a ratio of the fastest pure forward
naive    the naive loop (PIL open, preprocess, one image per forward, list, save at end)
onnx     onnxruntime CPU vs torch eager, like for like: each side at its best (torch
         channels_last; both with the malloc tuning, the same thread count and warm-up),
         alternating within every repeat (torch first in even repeats, onnxruntime first in
         odd ones) so that load from other jobs hits both; medians of ``--repeats``. Forward
         (same random batch) and end to end (the 1,797 scikit-learn digits through
         ``extract_to_store``, the shipped params' layers ``pool`` + ``block6``)
memory   peak RSS of a full extraction of N and 4N images, each in a clean process
         (started through ``/bin/sh`` so that ``ru_maxrss`` is the child's own)
malloc   pure forward with and without the glibc malloc tuning (fresh subprocess each)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.malloc import tune_malloc
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.registry import get_backbone
from featcache.extract.zoo.weights import load_backbone

BACKBONE = "efficientnet_lite0"
#: The layers of the shipped params.yaml (``backbones.efficientnet_lite0.layers``).
PARAMS_LAYERS = ["pool", "block6"]


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_images(root: Path, n: int, kind: str, seed: int = 0) -> Manifest:
    """Write ``n`` images: ``digits`` (8x8 grayscale PNG) or ``photo`` (500x375 JPEG)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        if kind == "digits":
            image = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L")
            path = root / f"{index:06d}.png"
        else:
            # Smooth gradients plus noise: JPEG-compressible like a photo, not like white noise.
            y, x = np.mgrid[0:375, 0:500]
            base = np.stack([(x * (1 + index % 3)) % 256, (y * 2) % 256, (x + y + 17 * index) % 256], axis=-1)
            noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(noisy)
            path = root / f"{index:06d}.jpg"
        image.save(path, quality=90) if kind == "photo" else image.save(path)
        paths.append(path.name)
    labels = np.arange(n, dtype=np.int64) % 2
    # A fixed 60/20/20 pattern, not the library's split: ab_revisions.py runs this file against older revisions.
    splits = np.resize(np.array([0, 0, 0, 1, 2], dtype=np.uint8), n)
    return Manifest([p for p in paths], paths, splits, "classification", labels=labels, classes=["a", "b"], root=root)


def _extractor(channels_last: bool = True) -> tuple[TorchFeatureExtractor, Preprocessor]:
    loaded = load_backbone(BACKBONE)
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["pool"], channels_last=channels_last)
    return extractor, Preprocessor.from_spec(loaded.spec)


def pure_forward(batch_size: int, channels_last: bool, seconds: float = 15.0) -> float:
    """Images per second of the forward pass alone (random input)."""
    extractor, _ = _extractor(channels_last)
    size = get_backbone(BACKBONE).input_size
    batch = torch.randn(batch_size, 3, size, size)
    extractor(batch)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        extractor(batch)
        count += batch_size
    return count / (time.perf_counter() - start)


def end_to_end(manifest: Manifest, batch_size: int, workers: int | None) -> float:
    """Images per second of ``extract_to_store`` including the HDF5 write."""
    from featcache.extract.engine import extract_to_store
    from featcache.extract.plan import plan_extraction

    extractor, preprocess = _extractor(True)
    plan = plan_extraction(device="cpu", backend="torch", num_workers=workers)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_to_store(manifest, extractor, preprocess, Path(tmp) / "bench.h5", config={"bench": True},
                         plan=plan, batch_size=batch_size, progress=False)
        return len(manifest) / (time.perf_counter() - start)


def naive_loop(manifest: Manifest) -> float:
    """The baseline: open, preprocess and forward one image at a time, save at the end."""
    loaded = load_backbone(BACKBONE)
    preprocess = Preprocessor.from_spec(loaded.spec)
    model = loaded.model.eval()
    features = []
    start = time.perf_counter()
    with torch.no_grad():
        for row in range(len(manifest)):
            image = Image.open(manifest.absolute_path(row)).convert("RGB")
            features.append(model.forward_features(preprocess(image)[None]).mean(dim=(2, 3)).numpy())
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "naive.npy", np.concatenate(features))
    return len(manifest) / (time.perf_counter() - start)


def _timed_forward(runner, batch: torch.Tensor, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        runner(batch)
    return batches * batch.shape[0] / (time.perf_counter() - start)


def _digits_manifest(root: Path, n: int | None = None) -> Manifest:
    """The scikit-learn digits as PNGs (what the ``digits`` stage writes); the first ``n`` per file name if given."""
    from featcache.extract.inputs.sources import from_folder, write_digits

    write_digits(root)
    if n is not None:
        for path in sorted(root.rglob("*.png"), key=lambda p: p.name)[n:]:
            path.unlink()
    return from_folder(root, {"train": 0.6, "val": 0.2, "test": 0.2}, 0)


def _median_row(samples: dict[str, list[float]]) -> dict[str, float]:
    ratios = [o / t for o, t in zip(samples["onnx"], samples["torch"])]
    return {"torch": statistics.median(samples["torch"]), "onnx": statistics.median(samples["onnx"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def onnx_vs_torch(batch_size: int, repeats: int, threads: int, forward_batches: int = 4,
                  warmup: int = 2, e2e: bool = True, digits: int | None = None) -> dict[str, dict[str, float]]:
    """onnxruntime CPU vs torch eager, both at their best, alternating within each repeat.

    Returns ``{"forward": row, "e2e": row, "export_s": ...}``; a row holds the median
    img/s of each side, the median of the per-repeat ratios onnx/torch and its range.
    """
    from featcache.extract.engine import extract_to_store
    from featcache.extract.onnx.runner import OnnxFeatureRunner

    loaded = load_backbone(BACKBONE)
    preprocess = Preprocessor.from_spec(loaded.spec)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        onnx = OnnxFeatureRunner.from_model(loaded.model, loaded.spec, PARAMS_LAYERS, path=tmp / "m.onnx",
                                            intra_op_threads=threads)
        export_s = time.perf_counter() - start
        runners = {"torch": TorchFeatureExtractor(loaded.model, loaded.spec, PARAMS_LAYERS, channels_last=True),
                   "onnx": onnx}
        size = loaded.spec.input_size
        batch = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        for runner in runners.values():  # the same warm-up for both
            for _ in range(warmup):
                runner(batch)
        manifest = _digits_manifest(tmp / "digits", digits) if e2e else None
        forward: dict[str, list[float]] = {"torch": [], "onnx": []}
        end_to_end: dict[str, list[float]] = {"torch": [], "onnx": []}
        for repeat in range(repeats):
            order = ["torch", "onnx"] if repeat % 2 == 0 else ["onnx", "torch"]
            for side in order:
                forward[side].append(_timed_forward(runners[side], batch, forward_batches))
            for side in order if e2e else []:
                out = tmp / f"{side}-{repeat}.h5"
                start = time.perf_counter()
                extract_to_store(manifest, runners[side], preprocess, out, config={"bench": side},
                                 batch_size=batch_size, progress=False)
                end_to_end[side].append(len(manifest) / (time.perf_counter() - start))
                out.unlink()
            print(f"  repeat {repeat + 1}/{repeats}: forward torch {forward['torch'][-1]:.1f} onnx "
                  f"{forward['onnx'][-1]:.1f} img/s" + (f"; end to end torch {end_to_end['torch'][-1]:.1f} onnx "
                  f"{end_to_end['onnx'][-1]:.1f} img/s" if e2e else "") + f"; load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
    result = {"forward": _median_row(forward), "export_s": export_s, "n_images": len(manifest) if e2e else 0}
    if e2e:
        result["e2e"] = _median_row(end_to_end)
    return result


def _subprocess_json(code: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, **(env or {})})
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_mb(n: int, kind: str, batch_size: int = 64) -> float:
    """Peak RSS (MiB) of a clean process extracting ``n`` generated images.

    The child is started through ``/bin/sh`` (a fork of a small shell, then exec):
    Linux carries the pre-``execve`` high-water mark into ``ru_maxrss``, so a child
    exec'ed straight from this big process would report this process's peak. The
    child's ``VmHWM`` must agree.
    """
    code = f"""
import json, resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from featcache.extract.malloc import tune_malloc
tune_malloc(True)
from bench_extract import make_images, end_to_end
with tempfile.TemporaryDirectory() as tmp:
    manifest = make_images(Path(tmp) / "img", {n}, {kind!r})
    end_to_end(manifest, {batch_size}, None)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "hwm": hwm / 1024}}))
"""
    result = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", code],
                            capture_output=True, text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if abs(out["rss"] - out["hwm"]) > 0.05 * out["hwm"]:
        raise RuntimeError(f"ru_maxrss {out['rss']:.0f} MiB != VmHWM {out['hwm']:.0f} MiB: inherited peak?")
    return out["rss"]


def malloc_forward(enabled: bool, batch_size: int) -> float:
    """Pure forward img/s in a fresh process with the malloc tuning on or off."""
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from featcache.extract.malloc import tune_malloc
tune_malloc({enabled})
from bench_extract import pure_forward
print(json.dumps({{"ips": pure_forward({batch_size}, True)}}))
"""
    return _subprocess_json(code)["ips"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["forward", "ratio", "naive", "onnx", "memory", "malloc", "all"],
                        default="all")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the onnx case (median)")
    parser.add_argument("--no-e2e", action="store_true", help="onnx case: forward only")
    parser.add_argument("--digits", type=int, default=None, help="onnx case: the first N digits (default all 1,797)")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.digits = 128, 3, args.digits or 384
    tuned = tune_malloc(not args.no_malloc_tuning)
    threads = _threads()
    torch.set_num_threads(threads)
    cases = ["forward", "ratio", "naive", "onnx", "memory", "malloc"] if args.case == "all" else [args.case]
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"malloc tuning {'on' if tuned else 'off'}, load {os.getloadavg()[0]:.2f}; backbone {BACKBONE}, "
          f"batch {args.batch_size}, {args.images} images\n")
    print("| case | result |\n|---|---|")
    forward = None
    if {"forward", "ratio", "naive"} & set(cases):
        forward_cl = pure_forward(args.batch_size, True)
        forward_nchw = pure_forward(args.batch_size, False)
        forward = max(forward_cl, forward_nchw)
        print(f"| pure forward channels_last | {forward_cl:.1f} img/s |")
        print(f"| pure forward NCHW | {forward_nchw:.1f} img/s |")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("digits", "photo"):
            if not {"ratio", "naive"} & set(cases):
                break
            manifest = make_images(Path(tmp) / kind, args.images, kind)
            if "ratio" in cases:
                e2e = end_to_end(manifest, args.batch_size, args.workers)
                print(f"| end-to-end {kind} | {e2e:.1f} img/s, {e2e / forward:.2f} of pure forward |")
            if "naive" in cases:
                naive = naive_loop(manifest)
                e2e = end_to_end(manifest, args.batch_size, args.workers) if "ratio" not in cases else e2e
                print(f"| naive loop {kind} | {naive:.1f} img/s; featcache is {e2e / naive:.1f}x faster |")
    if "onnx" in cases:
        load = os.getloadavg()[0]
        result = onnx_vs_torch(args.batch_size, args.repeats, threads, e2e=not args.no_e2e, digits=args.digits)
        rows = [("forward", "forward (same batch)")] + ([("e2e", f"end to end, {result['n_images']} digits "
                                                                  f"(`extract_to_store`)")] if "e2e" in result else [])
        for key, label in rows:
            r = result[key]
            print(f"| onnxruntime vs torch, {label}, median of {args.repeats} | {r['onnx']:.1f} vs {r['torch']:.1f} "
                  f"img/s = **{r['ratio']:.2f}x** (per-repeat {r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
        print(f"| ONNX export (once per backbone/layers) | {result['export_s']:.1f} s |")
        print(f"| load average during the onnx case | {load:.1f} -> {os.getloadavg()[0]:.1f} |")
    if "memory" in cases:
        n = max(args.images // 8, 4 * args.batch_size)  # several full batches: N < batch size would compare batch sizes
        small, large = peak_rss_mb(n, "photo"), peak_rss_mb(4 * n, "photo")
        print(f"| peak RSS {n} vs {4 * n} photos (clean process each) | {small:.0f} vs {large:.0f} MiB "
              f"= {large / small:.2f}x |")
    if "malloc" in cases:
        off, on = malloc_forward(False, args.batch_size), malloc_forward(True, args.batch_size)
        print(f"| malloc tuning off vs on (pure forward) | {off:.1f} vs {on:.1f} img/s = {on / off:.2f}x |")


if __name__ == "__main__":
    main()
