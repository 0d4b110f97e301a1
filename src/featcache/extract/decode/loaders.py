"""Data loading: decode and preprocess images in worker processes.

Two loaders give the engine the same batches: :func:`make_loader` (a torch
``DataLoader``, pinned memory for CUDA) and :func:`iter_array_batches` (a
``multiprocessing`` pool of numpy batches, without importing torch: what CPU
runners use, so a warm ONNX extraction never pays torch's start-up). Workers
hand over uint8 pixels (:meth:`Preprocessor.pixels_array`, a quarter of
float32's bytes); the engine normalises them where the runner takes its input
(:meth:`Preprocessor.normalize_batch`). A bad image never crashes a worker:
its row comes back with an error string (and zero pixels), so the extractor can report it by id and skip or fail as
configured. The reason starts with a plain category (``missing file``,
``empty file``, ``not an image``, ``truncated or corrupt image``, ``image too
large``, ``unreadable file``, ``cannot decode``) followed by the decoder's own
message; it never contains the machine-specific folder of the image, because
it is stored in the feature file.

Rows that are not plain local files, the members of WebDataset shards and
URLs (``https://``, ``s3://``, ...), are read as bytes first
(:func:`~featcache.extract.inputs.storage.read_ranges`): a batch's reads are
merged and in flight together, transient errors are retried, and a read
that fails for good becomes the row's reason (``missing object (404 not
found)``, ``timeout after 3 tries (30 s each)``, ``truncated member``).

The decompression-bomb limit (``Preprocessor.max_image_pixels``, from
``extract.max_image_pixels``) is applied here, in the worker that decodes,
from the image header, before any pixel is decoded.

Only *decode* errors become bad-image reasons: opening, reading or decoding
the file and the header size limit (:data:`DECODE_ERRORS`). Anything else,
an exception in preprocessing, a ``MemoryError`` or an unexpected exception
type from the decoder, is a bug and propagates (with a note naming the file),
so it can never pass for a bad image.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import multiprocessing.pool
import os
import posixpath
import re
import signal
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from featcache.errors import ExtractionError
from featcache.extract.decode.images import DECODE_ERRORS, ImageTooLargeError, load_rgb
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.inputs.storage import ReadFailure, StorageOptions, is_url, read_ranges
from featcache.extract.inputs.tar_headers import BLOCK as TAR_BLOCK
from featcache.extract.inputs.tar_headers import header_mismatch
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS
from featcache.util.compute import default_num_workers

if TYPE_CHECKING:  # torch is imported by the torch loader only
    import torch
    from torch.utils.data import DataLoader

__all__ = ["Batch", "DECODE_ERRORS", "DecodeWorkerDiedError", "LoaderFactory", "ImageReader", "ImageDataset",
           "make_loader", "iter_array_batches", "describe_error"]

#: A batch of the loaders (the engine's batch contract): ``(rows int64 (B,), images uint8 (B, 3, S, S),
#: reasons list[str])``, rows and images torch tensors or numpy arrays (the array loader of CPU runners).
Batch = tuple[Any, Any, list[str]]

#: ``loader_factory(rows, batch_size) -> iterable of Batch`` over exactly ``rows`` (any order, each once).
LoaderFactory = Callable[[Sequence[int], int], Iterable[Batch]]

_BYTES_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def describe_error(path: str, error: BaseException, on_disk: bool = True) -> str:
    """One-line reason why ``path`` could not be decoded (stored in ``/errors``).

    Parameters
    ----------
    path : str
        The image path as it was opened (replaced by its file name in the text).
    error : BaseException
        What decoding raised.
    on_disk : bool
        False when the bytes came from a shard member or a URL (``path`` names them): the file system is
        not looked at, and Pillow's ``<_io.BytesIO object at 0x...>`` becomes ``path``'s name (a memory
        address in a stored reason would change the store's bytes from run to run).
    """
    from PIL import Image

    detail = f"{type(error).__name__}: {error}".replace("\n", " ")
    if not on_disk:
        detail = _BYTES_REPR.sub(lambda _: posixpath.basename(path.split("?", 1)[0]), detail)
    folder = os.path.dirname(path)
    detail = detail.replace(path, os.path.basename(path))
    if folder and folder != os.sep:
        detail = detail.replace(folder + os.sep, "")
    if on_disk and (not os.path.lexists(path) or (isinstance(error, FileNotFoundError) and not os.path.exists(path))):
        return "missing file"
    try:
        if on_disk and os.path.isfile(path) and os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(error, ImageTooLargeError):
        return str(error)
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):  # Pillow's own limit
        return f"image too large ({detail})"
    if isinstance(error, Image.UnidentifiedImageError):
        return f"not an image or unsupported format ({detail})"
    if isinstance(error, (PermissionError, IsADirectoryError)) or (isinstance(error, OSError) and error.errno):
        return f"unreadable file ({detail})"  # the OS refused the read (EIO, EACCES, ...); Pillow's have no errno
    message = str(error).lower()
    if isinstance(error, (SyntaxError, EOFError)) or "truncated" in message or "broken" in message \
            or "corrupt" in message or "decoder error" in message:
        return f"truncated or corrupt image ({detail})"
    return f"cannot decode ({detail})"


class ImageReader:
    """Rows of a manifest as ``(row, pixels, error)`` triples, pixels a numpy array (no torch).

    ``pixels`` is the uint8 (3, S, S) crop of :meth:`Preprocessor.pixels_array`
    (zeros for a bad image, whose ``error`` is non-empty); normalise batches
    with :meth:`Preprocessor.normalize_batch`.

    Parameters
    ----------
    source : Manifest or sequence of paths
        Images to read; the index is the manifest row (or list position).
    preprocess : Preprocessor
        Maps a PIL RGB image to the (3, S, S) uint8 crop.
    """

    def __init__(self, source: Manifest | Sequence[str | os.PathLike], preprocess: Preprocessor) -> None:
        self.members = None
        self.storage = StorageOptions()
        if isinstance(source, Manifest):
            located: dict[str, str] = {}  # the rows of one shard share its location (one string, one resolve)
            self.paths = [located.get(path) or located.setdefault(path, source.location(row))
                          for row, path in enumerate(source.paths)]
            self.members, self.storage = source.members, source.storage
        else:
            self.paths = [str(path) for path in source]
        self.preprocess = preprocess
        self.any_url = any(map(is_url, self.paths))

    def as_dataset(self) -> ImageDataset:
        """The same rows as an :class:`ImageDataset` for torch's ``DataLoader``.

        Everything that locates a row is kept: the paths, the shard members (offsets
        into a WebDataset ``.tar``), the storage options and the preprocessor.

        Returns
        -------
        ImageDataset
            ``self`` when it is one already, else a dataset sharing this reader's fields.
        """
        if isinstance(self, ImageDataset):
            return self
        dataset = object.__new__(ImageDataset)
        dataset.__dict__.update(vars(self))
        return dataset

    def by_bytes(self, row: int) -> bool:
        """Whether ``row`` is read as bytes (a shard member or a URL), not opened as a local file."""
        return self.members is not None or (self.any_url and is_url(self.paths[row]))

    def fetch(self, rows: Sequence[int]) -> list[bytes | ReadFailure]:
        """The bytes of ``rows`` (members or URLs), read together: merged, in flight at once, retried.

        Returns
        -------
        list of bytes or ReadFailure
            Per row, its image's bytes, or why they could not be read.
        """
        out: list[bytes | ReadFailure | None] = [None] * len(rows)
        requests, where = [], []
        for index, row in enumerate(rows):
            if self.members is None:
                requests.append((self.paths[row], 0, None))
            elif not self.members.names[row]:
                out[index] = ReadFailure("no image member (none of data.image_keys in the sample)")
                continue
            else:  # with the member's tar header (the 512 bytes before its data): is it still that member?
                start = int(self.members.offsets[row])
                requests.append((self.paths[row], start - TAR_BLOCK, start + int(self.members.sizes[row])))
            where.append(index)
        for index, result in zip(where, read_ranges(requests, self.storage)):
            if self.members is not None and isinstance(result, bytes):
                result = self._member_data(rows[index], result)
            out[index] = result
        return out  # type: ignore[return-value]

    def _member_data(self, row: int, read: bytes) -> bytes | ReadFailure:
        """A member's data from its header and data as read, or why they are not the member prepare listed."""
        assert self.members is not None
        name, size = self.members.names[row], int(self.members.sizes[row])
        header, data = read[:TAR_BLOCK], read[TAR_BLOCK:]
        there = header_mismatch(header, name, size) if len(header) == TAR_BLOCK else ""
        if there:
            return ReadFailure(f"shard changed since prepare (at byte {int(self.members.offsets[row]) - TAR_BLOCK:,} "
                               f"it holds {there}, not {name!r} of {size:,} bytes). Hint: rerun featcache prepare "
                               "(dvc repro does) to list the shard again")
        if len(data) < size:
            return ReadFailure(f"truncated member (the shard ends after {len(data):,} of its {size:,} bytes)")
        return data

    def source(self, row: int) -> str | bytes:
        """What :func:`~featcache.extract.decode.images.load_rgb` takes for ``row``: its local path, or
        the bytes of its shard member or URL (OSError with the reason when they cannot be read)."""
        return self.read_bytes(row) if self.by_bytes(row) else self.paths[row]

    def read_bytes(self, row: int) -> bytes:
        """The file bytes of ``row``; OSError (with the reason) when they cannot be read."""
        if not self.by_bytes(row):
            with open(self.paths[row], "rb") as handle:
                return handle.read()
        data = self.fetch([row])[0]
        if isinstance(data, ReadFailure):
            raise OSError(data.reason)
        return data

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def max_image_pixels(self) -> int | None:
        """Decompression-bomb limit applied when decoding (the preprocessor's; None: no limit)."""
        return getattr(self.preprocess, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)

    def read(self, row: int, data: bytes | ReadFailure | None = None) -> tuple[int, np.ndarray, str]:
        """``(row, uint8 (3, S, S) array, reason)``; zeros and a non-empty reason for a bad image.

        ``data``: the row's bytes (or read failure) when :meth:`fetch` read them already.
        """
        path = self.paths[row]
        size = self.preprocess.input_size
        source: str | bytes = path
        if self.by_bytes(row):
            source = self.fetch([row])[0] if data is None else data  # type: ignore[assignment]
            if isinstance(source, ReadFailure):
                return row, np.zeros((3, size, size), dtype=np.uint8), source.reason
            if not source:
                return row, np.zeros((3, size, size), dtype=np.uint8), "empty file (0 bytes)"
        try:
            image = load_rgb(source, self.preprocess.background, self.max_image_pixels,
                             draft_size=self.preprocess.resize_size)
        except DECODE_ERRORS as error:
            # The reason is stored in the feature file: no machine-specific absolute path in it.
            where = path if source is path or self.members is None else self.members.names[row]
            return row, np.zeros((3, size, size), dtype=np.uint8), describe_error(where, error,
                                                                                   on_disk=source is path)
        except BaseException as error:
            _note(error, f"while decoding image {path} (row {row}); this is not a bad-image error")
            raise
        try:
            return row, self.preprocess.pixels_array(image), ""
        except BaseException as error:
            _note(error, f"while preprocessing image {path} (row {row}), which decoded fine")
            raise

    def __getitem__(self, row: int) -> tuple[int, np.ndarray, str]:
        return self.read(row)

    def read_batch(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The engine's batch of ``rows``: ``(rows int64 (B,), uint8 (B, 3, S, S), reasons)``.

        The bytes of member and URL rows are read first, all together (:meth:`fetch`).
        """
        remote = [row for row in rows if self.by_bytes(row)]
        fetched = dict(zip(remote, self.fetch(remote))) if remote else {}
        items = [self.read(row, fetched.get(row)) for row in rows]
        size = self.preprocess.input_size
        images = np.stack([item[1] for item in items]) if items else np.zeros((0, 3, size, size), np.uint8)
        return np.asarray([item[0] for item in items], dtype=np.int64), images, [item[2] for item in items]


class ImageDataset(ImageReader):
    """:class:`ImageReader` for torch's ``DataLoader``: the same triples, pixels as a uint8 tensor."""

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor, str]:  # type: ignore[override]
        import torch

        index, pixels, reason = self.read(row)
        return index, torch.from_numpy(pixels), reason


def _note(error: BaseException, note: str) -> None:
    """Append ``note`` to a propagating exception's ``__notes__`` (PEP 678), on every supported Python.

    ``add_note`` where it exists (3.11+, whose tracebacks print the notes);
    before that, the same ``__notes__`` list is set directly, as PEP 678
    advises, so callers read the note the same way (3.10's tracebacks do not
    print it).
    """
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(note)
        return
    notes = getattr(error, "__notes__", None)
    try:
        error.__notes__ = [*notes, note] if isinstance(notes, list) else [note]  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception type that takes no attributes: leave it as raised
        pass


def _collate(items: list[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import torch

    rows = torch.tensor([item[0] for item in items], dtype=torch.int64)
    return rows, torch.stack([item[1] for item in items]), [item[2] for item in items]


def make_loader(dataset: ImageDataset, rows: Sequence[int], batch_size: int, num_workers: int | None = None,
                pin_memory: bool = False, prefetch_factor: int = 4) -> DataLoader:
    """A torch DataLoader over the given manifest rows, in order.

    Returns batches ``(rows int64 (B,), images uint8 (B, 3, S, S), errors list[str])`` of tensors: the
    engine's batch contract (bad rows zero-filled with a non-empty reason).
    """
    from torch.utils.data import DataLoader

    workers = default_num_workers() if num_workers is None else num_workers
    return DataLoader(
        dataset, batch_size=batch_size, sampler=list(rows), num_workers=workers, collate_fn=_collate,
        pin_memory=pin_memory, prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
    )


_WORKER_READER: ImageReader | None = None  # the reader of a pool worker (set by _init_worker)

#: Seconds between checks that no pool worker died while the consumer waits for a batch.
WORKER_CHECK_SECONDS = 0.5


class DecodeWorkerDiedError(ExtractionError):
    """A worker process of :func:`iter_array_batches` died (killed by the OS or crashed in a codec).

    A :class:`~featcache.errors.UserError`: what the user can change (workers, batch size, the pixel limit) is
    in its message, and the CLI prints it without a traceback.
    """


def _init_worker(reader: ImageReader, started: Any) -> None:
    global _WORKER_READER
    # Ctrl-C reaches the whole process group: the consumer stops the pool (one line, exit 130), and a worker
    # interrupted in a decode would only print its own KeyboardInterrupt traceback (and die as if killed).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_READER = reader
    with started.get_lock():
        started.value += 1


def _read_batch(rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    assert _WORKER_READER is not None, "the pool initializer did not run"
    return _WORKER_READER.read_batch(rows)


def iter_array_batches(reader: ImageReader, rows: Sequence[int], batch_size: int, num_workers: int | None = None,
                       prefetch_factor: int = 4) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Batches of ``rows`` as numpy arrays, decoded by a process pool, in order; torch is not imported.

    At most ``num_workers * prefetch_factor`` batches are decoded ahead of the
    consumer. An exception in a worker (a bug, never a bad image: those come
    back as reasons) is raised here; closing the iterator early stops the pool.

    Parameters
    ----------
    reader : ImageReader
        The images and their preprocessing.
    rows : sequence of int
        Manifest rows to yield, in this order.
    batch_size : int
        Rows per batch (the last may be smaller).
    num_workers : int, optional
        Worker processes (default :func:`default_num_workers`); 0 reads in this process.
    prefetch_factor : int
        Batches in flight per worker.

    Yields
    ------
    rows : numpy.ndarray
        int64 (B,).
    images : numpy.ndarray
        uint8 (B, 3, S, S), zeros for bad rows.
    reasons : list of str
        ``""`` for good rows, why a bad row could not be decoded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    rows = [int(row) for row in rows]
    batches = (rows[start:start + batch_size] for start in range(0, len(rows), batch_size))
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers <= 0 or len(rows) <= batch_size:
        yield from map(reader.read_batch, batches)
        return
    # fork, like torch's DataLoader on Linux: the workers inherit the reader instead of unpickling it
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    # A pool replaces a worker that dies (the OOM killer, a crash in a codec) but the batch it held never
    # completes: the initializer counts the workers started, and a replacement means that batch is lost.
    started = context.Value("i", 0)
    with context.Pool(workers, initializer=_init_worker, initargs=(reader, started)) as pool:  # exit: terminate
        pending = collections.deque((batch, pool.apply_async(_read_batch, (batch,)))
                                    for batch in itertools.islice(batches, workers * prefetch_factor))
        while pending:
            batch, future = pending.popleft()
            result = _wait_for_batch(future, batch, started, workers)
            for batch in itertools.islice(batches, 1):
                pending.append((batch, pool.apply_async(_read_batch, (batch,))))
            yield result


def _wait_for_batch(future: multiprocessing.pool.AsyncResult, rows: list[int], started: Any,
                    workers: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The batch of ``future``; :class:`DecodeWorkerDiedError` once a worker has died instead of hanging."""
    while True:
        try:
            return future.get(timeout=WORKER_CHECK_SECONDS)
        except multiprocessing.TimeoutError:
            if started.value > workers:
                raise DecodeWorkerDiedError(
                    f"a decode worker process died while rows {rows[0]}..{rows[-1]} were being decoded "
                    "(killed by the operating system, most often for memory, or crashed in an image codec); "
                    "the blocks committed so far are kept. Hint: lower extract_run.num_workers or "
                    "extract_run.batch_size, or extract.max_image_pixels for very large images, then run again: "
                    "extraction resumes from the committed blocks.") from None
