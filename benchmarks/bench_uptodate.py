"""Benchmark of an extraction that finds its store up to date: with and without the cache root's records.

``featcache extract`` onto a finished store of the same inputs keeps it before building any model, but it still
needs the weights file's sha256 and, for a torch-on-CPU store, torch's intra-op thread count. The cache root
(``$FEATCACHE_CACHE_DIR``) now keeps both: the hash of a file whose stat is unchanged
(:func:`featcache.util.machine_records.cached_file_sha256`) and torch's default thread count on this machine
(:func:`featcache.util.machine_records.torch_default_threads`). Each case runs the same command with a warm cache root
(the records made by an earlier run) and a cold one (a new empty folder per run: what every run did before the
records existed), interleaved (warm, cold, warm, cold ...), medians of ``--repeats``.

Cases: EfficientNet-Lite0 with its pretrained weights (18 MB) on onnxruntime (the shipped params) and on torch,
and VGG16 from a local weights file (528 MB, random weights saved as a state dict) on onnxruntime and on torch.

Run: ``PYTHONPATH=src python benchmarks/bench_uptodate.py [--repeats 5]``. Prints a Markdown table for
``benchmarks/README.md`` with the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import env, featcache_command, machine_line, timed, write_images  # noqa: E402

#: (case name, backbone key, backend).
CASES = (("Lite0 pretrained (18 MB), onnx", "efficientnet_lite0", "onnx"),
         ("Lite0 pretrained (18 MB), torch", "efficientnet_lite0", "torch"),
         ("VGG16 local file (528 MB), onnx", "vgg16", "onnx"), ("VGG16 local file (528 MB), torch", "vgg16", "torch"))


def write_project(work: Path, n_images: int) -> None:
    """Images, a VGG16 weights file and one params file per backend, prepared."""
    import torch

    from featcache.extract.zoo.weights import load_backbone

    write_images(work / "images", n_images)
    torch.save(load_backbone("vgg16", "random").model.state_dict(), work / "vgg16.pth")
    for backend in ("onnx", "torch"):
        params = {
            "data": {"name": "uptodate", "source": "folder", "path": str(work / "images"),
                     "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
            "extract": {"backend": backend, "batch_size": 8},
            "extract_run": {"onnx_cache": str(work / "onnx-cache")},
            "backbones": {"efficientnet_lite0": {"weights": "pretrained", "layers": ["pool"]},
                          "vgg16": {"weights": str(work / "vgg16.pth"), "layers": ["fc7"]}},
            "features": [{"backbone": "efficientnet_lite0", "layer": "pool"}],
            "train": {"heads": ["logreg"]},
        }
        (work / f"{backend}.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    timed([*featcache_command(), "prepare", "--params", "onnx.yaml", "--out", "prepared"], work, env())


def extract_args(backbone: str, backend: str) -> list[str]:
    return [*featcache_command(), "extract", "--params", f"{backend}.yaml", "--backbone", backbone, "--manifest",
            "prepared/manifest.csv", "--out", f"features/{backbone}-{backend}.h5", "--no-progress"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        warm_env = dict(env(), FEATCACHE_CACHE_DIR=str(work / "cache"))
        write_project(work, args.images)
        times: dict[str, dict[str, list[float]]] = {name: {"warm": [], "cold": []} for name, _, _ in CASES}
        for _, backbone, backend in CASES:
            timed(extract_args(backbone, backend), work, warm_env)  # the store, and the records
            timed(extract_args(backbone, backend), work, warm_env)
        for repeat in range(args.repeats):
            for name, backbone, backend in CASES:
                for side in ("warm", "cold"):
                    cache = work / "cache" if side == "warm" else work / f"cold-{repeat}-{backend}-{backbone}"
                    seconds, stdout = timed(extract_args(backbone, backend), work,
                                            dict(warm_env, FEATCACHE_CACHE_DIR=str(cache)))
                    if "up to date" not in stdout:
                        raise RuntimeError(f"{name} ({side}) did not keep its store:\n{stdout}")
                    times[name][side].append(seconds)
    print("| up-to-date `featcache extract` | cache root with records (s) | empty cache root (s) | ratio |")
    print("|---|---|---|---|")
    for name, sides in times.items():
        warm, cold = statistics.median(sides["warm"]), statistics.median(sides["cold"])
        print(f"| {name} | {warm:.2f} | {cold:.2f} | {cold / warm:.1f}x |")
    print("\n" + machine_line(f"medians of {args.repeats} runs, interleaved"))


if __name__ == "__main__":
    main()
