"""Extraction benchmarks: end-to-end vs pure forward, naive loop, ONNX vs torch, memory, malloc.

Run from the repo root (``make bench`` runs every benchmark)::

    python benchmarks/bench_extract.py                 # all cases, prints markdown tables
    python benchmarks/bench_extract.py --quick         # fewer images
    python benchmarks/bench_extract.py --case ratio --images 512 --batch-size 64

Cases
-----
forward  pure forward throughput of the backbone (random input, channels_last and NCHW)
ratio    end-to-end ``extract_to_store`` (decode + preprocess + forward + HDF5 write) on
         generated images: tiny 8x8 digits-like PNGs and photo-sized 500x375 JPEGs;
         reported as a ratio of the fastest pure forward
naive    the naive loop (PIL open, preprocess, one image per forward, list, save at end)
onnx     onnxruntime CPU vs torch eager on the same batch
memory   peak RSS of a full extraction of N and 10N images (fresh subprocess each)
malloc   pure forward with and without the glibc malloc tuning (fresh subprocess each)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.extract.manifest import Manifest, assign_splits
from featcache.extract.preprocess import Preprocessor, load_rgb
from featcache.extract.registry import get_backbone
from featcache.extract.torch_runner import TorchFeatureExtractor
from featcache.extract.weights import load_backbone

BACKBONE = "efficientnet_lite0"


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
    splits = assign_splits(n, {"train": 0.6, "val": 0.2, "test": 0.2}, 0, strata=labels)
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

    extractor, preprocess = _extractor(True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_to_store(manifest, extractor, preprocess, Path(tmp) / "bench.h5", config={"bench": True},
                         batch_size=batch_size, num_workers=workers, progress=False)
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


def onnx_vs_torch(batch_size: int, seconds: float = 15.0) -> tuple[float, float]:
    """(onnxruntime CPU img/s, torch eager channels_last img/s) on the same batch."""
    from featcache.extract.onnx_runner import OnnxFeatureRunner

    loaded = load_backbone(BACKBONE)
    size = loaded.spec.input_size
    batch = torch.randn(batch_size, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        runner = OnnxFeatureRunner.from_model(loaded.model, loaded.spec, ["pool"], path=Path(tmp) / "m.onnx")
        runner(batch)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            runner(batch)
            count += batch_size
        ort = count / (time.perf_counter() - start)
    return ort, pure_forward(batch_size, True, seconds)


def _subprocess_json(code: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, **(env or {})})
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_mb(n: int, kind: str) -> float:
    """Peak RSS (MiB) of a fresh process extracting ``n`` generated images."""
    code = f"""
import json, resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_extract import make_images, end_to_end
with tempfile.TemporaryDirectory() as tmp:
    manifest = make_images(Path(tmp) / "img", {n}, {kind!r})
    end_to_end(manifest, 64, None)
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    return _subprocess_json(code)["rss"]


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
    parser.add_argument("--case", choices=["forward", "ratio", "naive", "onnx", "memory", "malloc", "all"], default="all")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images = 128
    torch.set_num_threads(_threads())
    cases = ["forward", "ratio", "naive", "onnx", "memory", "malloc"] if args.case == "all" else [args.case]
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}; backbone {BACKBONE}, batch {args.batch_size}, {args.images} images\n")
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
        ort, eager = onnx_vs_torch(args.batch_size)
        print(f"| onnxruntime CPU vs torch eager (channels_last) | {ort:.1f} vs {eager:.1f} img/s = {ort / eager:.2f}x |")
    if "memory" in cases:
        small, large = peak_rss_mb(args.images // 4, "photo"), peak_rss_mb(args.images * 10 // 4, "photo")
        print(f"| peak RSS {args.images // 4} vs {args.images * 10 // 4} photos | {small:.0f} vs {large:.0f} MiB "
              f"= {large / small:.2f}x |")
    if "malloc" in cases:
        off, on = malloc_forward(False, args.batch_size), malloc_forward(True, args.batch_size)
        print(f"| malloc tuning off vs on (pure forward) | {off:.1f} vs {on:.1f} img/s = {on / off:.2f}x |")


if __name__ == "__main__":
    main()
