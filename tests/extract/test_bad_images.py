"""Bad and unusual images, end to end: each is decoded or reported by id and reason, never a crash.

The corpus is generated here (no committed binaries): every kind of broken file
a user's folder may hold (truncated JPEG/PNG, corrupt bytes, zero bytes, text
named .jpg, a decompression bomb header, a missing file) next to unusual but
valid images (EXIF-rotated JPEG, palette/RGBA/LA/CMYK, 16-bit and float TIFF,
1x1, a 1 x 20000 strip, unicode and space-containing names). Extraction runs a
random-weight resnet18 on 32 px inputs (``num_workers=0`` unless a test is
about workers), so the module takes a few seconds.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from _support.files import md5
from featcache.errors import ExtractionError
from featcache.extract.decode import preprocess as preprocess_module
from featcache.extract.decode.images import ImageTooLargeError, load_rgb
from featcache.extract.decode.loaders import ImageDataset, make_loader
from featcache.extract.decode.preprocess import DEFAULT_MAX_IMAGE_PIXELS, Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest, ManifestError
from featcache.extract.inputs.sources import from_csv, from_folder
from featcache.extract.plan import plan_extraction
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.registry import IMAGENET_MEAN, IMAGENET_STD
from featcache.store import FeatureStore

PRE = Preprocessor(input_size=32, resize_size=36, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
CONFIG = {"backbone": "resnet18", "weights": "random", "layers": ["pool5"], "preprocess": PRE.config()}
ATTRS = {"backbone": "resnet18", "weights_id": "random:seed=0", "weights_sha256": "", "backend": "torch"}
ALL_TRAIN = {"train": 1.0}

UNICODE_NAME = "ünïcödé 名前 ✓.png"
SPACE_NAME = "with  spaces (1).jpg"


# ------------------------------------------------------------------ corpus
def _noise(size=(24, 20), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _encoded(fmt: str, seed: int = 0, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(size, seed)).save(buffer, fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb) with almost no pixel data."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def exif_jpeg(path: Path, orientation: int) -> None:
    """40x20 JPEG, left half red, right half blue, with an EXIF orientation tag."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", exif=exif.tobytes(), quality=95)


#: id -> the start of its reason in /errors.
BAD = {
    "bad/truncated.jpg": "truncated or corrupt image",
    "bad/truncated.png": "truncated or corrupt image",
    "bad/truncated_end.png": "truncated or corrupt image",  # pixel data complete, IEND cut: Pillow alone accepts it
    "bad/corrupt_bytes.png": "truncated or corrupt image",  # a flipped byte inside IDAT
    "bad/garbage.png": "not an image",  # PNG signature, then random bytes
    "bad/random.jpg": "not an image",
    "bad/zero.jpg": "empty file (0 bytes)",
    "bad/text.jpg": "not an image",
    "bad/bomb.png": "image too large",
    "bad/missing.png": "missing file",
}


def make_corpus(root: Path) -> dict[str, str]:
    """Write the corpus under ``root/{good,bad}/``; returns {id: expected reason prefix} of the bad ones."""
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(_noise()).save(good / "plain.png")
    exif_jpeg(good / "exif_rotated.jpg", 6)
    Image.fromarray(_noise()).convert("P").save(good / "palette.png")
    transparent = Image.fromarray(_noise()).convert("P")
    transparent.info["transparency"] = 0
    transparent.save(good / "palette_transparent.png", transparency=0)
    Image.fromarray(np.dstack([_noise(), rng.integers(0, 256, (20, 24, 1), dtype=np.uint8)])).save(good / "rgba.png")
    Image.new("LA", (24, 20), (120, 60)).save(good / "la.png")
    Image.new("CMYK", (24, 20), (10, 200, 30, 40)).save(good / "cmyk.jpg")
    Image.new("CMYK", (24, 20), (10, 200, 30, 40)).save(good / "cmyk.tif")
    Image.fromarray(np.arange(480, dtype=np.uint16).reshape(20, 24) * 136).save(good / "gray16.tif")
    Image.fromarray(np.arange(480, dtype=np.uint16).reshape(20, 24) * 136).save(good / "gray16.png")
    Image.fromarray(np.linspace(0, 1, 480, dtype=np.float32).reshape(20, 24)).save(good / "float32.tif")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(good / "one_pixel.png")
    Image.fromarray(_noise((1, 20000), 3)).save(good / "strip_1x20000.png")
    Image.fromarray(_noise(seed=4)).save(good / UNICODE_NAME)
    Image.fromarray(_noise(seed=5)).save(good / SPACE_NAME)
    import tifffile  # optional for featcache users, a dev dependency: the TIFFs Pillow cannot read are tested

    tifffile.imwrite(good / "rgb16.tif", rng.integers(0, 65536, (20, 24, 3)).astype(np.uint16), photometric="rgb")
    tifffile.imwrite(good / "float_rgb.tif", rng.random((20, 24, 3)).astype(np.float32), photometric="rgb")
    tifffile.imwrite(good / "float64.tif", rng.random((20, 24)), photometric="minisblack")

    jpeg, png = _encoded("JPEG"), _encoded("PNG")
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "truncated_end.png").write_bytes(png[:-12])
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    (bad / "corrupt_bytes.png").write_bytes(bytes(flipped))
    (bad / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (bad / "random.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (bad / "bomb.png").write_bytes(png_header_only(10_000, 10_000))  # 1e8 px > the default 89,478,485
    Image.fromarray(_noise()).save(bad / "missing.png")  # deleted after the manifest is built
    return dict(BAD)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Manifest, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    bad = make_corpus(root)
    manifest = from_folder(root, ALL_TRAIN, seed=0)
    (root / "bad" / "missing.png").unlink()
    return manifest, bad


@pytest.fixture(scope="module")
def runner(random_backbone):
    loaded = random_backbone("resnet18")
    return TorchFeatureExtractor(loaded.model, loaded.spec, ["pool5"], pooling="avg")


def _extract(manifest, runner, out, **kwargs):
    num_workers = kwargs.pop("num_workers", 0)
    kwargs.setdefault("plan", plan_extraction(device="cpu", backend="torch", num_workers=num_workers))
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("block_rows", 4)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("config", CONFIG)
    kwargs.setdefault("attrs", ATTRS)
    return extract_to_store(manifest, runner, kwargs.pop("preprocess", PRE), out, **kwargs)


@pytest.fixture(scope="module")
def skipped_run(corpus, runner, tmp_path_factory):
    manifest, _ = corpus
    out = tmp_path_factory.mktemp("skip") / "store.h5"
    logger = logging.getLogger("featcache.extract.engine")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        report = _extract(manifest, runner, out)
    finally:
        logger.removeHandler(handler)
    return out, report, [r.getMessage() for r in records]


# ------------------------------------------------------------ on_error: skip
def test_every_bad_input_is_reported_by_id_and_reason(corpus, skipped_run):
    manifest, bad = corpus
    out, report, log = skipped_run
    reported = dict(report.errors)
    assert sorted(reported) == sorted(bad), "exactly the bad inputs are skipped, the unusual-but-valid decode"
    for id_, prefix in bad.items():
        assert reported[id_].startswith(prefix), (id_, reported[id_])
        assert str(manifest.root) not in reported[id_]  # no machine-specific path in the feature file
        assert any(id_ in line and reported[id_] in line for line in log), f"{id_} is not in the log"
    with FeatureStore(out) as store:
        assert dict(store.errors()) == reported
        assert sorted(store.ids()) == sorted(set(manifest.ids) - set(bad))


def test_written_plus_skipped_is_the_input(corpus, skipped_run):
    manifest, bad = corpus
    out, report, _ = skipped_run
    assert report.n_input == len(manifest)
    assert report.n_skipped == len(bad)
    assert report.n_written + report.n_skipped == report.n_input
    with h5py.File(out, "r") as f:
        assert f.attrs["n_input"] == len(manifest)
        assert f.attrs["n_rows"] == report.n_written == f["features/pool5"].shape[0]
        assert f.attrs["n_skipped"] == report.n_skipped == len(f["errors"])
        assert np.isfinite(f["features/pool5"][()]).all()


def test_unicode_and_space_names_round_trip(corpus, skipped_run):
    out, _, _ = skipped_run
    with FeatureStore(out) as store:
        ids = set(store.ids())
    assert f"good/{UNICODE_NAME}" in ids and f"good/{SPACE_NAME}" in ids


def test_decompression_bomb_message_names_pixels_limit_and_param(skipped_run):
    _, report, _ = skipped_run
    reason = dict(report.errors)["bad/bomb.png"]
    assert "10000x10000" in reason and "100,000,000" in reason
    assert f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in reason and "extract.max_image_pixels" in reason


# ------------------------------------------------------------ valid oddities
def test_exif_rotated_jpeg_is_decoded_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif_jpeg(path, 6)  # "rotate 90 degrees clockwise to display"
    image = load_rgb(path, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    with Image.open(path) as raw:
        expected = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert image.size == (20, 40)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[35, 10, 2] > 200  # red on top, blue below


def test_unusual_modes_decode_to_their_values(corpus):
    manifest, _ = corpus
    root = manifest.root / "good"
    grey16 = np.asarray(load_rgb(root / "gray16.tif", max_pixels=None))[..., 0].astype(int)
    expected = np.round(np.arange(480).reshape(20, 24) * 136 / 65535 * 255).astype(int)
    assert np.abs(grey16 - expected).max() <= 1
    assert np.array_equal(np.asarray(load_rgb(root / "gray16.png", max_pixels=None)),
                          np.asarray(load_rgb(root / "gray16.tif", max_pixels=None)))
    ramp = np.asarray(load_rgb(root / "float32.tif", max_pixels=None))[..., 1].astype(int)
    assert ramp[0, 0] == 0 and ramp[-1, -1] == 255 and (np.diff(ramp.ravel()) >= 0).all()
    la = np.asarray(load_rgb(root / "la.png", max_pixels=None)).astype(int)  # grey 120 at alpha 60 on white
    assert np.abs(la - round(120 * 60 / 255 + 255 * (1 - 60 / 255))).max() <= 1
    cmyk = np.asarray(load_rgb(root / "cmyk.tif", max_pixels=None))
    assert cmyk.shape == (20, 24, 3) and cmyk.dtype == np.uint8
    assert load_rgb(root / "one_pixel.png", max_pixels=None).size == (1, 1)


def test_tiffs_pillow_cannot_read_are_decoded_with_tifffile(corpus):
    import tifffile
    root = corpus[0].root / "good"
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(root / "float_rgb.tif")
    raw = tifffile.imread(root / "float_rgb.tif")
    rgb = np.asarray(load_rgb(root / "float_rgb.tif", max_pixels=None)).astype(int)
    assert np.abs(rgb - np.round(raw * 255)).max() <= 1
    raw16 = tifffile.imread(root / "rgb16.tif")
    rgb16 = np.asarray(load_rgb(root / "rgb16.tif", max_pixels=None)).astype(int)
    assert np.abs(rgb16 - raw16.astype(float) / 65535 * 255).max() <= 1.01
    assert np.asarray(load_rgb(root / "float64.tif", max_pixels=None)).shape == (20, 24, 3)


def test_extreme_aspect_ratio_is_cropped_without_a_huge_intermediate(monkeypatch):
    """A 1 x 20000 strip would be upsized to 32 x 640000 before the crop; only the crop window is resampled."""
    strip = Image.fromarray(_noise((1, 20000), 3))
    out = PRE(strip)
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    # The crop-window path gives the pixels of the full resize-then-crop (up to float rounding: <= 2 grey levels).
    unit = Preprocessor(32, 36, "bilinear", (0.0,) * 3, (1.0,) * 3)
    for size in [(3, 200), (200, 3), (5, 97), (300, 40), (17, 1000), (4000, 90)]:
        image = Image.fromarray(_noise(size, 7))
        for interpolation in ("bilinear", "bicubic"):
            pre = Preprocessor(32, 36, interpolation, (0.0,) * 3, (1.0,) * 3)
            monkeypatch.setattr(preprocess_module, "_MAX_INTERMEDIATE_FACTOR", 10**9)
            full = pre(image)
            monkeypatch.setattr(preprocess_module, "_MAX_INTERMEDIATE_FACTOR", 0)
            window = pre(image)
            assert float((full - window).abs().max()) * 255 <= 2.01, (size, interpolation)
        assert unit(image).shape == (3, 32, 32)


# -------------------------------------------------------- max_image_pixels
def test_max_image_pixels_applies_in_loader_workers(tmp_path):
    Image.fromarray(_noise((50, 40))).save(tmp_path / "big.png")  # 2,000 px
    Image.fromarray(_noise((20, 20))).save(tmp_path / "small.png")  # 400 px
    paths = [tmp_path / "big.png", tmp_path / "small.png"]
    limited = Preprocessor(32, 36, "bilinear", IMAGENET_MEAN, IMAGENET_STD, max_image_pixels=1000)
    for workers in (0, 1):
        loader = make_loader(ImageDataset(paths, limited), [0, 1], batch_size=2, num_workers=workers)
        [(_, _, reasons)] = list(loader)
        assert reasons[1] == ""
        assert reasons[0].startswith("image too large") and "2,000 pixels" in reasons[0]
        assert "1,000 pixels" in reasons[0] and "extract.max_image_pixels" in reasons[0]
    unlimited = Preprocessor(32, 36, "bilinear", IMAGENET_MEAN, IMAGENET_STD, max_image_pixels=None)
    assert ImageDataset(paths, unlimited)[0][2] == ""


def test_max_image_pixels_none_disables_the_guard(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header_only(10_000, 10_000))
    with pytest.raises(ImageTooLargeError):
        load_rgb(tmp_path / "bomb.png", max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    Image.fromarray(_noise((50, 40))).save(tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow's global would refuse it
    assert load_rgb(tmp_path / "ok.png", max_pixels=None).size == (50, 40)
    assert load_rgb(tmp_path / "ok.png", max_pixels=5000).size == (50, 40)
    assert Image.MAX_IMAGE_PIXELS == 10  # restored after decoding


def test_max_image_pixels_param(tmp_path):
    from featcache.pipeline.config import parse_params
    from featcache.pipeline.params.base import ConfigError
    from featcache.pipeline.params.extract import extraction_config

    default = parse_params({})
    assert default.extract.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    # Not in the stored config at its default: feature files extracted before the param existed stay valid.
    assert "max_image_pixels" not in extraction_config(default, "efficientnet_lite0")["extract"]
    raised = parse_params({"extract": {"max_image_pixels": 200_000_000}})
    assert extraction_config(raised, "efficientnet_lite0")["extract"]["max_image_pixels"] == 200_000_000
    assert parse_params({"extract": {"max_image_pixels": None}}).extract.max_image_pixels is None
    with pytest.raises(ConfigError, match="max_image_pixels"):
        parse_params({"extract": {"max_image_pixels": 0}})
    from featcache.extract.zoo.registry import BACKBONES

    spec_pre = Preprocessor.from_spec(BACKBONES["resnet18"], max_image_pixels=1234)
    assert spec_pre.max_image_pixels == 1234 and "max_image_pixels" not in spec_pre.config()


# ------------------------------------------------------------ on_error: fail
def _good_folder(root: Path, n: int = 6) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(_noise(seed=10 * (name == "b") + i)).save(root / name / f"{i:03d}.png")
    return root


def test_fail_names_the_first_bad_input_keeps_committed_blocks_and_resumes(runner, tmp_path):
    images = _good_folder(tmp_path / "images")
    # 12 good rows (blocks 0-2 of 4 rows), then two bad ones in block 3.
    (images / "b" / "zz1_truncated.jpg").write_bytes(_encoded("JPEG")[:200])
    (images / "b" / "zz2_empty.jpg").write_bytes(b"")
    manifest = from_folder(images, ALL_TRAIN, seed=0)
    out = tmp_path / "fail" / "store.h5"
    with pytest.raises(ExtractionError) as info:
        _extract(manifest, runner, out, on_error="fail")
    message = str(info.value)
    assert "b/zz1_truncated.jpg" in message and "truncated" in message
    assert "zz2_empty" not in message  # the first bad input only
    assert "on_error" in message
    assert not out.exists() and not out.with_name("store.h5.partial").exists()
    committed = sorted(p.name for p in out.with_name("store.h5.parts").rglob("block-*.h5"))
    assert committed == ["block-000000.h5", "block-000001.h5", "block-000002.h5"]

    # Fix the files in place: the rerun resumes from the committed blocks, and the bytes equal a clean run.
    Image.fromarray(_noise(seed=98)).save(images / "b" / "zz1_truncated.jpg", "JPEG")
    Image.fromarray(_noise(seed=99)).save(images / "b" / "zz2_empty.jpg", "JPEG")
    report = _extract(manifest, runner, out, on_error="fail")
    assert report.n_resumed_blocks == 3 and report.n_skipped == 0 and report.n_written == len(manifest)
    clean = _extract(manifest, runner, tmp_path / "clean" / "store.h5", on_error="fail")
    assert md5(out) == md5(clean.path)
    assert sorted(p.name for p in out.parent.iterdir()) == ["store.h5"]


def test_missing_file_is_reported_as_missing(runner, tmp_path, caplog):
    images = _good_folder(tmp_path / "images", n=2)
    manifest = from_folder(images, ALL_TRAIN, seed=0)
    (images / "a" / "001.png").unlink()
    with caplog.at_level(logging.WARNING, logger="featcache.extract.engine"):
        report = _extract(manifest, runner, tmp_path / "m.h5")
    assert report.errors == [("a/001.png", "missing file")]
    assert (report.n_written, report.n_skipped) == (3, 1)
    # the warning names the file where the user can find it, from any working directory
    assert f"Bad image a/001.png ({images / 'a' / '001.png'}): missing file" in caplog.text


# --------------------------------------------------------------- manifests
def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_unicode_and_space_paths_in_a_csv(runner, tmp_path):
    Image.fromarray(_noise(seed=1)).save(tmp_path / UNICODE_NAME)
    Image.fromarray(_noise(seed=2)).save(tmp_path / SPACE_NAME)
    csv_path = _write_csv(tmp_path / "m.csv", "path,label", [f'"{UNICODE_NAME}",x', f'"{SPACE_NAME}",y'])
    manifest = from_csv(csv_path, ALL_TRAIN, seed=0)
    again = Manifest.read(manifest.write(tmp_path / "prepared" / "manifest.csv"))
    assert again.ids == manifest.ids == sorted([UNICODE_NAME, SPACE_NAME])
    report = _extract(again, runner, tmp_path / "u.h5")
    assert report.n_skipped == 0 and report.n_written == 2


def test_duplicated_paths_in_a_csv_are_named_with_their_rows(tmp_path):
    rows = ["img/a.png,first,x", "img/b.png,second,x", "./img//a.png,third,y"]
    with pytest.raises(ManifestError) as info:
        from_csv(_write_csv(tmp_path / "m.csv", "path,id,label", rows), ALL_TRAIN, 0)
    message = str(info.value)
    assert "Duplicate paths" in message and "'img/a.png'" in message and "rows 2 and 4" in message
    absolute = [f"{tmp_path / 'img' / 'a.png'},x", "img/a.png,y"]
    with pytest.raises(ManifestError, match=r"Duplicate (ids|paths).*rows 2 and 3"):
        from_csv(_write_csv(tmp_path / "abs.csv", "path,label", absolute), ALL_TRAIN, 0)


def test_labels_outside_data_classes_are_named_with_the_list(tmp_path):
    rows = ["a.png,cat", "b.png,dog", "c.png,emu", "d.png,cat"]
    path = _write_csv(tmp_path / "m.csv", "path,label", rows)
    with pytest.raises(ManifestError) as info:
        from_csv(path, ALL_TRAIN, 0, classes=["cat", "dog"])
    assert "['emu']" in str(info.value) and "['cat', 'dog']" in str(info.value) and "row 4" in str(info.value)
    manifest = from_csv(path, ALL_TRAIN, 0, classes=["emu", "dog", "cat"])  # the list's order is the label order
    assert manifest.classes == ["emu", "dog", "cat"]
    assert manifest.labels.tolist() == [2, 1, 0, 2]
    written = manifest.write(tmp_path / "out" / "manifest.csv")
    again = Manifest.read(written)
    assert again.classes == ["emu", "dog", "cat"] and again.labels.tolist() == [2, 1, 0, 2]
    assert again.sha256() != from_csv(path, ALL_TRAIN, 0).sha256()  # the order is part of the content


def test_empty_classes(tmp_path, caplog):
    images = _good_folder(tmp_path / "images", n=3)
    (images / "empty").mkdir()
    (images / "empty" / "._resource_fork.png").write_bytes(b"\x00\x05\x16\x07")  # hidden: not an image
    (images / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07")
    with caplog.at_level(logging.WARNING, logger="featcache.extract.inputs.sources"):
        manifest = from_folder(images, ALL_TRAIN, 0)
    assert manifest.classes == ["a", "b"]
    assert not any("._" in i for i in manifest.ids)
    assert any("empty" in r.getMessage() and "'empty'" in r.getMessage() for r in caplog.records)
    with pytest.raises(ManifestError, match=r"\['empty'\].*no images"):
        from_folder(images, ALL_TRAIN, 0, classes=["b", "a", "empty"])
    with pytest.raises(ManifestError, match=r"\['ghost'\].*no images"):
        from_folder(images, ALL_TRAIN, 0, classes=["a", "b", "ghost"])
    with pytest.raises(ManifestError, match=r"labels\) \['b'\].*not in data.classes \['a'\]"):
        from_folder(images, ALL_TRAIN, 0, classes=["a"])
    ordered = from_folder(images, ALL_TRAIN, 0, classes=["b", "a"])
    assert ordered.classes == ["b", "a"] and ordered.labels[0] == 1  # a/000.png sorts first, label "a" = 1


# ------------------------------------------------- errors that would hide bugs
class _CountingRunner:
    """Delegates to a real runner and counts its calls."""

    def __init__(self, runner) -> None:
        self.runner, self.calls = runner, 0

    def __call__(self, batch):
        self.calls += 1
        return self.runner(batch)

    def layer_specs(self, input_size=None):
        return self.runner.layer_specs(input_size)


def test_a_preprocessing_bug_propagates_and_is_not_a_bad_image(runner, tmp_path, monkeypatch):
    manifest = from_folder(_good_folder(tmp_path / "images", n=2), ALL_TRAIN, seed=0)

    def broken(self, image):  # a bug in preprocessing, after a good decode
        raise ZeroDivisionError("bug in the resize rule")

    monkeypatch.setattr(Preprocessor, "pixels_array", broken)  # what both loaders' workers call
    with pytest.raises(ZeroDivisionError, match="resize rule"):
        ImageDataset(manifest, PRE)[0]
    out = tmp_path / "store.h5"
    with pytest.raises(ZeroDivisionError):
        _extract(manifest, runner, out)
    assert not out.exists()


@pytest.mark.parametrize("error", [MemoryError("out of memory"), KeyError("a bug in a decoder plugin")])
def test_memory_error_or_unexpected_error_in_decode_propagates(runner, tmp_path, monkeypatch, error):
    manifest = from_folder(_good_folder(tmp_path / "images", n=2), ALL_TRAIN, seed=0)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr("featcache.extract.decode.loaders.load_rgb", failing)
    with pytest.raises(type(error)):
        _extract(manifest, runner, tmp_path / "store.h5")
    assert not (tmp_path / "store.h5").exists()


def test_a_run_of_only_bad_images_fails_naming_the_first_reasons(runner, tmp_path):
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"{i}.jpg").write_text("not a jpeg")
    manifest = from_folder(root.parent, ALL_TRAIN, seed=0)
    out = tmp_path / "store.h5"
    with pytest.raises(ExtractionError, match=r"6 of 6 images .*every row.*a/0\.jpg: not an image") as info:
        _extract(manifest, runner, out, max_bad_fraction=1.0)  # all bad fails even at 1.0
    assert "max_bad_fraction" in str(info.value)
    assert not out.exists()


def test_more_bad_than_max_bad_fraction_fails_then_a_higher_limit_finalizes_without_extracting(
        runner, corpus, tmp_path):
    manifest, bad = corpus
    out = tmp_path / "store.h5"
    fraction = len(bad) / len(manifest)
    with pytest.raises(ExtractionError, match=rf"{len(bad)} of {len(manifest)} images.*max_bad_fraction=0\.2"):
        _extract(manifest, runner, out, max_bad_fraction=0.2)
    assert 0.2 < fraction < 0.5 and not out.exists()
    counting = _CountingRunner(runner)
    report = _extract(manifest, counting, out, max_bad_fraction=0.5)
    assert counting.calls == 0 and report.n_skipped == len(bad)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        _extract(manifest, runner, tmp_path / "x.h5", max_bad_fraction=1.5)


@pytest.mark.parametrize(("n_bad", "n_input", "limit", "refused"), [
    (2, 4, 0.5, False), (3, 4, 0.5, True),  # the limit itself is allowed, one more is not
    (29, 100, 0.29, False), (57, 100, 0.57, False), (30, 100, 0.29, True),  # 0.29 * 100 is 28.999999999999996
    (0, 4, 0.0, False), (1, 4, 0.0, True), (4, 4, 1.0, True), (3, 4, 1.0, False),  # all rows bad fails even at 1
])
def test_max_bad_fraction_boundary(n_bad, n_input, limit, refused, tmp_path):
    from featcache.extract.engine import check_bad_rows

    errors = [(f"img{i}.jpg", "not an image") for i in range(n_bad)]
    if refused:
        with pytest.raises(ExtractionError, match=rf"{n_bad} of {n_input} images"):
            check_bad_rows(errors, n_input, limit, tmp_path / "store.h5")
    else:
        check_bad_rows(errors, n_input, limit, tmp_path / "store.h5")


def test_max_bad_fraction_param_is_not_in_the_config_hash():
    from featcache.pipeline.config import parse_params
    from featcache.pipeline.params.base import ConfigError
    from featcache.pipeline.params.extract import extraction_config

    assert parse_params({}).extract.max_bad_fraction == 0.5
    raised = parse_params({"extract": {"max_bad_fraction": 0.9}})
    assert "max_bad_fraction" not in extraction_config(raised, "efficientnet_lite0")["extract"]
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        parse_params({"extract": {"max_bad_fraction": 2}})
