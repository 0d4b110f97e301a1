"""Benchmark the served ONNX file (``featcache export``) against featcache's own two-step scoring, like for like.

For each run folder under ``--models`` (default: every ``models/digits/<backbone>/<layer>/<head>`` of
``make repro``), on the same preprocessed images (``--images`` of the manifest's test split, preprocessed once
outside the timing, as a server receives tensors):

* ``served``: the exported file in one onnxruntime session (backbone, float16 rounding and head in one graph);
* ``two-step``: what ``featcache predict --images`` runs after decoding: the store's backbone graph in
  featcache's ``OnnxFeatureRunner``, the float16 rounding in numpy, then the saved head's ``predict_proba``.

Both with the same intra-op threads (``--threads``, torch and BLAS limited to the same), after a warm-up, in
alternating order (A B A B ...), medians of ``--repeats``: batch-1 latency (ms per image, over ``--latency-images``
single-image calls) and batch throughput (images/s at ``--batch-size``). Also the largest absolute difference
between the two paths' probabilities, the file's size and node count, and the export's wall time (the backbone
from the export cache the extract stage filled).

Usage::

    python benchmarks/bench_serve.py                      # after `make repro`
    python benchmarks/bench_serve.py --models models/digits/efficientnet_lite0/block6/mlp --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_folders(models: list[Path]) -> list[Path]:
    """Every run folder (holding ``head.json``) at or under the given paths, sorted."""
    found = []
    for path in models:
        found.extend(sorted(p.parent for p in path.rglob("head.json")) if not (path / "head.json").is_file()
                     else [path])
    return found


def test_pixels(model: Path, manifest_path: Path, n_images: int) -> np.ndarray:
    """The first ``n_images`` test images of the manifest, preprocessed as the run's extraction did (N, 3, S, S)."""
    from featcache.extract.inputs.manifest import Manifest
    from featcache.pipeline.run_folder import saved_run_info, stored_preprocessor

    preprocess = stored_preprocessor(saved_run_info(model)["extraction_config"])
    manifest = Manifest.read(manifest_path)
    rows = [row for row in range(len(manifest)) if manifest.splits[row] == 2][:n_images]  # test
    return np.stack([np.asarray(preprocess(preprocess.load(str(manifest.absolute_path(row))))) for row in rows])


def two_step(model: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """featcache's own scoring of preprocessed images: the cached backbone graph, the rounding, the head."""
    from featcache.extract.onnx.runner import OnnxFeatureRunner
    from featcache.extract.onnx.serve import backbone_graph
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.heads import load_head
    from featcache.pipeline.run_folder import saved_run_info, stored_weights
    from featcache.store.schema import layer_parts

    info = saved_run_info(model)
    config = info["extraction_config"]
    parts = layer_parts(info["layer"])
    source = resolve_weights(info["backbone"], stored_weights(config, model))
    graph = backbone_graph(source, parts, pooling=config["extract"]["pooling"],
                           input_size=int(config["preprocess"]["input_size"]), store_layers=config["layers"])
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    import onnx

    onnx.save(graph, str(folder / "backbone.onnx"))
    runner = OnnxFeatureRunner(folder / "backbone.onnx", device="cpu", intra_op_threads=threads)
    head = load_head(model)
    dtype = np.dtype(config["extract"].get("dtype", "float32"))

    def score(pixels: np.ndarray) -> np.ndarray:
        outputs = runner(pixels)
        features = np.concatenate([np.asarray(outputs[p], dtype=np.float32).astype(dtype).astype(np.float32)
                                   for p in parts], axis=1)
        return head.predict_proba(features) if info["task"] == "classification" else head.predict(features)

    return score


def served(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(["scores"], {"images": pixels})[0]


def timings(cases: dict[str, Callable[[np.ndarray], np.ndarray]], pixels: np.ndarray, batch_size: int,
            latency_images: int, repeats: int) -> dict[str, dict[str, float]]:
    """Alternating rounds (A B A B ...) after a warm-up: medians of batch-1 ms per image and batch images/s."""
    for score in cases.values():
        score(pixels[:batch_size])
        score(pixels[:1])
    latency: dict[str, list[float]] = {name: [] for name in cases}
    rate: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, score in cases.items():
            start = time.perf_counter()
            for index in range(latency_images):
                score(pixels[index:index + 1])
            latency[name].append((time.perf_counter() - start) / latency_images * 1e3)
            start = time.perf_counter()
            for first in range(0, len(pixels), batch_size):
                score(pixels[first:first + batch_size])
            rate[name].append(len(pixels) / (time.perf_counter() - start))
    return {name: {"ms": statistics.median(latency[name]), "img_s": statistics.median(rate[name])} for name in cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", default=[ROOT / "models" / "digits"])
    parser.add_argument("--manifest", type=Path, default=ROOT / "data" / "prepared" / "digits" / "manifest.csv",
                        help="the test split's images are scored")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    from featcache.pipeline.serve import export_serving_model

    torch.set_num_threads(args.threads)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    print("| run | export s | file MB | nodes | batch-1 ms served / two-step | "
          f"batch-{args.batch_size} img/s served / two-step | served / two-step | max abs diff |")
    print("|---|---:|---:|---:|---|---|---:|---:|")
    with threadpool_limits(args.threads), tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        for model in run_folders(args.models):
            start = time.perf_counter()
            path = export_serving_model(model, Path(folder) / "model.onnx")
            export_s = time.perf_counter() - start
            import onnx

            nodes = len(onnx.load(str(path)).graph.node)
            pixels = test_pixels(model, args.manifest, args.images).astype(np.float32)
            cases = {"served": served(path, args.threads), "two-step": two_step(model, args.threads)}
            diff = float(np.max(np.abs(cases["served"](pixels) - cases["two-step"](pixels))))
            result = timings(cases, pixels, args.batch_size, args.latency_images, args.repeats)
            a, b = result["served"], result["two-step"]
            name = "/".join(model.parts[-3:])
            print(f"| {name} | {export_s:.1f} | {path.stat().st_size / 1e6:.1f} | {nodes} | {a['ms']:.2f} / "
                  f"{b['ms']:.2f} | {a['img_s']:.0f} / {b['img_s']:.0f} | {a['img_s'] / b['img_s']:.2f}x | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
