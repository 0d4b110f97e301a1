"""Decode any image file (or its bytes) to an upright 8-bit RGB PIL image, defensively.

A decompression-bomb limit is checked from the header before any pixel is
decoded (:class:`ImageTooLargeError`; on the size decoded, after a JPEG draft),
a truncated file is an error even where ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
set, PNG checksums and ends are verified
(Pillow alone accepts a PNG cut after its pixel data), a broken EXIF block does
not reject good pixels, and TIFFs Pillow cannot read (float RGB, float64) go
through ``tifffile`` when it is installed. What a broken file raises is
:data:`DECODE_ERRORS`; anything else is a bug (the loaders never report it as a
bad image). The model-specific resize, crop and normalisation are in
:mod:`featcache.extract.decode.preprocess`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = ["DECODE_ERRORS", "ImageTooLargeError", "MAX_PARAM", "load_rgb", "to_rgb"]

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
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")  # Pillow has no La -> RGBA
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

    def __reduce__(self) -> tuple[type[ImageTooLargeError], tuple[tuple[int, int], int]]:
        """Pickle as ``(size, limit)``, so the error crosses DataLoader and dask worker processes."""
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


@contextlib.contextmanager
def _strict_load(limit: int | None) -> Iterator[None]:
    """Pillow's pixel limit at ``limit`` and ``ImageFile.LOAD_TRUNCATED_IMAGES`` off while decoding.

    That flag is process-wide and often set by training scripts; left on, a
    truncated file decodes silently with its missing part grey. featcache
    reports a truncated file as a bad image whatever the flag says, so a
    store's rows never depend on what another import set.
    """
    with _pil_limit(limit):
        truncated = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated


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

    Returns
    -------
    PIL.Image.Image
        An RGB image, upright (EXIF orientation applied).

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
        # The limit is on the pixels decoded: a large JPEG that a draft decodes at a reduced DCT scale is no
        # decompression bomb (a 100-megapixel photo is decoded at 1/8 scale within the limit); without a draft
        # (load_rgb's callers that need full size) the stored size counts. The device route sends a file over the
        # limit here, to the same rule (probe.device_route).
        if own_limit and limit is not None and image.size[0] * image.size[1] > limit:
            raise ImageTooLargeError(image.size, limit)
        with _strict_load(limit if own_limit else Image.MAX_IMAGE_PIXELS):
            image.load()  # frame-level checks of some formats (GIF, ICO) use the same limit
            _verify_png(path, image)
        return _converted(_exif_transpose(image), background)  # inside: a broken EXIF gives `image` itself


def _converted(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """:func:`to_rgb` of a decoded image: whatever it raises is a bug (every mode Pillow opens converts),
    re-raised as a RuntimeError so that it can never pass for a bad image (a ValueError would)."""
    try:
        return to_rgb(image, background)
    except DECODE_ERRORS as error:
        raise RuntimeError(f"converting a decoded {image.mode} image of size {image.size} to RGB failed "
                           f"({type(error).__name__}: {error}); this is a bug in featcache, not a bad image"
                           ) from error


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
