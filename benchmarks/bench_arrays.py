"""``extract_features`` (features of a folder of images as arrays, one call) against the loop a notebook user writes.

The peer is the batched PyTorch loop at its best on this machine: a ``DataLoader`` over the files (PIL decode,
torchvision's resize 256 bicubic, center crop 224, to-tensor and normalise in ``--workers`` worker processes,
batches of 64) feeding the same EfficientNet-Lite0 weights in torch, ``channels_last`` and ``inference_mode``
(featcache's own :class:`~featcache.extract.runners.torch_runner.TorchFeatureExtractor`, pooled ``pool``
features), the arrays concatenated in memory. ``extract_features(folder, "efficientnet_lite0")`` runs what
``backend: auto`` picks here (onnxruntime on a CPU) with its decode workers and returns the same arrays (the
cosine between the two is printed: other resize code and another runtime, not bit for bit). Both sides warm up
once (model load, the ONNX export cache filled), then run interleaved (A B A B ...), medians of ``--repeats``,
same thread count.

Run: ``PYTHONPATH=src python benchmarks/bench_arrays.py [--images 512] [--repeats 3]``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_images  # noqa: E402
from bench_loop import machine_line  # noqa: E402


class _Files:
    """A map-style dataset of image files, the torchvision transforms of Lite0's preprocessing."""

    def __init__(self, paths: list[Path]) -> None:
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def torch_loop(paths: list[Path], workers: int, batch_size: int = 64) -> np.ndarray:
    """The notebook peer: DataLoader + torch forward, features concatenated in memory."""
    import torch

    from featcache.extract.runners.torch_runner import TorchFeatureExtractor
    from featcache.extract.zoo.weights import load_backbone

    loaded = load_backbone("efficientnet_lite0")
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["pool"], channels_last=True)
    loader = torch.utils.data.DataLoader(_Files(paths), batch_size=batch_size, num_workers=workers)
    outputs = [np.asarray(extractor(batch)["pool"]) for batch in loader]
    return np.concatenate(outputs)


def featcache_arrays(folder: Path) -> np.ndarray:
    from featcache.pipeline import extract_features

    return extract_features(folder, "efficientnet_lite0", ["pool"], batch_size=64).features["pool"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, args.images, "photo")
        paths = sorted(folder.glob("*.jpg"))
        cases = {"extract_features (featcache)": lambda: featcache_arrays(folder),
                 "DataLoader + torch loop": lambda: torch_loop(paths, args.workers)}
        results = {name: run() for name, run in cases.items()}  # warm-up: weights, the export cache
        a, b = results.values()
        cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        for repeat in range(args.repeats):
            for name, run in (cases.items() if repeat % 2 == 0 else reversed(list(cases.items()))):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    rates = {name: args.images / statistics.median(values) for name, values in seconds.items()}
    ours = rates["extract_features (featcache)"]
    print(f"| {args.images} 500x375 JPEGs, Lite0 `pool` | img/s (median of {args.repeats}) | vs the loop |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {ours / rate if name.startswith('DataLoader') else 1.0:.2f}x |")
    print(f"\nper-image cosine between the two: min {cosine.min():.5f}, median {np.median(cosine):.5f}")
    print(machine_line(f"{args.workers} loader workers, medians of {args.repeats}, interleaved"))


if __name__ == "__main__":
    main()
