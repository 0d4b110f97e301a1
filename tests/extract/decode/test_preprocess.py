"""Preprocessing: any PIL mode to RGB, EXIF orientation, resize/crop/squash, normalisation, bad files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.extract.decode.images import load_rgb, to_rgb
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.zoo.registry import BACKBONES
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS, RESIZE_MODES

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _pre(size: int = 64, resize: int = 73, mode: str = "crop", interpolation: str = "bilinear") -> Preprocessor:
    return Preprocessor(input_size=size, resize_size=resize, interpolation=interpolation, mean=MEAN, std=STD,
                        resize_mode=mode)


def _image(array, mode: str) -> Image.Image:
    """A PIL image of ``mode`` from an (H, W) or (H, W, C) array (raw bytes, any Pillow version)."""
    dtype = {"I;16": "<u2", "I": "=i4", "F": "=f4"}.get(mode, "u1")
    array = np.ascontiguousarray(np.asarray(array, dtype=dtype))
    image = Image.frombytes(mode, (array.shape[1], array.shape[0]), array.tobytes())
    assert image.mode == mode
    return image


def _rgb(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    array = np.asarray(out)
    assert array.dtype == np.uint8 and array.shape == (image.size[1], image.size[0], 3)
    return array


def _unnormalise(tensor: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) values in 0..255."""
    value = tensor * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (value * 255).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------- to_rgb
def test_rgb_is_returned_unchanged():
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    assert to_rgb(image) is image


def test_grayscale_and_bilevel():
    gray = _image(np.array([[0, 128], [200, 255]], dtype=np.uint8), "L")
    np.testing.assert_array_equal(_rgb(gray), np.repeat(np.asarray(gray)[..., None], 3, axis=2))
    bilevel = gray.convert("1")
    assert set(np.unique(_rgb(bilevel))) <= {0, 255}


def test_palette_without_and_with_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    np.testing.assert_array_equal(_rgb(palette), [[[255, 0, 0], [0, 0, 255]]])
    palette.info["transparency"] = 1  # index 1 is transparent -> background
    np.testing.assert_array_equal(_rgb(palette), [[[255, 0, 0], [255, 255, 255]]])
    np.testing.assert_array_equal(np.asarray(to_rgb(palette, background=(0, 10, 20))), [[[255, 0, 0], [0, 10, 20]]])


def test_palette_transparency_survives_png_round_trip(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0, 9, 9, 9] + [0] * 762)
    palette.putdata([0, 1])
    path = tmp_path / "p.png"
    palette.save(path, transparency=1)
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), [[[0, 255, 0], [255, 255, 255]]])


def test_rgba_is_composited_on_white():
    rgba = _image(np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8), "RGBA")
    out = _rgb(rgba).astype(int)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])  # opaque
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])  # transparent -> white, not red or black
    assert np.all(np.abs(out[0, 2] - 127) <= 1)  # half-transparent black on white -> mid grey
    black = np.asarray(to_rgb(rgba, background=(0, 0, 0)))
    np.testing.assert_array_equal(black[0, 1], [0, 0, 0])


def test_la_is_composited():
    la = _image(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(_rgb(la), [[[50, 50, 50], [255, 255, 255]]])


def test_cmyk():
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    np.testing.assert_array_equal(_rgb(cmyk), [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]])


def test_16_bit_uses_the_full_range():
    array = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    image = _image(array, "I;16")
    assert image.mode == "I;16"
    out = _rgb(image)[0, :, 0].astype(int)
    np.testing.assert_array_equal(out, [0, 1, 128, 255])
    assert (_rgb(image) == _rgb(image)[..., :1]).all()  # grey


def test_16_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    _image(np.array([[0, 65535], [1000, 40000]], dtype=np.uint16), "I;16").save(path)
    out = np.asarray(load_rgb(path))[..., 0].astype(int)
    np.testing.assert_array_equal(out, [[0, 255], [4, 156]])


def test_32_bit_integer():
    small = _image(np.array([[0, 100, 255]], dtype=np.int32), "I")
    np.testing.assert_array_equal(_rgb(small)[0, :, 0], [0, 100, 255])  # 8-bit range kept
    wide = _image(np.array([[-5, 0, 1000, 4000]], dtype=np.int32), "I")
    np.testing.assert_array_equal(_rgb(wide)[0, :, 0], [0, 0, 64, 255])  # scaled by its maximum, negatives clipped


def test_float():
    unit = _image(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32), "F")
    np.testing.assert_array_equal(_rgb(unit)[0, :, 0], [0, 128, 255, 0])
    large = _image(np.array([[0.0, 10.0, 20.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(_rgb(large)[0, :, 0], [0, 128, 255])


# ------------------------------------------------------------------ load_rgb
def _jpeg_with_orientation(path: Path, orientation: int) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(path, 6)  # "rotate 90 CW to display"
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (20, 40)  # transposed
    array = np.asarray(image).astype(int)
    assert array[5, 10, 0] > 200 and array[5, 10, 2] < 50  # the red left half is now on top
    assert array[35, 10, 2] > 200 and array[35, 10, 0] < 50
    upright = tmp_path / "upright.jpg"
    _jpeg_with_orientation(upright, 1)
    assert load_rgb(upright).size == (40, 20)


def test_load_rgb_converts_modes(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert (np.asarray(image) == 255).all()
    path = tmp_path / "gray.png"
    Image.new("L", (4, 4), 77).save(path)
    assert (np.asarray(load_rgb(path)) == 77).all()


def test_truncated_jpeg_raises(tmp_path):
    path = tmp_path / "cut.jpg"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(OSError):
        load_rgb(path)


def test_zero_byte_and_non_image_files_raise(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    for path in (empty, text):
        with pytest.raises(OSError):
            load_rgb(path)
    with pytest.raises(OSError):
        load_rgb(tmp_path / "missing.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (12, 12)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 px: only a warning in PIL, an error here
    with pytest.raises(Image.DecompressionBombWarning):
        load_rgb(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # > 2x the limit: PIL's own error
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(path)


# --------------------------------------------------------------- Preprocessor
def test_normalisation_matches_manual_computation():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = _pre(64, 64)(Image.fromarray(array))  # already the input size: no resampling
    assert out.dtype == torch.float32 and out.shape == (3, 64, 64)
    expected = (array.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_tiny_image_is_upsized(mode):
    rng = np.random.default_rng(4)
    digit = _image(rng.integers(0, 256, (8, 8)), "L").convert("RGB")
    out = _pre(64, 73, mode)(digit)
    assert out.shape == (3, 64, 64)
    # The whole 8x8 image, resized straight to the input size (not to resize_size and then cropped).
    expected = np.asarray(digit.resize((64, 64), Image.BILINEAR)).astype(np.float64)
    np.testing.assert_allclose(_unnormalise(out), expected, atol=1e-3)


def test_small_non_square_image_fills_the_input():
    image = _image(np.random.default_rng(5).integers(0, 256, (28, 40)), "L").convert("RGB")
    out = _pre(64, 73)(image)  # shorter side 28 < 64: resized to 64 (91x64), centre-cropped to 64x64
    resized = np.asarray(image.resize((91, 64), Image.BILINEAR)).astype(np.float64)
    np.testing.assert_allclose(_unnormalise(out), resized[:, 14:78], atol=1e-3)


def test_crop_and_squash_differ_on_a_wide_image():
    wide = np.zeros((100, 300, 3), dtype=np.uint8)
    wide[:, :100] = (255, 0, 0)
    wide[:, 100:200] = (0, 255, 0)
    wide[:, 200:] = (0, 0, 255)
    crop = _unnormalise(_pre(64, 73, "crop")(Image.fromarray(wide)))
    squash = _unnormalise(_pre(64, 73, "squash")(Image.fromarray(wide)))
    assert crop.shape == squash.shape == (64, 64, 3)
    # crop: 300x100 -> 219x73 -> centre 64x64: only the green middle third.
    assert crop[..., 1].min() > 250 and crop[..., 0].max() < 5 and crop[..., 2].max() < 5
    # squash: the whole image, red on the left, blue on the right.
    assert squash[32, 2, 0] > 250 and squash[32, 32, 1] > 250 and squash[32, 61, 2] > 250


def test_large_image_is_resized_then_centre_cropped():
    # A 146x146 image (2x the resize size 73) with a 6 px red frame: resize to 73 then a centre crop
    # to 64 removes the frame; resizing straight to 64 would keep it.
    image = np.zeros((146, 146, 3), dtype=np.uint8)
    image[...] = (0, 255, 0)
    image[:6], image[-6:], image[:, :6], image[:, -6:] = ((255, 0, 0),) * 4
    out = _unnormalise(_pre(64, 73)(Image.fromarray(image)))
    assert out[..., 0].max() < 5
    squash = _unnormalise(_pre(64, 73, "squash")(Image.fromarray(image)))
    assert squash[0, 32, 0] > 200


def test_output_shape_for_odd_sizes():
    pre = _pre(64, 73)
    for size in [(1, 1), (8, 8), (63, 90), (64, 64), (65, 65), (500, 30), (300, 400)]:
        assert pre(Image.new("RGB", size, (1, 2, 3))).shape == (3, 64, 64), size


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_from_spec(name):
    spec = BACKBONES[name]
    pre = Preprocessor.from_spec(spec)
    assert (pre.input_size, pre.resize_size, pre.interpolation) == (spec.input_size, spec.resize_size,
                                                                     spec.interpolation)
    assert pre.mean == tuple(spec.mean) and pre.std == tuple(spec.std) and pre.resize_mode == "crop"
    assert pre(Image.new("RGB", (300, 200))).shape == (3, spec.input_size, spec.input_size)
    small = Preprocessor.from_spec(spec, resize_mode="squash", input_size=64)
    assert small.input_size == 64 and small.resize_mode == "squash"
    assert small.resize_size == round(spec.resize_size * 64 / spec.input_size)
    with pytest.raises(ValueError, match="resize_mode"):
        Preprocessor.from_spec(spec, resize_mode="stretch")


def test_lite_preprocessing_is_timm_config():
    pre = Preprocessor.from_spec(BACKBONES["efficientnet_lite0"])
    assert (pre.input_size, pre.resize_size, pre.interpolation) == (224, 256, "bicubic")
    assert pre.mean == pre.std == (0.5, 0.5, 0.5)
    grey = pre(Image.new("RGB", (300, 300), (255, 0, 128)))
    np.testing.assert_allclose(grey[:, 100, 100].numpy(), [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-5)


def test_resnet18_at_64_matches_the_engine_tests():
    assert Preprocessor.from_spec(BACKBONES["resnet18"], input_size=64).resize_size == 73


def test_config_is_json_and_complete():
    pre = _pre(64, 73, "squash", "bicubic")
    config = pre.config()
    assert json.loads(json.dumps(config)) == config
    assert config == {"input_size": 64, "resize_size": 73, "interpolation": "bicubic", "mean": list(MEAN),
                      "std": list(STD), "resize_mode": "squash", "background": [255, 255, 255]}


def test_preprocessing_is_deterministic(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    pre = _pre(64, 73)
    assert torch.equal(pre(load_rgb(path)), pre(load_rgb(path)))


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_needed_size(tmp_path):
    from PIL import Image as _Image

    path = tmp_path / "big.jpg"
    _Image.new("RGB", (2000, 1500), (120, 30, 200)).save(path, quality=90)
    full = load_rgb(path)
    drafted = load_rgb(path, draft_size=256)
    assert full.size == (2000, 1500)
    assert drafted.size == (500, 375) and min(drafted.size) >= 256
    small = tmp_path / "small.jpg"
    _Image.new("RGB", (500, 375), (10, 200, 30)).save(small)
    assert load_rgb(small, draft_size=256).size == (500, 375)  # 1/2 would go below 256: full decode


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_pixels_and_normalisation_equal_torchvision_transforms(interpolation, mode):
    """The Preprocessor does without torchvision (start-up time) but must stay bitwise equal to its transforms."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    pre = _pre(64, 73, mode, interpolation)
    rng = np.random.default_rng(9)
    for size in [(8, 8), (28, 40), (63, 90), (64, 64), (73, 73), (146, 146), (300, 100), (101, 333), (500, 499)]:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        method = InterpolationMode(interpolation)
        if mode == "squash":
            reference = TF.resize(image, [64, 64], interpolation=method)
        else:
            reference = TF.center_crop(TF.resize(image, 64 if min(size) < 64 else 73, interpolation=method), [64, 64])
        expected = TF.pil_to_tensor(reference)
        pixels = pre.pixels(image)
        assert torch.equal(pixels, expected), (size, mode, interpolation)
        normalised = TF.normalize(expected.to(torch.float32).div(255.0), MEAN, STD)
        assert torch.equal(pre.normalize_batch(pixels), normalised), size
        assert torch.equal(pre.normalize_batch(pixels[None].repeat(2, 1, 1, 1)), normalised.expand(2, -1, -1, -1))
        # The torch-free path of the array loader (CPU runners): the same bits.
        array = pre.pixels_array(image)
        assert isinstance(array, np.ndarray) and array.flags.c_contiguous and np.array_equal(array, expected.numpy())
        normalised_array = pre.normalize_batch(array[None])
        assert normalised_array.dtype == np.float32
        assert np.array_equal(normalised_array.view(np.uint32), normalised[None].numpy().view(np.uint32)), size


def _tiff_pillow_cannot_identify(tmp_path: Path) -> Path:
    path = tmp_path / "odd.tif"
    path.write_bytes(b"II*\x00" + b"\x00" * 60)  # TIFF magic, no readable directory: Pillow gives up
    return path


def test_a_tiff_neither_decoder_reads_reports_pillows_error(tmp_path):
    with pytest.raises(Image.UnidentifiedImageError):
        load_rgb(_tiff_pillow_cannot_identify(tmp_path))


def test_a_bug_in_the_tifffile_path_propagates_instead_of_passing_for_a_bad_image(tmp_path, monkeypatch):
    from featcache.extract.decode import images

    def broken(*args: object) -> None:
        raise TypeError("a bug in the conversion")

    monkeypatch.setattr(images, "_tiff_to_rgb", broken)
    with pytest.raises(TypeError, match="a bug in the conversion"):
        load_rgb(_tiff_pillow_cannot_identify(tmp_path))


@pytest.mark.parametrize("limit", [1000, None, DEFAULT_MAX_IMAGE_PIXELS, 200_000_000])
def test_from_config_inverts_config(limit):
    """A stored ``config["preprocess"]`` (read back from JSON) rebuilds the same preprocessor, with its pixel limit."""
    original = Preprocessor(48, 55, "bicubic", MEAN, STD, "squash", (0, 10, 20), max_image_pixels=limit)
    stored = json.loads(json.dumps(original.config()))
    assert "max_image_pixels" not in stored  # not a pixel-changing setting: the extract config records it
    rebuilt = Preprocessor.from_config(stored, max_image_pixels=limit)
    assert rebuilt == original and rebuilt.config() == stored
    assert Preprocessor.from_config(stored).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="max_image_pixels"):
        Preprocessor.from_config(stored, max_image_pixels=0)
