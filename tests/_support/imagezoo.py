"""A zoo of small odd image files, written with Pillow alone (no featcache), and their reference pixels.

:func:`write_zoo` writes every file into a folder and returns :class:`ZooImage` entries: a valid file
carries the reference RGB pixels a user expects, computed independently of featcache (Pillow open, first
frame, ``ImageOps.exif_transpose``, then the documented conversion: alpha composited on white, 16-bit
grayscale scaled to 8 bits, everything else ``convert("RGB")``); an invalid file carries the start of its
bad-image reason.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

__all__ = ["WIDTH", "HEIGHT", "VALID_NAMES", "INVALID_NAMES", "ZooImage", "pattern", "reference_rgb", "write_zoo",
           "truncated_jpeg", "truncated_png", "corrupt_huffman_jpeg", "bomb_png", "encoded"]

#: Size of most zoo images (not square, so a wrong orientation changes the shape).
WIDTH, HEIGHT = 24, 20

#: What transparent pixels are composited on (featcache's documented background).
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ZooImage:
    """One file of the zoo.

    Attributes
    ----------
    name : str
        File name in the zoo folder (its extension may lie, on purpose).
    valid : bool
        Whether a user expects it to decode.
    expected : numpy.ndarray or None
        uint8 (H, W, 3) reference pixels of a valid file.
    reason : str
        Start of the bad-image reason of an invalid file.
    tolerance : int
        Largest allowed per-pixel difference from ``expected`` (rounding of alpha compositing).
    """

    name: str
    valid: bool
    expected: np.ndarray | None = None
    reason: str = ""
    tolerance: int = 0


def pattern(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """uint8 (H, W, 3) pixels with no symmetry: every flip or rotation changes them."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     (x * 7 + y * 13) % 256], axis=-1).astype(np.uint8)


def reference_rgb(data: bytes) -> np.ndarray:
    """What a user expects from an image file's bytes, decoded without featcache.

    First frame or page; EXIF orientation applied; RGBA, LA, PA and palette-with-transparency composited
    on white; 16-bit grayscale scaled from its full 0..65535 range (``convert("RGB")`` would clip it at
    255); every other mode ``convert("RGB")``.
    """
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64)
        gray = np.floor(values / 65535.0 * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        out = rgba[..., :3] * alpha + np.asarray(WHITE, dtype=np.float64) * (1.0 - alpha)
        return np.floor(out + 0.5).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    """``image`` saved in ``fmt`` (Pillow's ``save`` options), as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _jpeg(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return encoded(Image.fromarray(pattern()), "JPEG", quality=95, exif=exif)


def _alpha() -> np.ndarray:
    """An alpha channel from fully transparent to opaque, with partial values between."""
    return np.tile(np.linspace(0, 255, WIDTH).astype(np.uint8), (HEIGHT, 1))


def _rgba() -> Image.Image:
    return Image.fromarray(np.dstack([pattern(), _alpha()]), "RGBA")


def _gray16() -> bytes:
    values = (np.arange(WIDTH * HEIGHT).reshape(HEIGHT, WIDTH) * 131 % 65536).astype(np.uint16)
    return encoded(Image.fromarray(values), "PNG")


def _palette_transparency() -> bytes:
    image = Image.fromarray(pattern()).quantize(16)
    return encoded(image, "PNG", transparency=3)


def _animated_gif() -> bytes:
    first = Image.fromarray(pattern()).quantize(64)
    second = Image.fromarray(255 - pattern()).quantize(64)
    return encoded(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    first, second = Image.fromarray(pattern()), Image.fromarray(255 - pattern())
    return encoded(first, "TIFF", save_all=True, append_images=[second])


def truncated_jpeg() -> bytes:
    """A JPEG cut in the middle of its scan: no end-of-image marker."""
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    """A PNG cut in the middle of its pixel data."""
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "PNG")
    return data[: len(data) // 2]


def corrupt_huffman_jpeg() -> bytes:
    """A JPEG whose first Huffman table claims more codes than a table can hold (libjpeg: bad table)."""
    data = bytearray(_jpeg())
    at = data.index(b"\xff\xc4") + 5  # marker, length (2), table class/id: then the 16 code counts
    data[at:at + 16] = bytes([255] * 16)
    return bytes(data)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width x height`` black pixels (tiny on disk, huge decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + bytes((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


#: name -> writer of the valid files.
_VALID: dict[str, Callable[[], bytes]] = {
    "cmyk.jpg": lambda: encoded(Image.fromarray(pattern()).convert("CMYK"), "JPEG", quality=95),
    "gray.jpg": lambda: encoded(Image.fromarray(pattern()).convert("L"), "JPEG", quality=95),
    "gray16.png": _gray16,
    "palette_transparency.png": _palette_transparency,
    "rgba.png": lambda: encoded(_rgba(), "PNG"),
    "la.png": lambda: encoded(_rgba().convert("LA"), "PNG"),
    "bilevel.png": lambda: encoded(Image.fromarray(pattern()).convert("1"), "PNG"),
    "animated.gif": _animated_gif,
    "multipage.tif": _multipage_tiff,
    "lossy.webp": lambda: encoded(Image.fromarray(pattern()), "WEBP", quality=90),
    "lossless.webp": lambda: encoded(Image.fromarray(pattern()), "WEBP", lossless=True),
    "alpha.webp": lambda: encoded(_rgba(), "WEBP", lossless=True),
    "plain.bmp": lambda: encoded(Image.fromarray(pattern()), "BMP"),
    "plain.ppm": lambda: encoded(Image.fromarray(pattern()), "PPM"),
    **{f"orientation{value}.jpg": (lambda value=value: _jpeg(value)) for value in range(1, 9)},
    "one_pixel.png": lambda: encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "strip.png": lambda: encoded(Image.fromarray(pattern(20000, 10)), "PNG"),
    "png_named.jpg": lambda: encoded(Image.fromarray(pattern()), "PNG"),
    "UPPER.JPG": _jpeg,
    "UPPER.PNG": lambda: encoded(Image.fromarray(pattern()), "PNG"),
}

#: name -> (writer, start of the reason) of the invalid files.
_INVALID: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty.jpg": (lambda: b"", "empty file (0 bytes)"),
    "truncated.jpg": (truncated_jpeg, "truncated or corrupt image"),
    "truncated.png": (truncated_png, "truncated or corrupt image"),
    "text.jpg": (lambda: b"these are my holiday notes, not a photo\n" * 20, "not an image or unsupported format"),
    "bad_huffman.jpg": (corrupt_huffman_jpeg, "truncated or corrupt image"),
}


VALID_NAMES = tuple(_VALID)
INVALID_NAMES = tuple(_INVALID)


def write_zoo(folder: Path) -> list[ZooImage]:
    """Write every zoo file into ``folder``; the entries in a fixed order (valid first)."""
    folder.mkdir(parents=True, exist_ok=True)
    zoo = []
    for name, write in _VALID.items():
        data = write()
        (folder / name).write_bytes(data)
        alpha = name in ("rgba.png", "la.png", "palette_transparency.png", "alpha.webp")
        zoo.append(ZooImage(name, True, reference_rgb(data), tolerance=1 if alpha else 0))
    for name, (write, reason) in _INVALID.items():
        (folder / name).write_bytes(write())
        zoo.append(ZooImage(name, False, reason=reason))
    return zoo
