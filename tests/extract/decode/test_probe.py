"""The JPEG header scanner gives exactly Pillow's header, or steps aside (None) and lets Pillow read it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.extract.decode.probe import probe_header, probe_with_pillow, scan_jpeg_header

PHOTOS = Path(__file__).resolve().parents[2] / "fixtures" / "photos"

#: Pillow warns about every damaged EXIF block and MPO index it meets; damaging them is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _jpeg(image: Image.Image | None = None, **save) -> bytes:
    image = image if image is not None else Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """``data`` with one more segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _tiff(order: str, entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A TIFF block: header and IFD0 with (tag, type, count, 4-byte value field) entries."""
    head = (b"II*\x00" if order == "little" else b"MM\x00*") + (8).to_bytes(4, order)
    body = len(entries).to_bytes(2, order)
    for tag, kind, count, value in entries:
        body += tag.to_bytes(2, order) + kind.to_bytes(2, order) + count.to_bytes(4, order) + value
    return head + body + (0).to_bytes(4, order)


def _short(value: int, order: str) -> bytes:
    return value.to_bytes(2, order) + b"\x00\x00"


def _corpus() -> dict[str, bytes]:
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    files = {path.name: path.read_bytes() for path in sorted(PHOTOS.glob("*.jpg"))}
    for orientation in range(0, 10):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"orientation{orientation}"] = _jpeg(rgb, exif=exif)
    plain = _jpeg(rgb)
    files.update({
        "plain": plain, "gray": _jpeg(rgb.convert("L")), "cmyk": _jpeg(rgb.convert("CMYK")),
        "progressive": _jpeg(rgb, progressive=True), "444": _jpeg(rgb, subsampling=0),
        "truncated scan": plain[:-200], "zero padded": plain + b"\x00" * 64,
        "cut in the header": plain[:100], "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "empty": b"",
        "garbage": b"\xff\xd8\xff" + bytes(range(256)),
        "fill bytes": plain[:2] + b"\xff\xff" + plain[2:],
        "junk between segments": plain[:20] + b"\x00\x00" + plain[20:],
        "big-endian orientation 6": _with_segment(plain, 0xE1, b"Exif\x00\x00" + _tiff("big", [(0x0112, 3, 1,
                                                                                                 _short(6, "big"))])),
        "orientation as LONG": _with_segment(plain, 0xE1, b"Exif\x00\x00" + _tiff("little", [
            (0x0112, 4, 1, (3).to_bytes(4, "little"))])),
        "two orientation entries": _with_segment(plain, 0xE1, b"Exif\x00\x00" + _tiff("little", [
            (0x0112, 3, 1, _short(3, "little")), (0x0112, 3, 1, _short(6, "little"))])),
        "IFD past the segment": _with_segment(plain, 0xE1, b"Exif\x00\x00II*\x00" + (4000).to_bytes(4, "little")),
        "BigTIFF EXIF": _with_segment(plain, 0xE1, b"Exif\x00\x00II+\x00" + bytes(12)),
        "XMP orientation": _with_segment(plain, 0xE1, b'http://ns.adobe.com/xap/1.0/\x00<x tiff:Orientation="6"/>'),
        "MPO index": _with_segment(plain, 0xE2, b"MPF\x00" + bytes(32)),
        "12-bit frame": plain,  # patched below
        "unknown marker": _with_segment(plain, 0x02, b"abc"),
        "DHP read as a frame header": _with_segment(plain, 0xDE, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
        "short frame header": _with_segment(plain, 0xC0, b"\x08\x00\x10\x00\x10\x03\x01\x22"),
        "short quantisation table": _with_segment(plain, 0xDB, b"\x00" + bytes(40)),
        "short JFIF": _with_segment(plain, 0xE0, b"JFIF\x00"),
        "short ICC segment": _with_segment(plain, 0xE2, b"ICC_PROFILE\x00\x01"),
    })
    exif = Image.Exif()
    exif[0x0112] = 6
    oriented = _jpeg(rgb, exif=exif)
    files["two EXIF segments"] = _with_segment(oriented, 0xE1, b"Exif\x00\x00" + _tiff("little", []))
    files["EXIF and XMP"] = _with_segment(oriented, 0xE1, b'http://ns.adobe.com/xap/1.0/\x00<x tiff:Orientation="3"/>')
    sof = plain.index(b"\xff\xc0")
    files["12-bit frame"] = plain[:sof + 4] + b"\x0c" + plain[sof + 5:]
    return files


CORPUS = _corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_probe_header_equals_pillow(name):
    data = CORPUS[name]
    assert probe_header(data) == probe_with_pillow(data)
    fast = scan_jpeg_header(data)
    assert fast is None or fast == probe_with_pillow(data)


def test_the_scanner_reads_plain_jpegs_itself():
    """The fast path is taken for the usual files (a scanner that always stepped aside would pass the parity test)."""
    usual = [name for name in CORPUS if name.endswith(".jpg") or name.startswith("orientation") and "LONG" not in name
             or name in ("plain", "gray", "cmyk", "progressive", "444", "truncated scan", "zero padded",
                         "big-endian orientation 6")]
    for name in usual:
        assert scan_jpeg_header(CORPUS[name]) is not None, name
    assert scan_jpeg_header(CORPUS["big-endian orientation 6"]).orientation == 6
    assert scan_jpeg_header(CORPUS["orientation9"]).orientation == 1  # out of range: as stored, like Pillow
    assert scan_jpeg_header(CORPUS["truncated scan"]).complete is False
    for name in ("XMP orientation", "MPO index", "two EXIF segments", "orientation as LONG", "fill bytes", "png"):
        assert scan_jpeg_header(CORPUS[name]) is None, name


@pytest.mark.parametrize("seed", range(4))
def test_damaged_headers_give_pillows_answer(seed):
    """1-4 bytes of the header region overwritten, set to 0xFF, deleted or inserted (2,000 files per seed): the
    same header as Pillow (or None for both), never another size, mode or orientation. (100,000 such files were
    checked once, without a difference.)"""
    rng = np.random.default_rng(seed)
    sources = [data for data in CORPUS.values() if scan_jpeg_header(data) is not None]
    for _ in range(2000):
        data = bytearray(sources[int(rng.integers(len(sources)))])
        header_end = bytes(data).index(b"\xff\xda") + 2
        operation = int(rng.integers(4))
        for _ in range(int(rng.integers(1, 5))):
            at = int(rng.integers(0, header_end))
            if operation == 0:
                data[at] = int(rng.integers(0, 256))
            elif operation == 1:
                data[at] = 0xFF
            elif operation == 2:
                del data[at]
            else:
                data.insert(at, int(rng.integers(0, 256)))
        damaged = bytes(data)
        assert probe_header(damaged) == probe_with_pillow(damaged)
