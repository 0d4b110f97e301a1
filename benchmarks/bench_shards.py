"""WebDataset shards: ``prepare`` of a million members, and extraction from shards vs a folder vs HTTP.

Run from the repo root (webdataset must be importable: it writes the shards)::

    python benchmarks/bench_shards.py --case prepare --members 1000000      # time and peak RSS
    python benchmarks/bench_shards.py --case extract --images 10000 --repeats 2
    python benchmarks/bench_shards.py --case listing --repeats 3                 # tarfile vs TarReader
    python benchmarks/bench_shards.py --case read --images 10000 --repeats 3     # the input path alone

Cases
-----
prepare  ``from_shards`` (the manifest of ``data.source: webdataset``) over N synthetic samples (a 4x4 PNG and
         a ``cls`` member each, written by ``webdataset.TarWriter``) in shards of 10,000 samples (hard links
         of one shard, so N costs no disk); each size in a clean process, its own wall time and peak RSS
         (``VmHWM`` of the child). Two sizes show how memory grows with N.
listing  member listing of one 10,000-sample shard: Python's ``tarfile`` (stream mode) vs featcache's
         ``TarReader``, alternating within each repeat; members/s and the ratio.
read     the part of extraction that differs between the sources: ``ImageReader.read_batch`` (read the bytes,
         decode, resize, crop) of the same 10,000 images as a folder, 10 shards, and the shards over HTTP,
         interleaved batch by batch (64 rows; the order rotates every batch), so that load from other jobs
         hits all three alike; the forward pass is the same for all three (same pixels, same features).
extract  the same generated images (64x64 JPEGs, 10 classes) as a folder, as 10 shards on disk, and as the
         same shards served over loopback HTTP (a server in its own process; byte ranges); ``prepare`` +
         ``extract`` through the pipeline API with the shipped backend (``auto``: onnxruntime on the CPU),
         cases alternating within each repeat; img/s of the extract stage, ratios to the folder in the same
         repeat. Feature bytes are checked equal across the three.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


# ------------------------------------------------------------------ prepare
# Peak RSS from /proc/self/status VmHWM: this process's own high-water mark (ru_maxrss would carry the
# benchmark parent's peak over the exec).
_HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"

_PREPARE_CHILD = r"""
import sys, time
from featcache.extract.inputs.sharded import from_shards
started = time.perf_counter()
info = from_shards(sys.argv[1], sys.argv[2], {"train": 0.6, "val": 0.2, "test": 0.2}, 0)
seconds = time.perf_counter() - started
print(info.n_rows, seconds, %s)
""" % _HWM

_BASELINE_CHILD = r"""
import featcache.extract.inputs.sharded  # noqa: F401 - the same imports, no work
print(%s)
""" % _HWM


def _template_shard(path: Path, per_shard: int) -> None:
    import webdataset as wds
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with wds.TarWriter(str(path), encoder=False) as writer:
        for index in range(per_shard):
            writer.write({"__key__": f"{index:07d}", "png": png, "cls": str(index % 10).encode()})


def bench_prepare(members: list[int], per_shard: int) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = root / "template.tar"
        _template_shard(template, per_shard)
        baseline = float(subprocess.run([sys.executable, "-c", _BASELINE_CHILD], env=env, capture_output=True,
                                        text=True, check=True).stdout)
        print(f"\nshards of {per_shard:,} samples ({template.stat().st_size / 1e6:.1f} MB each, 2 members + pax "
              f"headers per sample); baseline RSS (python + imports) {baseline:.0f} MiB\n")
        print("| samples | shards | wall | samples/s | peak RSS | above baseline | per sample |")
        print("|---|---|---|---|---|---|---|")
        for n in members:
            folder = root / f"shards-{n}"
            folder.mkdir()
            for index in range(-(-n // per_shard)):
                os.link(template, folder / f"{index:06d}.tar")
            out = root / f"prepared-{n}" / "manifest.csv"
            result = subprocess.run([sys.executable, "-c", _PREPARE_CHILD, str(folder), str(out)], env=env,
                                    capture_output=True, text=True, check=True)
            rows, seconds, rss = result.stdout.split()
            rows, seconds, rss = int(rows), float(seconds), float(rss)
            print(f"| {rows:,} | {len(list(folder.iterdir()))} | {seconds:.1f} s | {rows / seconds:,.0f} | "
                  f"{rss:.0f} MiB | {rss - baseline:.0f} MiB | {(rss - baseline) * 2**20 / rows:.0f} B |", flush=True)


def bench_listing(per_shard: int, repeats: int) -> None:
    import tarfile

    from featcache.extract.inputs.tar_headers import TarReader

    def with_tarfile(path: Path) -> int:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            return sum(1 for info in tar if info.isfile())

    def with_reader(path: Path) -> int:
        with open(path, "rb") as raw:
            reader = TarReader(raw)
            count = sum(1 for _ in reader.members())
            reader.drain()
            return count

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "000000.tar"
        _template_shard(path, per_shard)
        times: dict[str, list[float]] = {"tarfile": [], "TarReader": []}
        for repeat in range(repeats):
            order = [("tarfile", with_tarfile), ("TarReader", with_reader)]
            for name, lister in order if repeat % 2 == 0 else reversed(order):
                started = time.perf_counter()
                members = lister(path)
                times[name].append(time.perf_counter() - started)
        print(f"\none shard of {per_shard:,} samples ({members:,} members), {repeats} repeats, load "
              f"{os.getloadavg()[0]:.1f}\n")
        print("| lister | members/s per repeat | ratio (TarReader / tarfile) per repeat |")
        print("|---|---|---|")
        for name, seconds in times.items():
            ratios = [t / s for t, s in zip(times["tarfile"], seconds)]
            print(f"| {name} | {', '.join(f'{members / s:,.0f}' for s in seconds)} | "
                  f"{', '.join(f'{r:.1f}' for r in ratios)} |")


# ------------------------------------------------------------------ extract
_SERVER_CHILD = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from _support.shards import LoopbackServer
with LoopbackServer(Path(sys.argv[1])) as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


def _images(root: Path, n: int, classes: int = 10, size: int = 64) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(n):
        label = index % classes
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        pixels[..., label % 3] += 120 + 10 * (label // 3)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)


def _extract(raw: dict, root: Path, name: str) -> tuple[float, bytes]:
    import h5py

    from featcache.pipeline import extract, parse_params, prepare

    params = parse_params(raw)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        prepare(params, root / name)
        out = root / f"{name}.h5"
        out.unlink(missing_ok=True)
        started = time.perf_counter()
        extract(params, "efficientnet_lite0", root / name / "manifest.csv", out, progress=False)
        seconds = time.perf_counter() - started
    finally:
        os.chdir(cwd)
    with h5py.File(out, "r") as handle:
        return seconds, handle["features/pool"][()].tobytes()


def bench_extract(n_images: int, n_shards: int, repeats: int) -> None:
    import yaml

    from _support.shards import shards_from_folder

    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _images(root / "images", n_images)
        shards_from_folder(root / "images", root / "shards", per_shard=-(-n_images // n_shards))
        server = subprocess.Popen([sys.executable, "-c", _SERVER_CHILD, str(root), str(REPO / "tests")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().strip()
        try:
            base = {"data": {"name": "bench", "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
                    "extract": dict(shipped["extract"]), "extract_run": dict(shipped["extract_run"]),
                    "backbones": {"efficientnet_lite0": {"weights": "pretrained", "layers": ["pool"]}},
                    "features": [{"backbone": "efficientnet_lite0", "layer": "pool"}]}
            cases = {
                "folder": {"source": "folder", "path": "images"},
                "shards": {"source": "webdataset", "path": "shards"},
                "http": {"source": "webdataset", "path": [url + "shards/{%06d..%06d}.tar" % (0, n_shards - 1)]},
            }
            warm = root / "warm"  # an untimed run first: the ONNX export cache and the OS page cache are warm
            for file in sorted((root / "images").rglob("*.jpg"))[:64]:
                (warm / file.parent.name).mkdir(parents=True, exist_ok=True)
                (warm / file.parent.name / file.name).write_bytes(file.read_bytes())
            _extract({**base, "data": {**base["data"], "source": "folder", "path": "warm"}}, root, "warmup")
            times: dict[str, list[float]] = {name: [] for name in cases}
            features = {}
            for repeat in range(repeats):
                order = list(cases) if repeat % 2 == 0 else list(reversed(cases))
                for name in order:
                    raw = {**base, "data": {**base["data"], **cases[name]}}
                    seconds, features[name] = _extract(raw, root, f"{name}")
                    times[name].append(seconds)
                    print(f"repeat {repeat}: {name} {n_images / seconds:.1f} img/s (load {os.getloadavg()[0]:.1f})",
                          flush=True)
        finally:
            server.communicate("", timeout=10)
    assert features["shards"] == features["folder"] == features["http"], "feature bytes differ between sources"
    print(f"\n{n_images:,} images (64x64 JPEG), {n_shards} shards, EfficientNet-Lite0 pool, shipped extract params "
          f"(backend {shipped['extract'].get('backend')}), {repeats} repeats; feature bytes equal across sources\n")
    print("| source | img/s per repeat | ratio to folder per repeat | median ratio |")
    print("|---|---|---|---|")
    for name in cases:
        rates = [n_images / s for s in times[name]]
        ratios = [f / s for f, s in zip(times["folder"], times[name])]
        print(f"| {name} | {', '.join(f'{r:.1f}' for r in rates)} | {', '.join(f'{r:.2f}' for r in ratios)} | "
              f"**{statistics.median(ratios):.2f}x** |")


def bench_read(n_images: int, n_shards: int, repeats: int, batch: int = 64) -> None:
    from _support.shards import shards_from_folder
    from featcache.extract.decode.loaders import ImageReader
    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.extract.inputs.manifest import Manifest
    from featcache.extract.inputs.sharded import from_shards
    from featcache.extract.inputs.sources import from_folder
    from featcache.extract.zoo.registry import get_backbone

    preprocess = Preprocessor.from_spec(get_backbone("efficientnet_lite0"))
    ratios = {"train": 0.6, "val": 0.2, "test": 0.2}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _images(root / "images", n_images)
        shards_from_folder(root / "images", root / "shards", per_shard=-(-n_images // n_shards))
        server = subprocess.Popen([sys.executable, "-c", _SERVER_CHILD, str(root), str(REPO / "tests")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().strip()
        try:
            from_shards(str(root / "shards"), root / "local" / "manifest.csv", ratios, 0)
            from_shards([url + "shards/{%06d..%06d}.tar" % (0, n_shards - 1)], root / "http" / "manifest.csv",
                        ratios, 0)
            readers = {"folder": ImageReader(from_folder(root / "images", ratios, 0), preprocess),
                       "shards": ImageReader(Manifest.read(root / "local" / "manifest.csv"), preprocess),
                       "http": ImageReader(Manifest.read(root / "http" / "manifest.csv"), preprocess)}
            names = list(readers)
            print(f"\n{n_images:,} images (64x64 JPEG) -> 224x224 crops (EfficientNet-Lite0 preprocessing), "
                  f"batches of {batch}, one process, {repeats} repeats\n")
            print("| repeat | folder img/s | shards img/s | http img/s | shards / folder | http / folder | load |")
            print("|---|---|---|---|---|---|---|")
            for repeat in range(repeats):
                seconds = dict.fromkeys(names, 0.0)
                for index, start in enumerate(range(0, n_images, batch)):
                    rows = list(range(start, min(start + batch, n_images)))
                    for name in names[index % 3:] + names[:index % 3]:
                        started = time.perf_counter()
                        _, pixels, reasons = readers[name].read_batch(rows)
                        seconds[name] += time.perf_counter() - started
                        assert not any(reasons), reasons
                rate = {name: n_images / s for name, s in seconds.items()}
                print(f"| {repeat} | {rate['folder']:.0f} | {rate['shards']:.0f} | {rate['http']:.0f} | "
                      f"{rate['shards'] / rate['folder']:.2f} | {rate['http'] / rate['folder']:.2f} | "
                      f"{os.getloadavg()[0]:.1f} |", flush=True)
        finally:
            server.communicate("", timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["prepare", "listing", "read", "extract"], required=True)
    parser.add_argument("--members", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.case == "prepare":
        bench_prepare(args.members, args.per_shard)
    elif args.case == "listing":
        bench_listing(args.per_shard, args.repeats)
    elif args.case == "read":
        bench_read(args.images, args.shards, args.repeats)
    else:
        bench_extract(args.images, args.shards, args.repeats)


if __name__ == "__main__":
    main()
