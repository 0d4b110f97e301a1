"""The tar header reader against Python's ``tarfile``: the same members, offsets and sizes, and the same hash."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from featcache.extract.inputs.tar_headers import BLOCK, TarReader, header_mismatch


def _archive(fmt: int, names: list[str], sizes: list[int]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("a-folder")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, size in zip(names, sizes):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes((i * 7) % 251 for i in range(size))))
    return buffer.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


NAMES = ["0001.jpg", "0001.cls", "deep/" * 30 + "long.png", "ünïcode key.json", "x" * 99 + ".webp", "empty.txt"]
SIZES = [1500, 1, 700, 40, 512, 0]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_offsets_and_sizes_equal_tarfiles(fmt):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if len(n.encode()) < 100
                                                       or n.startswith("deep")][:5]
    data = _archive(fmt, names, SIZES[: len(names)])
    reader = TarReader(io.BytesIO(data))
    ours = [(m.name, m.offset, m.size) for m, _ in reader.members()]
    reader.drain()
    assert ours == _tarfile_members(data)
    assert reader.sha256.hexdigest() == hashlib.sha256(data).hexdigest() and reader.size == len(data)
    assert reader.problem == ""


def test_member_data_is_read_in_place():
    data = _archive(tarfile.PAX_FORMAT, ["a.cls", "a.png"], [3, 900])
    reader = TarReader(io.BytesIO(data))
    seen = {}
    for member, stream in reader.members():
        if member.name.endswith(".cls"):
            seen[member.name] = stream.take(member.size)
        else:
            seen[member.name] = data[member.offset:member.offset + member.size]
    assert seen == {"a.cls": bytes([0, 7, 14]), "a.png": bytes((i * 7) % 251 for i in range(900))}


def test_a_cut_archive_and_a_damaged_header_stop_with_a_problem():
    data = _archive(tarfile.PAX_FORMAT, ["a.png", "b.png", "c.png"], [2000, 2000, 2000])
    members = _tarfile_members(data)
    name, offset, size = members[2]
    cut = TarReader(io.BytesIO(data[: offset + 100]))
    assert [m.name for m, _ in cut.members()] == ["a.png", "b.png", "c.png"]
    assert "ends inside member 'c.png'" in cut.problem
    damaged = bytearray(data)
    damaged[members[1][1] - 512 + 10] ^= 0xFF  # a byte of b.png's header
    broken = TarReader(io.BytesIO(bytes(damaged)))
    assert [m.name for m, _ in broken.members()] == ["a.png"]
    assert "bad header checksum" in broken.problem
    not_tar = TarReader(io.BytesIO(b"just some text, not an archive" * 40))
    assert list(not_tar.members()) == [] and "checksum" in not_tar.problem


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_each_members_header_is_recognised_before_its_data_and_others_are_not(fmt):
    """``header_mismatch`` (extract's check that a shard still holds a member where prepare listed it) accepts
    every member's own header, long and unicode names included, and names what is there otherwise."""
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if len(n.encode()) < 100
                                                       or n.startswith("deep")][:5]
    data = _archive(fmt, names, SIZES[: len(names)])
    members = _tarfile_members(data)
    for name, offset, size in members:
        assert header_mismatch(data[offset - BLOCK:offset], name, size) == "", name
    (first, at, size), (second, _, _) = members[0], members[1]
    assert header_mismatch(data[at - BLOCK:at], second, size) == f"member {first!r} of {size:,} bytes"
    assert header_mismatch(data[at - BLOCK:at], first, size + 1) == f"member {first!r} of {size:,} bytes"
    assert header_mismatch(data[at:at + BLOCK], first, size) == "no tar header"  # the data itself
    assert header_mismatch(data[at - BLOCK - 1:at - 1], first, size) == "no tar header"  # one byte off
    assert header_mismatch(bytes(BLOCK), first, size) == "no tar header"
