"""WebDataset shards for tests, written with webdataset's own ``TarWriter``, and a loopback HTTP server.

The server (127.0.0.1 only) serves a folder with byte ranges (``Range:
bytes=a-b``, as fsspec's HTTP filesystem asks for them), answers 404 for
missing files, and can make chosen paths fail a number of times (503) before
answering, or stall past a client's timeout. With ``ranges=False`` it ignores
``Range`` headers and answers with the whole file, as ``python -m http.server`` does.
"""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["LoopbackServer", "shards_from_folder"]


def shards_from_folder(folder: Path, out: Path, per_shard: int | None = None, extra: dict | None = None) -> list[Path]:
    """Write the images of an ImageFolder tree ``folder/<class>/<name>.<ext>`` as WebDataset shards.

    With ``per_shard=None`` there is one shard per class, ``out/<class>.tar``, whose samples are keyed by
    the file stem: sample ids ``<class>/<stem>`` then sort like the folder's ids ``<class>/<name>.<ext>``
    (same labels, same row order, so the same split). Otherwise the images, in id order, fill shards of
    ``per_shard`` samples named ``000000.tar``, ``000001.tar``, ... Each sample holds the image under its
    own extension and ``cls`` = the class name; ``extra`` adds members to every sample.
    """
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    groups: dict[str, list[Path]] = {}
    for index, file in enumerate(files):
        name = file.parent.name if per_shard is None else f"{index // per_shard:06d}"
        groups.setdefault(name, []).append(file)
    written = []
    for name, members in groups.items():
        path = out / f"{name}.tar"
        with wds.TarWriter(str(path)) as writer:
            for file in members:
                key = file.stem if per_shard is None else f"{file.parent.name}_{file.stem}"
                sample = {"__key__": key, file.suffix.lstrip(".").lower(): file.read_bytes(),
                          "cls": file.parent.name.encode(), **(extra or {})}
                writer.write(sample)
        written.append(path)
    return written


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0].lstrip("/")
        state = self.server.state
        with state.lock:
            state.requests[path] += 1
            failing = state.fail.get(path, 0)
            if failing:
                state.fail[path] = failing - 1
        if path in state.stall:
            time.sleep(state.stall[path])
        if failing:
            self.send_error(503, "Service Unavailable")
            return
        file = state.root / path
        if not file.is_file():
            self.send_error(404, "Not Found")
            return
        data = file.read_bytes()
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")) if state.ranges else None
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            body = data[start:end]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if state.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        file = self.server.state.root / self.path.split("?", 1)[0].lstrip("/")
        if not file.is_file():
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(file.stat().st_size))
        if self.server.state.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()


class _State:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.fail: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        self.ranges = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request, client_address) -> None:  # a client that timed out and hung up: not news
        pass


class LoopbackServer:
    """Serve ``root`` on ``http://127.0.0.1:<port>/`` from a thread (a context manager).

    Attributes
    ----------
    url : str
        The base URL, ending with ``/``.
    requests : Counter
        GET requests per path.
    """

    def __init__(self, root: Path, fail: dict[str, int] | None = None, stall: dict[str, float] | None = None,
                 ranges: bool = True) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.state = _State(Path(root))
        self.server.state.ranges = ranges
        self.server.state.fail.update(fail or {})
        self.server.state.stall.update(stall or {})
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def requests(self) -> Counter[str]:
        return self.server.state.requests

    def fail(self, path: str, times: int) -> None:
        """Answer 503 to the next ``times`` GETs of ``path``."""
        with self.server.state.lock:
            self.server.state.fail[path] = times

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def urls(self, names: Sequence[str]) -> Iterator[str]:
        return (self.url + name for name in names)
