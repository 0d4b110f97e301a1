"""GPU extraction benchmark: forward ceiling, featcache CPU decode, featcache GPU decode, plain DataLoader peer.

One command, made for one H100/H200 machine (16 cores), under 5 minutes::

    python benchmarks/bench_gpu.py                       # writes bench_gpu.json + bench_gpu.md under $OUT
    python benchmarks/bench_gpu.py --out results/ --images 4096 --repeats 3
    python benchmarks/bench_gpu.py --smoke               # seconds on a CPU: tiny images, tiny input, CPU device

For each backbone (resnet50 and EfficientNet-Lite0, random weights: speed does
not depend on them), on ``--images`` generated 500x375 JPEGs (written by a
process pool on the machine), batch 256, channels_last, fp16 autocast on CUDA:

forward     pure forward of a random batch already on the device (the ceiling)
cpu-decode  featcache ``extract_to_store`` with the plan of ``extract.decode: cpu``: PIL decode in DataLoader
            workers, HDF5 store
gpu-decode  featcache ``extract_to_store`` with the plan of ``extract.decode: gpu`` (``auto`` on CUDA): batched
            device JPEG decode, HDF5 store: what the extract stage runs
peer        plain torchvision ``ImageFolder`` + ``DataLoader(--workers)`` + FX (timm: pooled
            ``forward``), float32 tensors, features copied to the host, as a user writes it

End-to-end numbers are the median of ``--repeats`` runs after one warm-up run
of each loader; every case uses the same ``--workers``. Ratios are same-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from featcache.extract.decode.decoders import gpu_decode_status
from featcache.extract.decode.device import iter_device_batches
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.plan import ExtractionPlan, build_runner, plan_extraction
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.weights import load_backbone

CLASSES = ("a", "b")


def _write_jpeg(job: tuple[str, int, int, int]) -> None:
    from PIL import Image

    path, seed, width, height = job
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: JPEG-compressible like a photo (the recipe of bench_extract.py).
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (1 + seed % 3)) % 256, (y * 2) % 256, (x + y + 17 * seed) % 256], axis=-1)
    Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), processes: int | None = None) -> Manifest:
    """``n`` JPEGs in ImageFolder layout ``root/<class>/<i>.jpg``, written by a process pool."""
    paths = sorted(f"{CLASSES[i % 2]}/{i:06d}.jpg" for i in range(n))  # manifest ids are sorted
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / path), i, size[0], size[1]) for i, path in enumerate(paths)]
    if processes == 1:
        list(map(_write_jpeg, jobs))
    else:
        with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=32))
    labels = np.array([CLASSES.index(path.split("/")[0]) for path in paths], dtype=np.int64)
    return Manifest(list(paths), list(paths), np.zeros(n, dtype=np.uint8), "classification", labels=labels,
                    classes=list(CLASSES), root=root)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_forward(runner: TorchFeatureExtractor, size: int, batch: int, device: str, seconds: float) -> float:
    """Images per second of the truncated, pooled forward on a random batch already on the device."""
    x = torch.randn(batch, 3, size, size, device=device)
    for _ in range(3):
        runner.forward_raw(x)
    _sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runner.forward_raw(x)
        count += batch
    _sync(device)
    return count / (time.perf_counter() - started)


def plan_for(args, decode: str) -> ExtractionPlan:
    """The plan the extract stage makes for these settings (torch, ``--device``, fp16 on CUDA with ``--fp16``)."""
    return plan_extraction(device=args.device, backend="torch", autocast="fp16" if args.fp16 else "none",
                           decode=decode, num_workers=args.workers)


def run_extract(manifest, runner, preprocess, work: Path, args, decode: str) -> None:
    """What the extract stage runs with ``extract.decode: <decode>``: the plan's loader through the engine's loop."""
    out = work / f"{decode}.h5"
    extract_to_store(manifest, runner, preprocess, out, plan=plan_for(args, decode),
                     config={"bench": f"{decode}-decode"}, batch_size=args.batch_size, block_rows=1024,
                     progress=False)
    out.unlink()


def _with_switch_interval(seconds: float, fn) -> None:
    """Run ``fn`` with the interpreter's thread switch interval set to ``seconds`` (default 5 ms)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        fn()
    finally:
        sys.setswitchinterval(previous)


def _peer_model(name: str, model: torch.nn.Module, device: str):
    """What a user writes: torchvision's FX feature extractor, or a timm model without its classifier."""
    if name.startswith("efficientnet"):
        model.reset_classifier(0)
        net = model
    else:
        from torchvision.models.feature_extraction import create_feature_extractor

        net = create_feature_extractor(model, return_nodes={"flatten": "features"})
    return net.eval().to(device).to(memory_format=torch.channels_last)


def run_peer(name: str, net, preprocess: Preprocessor, root: Path, args) -> None:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    interpolation = transforms.InterpolationMode(preprocess.interpolation)
    transform = transforms.Compose([
        transforms.Resize(preprocess.resize_size, interpolation=interpolation),
        transforms.CenterCrop(preprocess.input_size), transforms.ToTensor(),
        transforms.Normalize(preprocess.mean, preprocess.std),
    ])
    loader = DataLoader(datasets.ImageFolder(str(root), transform), batch_size=args.batch_size,
                        num_workers=args.workers, pin_memory=args.device.startswith("cuda"))
    autocast = torch.autocast("cuda", torch.float16) if args.fp16 else torch.autocast("cpu", enabled=False)
    chunks = []
    with torch.inference_mode(), autocast:
        for images, _ in loader:
            images = images.to(args.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            output = net(images)
            output = output["features"] if isinstance(output, dict) else output
            chunks.append(output.float().cpu())
    assert sum(len(c) for c in chunks) == len(loader.dataset)


def _timed(fn, n_images: int, repeats: int, device: str) -> dict[str, float]:
    fn()  # warm-up: workers, cudnn autotuning, decoder initialisation
    rates = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        rates.append(n_images / (time.perf_counter() - started))
    return {"img_per_s": statistics.median(rates), "runs": rates}


def bench_backbone(name: str, manifest: Manifest, root: Path, work: Path, args) -> dict[str, dict]:
    loaded = load_backbone(name, "random")
    preprocess = Preprocessor.from_spec(loaded.spec, input_size=args.input_size)
    runner, _ = build_runner(loaded, ["default"], plan_for(args, "gpu"), channels_last=True)
    size, n = preprocess.input_size, len(manifest)
    results = {"forward": {"img_per_s": bench_forward(runner, size, args.batch_size, args.device, args.seconds)}}
    print(f"  {name} forward: {results['forward']['img_per_s']:,.0f} img/s", flush=True)
    cases = {
        "cpu-decode": lambda: run_extract(manifest, runner, preprocess, work, args, "cpu"),
        "gpu-decode": lambda: run_extract(manifest, runner, preprocess, work, args, "gpu"),
        "gpu-decode-si": lambda: _with_switch_interval(
            5e-4, lambda: run_extract(manifest, runner, preprocess, work, args, "gpu")),
    }
    net = _peer_model(name, loaded.model, args.device)
    cases["peer"] = lambda: run_peer(name, net, preprocess, root, args)
    for case, fn in cases.items():
        results[case] = _timed(fn, n, args.repeats, args.device)
        print(f"  {name} {case}: {results[case]['img_per_s']:,.0f} img/s", flush=True)
    return results


def _rate(fn, n_images: int, device: str) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return n_images / (time.perf_counter() - started)


def breakdown(name: str, manifest: Manifest, args) -> dict[str, float]:
    """img/s of each stage of the GPU-decode path alone, then chained, to find the one that bounds it.

    loader        DataLoader workers reading bytes and probing headers, batches collated (no decode)
    decode        batched device decode of batches already in the main process
    decode+resize ``decode_items`` (decode, orient, resize, crop) on batches already in the main process
    loader+decode ``iter_device_batches`` consumed without a forward
    forward       normalise + pooled forward + copy to the host of uint8 device batches already made
    """
    from torch.utils.data import DataLoader

    from featcache.extract.decode.decoders import decode_each, select_decoder
    from featcache.extract.decode.device import DeviceDecodeDataset, decode_items
    from featcache.extract.decode.packing import pack_items

    loaded = load_backbone(name, "random")
    preprocess = Preprocessor.from_spec(loaded.spec, input_size=args.input_size)
    runner, _ = build_runner(loaded, ["default"], plan_for(args, "gpu"), channels_last=True)
    dataset = DeviceDecodeDataset(manifest, preprocess)
    decoder = select_decoder(args.device)
    rows = list(range(len(manifest)))
    batches = [rows[start:start + args.batch_size] for start in range(0, len(rows), args.batch_size)]

    def loader():
        return DataLoader(dataset, batch_sampler=batches, num_workers=args.workers, collate_fn=pack_items,
                          prefetch_factor=4 if args.workers else None)

    n = len(manifest)
    held = list(loader())
    decoded = [decode_items(items, dataset, decoder) for items in held]  # warm-up, and the forward's input
    out: dict[str, float] = {}
    out["loader"] = _rate(lambda: sum(len(b.rows) for b in loader()), n, args.device)
    out["decode"] = _rate(lambda: [decode_each(decoder, list(torch.split(b.data, [k for k in b.lengths if k])))
                                   for b in held], n, args.device)
    out["decode+resize"] = _rate(lambda: [decode_items(items, dataset, decoder) for items in held], n, args.device)
    for label, background in (("loader+decode", True), ("loader+decode, inline", False)):
        out[label] = _rate(lambda background=background: [b for b in iter_device_batches(
            manifest, rows, preprocess=preprocess, device=args.device, batch_size=args.batch_size,
            num_workers=args.workers, background=background)], n, args.device)

    def forward():
        for _, images, _ in decoded:
            features = runner.forward_pooled(preprocess.normalize_batch(images))
            {k: v.cpu() for k, v in features.items()}

    forward()
    out["forward"] = _rate(forward, n, args.device)
    for stage, rate in out.items():
        print(f"  {name} breakdown {stage}: {rate:,.0f} img/s", flush=True)
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def markdown(report: dict) -> str:
    rows = ["forward", "cpu-decode", "gpu-decode", "gpu-decode-si", "peer"]
    labels = {"forward": "pure forward (random on-device batch)", "cpu-decode": "featcache CPU decode, end to end",
              "gpu-decode": "featcache GPU decode, end to end (decode thread)",
              "gpu-decode-si": "featcache GPU decode, end to end (decode thread, 0.5 ms switch interval)",
              "peer": f"plain ImageFolder + DataLoader({report['workers']} workers) + FX"}
    names = list(report["results"])
    lines = [f"{report['device_name']}, {report['images']} JPEGs {report['image_size']}, batch "
             f"{report['batch_size']}, channels_last, {report['precision']}, {report['workers']} workers, "
             f"median of {report['repeats']}; torch {report['torch']}; decoder: {report['decoder']}", "",
             "| img/s | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        lines.append(f"| {labels[row]} | " + " | ".join(f"{report['results'][n][row]['img_per_s']:,.0f}"
                                                         for n in names) + " |")
    for n in names:
        r = report["results"][n]
        lines.append(f"\n{n}: gpu-decode / peer = {r['gpu-decode']['img_per_s'] / r['peer']['img_per_s']:.2f}x, "
                     f"cpu-decode / peer = {r['cpu-decode']['img_per_s'] / r['peer']['img_per_s']:.2f}x, "
                     f"gpu-decode / forward = {r['gpu-decode']['img_per_s'] / r['forward']['img_per_s']:.2f}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_gpu_out", help="results folder")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the pure-forward measurement")
    parser.add_argument("--backbones", default="resnet50,efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--input-size", type=int, default=None, help="override the registry's input size")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that exercises every case")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each stage of the GPU-decode path alone (loader, decode, resize, forward)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.batch_size, args.workers, args.repeats, args.seconds = 6, 4, 0, 1, 0.1
        args.backbones, args.input_size = "resnet18,efficientnet_lite0", 32
        args.device = "cpu" if args.device == "auto" else args.device
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.fp16 = args.device.startswith("cuda")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    ok, decoder = gpu_decode_status(args.device)
    if not ok:
        sys.exit(f"GPU decode is not available on {args.device}: {decoder}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        image_size = (40, 30) if args.smoke else (500, 375)
        manifest = make_jpegs(work / "images", args.images, image_size, processes=1 if args.smoke else None)
        print(f"{args.images} JPEGs written in {time.perf_counter() - started:.1f} s; device "
              f"{device_name(args.device)}; {decoder}", flush=True)
        breakdowns = {name: breakdown(name, manifest, args)
                      for name in args.backbones.split(",")} if args.breakdown else {}
        results = {name: bench_backbone(name, manifest, work / "images", work, args)
                   for name in args.backbones.split(",")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"device": args.device, "device_name": device_name(args.device), "images": args.images,
              "image_size": "x".join(map(str, image_size)), "batch_size": args.batch_size, "workers": args.workers,
              "repeats": args.repeats, "precision": "fp16 autocast" if args.fp16 else "float32",
              "torch": torch.__version__, "decoder": decoder,
              "cpu_count": os.cpu_count(), "seconds": round(time.perf_counter() - started, 1), "results": results,
              "breakdown": breakdowns}
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "bench_gpu.md").write_text(table)
    print(table, flush=True)
    print(f"total {report['seconds']} s; results in {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
