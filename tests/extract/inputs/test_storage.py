"""Reading bytes from fsspec URLs: merged ranges, retries with backoff, a reason for every failure.

Unit tests use fsspec's ``memory://``; the HTTP tests a loopback server
(127.0.0.1) that serves byte ranges, answers 404, fails a path twice before
answering, or stalls past the client's timeout. Every test is bounded in time
by small timeouts and backoffs.
"""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from _support.shards import LoopbackServer
from featcache.extract.decode.loaders import ImageReader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.inputs.sources import from_csv
from featcache.extract.inputs.storage import (
    ReadFailure,
    StorageOptions,
    describe_failure,
    is_transient,
    is_url,
    read_ranges,
)

FAST = StorageOptions(timeout=2.0, tries=3, backoff=0.01)
PRE = Preprocessor(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 10, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def memory_files():
    fs = fsspec.filesystem("memory")
    fs.pipe("/featcache-test/a.bin", bytes(range(200)))
    fs.pipe("/featcache-test/b.bin", b"hello world")
    yield "memory://featcache-test/"
    fs.rm("/featcache-test", recursive=True)


def test_urls_are_told_from_local_paths():
    assert is_url("https://h/x.jpg") and is_url("s3://b/k") and is_url("file:///tmp/x") and is_url("memory://x")
    assert not is_url("data/x.jpg") and not is_url("/abs/x.jpg") and not is_url("C:\\x.jpg")


def test_ranges_of_memory_files_in_request_order(memory_files):
    base = memory_files
    out = read_ranges([(base + "a.bin", 10, 20), (base + "b.bin", 0, None), (base + "a.bin", 0, 5),
                       (base + "missing.bin", 0, 4)], FAST)
    assert out[0] == bytes(range(10, 20)) and out[1] == b"hello world" and out[2] == bytes(range(5))
    assert isinstance(out[3], ReadFailure) and out[3].reason.startswith("missing object")


def test_local_ranges_and_missing_files(tmp_path):
    (tmp_path / "f").write_bytes(b"0123456789")
    out = read_ranges([(str(tmp_path / "f"), 2, 5), (str(tmp_path / "nope"), 0, 3), (str(tmp_path / "f"), 8, 20)])
    assert out[0] == b"234" and out[1] == ReadFailure("missing file") and out[2] == b"89"


def test_transient_errors_and_their_reasons():
    class Status(Exception):
        def __init__(self, status: int) -> None:
            self.status, self.message = status, "Service Unavailable"

    assert is_transient(Status(503)) and is_transient(Status(429)) and not is_transient(Status(403))
    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError())
    assert not is_transient(FileNotFoundError("x"))
    assert describe_failure(Status(503), 3, FAST) == "unreadable object (HTTP 503 Service Unavailable after 3 tries)"
    assert describe_failure(TimeoutError(), 3, FAST) == "timeout after 3 tries (2 s each)"
    assert describe_failure(FileNotFoundError("http://h/x"), 1, FAST, "https") == "missing object (404 not found)"


# ------------------------------------------------------------ loopback HTTP
@pytest.fixture
def served(tmp_path) -> Path:
    for i in range(6):
        (tmp_path / f"img{i}.png").write_bytes(_png(40 * i))
    return tmp_path


def test_http_404_flaky_and_ranges(served):
    with LoopbackServer(served) as server:
        server.fail("img1.png", 2)  # fails twice, then answers
        out = read_ranges([(server.url + "img0.png", 0, None), (server.url + "img1.png", 0, None),
                           (server.url + "gone.png", 0, None), (server.url + "img2.png", 4, 12)], FAST)
        assert out[0] == _png(0) and out[1] == _png(40) and out[3] == _png(80)[4:12]
        assert out[2] == ReadFailure("missing object (404 not found)")
        assert server.requests["img1.png"] == 3  # two 503s, then the answer
        server.fail("img3.png", 5)  # more failures than tries
        (failed,) = read_ranges([(server.url + "img3.png", 0, None)], FAST)
        assert failed == ReadFailure("unreadable object (HTTP 503 Service Unavailable after 3 tries)")


def test_http_timeout_becomes_a_reason(served):
    options = StorageOptions(timeout=0.3, tries=2, backoff=0.0)
    with LoopbackServer(served, stall={"img4.png": 1.0}) as server:
        slow, fast = read_ranges([(server.url + "img4.png", 0, None), (server.url + "img5.png", 0, None)], options)
    assert slow == ReadFailure("timeout after 2 tries (0.3 s each)")
    assert fast == _png(200)


def test_adjacent_ranges_of_one_object_take_one_request(served):
    with LoopbackServer(served) as server:
        url = server.url + "img0.png"
        out = read_ranges([(url, 0, 10), (url, 10, 20), (url, 30, 40)], FAST)
        assert out == [_png(0)[0:10], _png(0)[10:20], _png(0)[30:40]]
        assert server.requests["img0.png"] == 1


def test_csv_of_urls_reads_every_row_and_reports_the_404_by_id(served, tmp_path_factory):
    folder = tmp_path_factory.mktemp("csv")
    with LoopbackServer(served) as server:
        server.fail("img2.png", 2)
        rows = [f"{server.url}img{i}.png,{'ab'[i % 2]},x{i}" for i in range(6)] + [f"{server.url}gone.png,a,x6"]
        (folder / "labels.csv").write_text("path,label,id\n" + "\n".join(rows) + "\n")
        manifest = from_csv(folder / "labels.csv", {"train": 0.5, "val": 0.25, "test": 0.25}, 0)
        manifest.write(folder / "prepared" / "manifest.csv")
        again = Manifest.read(folder / "prepared" / "manifest.csv", storage=FAST)
        assert again.paths == manifest.paths and again.paths[0].startswith("http://127.0.0.1:")  # not rebased
        rows_, pixels, reasons = ImageReader(again, PRE).read_batch(range(len(again)))
    assert reasons == ["", "", "", "", "", "", "missing object (404 not found)"]
    assert pixels[2].mean() == pytest.approx(80, abs=1)  # the flaky one, read on its third try


def test_a_server_that_ignores_ranges_gives_the_bytes_and_one_warning(served, caplog):
    """``python -m http.server`` answers every Range request with the whole file: the range is cut out of it,
    and the cost (a whole object per request) is said once per host, not silently paid on every batch."""
    with LoopbackServer(served, ranges=False) as server:
        with caplog.at_level("WARNING", logger="featcache.extract.inputs.storage"):
            first = read_ranges([(server.url + "img0.png", 4, 12), (server.url + "img1.png", 0, None)], FAST)
            second = read_ranges([(server.url + "img2.png", 2, 9)], FAST)
    assert first == [_png(0)[4:12], _png(40)] and second == [_png(80)[2:9]]
    warnings = [r.getMessage() for r in caplog.records if "ignores HTTP Range requests" in r.getMessage()]
    assert len(warnings) == 1 and server.url.split("/")[2] in warnings[0] and "whole object" in warnings[0]
