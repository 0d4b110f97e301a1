"""Cheap image-header probing: which files the device JPEG decoder may take.

The decode workers of the GPU path (:mod:`featcache.extract.decode.device`) only
read a file's bytes and its header; no pixel is decoded here. The header says
the format, size, mode, progressive flag and EXIF orientation, and
:func:`device_route` decides from it whether the file goes to the device
decoder or to the CPU path (PIL, :func:`featcache.extract.decode.images.load_rgb`),
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
from PIL.JpegImagePlugin import MARKER as _PIL_JPEG_MARKERS
from PIL.JpegImagePlugin import SOF as _PIL_SOF

from featcache.extract.decode.preprocess import MAX_INTERMEDIATE_FACTOR, Preprocessor

__all__ = ["ImageHeader", "probe_header", "probe_with_pillow", "scan_jpeg_header", "device_route", "resize_geometry",
           "draft_scale",
           "ORIENTATIONS"]

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

    A plain JPEG is read by :func:`scan_jpeg_header` (a few microseconds: it
    walks the marker segments to the first scan); anything it does not vouch
    for, and every other format, is opened by Pillow (lazily: the header only,
    tens of microseconds of Python). Both give the same :class:`ImageHeader`.

    Parameters
    ----------
    data : bytes
        The whole file.

    Returns
    -------
    ImageHeader or None
        None when Pillow cannot identify the data (the CPU path then reports why).
    """
    return scan_jpeg_header(data) or probe_with_pillow(data)


def probe_with_pillow(data: bytes) -> ImageHeader | None:
    """:func:`probe_header` by Pillow's lazy open (any format)."""
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


#: SOF markers whose frame is progressive (Pillow sets ``info["progressive"]`` for these).
_PROGRESSIVE_SOF = (0xC2, 0xC6, 0xCA, 0xCE)
#: Markers Pillow reads as a frame header (its SOF handler): C0-C3, C5-C7, C9-CB, CD-CF and DE (DHP).
_SOF = frozenset(code & 0xFF for code, (_, _, handler) in _PIL_JPEG_MARKERS.items() if handler is _PIL_SOF)
#: Markers Pillow knows that carry no length (SOI, EOI, RSTn, JPG, JPGn); any other unknown marker makes Pillow fail.
_STANDALONE = frozenset(code & 0xFF for code, (_, _, handler) in _PIL_JPEG_MARKERS.items() if handler is None)
_KNOWN = frozenset(code & 0xFF for code in _PIL_JPEG_MARKERS)
_EXIF_PREFIX = b"Exif\x00\x00"
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def scan_jpeg_header(data: bytes) -> ImageHeader | None:
    """The header of a plain JPEG from its marker segments, or None when Pillow should read it.

    Walks the segments from SOI to the first SOS, reading only the frame
    header (size, precision, components: Pillow's mode), the one EXIF APP1
    segment (IFD0's orientation) and whether XMP or an MPO index is there. It
    returns a header only where it gives exactly what Pillow gives
    (``tests/extract/decode/test_probe.py``, with damaged headers): it checks
    what Pillow's segment handlers check (the frame header's length and
    components, the quantisation tables, the JFIF and Adobe segments' length,
    the ICC segments the frame header reads), and anything unusual (junk or
    fill bytes between segments, a marker Pillow does not know, a segment
    length below 2, two frame headers, a precision other than 8 bits, more
    than one EXIF segment, an EXIF block it cannot read whole, an orientation
    that is not one SHORT, an orientation left to XMP, an MPO index, a size
    over twice Pillow's bomb limit) returns None, and :func:`probe_header`
    asks Pillow.

    Parameters
    ----------
    data : bytes
        The whole file.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    size = len(data)
    pos, frame, exif, xmp, short_icc = 2, None, None, False, False
    while True:
        if pos + 4 > size or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker not in _KNOWN or marker in (0xD8, 0xD9):
            return None
        if marker in _STANDALONE:
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end < pos + 4 or end > size:
            return None
        if marker == 0xDA:  # start of scan: the header is complete
            break
        body = pos + 4  # the segment's payload: data[body:end]
        if marker in _SOF:
            if frame is not None or short_icc or end - body < 6 or (end - body - 6) % 3:
                return None
            frame = (marker, body)
        elif marker == 0xDB and not _quantisation_tables_fit(data, body, end):
            return None
        elif (marker == 0xE0 and data.startswith(b"JFIF", body) or marker == 0xEE and data.startswith(b"Adobe", body)
              ) and end - body < 7:
            return None
        elif marker == 0xE2 and data.startswith(b"ICC_PROFILE\x00", body):
            short_icc = short_icc or end - body < 14  # the frame header reads byte 13 of each
        elif marker == 0xE1 and data.startswith(_EXIF_PREFIX, pos + 4):
            if exif is not None:
                return None
            exif = (pos + 4 + len(_EXIF_PREFIX), end)
        elif marker == 0xE1 and data.startswith(_XMP_PREFIX, pos + 4):
            xmp = True
        elif marker == 0xE2 and data.startswith(b"MPF\x00", pos + 4):
            return None
        pos = end
    if frame is None or frame[1] + 6 > size:
        return None
    marker, at = frame
    height, width = int.from_bytes(data[at + 1:at + 3], "big"), int.from_bytes(data[at + 3:at + 5], "big")
    mode = _MODES.get(data[at + 5])
    if data[at] != 8 or mode is None or width * height > 2 * (Image.MAX_IMAGE_PIXELS or float("inf")):
        return None
    orientation = _tiff_orientation(data, *exif) if exif is not None else 0
    if orientation is None or (orientation == 0 and xmp):
        return None
    return ImageHeader(format="JPEG", width=width, height=height, mode=mode, progressive=marker in _PROGRESSIVE_SOF,
                       orientation=orientation if orientation in ORIENTATIONS else 1,
                       complete=data.rstrip(b"\x00").endswith(_JPEG_EOI))


def _quantisation_tables_fit(data: bytes, start: int, end: int) -> bool:
    """Whether a DQT payload holds whole tables (64 bytes each, or 128 at 16-bit precision), as Pillow checks."""
    while start < end:
        start += 1 + (64 if data[start] < 16 else 128)
        if start > end:
            return False
    return True


def _tiff_orientation(data: bytes, start: int, end: int) -> int | None:
    """IFD0's orientation in the TIFF block ``data[start:end]``: its value, 0 when absent, None when unsure."""
    if end - start < 8:
        return None
    order = {b"II*\x00": "little", b"MM\x00*": "big"}.get(data[start:start + 4])
    if order is None:
        return None

    def number(at: int, width: int) -> int:
        return int.from_bytes(data[at:at + width], order)  # type: ignore[arg-type]

    ifd = start + number(start + 4, 4)
    if ifd + 2 > end:
        return None
    count = number(ifd, 2)
    if ifd + 2 + 12 * count > end:
        return None
    found = [at for at in range(ifd + 2, ifd + 2 + 12 * count, 12) if number(at, 2) == _EXIF_ORIENTATION_TAG]
    if not found:
        return 0
    at = found[0]
    if len(found) > 1 or number(at + 2, 2) != 3 or number(at + 4, 4) != 1:
        return None
    return number(at + 8, 2)


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
