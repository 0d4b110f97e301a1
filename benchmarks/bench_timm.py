"""A timm CNN by name vs the same architecture from the built-in registry, both through ONNX on the CPU.

timm ``resnet50`` (``model: timm/resnet50``, its ``pre_logits``) against the registry's torchvision
``resnet50`` (``pool5``), random weights, each exported once through featcache's ONNX path and run by
onnxruntime with the same threads. Within each repeat the two run back to back, the order alternating,
on (1) the same random 224x224 batch, (2) end to end through ``extract_to_store`` on the same
generated JPEGs with each backbone's own preprocessing (timm's ``resnet50.a1_in1k`` recipe: bicubic,
crop 0.95; the built-in's: bilinear, 256 -> 224), (3) the same with the built-in's preprocessing for
both (the backbone path alone), and (4) that preprocessing alone (decode + resize + crop, one process).
Prints a Markdown table of medians and the per-repeat ratio range (timm / built-in; done when >= 0.90).

    python benchmarks/bench_timm.py --repeats 3 --images 128 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.inputs.sources import from_folder
from featcache.extract.malloc import tune_malloc
from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.extract.zoo.weights import load_backbone

SIDES = {"timm": ("timm_resnet50", "timm/resnet50", ["pre_logits"]), "builtin": ("resnet50", None, ["pool5"])}


def _jpegs(root: Path, n: int) -> Manifest:
    rng = np.random.default_rng(0)
    for index in range(n):
        folder = root / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)
    return from_folder(root, {"train": 0.6, "val": 0.2, "test": 0.2}, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--forward-batches", type=int, default=3)
    args = parser.parse_args()
    tune_malloc(True)
    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    runners, preprocess, export_s = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for side, (name, model, layers) in SIDES.items():
            loaded = load_backbone(name, "random", model=model)
            start = time.perf_counter()
            runners[side] = OnnxFeatureRunner.from_model(loaded.model, loaded.spec, layers, path=tmp / f"{side}.onnx",
                                                         intra_op_threads=threads, cache_dir="none")
            export_s[side] = time.perf_counter() - start
            preprocess[side] = Preprocessor.from_spec(loaded.spec)
            print(f"{side}: {loaded.spec.arch} {layers}, exported in {export_s[side]:.0f} s, "
                  f"{len(runners[side].session.get_inputs())} input", file=sys.stderr, flush=True)
        batch = np.random.default_rng(0).standard_normal((args.batch_size, 3, 224, 224)).astype(np.float32)
        for runner in runners.values():
            runner(batch)
        manifest = _jpegs(tmp / "jpegs", args.images)
        forward = {side: [] for side in SIDES}
        e2e = {side: [] for side in SIDES}
        same = {side: [] for side in SIDES}
        prep = {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            order = list(SIDES) if repeat % 2 == 0 else list(reversed(SIDES))
            for side in order:
                start = time.perf_counter()
                for _ in range(args.forward_batches):
                    runners[side](batch)
                forward[side].append(args.forward_batches * args.batch_size / (time.perf_counter() - start))
            for side in order:
                out = tmp / f"{side}-{repeat}.h5"
                start = time.perf_counter()
                extract_to_store(manifest, runners[side], preprocess[side], out, config={"bench": side},
                                 batch_size=args.batch_size, progress=False)
                e2e[side].append(len(manifest) / (time.perf_counter() - start))
                out.unlink()
            for side in order:
                out = tmp / f"{side}-same-{repeat}.h5"
                start = time.perf_counter()
                extract_to_store(manifest, runners[side], preprocess["builtin"], out, config={"bench": side},
                                 batch_size=args.batch_size, progress=False)
                same[side].append(len(manifest) / (time.perf_counter() - start))
                out.unlink()
            for side in order:
                start = time.perf_counter()
                for row in range(len(manifest)):
                    preprocess[side].pixels_array(preprocess[side].load(manifest.absolute_path(row)))
                prep[side].append(len(manifest) / (time.perf_counter() - start))
            print(f"  repeat {repeat + 1}: forward timm {forward['timm'][-1]:.1f} built-in {forward['builtin'][-1]:.1f}"
                  f"; end to end timm {e2e['timm'][-1]:.1f} built-in {e2e['builtin'][-1]:.1f} img/s; "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    print(f"machine: {os.cpu_count()} cpus, {threads} threads, batch {args.batch_size}, {args.images} JPEGs, "
          f"{args.repeats} repeats, load {os.getloadavg()[0]:.1f}\n")
    print("| measure | timm resnet50 | built-in resnet50 | ratio timm / built-in (median) | per-repeat range |")
    print("|---|---:|---:|---:|---|")
    for label, samples in (("forward, same random batch", forward),
                           ("end to end, 500x375 JPEGs, each backbone's own preprocessing", e2e),
                           ("end to end, the same (built-in's) preprocessing for both", same),
                           ("preprocessing alone (decode + resize + crop, 1 process), own recipe", prep)):
        ratios = [t / b for t, b in zip(samples["timm"], samples["builtin"])]
        print(f"| {label} | {statistics.median(samples['timm']):.1f} img/s | "
              f"{statistics.median(samples['builtin']):.1f} img/s | **{statistics.median(ratios):.2f}** | "
              f"{min(ratios):.2f}-{max(ratios):.2f} |")
    print(f"| ONNX export (once) | {export_s['timm']:.0f} s | {export_s['builtin']:.0f} s | | |")


if __name__ == "__main__":
    main()
