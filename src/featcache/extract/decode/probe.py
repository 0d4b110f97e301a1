"""Cheap image-header probing: which files the device JPEG decoder may take.

The decode workers of the GPU path (:mod:`featcache.extract.decode.device`) only
read a file's bytes and its header; no pixel is decoded here. The header says
the format, size, mode, progressive flag and EXIF orientation, and
:func:`device_route` decides from it whether the file goes to the device
decoder or to the CPU path (PIL, :func:`featcache.extract.decode.preprocess.load_rgb`),
which also reports every bad file with its reason.

A file goes to the device only if it is an 8-bit baseline or progressive
JPEG in RGB (YCbCr) or grayscale, within the decompression-bomb limit
(``Preprocessor.max_image_pixels``, checked here from the header before any
decoding), ends with the JPEG end-of-image marker (a truncated file goes to
the CPU path, which reports it exactly as today), and needs no huge
intermediate to resize (the aspect-ratio guard of
:class:`~featcache.extract.decode.preprocess.Preprocessor`, which the CPU path
applies with its crop-window resampling).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

from PIL import Image

from featcache.extract.decode.preprocess import MAX_INTERMEDIATE_FACTOR, Preprocessor

__all__ = ["ImageHeader", "probe_header", "device_route", "resize_geometry", "draft_scale", "ORIENTATIONS"]

logger = logging.getLogger(__name__)

#: EXIF orientation values with a transform (1 = as stored; others are ignored, like Pillow does).
ORIENTATIONS = (1, 2, 3, 4, 5, 6, 7, 8)

_EXIF_ORIENTATION_TAG = 0x0112
_JPEG_EOI = b"\xff\xd9"
#: Colour modes (as Pillow names them from the header) that the device decoder turns into RGB like PIL does.
_DEVICE_MODES = ("RGB", "L")


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, without decoding pixels.

    Attributes
    ----------
    format : str
        Pillow's format name (``JPEG``, ``PNG``, ...).
    width, height : int
        Stored size (before the EXIF orientation is applied).
    mode : str
        Pillow's mode from the header (``RGB``, ``L``, ``CMYK`` for CMYK and YCCK JPEGs, ...).
    progressive : bool
        A progressive JPEG.
    orientation : int
        EXIF orientation 1-8 (1 when absent, unreadable or out of range).
    complete : bool
        For JPEGs: the data ends with the end-of-image marker (trailing zero padding allowed).
    """

    format: str
    width: int
    height: int
    mode: str
    progressive: bool = False
    orientation: int = 1
    complete: bool = True


def _orientation(image: Image.Image) -> int:
    """EXIF orientation as :func:`PIL.ImageOps.exif_transpose` reads it; 1 when it cannot be read."""
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception as error:  # noqa: BLE001 - broken metadata never rejects good pixels (as on the CPU path)
        logger.debug("ignoring unreadable EXIF orientation (%s: %s)", type(error).__name__, error)
        return 1
    return value if value in ORIENTATIONS else 1


def probe_header(data: bytes) -> ImageHeader | None:
    """Parse the header of an encoded image.

    Parameters
    ----------
    data : bytes
        The whole file.

    Returns
    -------
    ImageHeader or None
        None when Pillow cannot identify the data (the CPU path then reports why).
    """
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning is noise here: device_route applies the configured limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
                is_jpeg = image.format == "JPEG"
                return ImageHeader(
                    format=str(image.format), width=int(image.size[0]), height=int(image.size[1]), mode=image.mode,
                    progressive=bool(image.info.get("progressive", False)) if is_jpeg else False,
                    orientation=_orientation(image),
                    complete=data.rstrip(b"\x00").endswith(_JPEG_EOI) if is_jpeg else True,
                )
    except Exception as error:  # noqa: BLE001 - any header Pillow rejects goes to the CPU path, which reports it
        logger.debug("header not identified (%s: %s)", type(error).__name__, error)
        return None


def resize_geometry(width: int, height: int, preprocess: Preprocessor) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resized size and crop offset of an image, exactly as :class:`Preprocessor` computes them.

    ``crop``: the shorter side goes to ``resize_size`` (to ``input_size`` when
    the image is smaller than the input, so nothing of a tiny image is cropped
    away), the longer side to ``int(target * long / short)`` (torchvision's
    rule), then the center crop at torchvision's rounded offsets. ``squash``:
    straight to the square input.

    Parameters
    ----------
    width, height : int
        Size of the (oriented) image.
    preprocess : Preprocessor
        Input size, resize target and mode.

    Returns
    -------
    (new_height, new_width), (top, left)
        Size after resizing and the crop window's top-left corner.
    """
    size = preprocess.input_size
    if preprocess.resize_mode == "squash":
        return (size, size), (0, 0)
    target = size if min(width, height) < size else preprocess.resize_size
    short, long = min(width, height), max(width, height)
    new_long = int(target * long / short)
    new_w, new_h = (target, new_long) if width <= height else (new_long, target)
    return (new_h, new_w), (int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0)))


def draft_scale(width: int, height: int, preprocess: Preprocessor) -> int:
    """The DCT scale (1, 2, 4 or 8) at which the CPU path decodes a JPEG of this stored size.

    :class:`~featcache.extract.decode.loaders.ImageDataset` asks Pillow for a draft of at
    least ``resize_size`` on both sides (``Image.draft``), and Pillow picks the
    largest of 8, 4, 2, 1 that is at most ``min(width // r, height // r)``;
    the device path mimics it by averaging ``scale x scale`` blocks.
    """
    target = preprocess.resize_size
    fits = min(width // target, height // target)
    return next(scale for scale in (8, 4, 2, 1) if fits >= scale or scale == 1)


def device_route(header: ImageHeader | None, preprocess: Preprocessor) -> str:
    """Why a file goes to the CPU path, or ``""`` when the device decoder takes it.

    Parameters
    ----------
    header : ImageHeader or None
        :func:`probe_header` of the file (None: not identified).
    preprocess : Preprocessor
        Its pixel limit and geometry.

    Returns
    -------
    str
        Empty for the device; otherwise a short debug note (never stored: the
        CPU path decides whether the file is bad and why).
    """
    if header is None:
        return "header not identified"
    if header.format != "JPEG":
        return f"{header.format}, not a JPEG"
    if header.mode not in _DEVICE_MODES:
        return f"JPEG mode {header.mode}"
    if not header.complete:
        return "no JPEG end-of-image marker (truncated?)"
    limit = preprocess.max_image_pixels
    if limit is not None and header.width * header.height > limit:
        return "over the decompression-bomb limit"
    if min(header.width, header.height) < 1:
        return "empty image"
    (new_h, new_w), _ = resize_geometry(header.width, header.height, preprocess)
    size = preprocess.input_size
    if new_h < size or new_w < size:
        return "smaller than the crop after resizing"
    if preprocess.resize_mode == "crop" and new_h * new_w > MAX_INTERMEDIATE_FACTOR * size * size:
        return "extreme aspect ratio (crop-window resampling)"
    return ""
