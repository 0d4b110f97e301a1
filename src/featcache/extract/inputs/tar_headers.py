"""Tar member headers, read in one sequential pass that hashes every byte: the member list of a shard.

Python's ``tarfile`` builds a full ``TarInfo`` per member (every field parsed,
pax records decoded through several layers): on the 2-core VM it lists about
4,400 members a second, so the two million members of a million-sample
shard set would take 8 minutes to list (``benchmarks/README.md``). This
reader parses only what a member list needs (name, size, type; the ``path``
and ``size`` records of pax headers; GNU long names) straight from the
512-byte headers and verifies each header checksum as ``tarfile`` does.
``tests/extract/inputs/test_tar_headers.py`` checks it against ``tarfile``
on ustar, GNU and pax archives, long names included.

The format (POSIX.1-2001 / ustar, GNU): a 512-byte header, the member's data
padded to 512 bytes, and so on; an all-zero block ends the archive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import IO, Iterator

__all__ = ["BLOCK", "TarFormatError", "TarMember", "TarReader", "header_mismatch"]

BLOCK = 512
_ZERO = bytes(BLOCK)
_CHUNK = 1 << 20


class TarFormatError(ValueError):
    """A header that is not a tar header (bad checksum, bad number): the archive is damaged here."""


@dataclass(frozen=True)
class TarMember:
    """One regular-file member: its name, the offset of its data in the archive, and its size in bytes."""

    name: str
    offset: int
    size: int


def _number(field: bytes) -> int:
    """A header number: NUL/space-terminated octal, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number field {bytes(field)!r}") from None


def _checksum_ok(header: bytes) -> bool:
    """Whether a 512-byte block is a tar header: its stored checksum is the sum of its bytes (checksum as spaces)."""
    stored = header[148:156]
    try:
        return _number(stored) == sum(header) - sum(stored) + 8 * 32
    except TarFormatError:
        return False


def _header_name(header: bytes) -> bytes:
    """The name a header holds itself: ``name``, or ustar's ``prefix/name`` (pax and GNU long names aside)."""
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0" and header[345:346] != b"\0":  # POSIX ustar: prefix/name
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name


def header_mismatch(header: bytes, name: str, size: int) -> str:
    """Why ``header``, the 512 bytes before a member's data, is not the header of member ``name`` of ``size`` bytes.

    A member's data always follows its own header, so reading those 512 bytes with the data (one request:
    they are adjacent) tells whether the archive still holds that member at that offset: a shard rewritten
    or replaced since its member list was read has another member, or no header at all, there. A name
    that a header cannot hold verbatim (over 100 bytes, or not ASCII: a pax or GNU long name, written in
    an extended header before it) is not compared; the size always is (below ustar's 8 GiB limit).

    Returns
    -------
    str
        ``""`` when it matches; else what is there (``"no tar header"``, ``"member 'b.jpg' of 900 bytes"``).
    """
    if len(header) != BLOCK or header == _ZERO or not _checksum_ok(header):
        return "no tar header"
    if header[156:157] not in (b"0", b"\0", b"7"):
        return f"a tar header of type {header[156:157].decode('latin-1')!r}, not a file"
    stored = _header_name(header)
    held = stored.decode("utf-8", "surrogateescape")
    plain = name.isascii() and len(name) <= 100
    try:
        stored_size = _number(header[124:136])
    except TarFormatError:
        return "no tar header"
    if (plain and held != name) or (size < 8 ** 11 and stored_size != size):
        return f"member {held!r} of {stored_size:,} bytes"
    return ""


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header (``"%d %s=%s\\n"`` each)."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] not in (b"", b"\0"):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1: position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


class TarReader:
    """Walk a tar stream's headers once; hash and count every byte read.

    Parameters
    ----------
    raw : binary file object
        Read sequentially (a local file, an fsspec file over HTTP/S3).

    Attributes
    ----------
    sha256 : hashlib object
        Of every byte read so far (after :meth:`drain`: of the whole stream).
    size : int
        Bytes read so far.
    problem : str
        ``""``, or why the walk stopped before the end-of-archive block (a cut or damaged archive).
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.problem = ""
        self._buffer = b""
        self._start = 0  # absolute offset of _buffer[0]
        self._index = 0  # read position in _buffer

    @property
    def offset(self) -> int:
        """Absolute offset of the next byte to read."""
        return self._start + self._index

    def _fill(self, n: int) -> None:
        while len(self._buffer) - self._index < n:
            chunk = self.raw.read(max(_CHUNK, n))
            if not chunk:
                return
            self.sha256.update(chunk)
            self.size += len(chunk)
            self._start += self._index
            self._buffer = self._buffer[self._index:] + chunk
            self._index = 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end of the stream)."""
        self._fill(n)
        data = self._buffer[self._index:self._index + n]
        self._index += len(data)
        return data

    def skip(self, n: int) -> int:
        """Advance ``n`` bytes (still hashing them); the number actually skipped."""
        available = len(self._buffer) - self._index
        if n <= available:
            self._index += n
            return n
        skipped = available
        self._start, self._buffer, self._index = self._start + len(self._buffer), b"", 0
        while skipped < n:
            chunk = self.raw.read(min(_CHUNK, n - skipped))
            if not chunk:
                break
            self.sha256.update(chunk)
            self.size += len(chunk)
            self._start += len(chunk)
            skipped += len(chunk)
        return skipped

    def drain(self) -> None:
        """Read (and hash) the rest of the stream: the end-of-archive blocks and padding."""
        while self.skip(_CHUNK) == _CHUNK:
            pass

    def members(self) -> Iterator[tuple[TarMember, "TarReader"]]:
        """Yield ``(member, self)`` per regular file; read its data with ``take(member.size)`` before the next.

        Data not read by the caller is skipped. The walk stops at the
        end-of-archive block, at the end of the stream, or at a damaged header
        (then :attr:`problem` says why and where).
        """
        overrides: dict[str, str] = {}
        while True:
            at = self.offset
            header = self.take(BLOCK)
            if len(header) < BLOCK:
                if header:
                    self.problem = f"the archive ends inside a header at byte {at:,}"
                return
            if header == _ZERO:
                return
            try:
                valid = _checksum_ok(header)
                size = _number(header[124:136])
            except TarFormatError:
                valid = False
            if not valid:
                self.problem = f"bad header checksum at byte {at:,} (a damaged or non-tar file)"
                return
            kind = header[156:157]
            padded = -(-size // BLOCK) * BLOCK
            if kind in (b"x", b"L", b"g", b"K"):  # pax / GNU long name: they describe the next header
                data = self.take(padded)
                if len(data) < padded:
                    self.problem = f"the archive ends inside an extended header at byte {at:,}"
                    return
                if kind == b"x":
                    overrides.update(_pax(data[:size]))
                elif kind == b"L":
                    overrides["path"] = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = _header_name(header)
            member = TarMember(overrides.get("path", name.decode("utf-8", "surrogateescape")), self.offset,
                               int(overrides.get("size", size)))
            overrides = {}
            padded = -(-member.size // BLOCK) * BLOCK
            start = self.offset
            if kind in (b"0", b"\0", b"7"):  # regular files (and contiguous files, which tarfile treats alike)
                yield member, self
            remaining = padded - (self.offset - start)
            if self.skip(remaining) < remaining:
                self.problem = f"the archive ends inside member {member.name!r} (at byte {self.offset:,})"
                return
