"""Bytes of images and shards from local paths and fsspec URLs: pipelined, retried, a reason for each failure.

A path is local unless it starts with a URL scheme (``file://``, ``http://``,
``https://``, ``s3://``, ``gs://``, ...), which fsspec resolves (``s3`` and
``gs`` need ``s3fs`` / ``gcsfs``: ``pip install 'featcache[s3]'`` or
``'featcache[gcs]'``). :func:`read_ranges` reads many byte ranges at once:
adjacent ranges of one object are merged into one request
(``fsspec.utils.merge_offset_ranges``), and the requests of an asynchronous
filesystem (HTTP, S3, GCS) are in flight together (``cat_ranges``). Transient
errors (HTTP 5xx and 429, timeouts, connection resets) are retried with
exponential backoff; a request that still fails, or fails for good (404, a
permission error), comes back as a :class:`ReadFailure` whose reason says why
(``missing object (404)``, ``timeout after 3 tries (30 s each)``), never as an
exception and never silently dropped. Reasons never contain the URL itself (a
presigned URL holds credentials): the caller reports the row's id.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Mapping, Sequence

__all__ = ["ReadFailure", "StorageOptions", "describe_failure", "is_storage_error", "is_url", "is_transient",
           "is_transient_reason", "open_binary",
           "read_ranges", "url_protocol"]

logger = logging.getLogger(__name__)

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

#: Exception class names (anywhere in the MRO) of errors worth another try: timeouts, dropped connections,
#: truncated payloads. Matched by name so that aiohttp is not imported for local reads.
_TRANSIENT_NAMES = frozenset({"TimeoutError", "ConnectionError", "ClientConnectionError", "ClientPayloadError",
                              "ServerDisconnectedError", "IncompleteRead", "ClientOSError"})


def is_url(path: object) -> bool:
    """True when ``path`` is a string with a URL scheme (``http://...``, ``file://...``, ``s3://...``)."""
    return isinstance(path, str) and _URL.match(path) is not None


def url_protocol(path: str) -> str:
    """The scheme of a URL (``https``), or ``""`` for a local path."""
    match = _URL.match(path)
    return match.group(1).lower() if match else ""


@dataclass(frozen=True)
class StorageOptions:
    """How remote objects are read (``data.io`` in ``params.yaml``).

    Attributes
    ----------
    timeout : float
        Seconds one request may take (HTTP: aiohttp's total timeout).
    tries : int
        Attempts per request; 1 never retries.
    backoff : float
        Seconds before the second attempt, doubled before each further one.
    max_gap : int
        Ranges of one object at most this many bytes apart are fetched in one request.
    max_block : int
        A merged request covers at most this many bytes.
    options : mapping
        Extra keyword arguments of ``fsspec.filesystem`` (credentials, endpoint, ...): under a protocol's
        name for that protocol (``{"s3": {"anon": true}}``), any other key for every protocol.
    """

    timeout: float = 30.0
    tries: int = 3
    backoff: float = 0.5
    max_gap: int = 64 * 1024
    max_block: int = 32 * 1024 * 1024
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}.")
        if isinstance(self.tries, bool) or not isinstance(self.tries, int) or self.tries < 1:
            raise ValueError(f"tries must be an integer >= 1, got {self.tries!r}.")
        if self.backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {self.backoff!r}.")

    def filesystem_kwargs(self, protocol: str) -> dict[str, Any]:
        """Keyword arguments of ``fsspec.filesystem(protocol, ...)``: these options plus the timeout."""
        from fsspec.registry import known_implementations

        kwargs = {key: value for key, value in self.options.items() if key not in known_implementations}
        section = self.options.get(protocol)
        kwargs.update(section if isinstance(section, Mapping) else {})
        if protocol in ("http", "https"):
            import aiohttp

            client = dict(kwargs.get("client_kwargs") or {})
            client.setdefault("timeout", aiohttp.ClientTimeout(total=self.timeout))
            kwargs["client_kwargs"] = client
        return kwargs

    def filesystem(self, protocol: str) -> Any:
        """The fsspec filesystem of ``protocol`` (fsspec caches instances per process)."""
        import fsspec

        try:
            return fsspec.filesystem(protocol, **self.filesystem_kwargs(protocol))
        except ImportError as error:
            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
            hint = f"pip install 'featcache[{extra}]'" if extra else "install the fsspec backend it names"
            raise ImportError(f"Reading {protocol}:// URLs needs a package that is not installed ({error}). "
                              f"Hint: {hint}.") from error


@dataclass(frozen=True)
class ReadFailure:
    """A range or object that could not be read, and why (stored as the bad row's reason)."""

    reason: str


def is_transient(error: BaseException) -> bool:
    """Whether another try may succeed: a timeout, a dropped connection, HTTP 5xx or 429."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(error).__mro__)


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` is a storage client's error (an HTTP status, aiohttp's ``ClientError``, botocore's)."""
    return isinstance(getattr(error, "status", None), int) or any(
        cls.__name__ in ("ClientError", "BotoCoreError", "HttpError") for cls in type(error).__mro__)


def describe_failure(error: BaseException, tries: int, options: StorageOptions, protocol: str = "") -> str:
    """One-line reason for a read of a ``protocol`` URL that failed after ``tries`` attempts (no URL in it)."""
    after = f" after {tries} {'try' if tries == 1 else 'tries'}"
    status = getattr(error, "status", None)
    if status == 404 or isinstance(error, FileNotFoundError):
        return "missing object (404 not found)" if protocol.startswith("http") or status == 404 \
            else "missing object (not found)"
    if isinstance(status, int):
        message = str(getattr(error, "message", "") or "").strip()
        return f"unreadable object (HTTP {status}{' ' + message if message else ''}{after})"
    if isinstance(error, PermissionError):
        return f"unreadable object (permission denied: {error})"
    if any(cls.__name__ == "TimeoutError" for cls in type(error).__mro__):
        return f"timeout{after} ({options.timeout:g} s each)"
    detail = f"{type(error).__name__}: {error}".replace("\n", " ")
    if is_transient(error):
        return f"connection failed{after} ({detail})"
    return f"unreadable object ({detail})"


#: The reasons :func:`describe_failure` gives a transient error that outlasted every try (a server down or
#: overloaded for a while, not a bad image): a later run may read the row.
_TRANSIENT_REASON = re.compile(r"^(timeout after \d+ tr|connection failed after \d+ tr|unreadable object \(HTTP "
                               r"(5\d\d|429)\b)")


def is_transient_reason(reason: str) -> bool:
    """Whether a bad row's stored ``reason`` is a read that failed for a transient cause after every try
    (``timeout after 3 tries ...``, ``connection failed after ...``, ``unreadable object (HTTP 503 ...``)."""
    return _TRANSIENT_REASON.match(reason) is not None


def _local_read(path: str, start: int, end: int | None) -> bytes | ReadFailure:
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read(-1 if end is None else end - start)
    except FileNotFoundError:
        return ReadFailure("missing file")
    except IsADirectoryError:
        return ReadFailure("unreadable file (a directory)")
    except OSError as error:
        return ReadFailure(f"unreadable file ({type(error).__name__}: {error.strerror or error})")
    return data


#: Hosts already warned about ignoring Range requests (one warning per host and process).
_WARNED_NO_RANGES: set[str] = set()


def _slice_full(data: bytes, start: int, end: int | None, url: str = "") -> bytes:
    """A server that ignores the Range header answers with the whole object: cut the range out of it.

    The first time a host does that, a warning says what it costs (the whole object per request).
    """
    if end is not None and len(data) > end - start and len(data) >= end:
        host = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]  # no path, query or credentials
        if host not in _WARNED_NO_RANGES:
            _WARNED_NO_RANGES.add(host)
            logger.warning("the server %s ignores HTTP Range requests: each read downloads the whole object "
                           "(%s bytes for a range of %s), so every batch of a shard downloads the whole shard. "
                           "Hint: serve the data with a server that supports Range requests (nginx, Apache, an "
                           "object store; not `python -m http.server`), or copy it to a local folder",
                           host, f"{len(data):,}", f"{end - start:,}")
        return data[start:end]
    return data


def _remote_reads(protocol: str, requests: list[tuple[str, int, int | None]],
                  options: StorageOptions) -> list[bytes | ReadFailure]:
    """Fetch ``requests`` (one protocol) with merging, concurrency and retries."""
    from fsspec.utils import merge_offset_ranges

    fs = options.filesystem(protocol)
    paths, starts, ends = merge_offset_ranges([r[0] for r in requests], [r[1] for r in requests],
                                              [r[2] for r in requests], max_gap=options.max_gap,
                                              max_block=options.max_block, sort=True)
    fetched: list[bytes | BaseException | None] = [None] * len(paths)
    todo = list(range(len(paths)))
    tries = 0
    while todo:
        tries += 1
        results = fs.cat_ranges([paths[i] for i in todo], [starts[i] for i in todo], [ends[i] for i in todo],
                                on_error="return")
        retry = []
        for index, result in zip(todo, results):
            fetched[index] = result
            if isinstance(result, BaseException) and is_transient(result) and tries < options.tries:
                retry.append(index)
        if retry:
            delay = options.backoff * 2 ** (tries - 1)
            logger.info("retrying %d of %d %s:// requests in %.1f s (try %d of %d): %s", len(retry), len(paths),
                        protocol, delay, tries + 1, options.tries, describe_failure(fetched[retry[0]], tries,  # type: ignore[arg-type]
                                                                                    options, protocol))
            time.sleep(delay)
        todo = retry
    out: list[bytes | ReadFailure] = []
    for url, start, end in requests:
        for index in range(len(paths)):  # the merged range that covers this request
            if paths[index] == url and starts[index] <= start and (ends[index] is None or
                                                                    (end is not None and end <= ends[index])):
                break
        else:  # pragma: no cover - merge_offset_ranges covers every input range
            raise AssertionError(f"no merged range covers {start}..{end}")
        result = fetched[index]
        if isinstance(result, BaseException):
            out.append(ReadFailure(describe_failure(result, tries if is_transient(result) else 1, options, protocol)))
            continue
        assert isinstance(result, bytes)
        data = _slice_full(result, starts[index], ends[index], paths[index])
        offset = start - starts[index]
        out.append(data[offset: None if end is None else offset + end - start])
    return out


def read_ranges(requests: Sequence[tuple[str, int, int | None]],
                options: StorageOptions | None = None) -> list[bytes | ReadFailure]:
    """Read byte ranges ``[start, end)`` of local files or URLs, in the order given.

    Parameters
    ----------
    requests : sequence of (path, start, end)
        ``end`` None reads to the end of the object (a whole image file).
    options : StorageOptions, optional
        Timeouts, tries and fsspec options (default :class:`StorageOptions`).

    Returns
    -------
    list of bytes or ReadFailure
        One entry per request. A range that ends beyond the object gives
        fewer bytes; the caller decides whether that is a truncated member.
    """
    options = options or StorageOptions()
    out: list[bytes | ReadFailure | None] = [None] * len(requests)
    remote: dict[str, list[int]] = {}
    for index, (path, start, end) in enumerate(requests):
        protocol = url_protocol(path)
        if protocol:
            remote.setdefault(protocol, []).append(index)
        else:
            out[index] = _local_read(path, start, end)
    for protocol, indices in remote.items():
        for index, result in zip(indices, _remote_reads(protocol, [requests[i] for i in indices], options)):
            out[index] = result
    return out  # type: ignore[return-value]


@contextlib.contextmanager
def open_binary(path: str, options: StorageOptions | None = None) -> Iterator[IO[bytes]]:
    """Open a local file or a URL for sequential binary reading."""
    protocol = url_protocol(path)
    if not protocol:
        with open(path, "rb") as handle:
            yield handle
        return
    options = options or StorageOptions()
    fs = options.filesystem(protocol)
    with fs.open(path, "rb", block_size=8 * 1024 * 1024) as handle:
        yield handle
