"""Model-specific preprocessing: decode any image to RGB, resize, crop, normalise.

The backbone registry decides the numbers (input size, resize, interpolation,
mean/std); this module applies them, like Chainer's ``prepare``. The torch and
ONNX backends share it: both consume the normalised tensor it produces.

Decoding is defensive: a decompression-bomb limit is checked from the header
before any pixel is decoded (:class:`ImageTooLargeError`), PNG checksums and
ends are verified (Pillow alone accepts a PNG cut after its pixel data), a
broken EXIF block does not reject good pixels, TIFFs Pillow cannot read (float
RGB, float64) go through ``tifffile`` when it is installed, and extreme aspect
ratios are cropped without building a huge upsized intermediate.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
from PIL import Image, ImageOps

from featcache.extract.zoo.registry import BackboneSpec
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS, RESIZE_MODES

if TYPE_CHECKING:  # torch is imported on first use (params checks and configs stay cheap); torchvision never
    import torch

__all__ = ["Preprocessor", "load_rgb", "to_rgb", "ImageTooLargeError", "DECODE_ERRORS", "MAX_PARAM",
           "MAX_INTERMEDIATE_FACTOR"]

logger = logging.getLogger(__name__)

#: The parameter that raises the limit (named in the error message).
MAX_PARAM = "extract.max_image_pixels"

#: What opening, reading or decoding a broken file raises (Pillow, tifffile, the OS), and the
#: decompression-bomb limit; only these become bad-image reasons. ``MemoryError`` is not one of them.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)

#: ``load_rgb(max_pixels=...)`` default: keep Pillow's global ``Image.MAX_IMAGE_PIXELS`` behaviour.
_PIL_GLOBAL = object()

# Image.MAX_IMAGE_PIXELS is a module global: changing it is serialised by this lock (decode threads).
_LIMIT_LOCK = threading.RLock()

#: Upsizing a tiny image of extreme aspect ratio (1 x 5000) to the input size would allocate a huge
#: intermediate (224 x 1,120,000 pixels, 750 MB); above this many intermediate pixels per pixel of the
#: crop (aspect ratios beyond about 50:1), only the crop window is resampled (``_resize_crop_window``).
_MAX_INTERMEDIATE_FACTOR = 64
MAX_INTERMEDIATE_FACTOR = _MAX_INTERMEDIATE_FACTOR  # public name (extract.image_probe routes these to the CPU path)

#: Registry interpolation name -> Pillow filter (torchvision's mapping of its InterpolationMode for PIL images).
_PIL_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Palette, grayscale, CMYK and YCbCr images are converted; images with
    alpha (RGBA, LA, PA, palette with transparency) are composited on
    ``background``; 16-bit and 32-bit integer images are scaled from their
    full range, float images from [0, 1] (or their own range if larger).

    Parameters
    ----------
    image : PIL.Image.Image
        Decoded image of any mode.
    background : tuple of int
        RGB colour behind transparent pixels.

    Returns
    -------
    PIL.Image.Image
        An image in mode ``RGB``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if mode == "F":
            finite = array[np.isfinite(array)]  # NaN and +-inf do not set the scale
            top = max(1.0, float(finite.max()) if finite.size else 1.0)
        elif mode.startswith("I;16"):
            top = 65535.0
        else:
            top = max(255.0, float(array.max()) if array.size else 255.0)
        array = np.clip(np.nan_to_num(array, nan=0.0, posinf=top, neginf=0.0) / top * 255.0 + 0.5, 0, 255)
        array = array.astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")


class ImageTooLargeError(Image.DecompressionBombError):
    """An image has more pixels than the configured decompression-bomb limit."""

    def __init__(self, size: tuple[int, int], limit: int) -> None:
        width, height = size
        self.size, self.pixels, self.limit = (width, height), width * height, limit
        super().__init__(
            f"image too large: {width}x{height} = {self.pixels:,} pixels exceeds the decompression-bomb limit "
            f"of {limit:,} pixels. Hint: if the image is genuine, raise {MAX_PARAM} above {self.pixels:,} "
            f"(or set it to null to disable the check)."
        )

    def __reduce__(self):  # picklable across DataLoader / dask workers
        return type(self), (self.size, self.limit)


@contextlib.contextmanager
def _pil_limit(limit: int | None) -> Iterator[None]:
    """Temporarily set Pillow's ``Image.MAX_IMAGE_PIXELS`` (serialised between threads)."""
    with _LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _exif_transpose(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - broken metadata must not reject good pixels
        logger.debug("ignoring unreadable EXIF orientation (%s: %s)", type(error).__name__, error)
        return image


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _open_source(path: str | Path | bytes) -> str | Path | io.BytesIO:
    """What Pillow and tifffile open: the path, or a fresh file object over an image's bytes."""
    return io.BytesIO(path) if isinstance(path, (bytes, bytearray, memoryview)) else path


def _is_tiff(path: str | Path | bytes) -> bool:
    if isinstance(path, (bytes, bytearray, memoryview)):
        return bytes(path[:4]) in _TIFF_MAGIC
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in _TIFF_MAGIC
    except OSError:
        return False


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[None]:
    """tifffile's parser on a malformed file raises what it meets (IndexError, KeyError, struct.error, ...):
    as a decode error (ValueError), like Pillow turns its parsers' errors into ``UnidentifiedImageError``.
    Only calls into tifffile run under this; featcache's own conversion code does not."""
    try:
        yield
    except (MemoryError, ImageTooLargeError):
        raise
    except Exception as error:  # noqa: BLE001 - a third-party decoder's error on a malformed file
        raise ValueError(f"tifffile: {type(error).__name__}: {error}") from error


def _tiff_to_rgb(path: str | Path | bytes, background: tuple[int, int, int], max_pixels: int | None) -> Image.Image:
    """Decode a TIFF that Pillow cannot (float RGB, float64/float16, ...) with ``tifffile``.

    Integers are scaled from their dtype's full range, floats from [0, 1] (or
    their own maximum if larger), like :func:`to_rgb`. Raises ImportError when
    ``tifffile`` is not installed (the caller then reports Pillow's error).
    """
    import tifffile

    source = _open_source(path)
    with _tifffile_errors():
        tif = tifffile.TiffFile(source if isinstance(source, io.BytesIO) else str(source))
    with tif:
        with _tifffile_errors():
            page = tif.pages[0]
            axes, shape = page.axes, page.shape
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"TIFF page without image axes ({axes!r})")
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError((width, height), max_pixels)
        with _tifffile_errors():
            array = np.asarray(page.asarray())
    if "S" in axes and axes.index("S") < axes.index("Y"):  # planar (samples first) -> samples last
        array = np.moveaxis(array, axes.index("S"), -1)
    array = array.reshape(height, width, -1)[..., :4]
    if array.dtype.kind == "f":
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        top = max(1.0, float(finite.max())) if finite.size else 1.0
        values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0) / top
    elif array.dtype.kind in "ui":
        values = array.astype(np.float64) / float(np.iinfo(array.dtype).max)
    elif array.dtype.kind == "b":
        values = array.astype(np.float64)
    else:
        raise ValueError(f"unsupported TIFF sample type {array.dtype}")
    pixels = np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # (H, W) -> L, (H, W, 2) -> LA, (H, W, 3) -> RGB, (H, W, 4) -> RGBA
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    return to_rgb(image, background)


def load_rgb(path: str | Path | bytes, background: tuple[int, int, int] = (255, 255, 255),
             max_pixels: int | None | object = _PIL_GLOBAL, draft_size: int | None = None) -> Image.Image:
    """Decode an image file, apply its EXIF orientation and convert it to RGB.

    Parameters
    ----------
    path : path or bytes
        The image file, or its bytes (a shard member, a downloaded object).
    background : tuple of int
        RGB colour behind transparent pixels.
    max_pixels : int or None, optional
        Decompression-bomb limit (width x height), checked from the header
        before any pixel is decoded; None disables it. Default: Pillow's
        global ``Image.MAX_IMAGE_PIXELS`` (a warning above it, Pillow's
        error above twice it, both raised).
    draft_size : int, optional
        Smallest side the caller needs. JPEGs at least twice that size are
        decoded at a reduced DCT scale (``Image.draft``), which keeps both
        sides >= ``draft_size`` and is several times faster for large photos.

    Raises
    ------
    OSError, ValueError, PIL.Image.DecompressionBombError
        For unreadable, truncated or oversized images (the caller reports them);
        :class:`ImageTooLargeError` when ``max_pixels`` is exceeded.
    """
    with warnings.catch_warnings():
        # A decompression-bomb *warning* becomes an error: an oversized image is reported, not decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if max_pixels is _PIL_GLOBAL:
            return _decode(path, background, Image.MAX_IMAGE_PIXELS, own_limit=False, draft_size=draft_size)
        limit = None if max_pixels is None else int(max_pixels)  # type: ignore[call-overload]
        with _pil_limit(None):  # the header is checked against `limit` here, with a clearer message
            return _decode(path, background, limit, own_limit=True, draft_size=draft_size)


def _decode(path: str | Path | bytes, background: tuple[int, int, int], limit: int | None, own_limit: bool,
            draft_size: int | None = None) -> Image.Image:
    try:
        image = Image.open(_open_source(path))
    except Image.UnidentifiedImageError:
        if _is_tiff(path):
            rgb = _try_tifffile(path, background, limit)
            if rgb is not None:
                return rgb
        raise
    with image:
        if draft_size is not None and image.format == "JPEG":
            image.draft(image.mode, (draft_size, draft_size))
        if own_limit:
            if limit is not None and image.size[0] * image.size[1] > limit:
                raise ImageTooLargeError(image.size, limit)
            with _pil_limit(limit):  # frame-level checks of some formats (GIF, ICO) use the same limit
                image.load()
        else:
            image.load()
        _verify_png(path, image)
        return to_rgb(_exif_transpose(image), background)


def _try_tifffile(path: str | Path | bytes, background: tuple[int, int, int],
                  limit: int | None) -> Image.Image | None:
    """A TIFF Pillow cannot identify, decoded by ``tifffile`` if installed; None if that fails too.

    Only a missing ``tifffile`` and decode errors (:data:`DECODE_ERRORS`, ``tifffile.TiffFileError`` among
    them) give None, and the caller reports Pillow's error; anything else is a bug and propagates.
    """
    try:
        return _tiff_to_rgb(path, background, limit)
    except ImageTooLargeError:
        raise
    except (ImportError, *DECODE_ERRORS) as error:
        logger.debug("tifffile could not read %s either (%s: %s)", path, type(error).__name__, error)
        return None


def _verify_png(path: str | Path | bytes, image: Image.Image) -> None:
    """Check a PNG's chunk CRCs and its end: Pillow decodes a PNG cut after its pixel data silently."""
    if image.format != "PNG":
        return
    with Image.open(_open_source(path)) as again:
        again.verify()  # SyntaxError on a bad checksum, OSError on a truncated file


@functools.lru_cache(maxsize=64)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...],
                       device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (C, 1, 1) float32 mean and std on ``device``, made once per device and kept.

    Built per batch, each would be a blocking host-to-device copy, which
    synchronises the forward's CUDA stream: the loop could not queue the next
    forward before the previous one ends. Nothing writes to them.
    """
    import torch

    def constant(values: tuple[float, ...]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)

    return constant(mean), constant(std)


@dataclass(frozen=True)
class Preprocessor:
    """Turn an RGB PIL image into the normalised tensor a backbone expects.

    Images whose shorter side is below the input size (8x8 digits, 28x28
    MNIST) are upsized so the shorter side equals the input size and then
    center-cropped, so no content of a tiny image is cropped away; larger
    images are resized to ``resize_size`` and center-cropped (``crop``), or
    squashed to the square input (``squash``).

    Attributes
    ----------
    input_size, resize_size : int
        Crop side and resize target of the shorter side.
    interpolation : str
        ``bilinear``, ``bicubic`` or ``nearest``.
    mean, std : tuple of float
        Per-channel normalisation.
    resize_mode : str
        One of :data:`RESIZE_MODES`.
    """

    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "crop"
    background: tuple[int, int, int] = (255, 255, 255)
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_spec(cls, spec: BackboneSpec, resize_mode: str = "crop", input_size: int | None = None,
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> "Preprocessor":
        """Build the preprocessor of a registry entry (optionally at another input size).

        ``max_image_pixels`` is the decompression-bomb limit that
        :class:`~featcache.extract.decode.loaders.ImageDataset` applies when decoding (None disables
        it); it does not change any pixel, so it is not part of :meth:`config`.
        """
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}.")
        _check_max_image_pixels(max_image_pixels)
        size = input_size or spec.input_size
        resize = round(spec.resize_size * size / spec.input_size)
        return cls(size, resize, spec.interpolation, tuple(spec.mean), tuple(spec.std), resize_mode,
                   max_image_pixels=max_image_pixels)

    def load(self, path: str | Path) -> Image.Image:
        """Decode ``path`` to RGB with this preprocessor's background and pixel limit."""
        return load_rgb(path, self.background, self.max_image_pixels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one RGB image: :meth:`pixels` then :meth:`normalize_batch`.

        Returns
        -------
        torch.Tensor
            float32 tensor of shape (3, input_size, input_size).
        """
        return self.normalize_batch(self.pixels(image))

    def normalize_batch(self, images: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """uint8 pixels -> the normalised float32 input, ``(x / 255 - mean) / std``, on their device.

        The loaders hand over uint8 crops (a quarter of float32's bytes); the
        engine normalises them where the model runs. The arithmetic is exactly
        torchvision's ``ToTensor`` + ``Normalize`` (bitwise equal on CPU), for
        torch tensors and, without importing torch, for numpy arrays.

        Parameters
        ----------
        images : torch.Tensor or numpy.ndarray
            uint8 (B, 3, S, S) or (3, S, S); a tensor on any device.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            float32, same shape, type and device.
        """
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TypeError(f"normalize_batch takes uint8 pixels (from Preprocessor.pixels or a loader), got "
                                f"{images.dtype}. Hint: a float array is probably normalised already.")
            # The same float32 operations in the same order as the torch branch: bitwise equal results.
            mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
            out = images.astype(np.float32)
            out /= np.float32(255.0)
            out -= mean
            out /= std
            return out
        import torch

        if images.dtype != torch.uint8:
            raise TypeError(f"normalize_batch takes uint8 pixels (from Preprocessor.pixels or a loader), got "
                            f"{images.dtype}. Hint: a float tensor is probably normalised already.")
        # torchvision's Normalize, op for op (sub_ then div_ by per-channel float32 tensors), without importing it
        mean, std = _channel_constants(tuple(self.mean), tuple(self.std), str(images.device))
        return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Resize and crop (or squash) one RGB image to the uint8 tensor a loader hands over.

        Returns
        -------
        torch.Tensor
            uint8 tensor of shape (3, input_size, input_size); :meth:`normalize_batch` makes it the input.
        """
        import torch

        return torch.from_numpy(self.pixels_array(image))

    def pixels_array(self, image: Image.Image) -> np.ndarray:
        """:meth:`pixels` as a numpy array, without importing torch.

        Returns
        -------
        numpy.ndarray
            uint8 array of shape (3, input_size, input_size), C-contiguous.
        """
        # torchvision's resize / center_crop / pil_to_tensor on PIL images, step for step (the same Pillow
        # calls, tested equal), without importing torchvision (seconds of start-up in every loader worker)
        size = self.input_size
        if self.resize_mode == "squash":
            image = image.resize((size, size), self._resample)
        else:
            target = size if min(image.size) < size else self.resize_size
            width, height = image.size
            short, long = min(width, height), max(width, height)
            new_long = int(target * long / short)  # torchvision's rule for the longer side
            if target * new_long > _MAX_INTERMEDIATE_FACTOR * size * size:
                image = self._resize_crop_window(image, target, new_long)
            else:
                new_w, new_h = (target, new_long) if width <= height else (new_long, target)
                image = image.resize((new_w, new_h), self._resample)
                top = int(round((new_h - size) / 2.0))  # torchvision's center_crop offsets
                left = int(round((new_w - size) / 2.0))
                image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image).reshape(image.size[1], image.size[0], len(image.getbands()))
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    @property
    def _resample(self) -> int:
        """Pillow's resampling filter of :attr:`interpolation`."""
        return _PIL_RESAMPLE[self.interpolation]

    def _resize_crop_window(self, image: Image.Image, target: int, new_long: int) -> Image.Image:
        """Resize the shorter side to ``target`` then center-crop, resampling only the crop window.

        For an extreme aspect ratio (a 1 x 5000 strip upsized to 224 would be
        224 x 1,120,000 pixels) the full intermediate is never built. The two
        separable passes run in Pillow's order (horizontal, then vertical),
        each restricted to the crop window with ``resize(box=...)``, which maps
        output pixels to the same source positions and filter supports as the
        full resize: the result equals resize-then-crop up to floating-point
        rounding of those positions (at most a grey level or two).
        """
        width, height = image.size
        new_w, new_h = (target, new_long) if width <= height else (new_long, target)
        size = self.input_size
        top = round((new_h - size) / 2.0)  # torchvision's center_crop offsets
        left = round((new_w - size) / 2.0)
        scale_x, scale_y = width / new_w, height / new_h
        resample = self._resample
        columns = image.resize((size, height), resample, box=(left * scale_x, 0, (left + size) * scale_x, height))
        return columns.resize((size, size), resample, box=(0, top * scale_y, size, (top + size) * scale_y))

    def config(self) -> dict[str, object]:
        """JSON-serialisable description, stored with the features."""
        return {
            "input_size": self.input_size, "resize_size": self.resize_size,
            "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
            "resize_mode": self.resize_mode, "background": list(self.background),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any],
                    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> "Preprocessor":
        """The inverse of :meth:`config`: the preprocessor a store's ``config["preprocess"]`` describes.

        Parameters
        ----------
        config : mapping
            What :meth:`config` returned (read back from JSON: lists for the tuples).
        max_image_pixels : int or None
            The decompression-bomb limit, which :meth:`config` leaves out: the store's
            ``config["extract"]["max_image_pixels"]`` when recorded (None disables it), else the default.
        """
        _check_max_image_pixels(max_image_pixels)
        return cls(int(config["input_size"]), int(config["resize_size"]), str(config["interpolation"]),
                   tuple(config["mean"]), tuple(config["std"]), str(config.get("resize_mode", "crop")),
                   tuple(config.get("background", (255, 255, 255))), max_image_pixels=max_image_pixels)


def _check_max_image_pixels(max_image_pixels: int | None) -> None:
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be >= 1 or None, got {max_image_pixels!r}.")
