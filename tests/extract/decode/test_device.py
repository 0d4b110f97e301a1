"""Batched device JPEG decode (extract/decode/device.py, extract/decode/probe.py) against the PIL path.

The device path runs here on the CPU device (torchvision decodes CPU tensors):
same routing, batching, grouping, geometry and fallback code as on a GPU. The
reference is the CPU path as extraction runs it today (ImageDataset: PIL with
its JPEG draft, EXIF transpose, torchvision resize and crop).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from _support.similarity import row_cosines
from featcache.extract.decode.decoders import DeviceDecoder, gpu_decode_status, select_decoder
from featcache.extract.decode.device import (
    DecodeStats,
    DeviceDecodeDataset,
    decode_items,
    iter_device_batches,
    orient,
)
from featcache.extract.decode.loaders import ImageDataset
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.zoo.registry import get_backbone

#: (width, height) of generated JPEGs: tiny, thin strips both ways, the benchmark size, an extreme strip.
ODD_SIZES = [(1, 1), (7, 300), (301, 17), (500, 375), (4000, 30), (1100, 800)]
PHOTOS = ["chelsea", "coffee", "astronaut"]
#: Files the device decoder must take (the rest go to the CPU path by design).
ON_DEVICE = {f"{name}.jpg" for name in PHOTOS} | {f"orient{o}.jpg" for o in range(1, 9)} | {
    "gray.jpg", "progressive.jpg", "big.jpg", "odd1x1.jpg", "odd7x300.jpg", "odd301x17.jpg", "odd500x375.jpg",
    "odd1100x800.jpg"}
ON_CPU = {"cmyk.jpg", "odd4000x30.jpg"}  # CMYK; extreme aspect ratio (crop-window resampling on the CPU path)


#: (width, height) of the scikit-image samples, for a stand-in where scikit-image is missing (GPU machines).
_PHOTO_SIZES = {"chelsea": (451, 300), "coffee": (600, 400), "astronaut": (512, 512)}


def _photo(name: str) -> Image.Image:
    try:
        import skimage.data
    except ImportError:  # the GPU machines lack scikit-image: a smooth noisy stand-in of the same size
        return _gradient(*_PHOTO_SIZES[name], seed=len(name))
    return Image.fromarray(getattr(skimage.data, name)())


def _gradient(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Real photos, odd sizes, EXIF orientations 1-8, grayscale, CMYK, progressive, a large photo."""
    root = tmp_path_factory.mktemp("jpegs")
    for name in PHOTOS:
        _photo(name).save(root / f"{name}.jpg", quality=90)
    for index, (width, height) in enumerate(ODD_SIZES):
        _gradient(width, height, index).save(root / f"odd{width}x{height}.jpg", quality=90)
    cat = _photo("chelsea")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cat.save(root / f"orient{orientation}.jpg", exif=exif)
    cat.convert("L").save(root / "gray.jpg")
    cat.convert("CMYK").save(root / "cmyk.jpg")
    cat.save(root / "progressive.jpg", progressive=True)
    _photo("astronaut").resize((2100, 1700)).save(root / "big.jpg")  # decoded at 1/8 scale by PIL's draft
    return root


def _preprocessor(backbone: str = "resnet18", mode: str = "crop", **kwargs) -> Preprocessor:
    return Preprocessor.from_spec(get_backbone(backbone), mode, **kwargs)


def _normalise(images: torch.Tensor, preprocess: Preprocessor) -> torch.Tensor:
    mean = torch.tensor(preprocess.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float64).view(1, 3, 1, 1)
    return (images.to(torch.float64) / 255.0 - mean) / std


def _device_batch(paths, preprocess, batch_size=64, num_workers=0, rows=None):
    rows = list(range(len(paths))) if rows is None else rows
    batches = list(iter_device_batches(paths, rows, preprocess=preprocess, device="cpu", batch_size=batch_size,
                                       num_workers=num_workers))
    return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
            [reason for b in batches for reason in b[2]])


def _cpu_reference(paths, preprocess) -> tuple[torch.Tensor, list[str]]:
    """The CPU path's normalised inputs (float64) and reasons (ImageDataset hands over uint8 or normalised)."""
    dataset = ImageDataset(paths, preprocess)
    items = [dataset[i] for i in range(len(paths))]
    pixels = torch.stack([item[1] for item in items])
    inputs = _normalise(pixels, preprocess) if pixels.dtype == torch.uint8 else pixels.to(torch.float64)
    return inputs, [item[2] for item in items]


def test_routing_sends_plain_jpegs_to_the_device(image_dir):
    """Not vacuous: the comparisons below run the device decoder, and CMYK / extreme strips go to PIL."""
    dataset = DeviceDecodeDataset([str(image_dir / name) for name in sorted(ON_DEVICE | ON_CPU)], _preprocessor())
    routed = {name: dataset[i].data is not None for i, name in enumerate(sorted(ON_DEVICE | ON_CPU))}
    assert routed == {name: name in ON_DEVICE for name in routed}


@pytest.mark.parametrize("backbone,mode", [("resnet18", "crop"), ("efficientnet_lite0", "crop"),
                                           ("resnet18", "squash"), ("efficientnet_lite0", "squash")])
def test_device_path_matches_pil_path(image_dir, backbone, mode):
    names = sorted(ON_DEVICE | ON_CPU)
    paths = [str(image_dir / name) for name in names]
    preprocess = _preprocessor(backbone, mode)
    rows, images, reasons = _device_batch(paths, preprocess, batch_size=7)
    expected, _ = _cpu_reference(paths, preprocess)
    assert rows.tolist() == list(range(len(paths))) and reasons == [""] * len(paths)
    assert images.dtype == torch.uint8 and images.shape == (len(paths), 3, preprocess.input_size,
                                                            preprocess.input_size)
    cosines = row_cosines(_normalise(images, preprocess), expected)
    assert cosines.min() >= 0.999, dict(zip(names, cosines.round(5)))
    # Pixels agree to within a grey level on average (the decoders and the draft emulation differ slightly).
    mean = torch.tensor(preprocess.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float64).view(1, 3, 1, 1)
    levels = (images.to(torch.float64) - (expected * std + mean) * 255.0).abs().mean(dim=(1, 2, 3))
    assert levels.max() <= 1.0, dict(zip(names, levels.numpy().round(2)))


@pytest.mark.parametrize("size", [(511, 600), (512, 512), (1030, 2100), (2100, 1700), (4100, 300), (300, 4100)])
def test_draft_scale_matches_pillow(size):
    """The device path averages the blocks Pillow's JPEG draft (used by the CPU path) would drop."""
    from featcache.extract.decode.probe import draft_scale

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "JPEG")
    preprocess = _preprocessor()
    with Image.open(buffer) as image:
        image.draft(image.mode, (preprocess.resize_size, preprocess.resize_size))
        drafted = image.size
    scale = draft_scale(*size, preprocess)
    assert drafted == (-(-size[0] // scale), -(-size[1] // scale))


def test_exif_orientation_like_pil():
    """All 8 EXIF orientations, exactly as Pillow's exif_transpose (on a non-square image)."""
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    for orientation in range(1, 9):
        image = Image.fromarray(pixels)
        exif = image.getexif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        image.save(buffer, "PNG", exif=exif)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
        assert np.array_equal(orient(tensor, orientation).permute(1, 2, 0).numpy(), expected), orientation


def test_features_match_through_a_backbone(image_dir, random_backbone):
    from featcache.extract.runners.torch_runner import TorchFeatureExtractor

    loaded = random_backbone("resnet18")
    runner = TorchFeatureExtractor(loaded.model, loaded.spec, ["pool5", "res3"], device="cpu")
    names = sorted(ON_DEVICE)
    paths = [str(image_dir / name) for name in names]
    preprocess = _preprocessor("resnet18")
    _, images, reasons = _device_batch(paths, preprocess, batch_size=16)
    assert reasons == [""] * len(paths)
    expected, _ = _cpu_reference(paths, preprocess)
    got = runner(_normalise(images, preprocess).to(torch.float32))
    want = runner(expected.to(torch.float32))
    for layer in ("pool5", "res3"):
        cosines = row_cosines(torch.from_numpy(got[layer]), torch.from_numpy(want[layer]))
        assert cosines.min() >= 0.999, (layer, dict(zip(names, cosines.round(5))))


def _png_with_size(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` (a decompression bomb as far as the header goes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


@pytest.fixture()
def mixed(image_dir, tmp_path) -> tuple[list[str], dict[str, str]]:
    """Good JPEGs and PNGs mixed with bad files; name -> expected reason prefix ("" for good)."""
    good = (image_dir / "chelsea.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _png_with_size(tmp_path / "bomb.png", 100_000, 100_000)
    _gradient(600, 500, 3).save(tmp_path / "over_limit.jpg")  # 300,000 pixels > the limit below
    _gradient(40, 30, 4).save(tmp_path / "small.png")
    expected = {
        "chelsea.jpg": "", "truncated.jpg": "truncated or corrupt image", "coffee.jpg": "",
        "text.jpg": "not an image or unsupported format", "small.png": "", "cmyk.jpg": "",
        "empty.jpg": "empty file", "bomb.png": "image too large", "gray.jpg": "", "missing.jpg": "missing file",
        "over_limit.jpg": "image too large", "odd500x375.jpg": "",
    }
    paths = [str((image_dir if (image_dir / name).exists() else tmp_path) / name) for name in expected]
    return paths, expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_batch_keeps_good_rows_and_reports_bad_ones(mixed, num_workers):
    paths, expected = mixed
    preprocess = _preprocessor(max_image_pixels=250_000)
    order = list(range(len(paths)))[::-1]  # rows come back in the order given, not sorted
    rows, images, reasons = _device_batch(paths, preprocess, batch_size=5, num_workers=num_workers, rows=order)
    assert rows.tolist() == order
    want, want_reasons = _cpu_reference(paths, preprocess)
    names = list(expected)
    for position, row in enumerate(order):
        name, reason = names[row], reasons[position]
        assert reason == want_reasons[row], name  # the same text extraction reports today
        if expected[name]:
            assert reason.startswith(expected[name]), (name, reason)
            assert not images[position].any(), name
        else:
            assert reason == "", (name, reason)
            cosine = row_cosines(_normalise(images[position:position + 1], preprocess), want[row:row + 1])[0]
            assert cosine >= 0.999, (name, cosine)


def test_a_file_the_device_rejects_is_redone_alone_on_the_cpu_path(mixed):
    """The decoder fails the whole batch on one file: the others still decode on the device."""
    paths, expected = mixed
    real = select_decoder("cpu")
    calls = []

    def picky(datas):
        calls.append(len(datas))
        if any(len(data) == len(Path(paths[-1]).read_bytes()) for data in datas):  # rejects odd500x375.jpg
            raise RuntimeError("device decoder: unsupported JPEG")
        return real.decode(datas)

    decoder = DeviceDecoder("picky", "cpu", picky, applies_exif=False)
    preprocess = _preprocessor()
    dataset = DeviceDecodeDataset(paths, preprocess)
    rows, images, reasons = decode_items([dataset[i] for i in range(len(paths))], dataset, decoder)
    n_device = sum(dataset[i].data is not None for i in range(len(paths)))
    assert calls == [n_device] + [1] * n_device  # one batched call, then one call per file
    want, want_reasons = _cpu_reference(paths, preprocess)
    assert reasons == want_reasons
    good = [i for i, reason in enumerate(reasons) if not reason]
    assert row_cosines(_normalise(images[good], preprocess), want[good]).min() >= 0.999


def test_large_batches_are_decoded_in_parts(image_dir, monkeypatch):
    """At most _MAX_DECODE_PIXELS per decode call; the output does not depend on the split."""
    from featcache.extract.decode import device as gpu_decode

    paths = [str(image_dir / name) for name in ("chelsea.jpg", "orient6.jpg", "coffee.jpg", "gray.jpg")]
    real = select_decoder("cpu")
    calls = []

    def counting(datas):
        calls.append(len(datas))
        return real.decode(datas)

    decoder = DeviceDecoder("counting", "cpu", counting, applies_exif=False)
    dataset = DeviceDecodeDataset(paths, _preprocessor())
    whole = decode_items([dataset[i] for i in range(len(paths))], dataset, decoder)
    monkeypatch.setattr(gpu_decode, "_MAX_DECODE_PIXELS", 300_000)  # two 451x300 cats, one 600x400 coffee
    parts = decode_items([dataset[i] for i in range(len(paths))], dataset, decoder)
    assert calls == [4, 2, 1, 1]
    assert torch.equal(whole[1], parts[1]) and whole[2] == parts[2] == [""] * 4


@pytest.mark.parametrize("resize_chunk", [None, 400_000], ids=["one-resize-per-group", "groups-resized-in-chunks"])
def test_every_row_of_a_batch_gets_the_pixels_it_gets_alone(image_dir, monkeypatch, resize_chunk):
    """Size groups of one and of several images (the same photo under several names and orientations), the CPU
    path and the device path in one batch, in shuffled order: grouping and the one rounding per batch never
    move or change a row's pixels."""
    from featcache.extract.decode import device as gpu_decode

    names = sorted(path.name for path in image_dir.iterdir())
    paths = [str(image_dir / name) for name in names + ["chelsea.jpg", "orient1.jpg", "orient6.jpg", "cmyk.jpg"]]
    order = list(np.random.default_rng(3).permutation(len(paths)))
    if resize_chunk is not None:
        monkeypatch.setattr(gpu_decode, "_MAX_RESIZE_PIXELS", resize_chunk)  # 451x300 cats: 2 per resize call
    decoder = select_decoder("cpu")
    dataset = DeviceDecodeDataset(paths, _preprocessor())
    stats = gpu_decode.DecodeStats()
    rows, images, reasons = decode_items([dataset[int(i)] for i in order], dataset, decoder, stats)
    assert rows.tolist() == order and stats.device + stats.cpu == len(paths) and stats.device >= 20 and stats.cpu >= 2
    for position, row in enumerate(order):
        _, alone, why = decode_items([dataset[int(row)]], dataset, decoder)
        assert why == [reasons[position]]
        assert torch.equal(images[position], alone[0]), paths[row]


def test_background_thread_gives_the_same_batches_and_raises_its_errors(image_dir, monkeypatch):
    from featcache.extract.decode import device as gpu_decode

    paths = [str(image_dir / name) for name in sorted(ON_DEVICE)][:6]
    preprocess = _preprocessor()

    def run(background):
        return list(iter_device_batches(paths, range(6), preprocess=preprocess, batch_size=2, num_workers=0,
                                        background=background))

    inline, threaded = run(False), run(True)
    assert len(inline) == len(threaded) == 3
    for a, b in zip(inline, threaded):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    # Closing early stops the thread; an error in the thread is raised in the caller.
    batches = iter_device_batches(paths, range(6), preprocess=preprocess, batch_size=2, num_workers=0,
                                  background=True)
    next(batches)
    batches.close()
    real = gpu_decode.decode_items

    def failing(items, dataset, decoder, stats=None):
        if items.rows[0] == 4:
            raise RuntimeError("bug in the device path")
        return real(items, dataset, decoder, stats)

    monkeypatch.setattr(gpu_decode, "decode_items", failing)
    with pytest.raises(RuntimeError, match="bug in the device path"):
        run(True)


def test_status_and_decoder_on_the_cpu_device():
    ok, text = gpu_decode_status("cpu")
    assert ok and "decode_jpeg" in text and "cpu" in text
    decoder = select_decoder("cpu")
    # torchvision's decoder leaves the EXIF orientation to the caller; TorchCodec's (0.17, where installed) applies it
    assert decoder.applies_exif is (decoder.name == "torchcodec")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no CUDA device is visible")
def test_status_without_cuda_says_why():
    ok, text = gpu_decode_status("cuda")
    assert not ok and "CUDA" in text and "extract.decode: cpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_cuda_decode_matches_pil_path(image_dir, backbone):
    names = sorted(ON_DEVICE | ON_CPU)
    paths = [str(image_dir / name) for name in names]
    preprocess = _preprocessor(backbone)
    stats = DecodeStats()
    batches = list(iter_device_batches(paths, range(len(paths)), preprocess=preprocess, device="cuda",
                                       batch_size=8, num_workers=2, stats=stats))
    images = torch.cat([b[1] for b in batches])
    assert images.is_cuda and [r for b in batches for r in b[2]] == [""] * len(paths)
    # Not vacuous: the device decoded the plain JPEGs (a run where they all fell back to PIL fails here); only
    # the progressive one may be redone on the CPU path if nvJPEG refuses it.
    assert (stats.cpu, stats.bad) == (len(ON_CPU), 0), stats
    assert stats.device >= len(ON_DEVICE) - 1 and stats.device + stats.rejected == len(ON_DEVICE), stats
    expected, _ = _cpu_reference(paths, preprocess)
    cosines = row_cosines(_normalise(images.cpu(), preprocess), expected)
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a grey level or so. Upscaling a 301x17 noisy
    # strip 13x with bicubic magnifies that: 0.99895 on an H100 (2026-11-26), the photos 0.9998 or more.
    assert cosines.min() >= 0.998, dict(zip(names, cosines.round(5)))
    assert np.median(cosines) >= 0.9998, dict(zip(names, cosines.round(5)))


@pytest.mark.gpu
def test_cuda_mixed_batch(mixed):
    paths, _ = mixed
    preprocess = _preprocessor(max_image_pixels=250_000)
    batches = list(iter_device_batches(paths, range(len(paths)), preprocess=preprocess, device="cuda",
                                       batch_size=5, num_workers=2))
    _, want_reasons = _cpu_reference(paths, preprocess)
    assert [r for b in batches for r in b[2]] == want_reasons


def test_bench_gpu_smoke(tmp_path):
    """benchmarks/bench_gpu.py runs every case end to end (tiny CPU mode) and writes its JSON and table."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert set(report["results"]) == {"resnet18", "efficientnet_lite0"}
    for results in report["results"].values():
        assert set(results) == set(bench.CASES)
        assert all(case["img_per_s"] > 0 for case in results.values())
        for case in bench.DECODED_CASES:  # every row decoded on the device, features as the CPU path's
            store = results[case]["store"]
            assert (store["rows"], store["bad"], store["device_rows"], store["cpu_rows"]) == (6, 0, 6, 0)
            assert all(store[key]["min"] > 0.99 for key in store if key.startswith("cosine_"))
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "featcache GPU decode, end to end" in table and "| resnet18 | efficientnet_lite0 |" in table


def test_profile_gpu_smoke(tmp_path, monkeypatch):
    """benchmarks/profile_gpu.py times every stage alone and traces the loop with its labels (tiny CPU mode)."""
    import functools
    import gzip
    import importlib
    import json

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "benchmarks"))
    profile_gpu = importlib.import_module("profile_gpu")
    # As on CUDA: the loader reads and decodes in its own thread, whose labels the trace must record too (torch's
    # profiler records only the thread that starts it unless told; they were 0 there).
    monkeypatch.setattr(profile_gpu, "iter_device_batches", functools.partial(iter_device_batches, background=True))
    profile_gpu.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "profile_gpu.json").read_text())
    assert set(report["stages"]) == {"read (processes)", "read (threads)", "decode", "decode+resize",
                                     "decode+resize, mixed sizes", "read (processes) + decode",
                                     "read (threads) + decode", "forward + copy-out"}
    assert all(rate > 0 for rate in report["stages"].values())
    assert set(report["traces"]) == {"processes", "threads"}
    for reader, trace in report["traces"].items():
        assert trace["images"] == 8 and trace["gpu_busy_fraction"] is None  # no kernels on the CPU
        assert (trace["device_rows"], trace["cpu_rows"]) == (8, 0)
        labels = trace["us_per_image_by_label"]
        assert all(labels[label] > 0 for label in ("featcache.read_files", "featcache.device_decode",
                                                    "featcache.forward"))
        with gzip.open(tmp_path / f"profile_gpu_trace_{reader}.json.gz", "rt") as trace_file:
            assert "featcache.device_decode" in trace_file.read()
    assert "Trace, files read by threads" in (tmp_path / "profile_gpu.md").read_text()
    ops = (tmp_path / "profile_gpu_ops.txt").read_text()
    assert ops.count("== files read by") == 2
    assert len(list(tmp_path.iterdir())) <= 5  # a device call returns 8 files: 2 for bench_gpu, 1 for the log


def test_profile_gpu_traces_even_when_the_stages_fail(tmp_path, monkeypatch):
    """A stages step whose setup raises (reading the batches, a warm-up) is reported; the traces still run."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "benchmarks"))
    profile_gpu = importlib.import_module("profile_gpu")
    traced = []

    def failing(*args):
        raise RuntimeError("the decode warm-up failed")

    def trace(manifest, runner, preprocess, work, args, out, reader):
        traced.append(reader)
        return {"error": "not traced in this test"}

    monkeypatch.setattr(profile_gpu, "stages", failing)
    monkeypatch.setattr(profile_gpu, "trace", trace)
    report = profile_gpu.main(["--smoke", "--out", str(tmp_path)])
    assert report["stages"] == {"error": "RuntimeError: the decode warm-up failed"}
    assert traced == ["processes", "threads"]
    assert "| error | RuntimeError: the decode warm-up failed |" in (tmp_path / "profile_gpu.md").read_text()
