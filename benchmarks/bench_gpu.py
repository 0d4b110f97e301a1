"""GPU extraction benchmark: forward ceiling, featcache's decode paths end to end, plain DataLoader peer.

One command, made for one H100/H200 machine (16 cores), in a few minutes::

    python benchmarks/bench_gpu.py                       # writes bench_gpu.json + bench_gpu.md under $OUT
    python benchmarks/bench_gpu.py --out results/ --images 4096 --repeats 3
    python benchmarks/bench_gpu.py --smoke               # seconds on a CPU: tiny images, tiny input, CPU device

For each backbone (resnet50 and EfficientNet-Lite0, random weights: speed does
not depend on them), on ``--images`` generated 500x375 JPEGs (written once by a
process pool on the machine, the same files for every case), batch 256,
channels_last, fp16 autocast on CUDA:

forward         pure forward of a random batch already on the device (the ceiling)
gpu-decode      featcache ``extract_to_store`` as the extract stage runs it with ``extract.decode: gpu``:
                worker processes read bytes and probe headers, batched device JPEG decode in a thread on
                its own CUDA stream, overlapped forward, copy-out and commits, HDF5 store
gpu-threads     the same with the files read by a thread pool in the main process (no process hop)
gpu-sync        the same with ``overlap=False``: decode, forward and commits in order on one thread
gpu-graphs      gpu-decode with the forward replayed from a CUDA graph (``GraphedRunner``, captured for
                batches of ``--batch-size``, the last batch padded)
dask            ``extract_distributed`` with ``--dask-workers`` worker processes sharing the device
                (``extract_run.scheduler: local``, ``n_workers: 2``): each decodes on the device, reading files
                with ``--workers / --dask-workers`` threads; the cluster is started once, outside the timing
cpu-decode      ``extract.decode: cpu``: PIL decode in DataLoader workers, HDF5 store
peer            plain torchvision ``ImageFolder`` + ``DataLoader(--workers)`` + FX (timm: pooled
                ``forward``), float32 tensors, features copied to the host, as a user writes it

Every end-to-end case runs once to warm up, then the cases are interleaved
(A B C ... then reversed, ``--repeats`` rounds) and each reports the median
rate. Every featcache case checks its store: all rows present, none bad, and
for the device-decode cases how many rows the device decoded and how many took
the CPU path, and the per-row cosine of the features against the CPU-decode
store (min and median over all rows). Ratios are same-run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from distributed import Client, LocalCluster

from featcache.extract.decode.decoders import gpu_decode_status
from featcache.extract.decode.device import DecodeStats, iter_device_batches
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.distributed import extract_distributed
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.plan import ExtractionPlan, build_runner, plan_extraction
from featcache.extract.runner_spec import RunnerSpec
from featcache.extract.runners.graphs import GraphedRunner
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.weights import load_backbone
from featcache.store import FeatureStore

CLASSES = ("a", "b")

#: End-to-end cases in table order; the device-decode ones with their ``iter_device_batches`` options.
DEVICE_CASES: dict[str, dict[str, Any]] = {
    "gpu-decode": {"reader": "processes", "overlap": None},
    "gpu-threads": {"reader": "threads", "overlap": None},
    "gpu-sync": {"reader": "processes", "overlap": False},
    "gpu-graphs": {"reader": "processes", "overlap": None, "graphs": True},
}
#: Every case whose store is checked against the CPU-decode store, with its device/CPU-path counts.
DECODED_CASES = (*DEVICE_CASES, "dask")
CASES = ("forward", *DECODED_CASES, "cpu-decode", "peer")
LABELS = {
    "forward": "pure forward (random on-device batch)",
    "gpu-decode": "featcache GPU decode, end to end (`extract.decode: gpu`)",
    "gpu-threads": "featcache GPU decode, files read by threads (no process hop)",
    "gpu-sync": "featcache GPU decode, synchronous loop (`overlap=False`)",
    "gpu-graphs": "featcache GPU decode, forward replayed from a CUDA graph",
    "dask": "featcache GPU decode on dask workers sharing the device (`extract_run.scheduler: local`)",
    "cpu-decode": "featcache CPU decode, end to end (PIL in workers)",
    "peer": "plain ImageFolder + DataLoader + FX, float32 to the device",
}


def _write_jpeg(job: tuple[str, int, int, int]) -> None:
    from PIL import Image

    path, seed, width, height = job
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: JPEG-compressible like a photo (the recipe of bench_extract.py).
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (1 + seed % 3)) % 256, (y * 2) % 256, (x + y + 17 * seed) % 256], axis=-1)
    Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), processes: int | None = None,
               mixed: bool = False) -> Manifest:
    """``n`` JPEGs in ImageFolder layout ``root/<class>/<i>.jpg``, written by a process pool.

    ``mixed``: each image's width and height drawn (seeded) between 0.6 and 1.6 times ``size``, as in a
    folder of real photos (about one size per image).
    """
    paths = sorted(f"{CLASSES[i % 2]}/{i:06d}.jpg" for i in range(n))  # manifest ids are sorted
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    scales = np.random.default_rng(0).uniform(0.6, 1.6, (n, 2)) if mixed else np.ones((n, 2))
    jobs = [(str(root / path), i, int(size[0] * scales[i, 0]), int(size[1] * scales[i, 1]))
            for i, path in enumerate(paths)]
    if processes == 1:
        list(map(_write_jpeg, jobs))
    else:
        with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=32))
    labels = np.array([CLASSES.index(path.split("/")[0]) for path in paths], dtype=np.int64)
    return Manifest(list(paths), list(paths), np.zeros(n, dtype=np.uint8), "classification", labels=labels,
                    classes=list(CLASSES), root=root)


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), else nothing."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_forward(runner: TorchFeatureExtractor, size: int, batch: int, device: str, seconds: float) -> float:
    """Images per second of the truncated, pooled forward on a random batch already on the device."""
    x = torch.randn(batch, 3, size, size, device=device)
    for _ in range(3):
        runner.forward_raw(x)
    sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runner.forward_raw(x)
        count += batch
    sync(device)
    return count / (time.perf_counter() - started)


def plan_for(args: argparse.Namespace, decode: str) -> ExtractionPlan:
    """The plan the extract stage makes for these settings (torch, ``--device``, fp16 on CUDA with ``--fp16``)."""
    return plan_extraction(device=args.device, backend="torch", autocast="fp16" if args.fp16 else "none",
                           decode=decode, num_workers=args.workers)


def run_featcache(case: str, manifest: Manifest, runner, preprocess: Preprocessor, out: Path,
                  args: argparse.Namespace, graphed=None) -> DecodeStats | None:
    """One featcache case to a finished store at ``out``; the device decode's counts (None for ``cpu-decode``).

    The device cases pass the engine's own loader call (``iter_device_batches`` with
    the plan's workers, as ``make_batches`` makes it) through ``loader_factory``
    only to choose the reader and to collect its :class:`DecodeStats`.
    """
    out.unlink(missing_ok=True)
    if case == "cpu-decode":
        extract_to_store(manifest, runner, preprocess, out, plan=plan_for(args, "cpu"),
                         config={"bench": case}, batch_size=args.batch_size, block_rows=1024, progress=False)
        return None
    options, stats = DEVICE_CASES[case], DecodeStats()
    if options.get("graphs") and isinstance(graphed, str):
        raise RuntimeError(f"no CUDA graph runner ({graphed})")
    plan = plan_for(args, "gpu")

    def loader(rows, batch_size):
        return iter_device_batches(manifest, rows, preprocess=preprocess, device=args.device,
                                   batch_size=batch_size, num_workers=plan.num_workers, reader=options["reader"],
                                   background=options["overlap"], stats=stats)

    extract_to_store(manifest, graphed if options.get("graphs") else runner, preprocess, out, plan=plan,
                     config={"bench": case}, batch_size=args.batch_size, block_rows=1024, progress=False,
                     loader_factory=loader, overlap=options["overlap"])
    return stats


def start_cluster(n_workers: int, stack: contextlib.ExitStack) -> Any:
    """A client of a LocalCluster closed with ``stack``; the reason as a string when it does not start
    (then only the ``dask`` case fails)."""
    try:
        cluster = stack.enter_context(LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                                   dashboard_address=":0"))
        return stack.enter_context(Client(cluster))
    except Exception as error:  # noqa: BLE001 - the other cases need no cluster
        print(f"  the dask cluster did not start: {type(error).__name__}: {error}", flush=True)
        return f"{type(error).__name__}: {error}"


def run_dask(name: str, manifest: Manifest, preprocess: Preprocessor, out: Path, client: Any,
             args: argparse.Namespace) -> DecodeStats:
    """The ``dask`` case: ``extract_distributed`` with the device loader, as the extract stage runs it."""
    if isinstance(client, str):
        raise RuntimeError(f"no dask cluster ({client})")
    out.unlink(missing_ok=True)
    spec = RunnerSpec(name, "random", ("default",), "avg", device=args.device, channels_last=True,
                      autocast="fp16" if args.fp16 else None)
    report = extract_distributed(manifest, spec, preprocess, out, config={"bench": "dask"}, client=client,
                                 loader="device", read_threads=max(1, args.workers // args.dask_workers),
                                 batch_size=args.batch_size, block_rows=1024, progress=False)
    return report.decode_stats


def check_store(path: Path, reference: Path | None, stats: DecodeStats | None, n_rows: int) -> dict[str, Any]:
    """Rows, bad rows, device/CPU counts and the cosine of every row against the CPU-decode store."""
    store = FeatureStore(path)
    facts: dict[str, Any] = {"rows": store.n_rows, "bad": len(store.errors())}
    if store.n_rows != n_rows or facts["bad"]:
        raise AssertionError(f"{path.name}: {store.n_rows} rows ({facts['bad']} bad), expected {n_rows} good")
    if stats is not None:
        facts.update(device_rows=stats.device, cpu_rows=stats.cpu, rejected=stats.rejected)
    if reference is not None:
        cpu = FeatureStore(reference)
        for layer in store.layers:
            a, b = store.read(layer), cpu.read(layer)
            cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            facts[f"cosine_{layer}"] = {"min": float(cosine.min()), "median": float(np.median(cosine))}
        cpu.close()
    store.close()
    return facts


def _peer_model(name: str, model: torch.nn.Module, device: str):
    """What a user writes: torchvision's FX feature extractor, or a timm model without its classifier."""
    if name.startswith("efficientnet"):
        model.reset_classifier(0)
        net = model
    else:
        from torchvision.models.feature_extraction import create_feature_extractor

        net = create_feature_extractor(model, return_nodes={"flatten": "features"})
    return net.eval().to(device).to(memory_format=torch.channels_last)


def run_peer(net, preprocess: Preprocessor, root: Path, args: argparse.Namespace) -> None:
    """ImageFolder + DataLoader + the model, features to the host: the loop a user writes."""
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


def timed(fn: Callable[[], Any], n_images: int, device: str) -> tuple[float, Any]:
    """Images per second of one call of ``fn`` (device work included), and what it returned."""
    sync(device)
    started = time.perf_counter()
    value = fn()
    sync(device)
    return n_images / (time.perf_counter() - started), value


def interleaved(cases: dict[str, Callable[[], Any]], n_images: int, repeats: int,
                device: str, deadline: float | None = None) -> dict[str, dict[str, Any]]:
    """Each case once to warm up, then ``repeats`` rounds in alternating order; median img/s per case.

    A case that raises is reported with its error (``img_per_s`` None) and left out of the later rounds:
    one broken path never costs the numbers of the others (a GPU call comes 15 minutes at a time).
    ``deadline`` (a ``time.perf_counter()`` value): no round starts that would end after it at the pace of
    the last one (the first always runs), so a call under a time limit keeps fewer rounds of every case
    instead of losing the next backbone; ``runs`` shows how many ran.
    """
    runs: dict[str, list[float]] = {case: [] for case in cases}
    last: dict[str, Any] = {}
    failed: dict[str, str] = {}

    def attempt(case: str, timing: bool) -> None:
        try:
            if timing:
                rate, last[case] = timed(cases[case], n_images, device)
                runs[case].append(rate)
            else:
                cases[case]()  # warm-up: workers, cudnn autotuning, decoder initialisation
        except Exception as error:  # noqa: BLE001 - reported in the results, the other cases go on
            failed[case] = f"{type(error).__name__}: {error}"
            print(f"  case {case} failed: {failed[case]}", flush=True)
            traceback.print_exc()

    for case in cases:
        attempt(case, timing=False)
    took = 0.0
    for round_ in range(repeats):
        started = time.perf_counter()
        if round_ and deadline is not None and started + took > deadline:
            print(f"  {round_} of {repeats} rounds: the time budget is spent", flush=True)
            break
        order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
        for case in order:
            if case not in failed:
                attempt(case, timing=True)
        took = time.perf_counter() - started
    return {case: {"img_per_s": None, "error": failed[case]} if case in failed else
            {"img_per_s": statistics.median(rates), "runs": rates, "last": last.get(case)}
            for case, rates in runs.items()}


def bench_backbone(name: str, manifest: Manifest, root: Path, work: Path, client: Any,
                   args: argparse.Namespace, deadline: float | None = None) -> dict:
    """Every case of one backbone: img/s (median), and the checks of each featcache store (rounds until
    ``deadline``, see :func:`interleaved`)."""
    loaded = load_backbone(name, "random")
    preprocess = Preprocessor.from_spec(loaded.spec, input_size=args.input_size)
    runner, _ = build_runner(loaded, ["default"], plan_for(args, "gpu"), channels_last=True)
    n = len(manifest)
    results: dict[str, dict[str, Any]] = {
        "forward": {"img_per_s": bench_forward(runner, preprocess.input_size, args.batch_size, args.device,
                                               args.seconds)}}
    print(f"  {name} forward: {results['forward']['img_per_s']:,.0f} img/s", flush=True)
    stores = {case: work / f"{name}-{case}.h5" for case in (*DECODED_CASES, "cpu-decode")}
    try:  # captured now, before any thread; a capture that raises fails only the gpu-graphs case
        graphed: Any = GraphedRunner(runner, args.batch_size, preprocess.input_size)
        print(f"  {name} CUDA graph captured: {graphed.graphed}", flush=True)
    except Exception as error:  # noqa: BLE001 - reported as that case's error, the others go on
        graphed = f"{type(error).__name__}: {error}"
        print(f"  {name} GraphedRunner failed: {graphed}", flush=True)
        traceback.print_exc()
    cases: dict[str, Callable[[], Any]] = {
        case: (lambda case=case: run_featcache(case, manifest, runner, preprocess, stores[case], args, graphed))
        for case in stores if case != "dask"}
    cases["dask"] = lambda: run_dask(name, manifest, preprocess, stores["dask"], client, args)
    net = _peer_model(name, loaded.model, args.device)
    cases["peer"] = lambda: run_peer(net, preprocess, root, args)
    for case, result in interleaved(cases, n, args.repeats, args.device, deadline).items():
        stats = result.pop("last", None)
        if case in stores and result["img_per_s"] is not None:
            reference = stores["cpu-decode"] if case in DECODED_CASES else None
            try:
                result["store"] = check_store(stores[case], reference, stats, n)
            except Exception as error:  # noqa: BLE001 - a wrong store is a result too; the other cases go on
                result["store"] = {"error": f"{type(error).__name__}: {error}"}
        results[case] = result
        print(f"  {name} {case}: {rate_text(result)} img/s {result.get('store', '')}", flush=True)
    return results


def rate_text(result: dict[str, Any]) -> str:
    return "failed" if result["img_per_s"] is None else f"{result['img_per_s']:,.0f}"


def ratio_text(rate: dict[str, float | None], a: str, b: str) -> str:
    return "n/a" if rate[a] is None or rate[b] is None else f"{rate[a] / rate[b]:.2f}x"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's with its core count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def markdown(report: dict) -> str:
    """The README table: img/s per case and backbone, the same-run ratios, the store checks."""
    names = list(report["results"])
    lines = [f"{report['device_name']}, {report['images']} JPEGs {report['image_size']}, batch "
             f"{report['batch_size']}, channels_last, {report['precision']}, {report['workers']} workers, "
             f"interleaved, median of {report['repeats']}; torch {report['torch']}; decoder: {report['decoder']}",
             "", "| img/s | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for case in CASES:
        lines.append(f"| {LABELS[case]} | " + " | ".join(rate_text(report["results"][n][case]) for n in names) + " |")
    for n in names:
        r = report["results"][n]
        rate = {case: r[case]["img_per_s"] for case in CASES}
        pairs = [("gpu-decode", "forward"), ("gpu-decode", "peer"), ("gpu-threads", "forward"),
                 ("gpu-threads", "gpu-decode"), ("gpu-sync", "gpu-decode"), ("gpu-graphs", "gpu-decode"),
                 ("dask", "gpu-decode"),
                 ("cpu-decode", "peer")]
        lines.append(f"\n{n}: " + ", ".join(f"{a} / {b} = {ratio_text(rate, a, b)}" for a, b in pairs))
        for case in DECODED_CASES:
            lines.append(f"- {case} store: {json.dumps(r[case].get('store') or r[case].get('error'))}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--smoke`` shrinks everything to a seconds-long CPU run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_gpu_out", help="results folder")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dask-workers", type=int, default=2, help="worker processes of the dask case")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the pure-forward measurement")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: each backbone gets an equal share of what is left and runs "
                             "fewer rounds rather than overrun it (default: no limit)")
    parser.add_argument("--backbones", default="resnet50,efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--input-size", type=int, default=None, help="override the registry's input size")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that exercises every case")
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
    """Run every backbone and case; write ``bench_gpu.json`` and ``bench_gpu.md`` under ``--out``."""
    args = parse_args(argv)
    started = time.perf_counter()
    ok, decoder = gpu_decode_status(args.device)
    if not ok:
        sys.exit(f"GPU decode is not available on {args.device}: {decoder}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    image_size = (40, 30) if args.smoke else (500, 375)
    results: dict[str, dict] = {}
    report = {"device": args.device, "device_name": device_name(args.device), "images": args.images,
              "image_size": "x".join(map(str, image_size)), "batch_size": args.batch_size, "workers": args.workers,
              "repeats": args.repeats, "budget_s": args.budget, "dask_workers": args.dask_workers,
              "precision": "fp16 autocast" if args.fp16 else "float32", "torch": torch.__version__, "decoder": decoder,
              "cpu_count": os.cpu_count(), "results": results}
    try:
        manifest = make_jpegs(work / "images", args.images, image_size, processes=1 if args.smoke else None)
        print(f"{args.images} JPEGs written in {time.perf_counter() - started:.1f} s; device "
              f"{device_name(args.device)}; {decoder}", flush=True)
        with contextlib.ExitStack() as stack:
            client = start_cluster(args.dask_workers, stack)
            names = args.backbones.split(",")
            for index, name in enumerate(names):
                now = time.perf_counter()
                deadline = None if args.budget is None else now + (started + args.budget - now) / (len(names) - index)
                try:
                    results[name] = bench_backbone(name, manifest, work / "images", work, client, args, deadline)
                except Exception as error:  # noqa: BLE001 - the next backbone is still measured, the table written
                    print(f"  {name} failed: {type(error).__name__}: {error}", flush=True)
                    traceback.print_exc()
                    results[name] = {case: {"img_per_s": None, "error": f"{type(error).__name__}: {error}"}
                                     for case in CASES}
                report["seconds"] = round(time.perf_counter() - started, 1)
                # after each backbone: a call cut short by its time limit keeps what it measured
                (out / "bench_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown(report)
    (out / "bench_gpu.md").write_text(table)
    print(table, flush=True)
    print(f"total {report['seconds']} s; results in {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
