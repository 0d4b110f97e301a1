"""CPU runtimes like for like: onnxruntime float32, OpenVINO float32 and bf16, torch eager bf16.

Which runtime should run the forward on a CPU? featcache's default is
onnxruntime's float32 graph; ``extract.autocast: bf16`` runs the same exported
file with OpenVINO where the CPU computes bfloat16 natively. This measures
both claims on one machine, in one run::

    python benchmarks/bench_cpu_runtimes.py --repeats 3 --images 256 --out bench_out

``--fp16`` adds OpenVINO float16, ``--int8`` onnxruntime's int8 graph
(``extract.precision: int8``: calibrated on the generated train rows, gated on
val), so a user can see which reduced precision pays on their CPU.

For each backbone (EfficientNet-Lite0 pretrained with the shipped params'
layers ``pool`` + ``block6``; resnet50 with random weights, ``pool5``) and each
runtime, with the same intra-op threads (one per core), the glibc malloc tuning
on, the same warm-up, and the order rotated in every repeat:

* **forward**: the same random (B, 3, 224, 224) batch, ``--forward-batches`` batches;
* **end to end**: ``extract_to_store`` on generated 500x375 JPEGs (decode,
  preprocess, forward, HDF5 write);
* **cosine**: per image, every store's first layer against onnxruntime's float32
  store (lowest and median), so a fast runtime that changes the features shows it.

Ratios are each repeat's img/s over onnxruntime float32's in the same repeat;
the table gives medians and the range. ``torch bf16`` is torch's own bf16 path
(``autocast`` on the CPU, ``channels_last``): the best a bf16 user had before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench_extract import make_images
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.malloc import tune_malloc
from featcache.extract.onnx.calibration import calibration_images
from featcache.extract.onnx.openvino_runner import OpenVinoFeatureRunner, native_autocasts, openvino_status
from featcache.extract.onnx.quantize import int8_runner
from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.weights import load_backbone
from featcache.store.reader import FeatureStore
from featcache.util.compute import torch_threads

#: backbone -> (weights, layers); the first layer is the one the cosines compare.
BACKBONES: dict[str, tuple[str, list[str]]] = {"efficientnet_lite0": ("pretrained", ["pool", "block6"]),
                                               "resnet50": ("random", ["pool5"])}
REFERENCE = "onnxruntime f32"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_runners(loaded: Any, layers: list[str], threads: int, folder: Path, input_size: int | None = None,
                  fp16: bool = False) -> dict[str, Callable[[Any], dict[str, np.ndarray]]]:
    """Every runtime of one backbone, all from one ONNX export (torch from the same model); ``fp16`` adds
    OpenVINO's float16 (why ``backend: auto`` does not pick it)."""
    onnx = OnnxFeatureRunner.from_model(loaded.model, loaded.spec, layers, input_size=input_size,
                                        intra_op_threads=threads, cache_dir=folder)
    runners = {
        REFERENCE: onnx,
        "openvino f32": OpenVinoFeatureRunner(onnx.path, intra_op_threads=threads),
        "openvino bf16": OpenVinoFeatureRunner(onnx.path, intra_op_threads=threads, autocast="bf16"),
        "torch bf16": TorchFeatureExtractor(loaded.model, loaded.spec, layers, channels_last=True, autocast="bf16"),
    }
    if fp16:
        runners["openvino fp16"] = OpenVinoFeatureRunner(onnx.path, intra_op_threads=threads, autocast="fp16")
    return runners


def _forward(runner: Callable, batch: torch.Tensor, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        runner(batch)
    return batches * batch.shape[0] / (time.perf_counter() - start)


def _cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    reference, other = reference.astype(np.float64), other.astype(np.float64)
    return (reference * other).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))


def measure(name: str, weights: str, layers: list[str], args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Forward and end-to-end img/s of every runtime (rotated order), ratios to onnxruntime, cosines."""
    loaded = load_backbone(name, weights)
    runners = build_runners(loaded, layers, args.threads, folder, args.input_size, args.fp16)
    preprocess = Preprocessor.from_spec(loaded.spec, input_size=args.input_size)
    size = preprocess.input_size
    batch = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    manifest = make_images(folder / "photos", args.images, "photo")
    if args.int8:  # onnxruntime's int8 graph, calibrated on the train rows and gated on val, as extract.precision
        images = calibration_images(manifest, preprocess, 64, 64)
        runners["onnxruntime int8"], _ = int8_runner(runners[REFERENCE], images, cache_dir=folder,
                                                     intra_op_threads=args.threads)
    for runner in runners.values():  # the same warm-up for all
        for _ in range(2):
            runner(batch)
    sides = list(runners)
    forward: dict[str, list[float]] = {side: [] for side in sides}
    e2e: dict[str, list[float]] = {side: [] for side in sides}
    features: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats):
        order = sides[repeat % len(sides):] + sides[:repeat % len(sides)]
        for side in order:
            forward[side].append(_forward(runners[side], batch, args.forward_batches))
            out = folder / f"{side.replace(' ', '-')}.h5"
            start = time.perf_counter()
            extract_to_store(manifest, runners[side], preprocess, out, config={"bench": side},
                             batch_size=args.batch_size, progress=False)
            e2e[side].append(len(manifest) / (time.perf_counter() - start))
            with FeatureStore(out) as store:
                features[side] = store.read(layers[0])
            out.unlink()
        print(f"  {name} repeat {repeat + 1}/{args.repeats}: " + "; ".join(
            f"{side} {forward[side][-1]:.1f}/{e2e[side][-1]:.1f}" for side in sides)
            + f" img/s (forward/end to end); load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows = {}
    for side in sides:
        cosines = _cosines(features[REFERENCE], features[side])
        rows[side] = {"forward": statistics.median(forward[side]), "e2e": statistics.median(e2e[side]),
                      "cosine_min": float(cosines.min()), "cosine_median": float(np.median(cosines))}
        for kind, samples in (("forward", forward), ("e2e", e2e)):
            ratios = [value / reference for value, reference in zip(samples[side], samples[REFERENCE])]
            rows[side][f"{kind}_ratio"] = statistics.median(ratios)
            rows[side][f"{kind}_range"] = [min(ratios), max(ratios)]
    return {"layers": layers, "weights": weights, "images": len(manifest), "runtimes": rows}


def table(results: dict[str, Any]) -> str:
    """The markdown table of every backbone and runtime."""
    lines = ["| backbone | runtime | forward img/s | ratio (range) | end to end img/s | ratio (range) | "
             "cosine to onnxruntime f32, lowest / median |", "|---|---|---:|---|---:|---|---|"]
    for name, result in results["backbones"].items():
        for side, row in result["runtimes"].items():
            ratios = [f"**{row[f'{kind}_ratio']:.2f}x** ({row[f'{kind}_range'][0]:.2f}-{row[f'{kind}_range'][1]:.2f})"
                      for kind in ("forward", "e2e")]
            lines.append(f"| {name} ({result['layers'][0]}) | {side} | {row['forward']:.1f} | {ratios[0]} | "
                         f"{row['e2e']:.1f} | {ratios[1]} | {row['cosine_min']:.5f} / {row['cosine_median']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--forward-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=_cores())
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--input-size", type=int, default=None, help="override the registry's input size")
    parser.add_argument("--fp16", action="store_true", help="also OpenVINO float16 (where the CPU lists FP16)")
    parser.add_argument("--int8", action="store_true", help="also onnxruntime int8 (extract.precision: int8)")
    parser.add_argument("--smoke", action="store_true", help="tiny run of every runtime (resnet18, 64 px)")
    args = parser.parse_args(argv)
    backbones = {name: BACKBONES[name] for name in args.backbones.split(",")}
    if args.smoke:
        backbones = {"resnet18": ("random", ["pool5"])}
        args.images, args.batch_size, args.forward_batches, args.repeats, args.input_size = 6, 4, 1, 1, 64
    tune_malloc(True)
    status = openvino_status()
    results: dict[str, Any] = {
        "machine": f"{status['cpu']}, {_cores()} cores, OpenVINO {status['version']} (native "
                   f"{', '.join(sorted(native_autocasts())) or 'none'}), torch {torch.__version__}",
        "threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats, "backbones": {}}
    with torch_threads(args.threads), tempfile.TemporaryDirectory(prefix="featcache-bench-runtimes-") as tmp:
        for name, (weights, layers) in backbones.items():
            results["backbones"][name] = measure(name, weights, layers, args, Path(tmp) / name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cpu_runtimes.json").write_text(json.dumps(results, indent=1))
    text = f"{results['machine']}; {args.threads} threads, batch {args.batch_size}, medians of {args.repeats}\n\n"
    (args.out / "bench_cpu_runtimes.md").write_text(text + table(results) + "\n")
    print(text + table(results))
    return results


if __name__ == "__main__":
    main()
