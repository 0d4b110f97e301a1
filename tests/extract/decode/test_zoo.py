"""An image zoo through every CPU loader: odd but valid files decode to the reference pixels, broken ones
are bad images with a clear reason, and a bug in featcache is never reported as a bad image.

The zoo (``_support/imagezoo.py``) is generated with Pillow alone; its reference pixels are computed
without featcache (first frame, EXIF orientation, alpha on white, 16-bit grayscale scaled to 8 bits).
The loaders are the three CPU paths of extraction: ``pil`` (:func:`load_rgb` in this process, what the
ONNX export and finetune stages call), ``arrays`` (the process pool of CPU runners) and ``torch`` (torch's
``DataLoader``), each with a worker process where it has one. The device loader sends every file that is
not a plain JPEG to the ``arrays`` path (tests/extract/decode/test_device.py).
"""

from __future__ import annotations

import builtins
import errno
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from _support.imagezoo import (
    INVALID_NAMES,
    VALID_NAMES,
    bomb_png,
    encoded,
    pattern,
    truncated_jpeg,
    truncated_png,
    write_zoo,
)
from featcache.extract.decode import images as images_module
from featcache.extract.decode.images import DECODE_ERRORS, load_rgb
from featcache.extract.decode.loaders import ImageDataset, ImageReader, describe_error, iter_array_batches, make_loader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.sources import from_folder
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS

PRE = Preprocessor(input_size=32, resize_size=36, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
LOADERS = ("pil", "arrays", "torch")


def run_loader(loader: str, paths: list[Path], pre: Preprocessor = PRE) -> list[tuple[np.ndarray | None, str]]:
    """``(pixels, reason)`` per path through ``loader``: the (3, S, S) uint8 crop (``pil``: the full RGB
    image, (H, W, 3)), or None and the bad-image reason."""
    if loader == "pil":
        out: list[tuple[np.ndarray | None, str]] = []
        for path in paths:
            try:
                out.append((np.asarray(load_rgb(path, pre.background, pre.max_image_pixels)), ""))
            except DECODE_ERRORS as error:
                out.append((None, describe_error(str(path), error)))
        return out
    rows = list(range(len(paths)))
    if loader == "arrays":
        batches = list(iter_array_batches(ImageReader(paths, pre), rows, batch_size=4, num_workers=1))
    else:
        batches = [(r.numpy(), i.numpy(), e) for r, i, e in make_loader(ImageDataset(paths, pre), rows, 4, 1)]
    found = {int(row): (pixels, reason) for batch in batches for row, pixels, reason in zip(*batch)}
    assert sorted(found) == rows
    return [(None if found[row][1] else found[row][0], found[row][1]) for row in rows]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    return folder, {entry.name: entry for entry in write_zoo(folder)}


@pytest.fixture(scope="module")
def decoded(zoo):
    """Each loader's ``{name: (pixels, reason)}`` over the whole zoo (one run per loader)."""
    folder, entries = zoo
    names = list(entries)
    return {loader: dict(zip(names, run_loader(loader, [folder / name for name in names]))) for loader in LOADERS}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", VALID_NAMES)
def test_a_valid_odd_image_decodes_to_the_reference_pixels(zoo, decoded, loader, name):
    entry = zoo[1][name]
    pixels, reason = decoded[loader][name]
    assert reason == ""
    expected = entry.expected if loader == "pil" else PRE.pixels_array(Image.fromarray(entry.expected))
    assert pixels.shape == expected.shape
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= entry.tolerance


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", INVALID_NAMES)
def test_an_invalid_file_is_a_bad_image_with_its_reason(zoo, decoded, loader, name):
    pixels, reason = decoded[loader][name]
    assert pixels is None and reason.startswith(zoo[1][name].reason), reason
    assert str(zoo[0]) not in reason  # the machine's folder is never stored


def test_references_are_what_a_user_expects(zoo):
    """The documented handling, checked on the reference itself (not a copy of featcache's arithmetic)."""
    entries = zoo[1]
    gray16 = np.asarray(Image.open(zoo[0] / "gray16.png"))
    assert gray16.max() > 255 and entries["gray16.png"].expected[..., 0].max() == round(gray16.max() / 257)
    rgba = entries["rgba.png"].expected
    assert (rgba[:, 0] == 255).all() and np.array_equal(rgba[:, -1], pattern()[:, -1])  # alpha 0 -> white
    first_frame = entries["animated.gif"].expected.astype(int)  # the first frame, not the inverted second
    assert np.abs(first_frame - pattern()).mean() < np.abs(first_frame - (255 - pattern())).mean() / 4
    for name in ("multipage.tif", "plain.bmp", "lossless.webp", "png_named.jpg", "UPPER.PNG"):
        assert np.array_equal(entries[name].expected, pattern()), name
    upright = entries["orientation1.jpg"].expected
    assert np.array_equal(entries["orientation3.jpg"].expected, upright[::-1, ::-1])
    assert np.array_equal(entries["orientation6.jpg"].expected, np.rot90(upright, -1))
    assert entries["strip.png"].expected.shape == (10, 20000, 3)


def test_every_zoo_file_is_listed_by_a_folder_source(zoo, tmp_path):
    """Upper-case and odd extensions (.JPG, .webp, .ppm, .tif) are images to ``from_folder``."""
    (tmp_path / "zoo").symlink_to(zoo[0], target_is_directory=True)
    manifest = from_folder(tmp_path, {"train": 1.0}, seed=0)
    assert sorted(manifest.ids) == sorted(f"zoo/{name}" for name in zoo[1])


@pytest.mark.parametrize("loader", LOADERS)
def test_truncated_files_are_bad_images_even_with_pillows_load_truncated_images(tmp_path, monkeypatch, loader):
    """``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (set by many training scripts) would decode the missing
    part as grey: featcache reports the file whatever the flag says, and leaves the flag as it was.
    Fails on the old code: the JPEG decoded, grey below the cut, without a reason."""
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "cut.png").write_bytes(truncated_png())
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    results = run_loader(loader, [tmp_path / "cut.jpg", tmp_path / "cut.png"])
    assert [reason.split(" (")[0] for _, reason in results] == ["truncated or corrupt image"] * 2, results
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


@pytest.mark.parametrize("loader", LOADERS)
def test_the_pixel_limit_is_on_the_pixels_decoded(tmp_path, loader):
    """A JPEG over ``max_image_pixels`` that the extraction loaders decode at a reduced DCT scale (draft: 300 px
    -> 75 px for a 36 px resize) is decoded, as it is no decompression bomb (a 100-megapixel photo is decoded at
    1/8 scale); decoded at full size (``load_rgb`` without a draft), it is refused, naming the param."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)
    (tmp_path / "big.jpg").write_bytes(encoded(Image.fromarray(noise), "JPEG"))
    limited = Preprocessor(32, 36, "bilinear", (0.5,) * 3, (0.25,) * 3, max_image_pixels=50_000)
    [(pixels, reason)] = run_loader(loader, [tmp_path / "big.jpg"], limited)
    if loader == "pil":
        assert pixels is None and reason.startswith("image too large: 300x300 = 90,000 pixels exceeds"), reason
        assert "extract.max_image_pixels" in reason
    else:
        assert reason == "" and pixels.shape == (3, 32, 32)


@pytest.mark.parametrize("loader", LOADERS)
def test_an_image_over_the_default_limit_is_refused_before_decoding(tmp_path, loader):
    """Larger than Pillow's ``MAX_IMAGE_PIXELS`` (featcache's default limit is the same number): refused
    from the header with the parameter to raise, not decoded (a 12 KB file of 90 million pixels)."""
    assert DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    (tmp_path / "bomb.png").write_bytes(bomb_png(10_000, 9_000))
    [(pixels, reason)] = run_loader(loader, [tmp_path / "bomb.png"])
    assert pixels is None and reason.startswith("image too large: 10000x9000 = 90,000,000 pixels"), reason


def test_pillows_own_limit_is_reported_as_too_large(tmp_path):
    """``load_rgb`` without ``max_pixels`` (Pillow's global limit, whose warning is raised) gives the same
    category. Fails on the old code: ``cannot decode (DecompressionBombWarning: ...)``."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(10_000, 9_000))
    with pytest.raises(DECODE_ERRORS) as raised:
        load_rgb(path)
    assert describe_error(str(path), raised.value).startswith("image too large (DecompressionBombWarning: ")


@pytest.mark.parametrize("loader", LOADERS)
def test_a_file_the_os_cannot_read_is_an_unreadable_file(tmp_path, monkeypatch, loader):
    """Permission denied (faked: root ignores chmod) and an I/O error. Fails on the old code for the I/O
    error: ``cannot decode (OSError: [Errno 5] ...)``."""
    for name in ("locked.jpg", "failing.jpg"):
        (tmp_path / name).write_bytes(encoded(Image.fromarray(pattern()), "JPEG"))
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        name = Path(str(file)).name
        if name == "locked.jpg":
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        if name == "failing.jpg":
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)  # inherited by the forked workers
    results = run_loader(loader, [tmp_path / "locked.jpg", tmp_path / "failing.jpg"])
    assert [reason for _, reason in results] == [
        "unreadable file (PermissionError: [Errno 13] Permission denied: 'locked.jpg')",
        "unreadable file (OSError: [Errno 5] Input/output error: 'failing.jpg')"]


@pytest.mark.parametrize("loader", LOADERS)
def test_a_bug_in_featcache_is_raised_not_reported_as_a_bad_image(zoo, monkeypatch, loader):
    def broken(*args, **kwargs):
        raise TypeError("a bug in the conversion")

    monkeypatch.setattr(images_module, "to_rgb", broken)
    with pytest.raises(TypeError, match="a bug in the conversion"):
        run_loader(loader, [zoo[0] / "rgba.png"])


@pytest.mark.parametrize("loader", LOADERS)
def test_a_conversion_error_is_raised_as_a_bug_not_reported_as_cannot_decode(zoo, monkeypatch, loader):
    """A ValueError in converting a decoded image (every mode Pillow opens converts) is featcache's bug.
    Fails on the old code: the row came back as ``cannot decode (ValueError: ...)``."""
    def broken(*args, **kwargs):
        raise ValueError("a bug in the compositing")

    monkeypatch.setattr(Image, "alpha_composite", broken)
    with pytest.raises(RuntimeError, match="a bug in the compositing"):
        run_loader(loader, [zoo[0] / "rgba.png"])


def test_every_mode_pillow_has_converts_to_rgb():
    """Premultiplied ``La`` (Pillow has no La -> RGBA conversion) among them. Fails on the old to_rgb:
    ValueError for La, which the loaders would have reported as ``cannot decode``."""
    from featcache.extract.decode.images import to_rgb

    for mode in ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16",
                 "I;16B", "LA", "La", "PA"):
        image = Image.new("LA", (3, 2), (100, 255)).convert(mode) if mode in ("La", "PA") else Image.new(mode, (3, 2))
        assert to_rgb(image).mode == "RGB", mode
    assert to_rgb(Image.new("LA", (1, 1), (100, 255)).convert("La")).getpixel((0, 0)) == (100, 100, 100)
