"""The pieces of the extraction hot loop: batches, block assembly, overlapped forward, commits, progress.

:func:`featcache.extract.engine.run_blocks` strings them together::

    make_batches               the plan's loader: (rows, uint8 images, reasons) per batch
      -> BatchForward.launch   normalise on the runner's device, forward (async on CUDA),
                               copy the pooled features out on a side stream into pinned buffers
      -> BlockAssembler.add    slice the batch's rows into preallocated per-block arrays (masks, no
                               per-row Python except for the rare bad rows)
      -> CommitQueue.submit    finished blocks go to the store: inline on CPU, or one writer thread
                               with a bounded queue on CUDA (its errors propagate to the loop)
      -> Progress              a log line per committed block (rows done/total, img/s, ETA)

On CUDA the forward of batch k+1 is launched before batch k's features are
waited for, so the device-to-host copy and the block commit of batch k run
while the device computes batch k+1. On CPU everything is synchronous: the
forward is the bottleneck and threads would only compete for the cores.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from featcache.extract.decode.loaders import Batch, ImageDataset, ImageReader, iter_array_batches, make_loader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.inputs.storage import is_transient_reason
from featcache.extract.plan import LOADERS
from featcache.store.errors import StoreError

if TYPE_CHECKING:  # torch is imported only for runners whose input device is not the CPU
    import torch

    from featcache.store.writer import StoreWriter

__all__ = ["BatchForward", "BlockAssembler", "CommitQueue", "FinishedBlock", "Progress", "format_eta", "make_batches",
           "reopen_transient_blocks"]

logger = logging.getLogger("featcache.extract.engine")


# ----------------------------------------------------------------- assembly
@dataclass
class FinishedBlock:
    """One complete block, ready for ``sink.commit_block``.

    Attributes
    ----------
    block : int
        Block index.
    kept_rows : ndarray of int64, (M,)
        Extracted rows, ascending.
    features : dict of str to ndarray, each (M, D)
        Features of ``kept_rows``.
    errors : list of (id, reason), (E,)
        Skipped rows, in row order; ``M + E`` is the block size.
    """

    block: int
    kept_rows: np.ndarray
    features: dict[str, np.ndarray]
    errors: list[tuple[str, str]]


@dataclass
class _Buffer:
    start: int
    size: int
    features: dict[str, np.ndarray]
    good: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)
    done: int = 0


class BlockAssembler:
    """Collect batch outputs into preallocated per-block arrays; hand out each block when complete.

    Parameters
    ----------
    block_rows : int
        Rows per block (row ``r`` belongs to block ``r // block_rows``).
    n_rows : int
        N (the last block may be short).
    dims : mapping of str to int
        Layer alias -> feature dimension D, in store order.
    ids : sequence of str, (N,)
        Row ids (for the error table).
    """

    def __init__(self, block_rows: int, n_rows: int, dims: Mapping[str, int], ids: Sequence[str]) -> None:
        self.block_rows, self.n_rows = int(block_rows), int(n_rows)
        self.dims = dict(dims)
        self.ids = ids
        self._buffers: dict[int, _Buffer] = {}

    def _buffer(self, block: int) -> _Buffer:
        buffer = self._buffers.get(block)
        if buffer is None:
            start = block * self.block_rows
            size = min(self.block_rows, self.n_rows - start)
            buffer = _Buffer(start, size, {name: np.empty((size, dim), dtype=np.float32)
                                           for name, dim in self.dims.items()}, np.zeros(size, dtype=bool))
            self._buffers[block] = buffer
        return buffer

    def add(self, rows: np.ndarray, good: np.ndarray, features: Mapping[str, np.ndarray],
            reasons: Sequence[str]) -> list[FinishedBlock]:
        """Place one batch; return the blocks it completed.

        Parameters
        ----------
        rows : ndarray of int64, (B,)
            Absolute rows of the batch, each seen once over the whole run.
        good : ndarray of bool, (B,)
            Which rows decoded.
        features : mapping of str to ndarray, each (G, D)
            Features of the good rows, in batch order (G = ``good.sum()``).
        reasons : sequence of str, (B,)
            Why each bad row is bad ("" for good rows).
        """
        if good.any():
            self._check(features, int(good.sum()))
        finished = []
        good_position = np.cumsum(good) - 1  # index into `features` of each good row
        block_of = rows // self.block_rows
        for block in np.unique(block_of).tolist():
            in_block = np.flatnonzero(block_of == block)
            buffer = self._buffer(block)
            offsets = rows[in_block] - buffer.start
            is_good = good[in_block]
            if is_good.any():
                source = good_position[in_block[is_good]]
                for name, array in features.items():
                    buffer.features[name][offsets[is_good]] = array[source]
                buffer.good[offsets[is_good]] = True
            for index in in_block[~is_good].tolist():  # bad rows only: rare
                buffer.reasons[int(rows[index]) - buffer.start] = reasons[index]
            buffer.done += in_block.size
            if buffer.done == buffer.size:
                finished.append(self._finish(block, self._buffers.pop(block)))
        return finished

    def _check(self, features: Mapping[str, np.ndarray], n_good: int) -> None:
        """The runner's outputs must be the store's layers: (G, D) each."""
        if set(features) != set(self.dims):
            raise StoreError(f"the runner returned layers {sorted(features)}, but the store has {sorted(self.dims)}")
        for name, array in features.items():
            if array.shape != (n_good, self.dims[name]):
                raise StoreError(f"layer {name!r}: the runner returned shape {tuple(array.shape)} for {n_good} "
                                 f"images, but the store's layer has dim {self.dims[name]}")

    def _finish(self, block: int, buffer: _Buffer) -> FinishedBlock:
        kept = np.flatnonzero(buffer.good)
        features = {name: array[kept] for name, array in buffer.features.items()}
        errors = [(self.ids[buffer.start + offset], buffer.reasons[offset]) for offset in sorted(buffer.reasons)]
        return FinishedBlock(block, kept.astype(np.int64) + buffer.start, features, errors)


# ------------------------------------------------------------------ forward
class _Ready:
    """Features computed synchronously (CPU, ONNX)."""

    def __init__(self, features: dict[str, np.ndarray]) -> None:
        self.features = features

    def wait(self) -> dict[str, np.ndarray]:
        return self.features


class _InFlight:
    """Features being copied out of the device: wait on the copy's event, then read the pinned buffers."""

    def __init__(self, host: dict[str, torch.Tensor], event: Any, keep: tuple[Any, ...]) -> None:
        self.host, self.event, self.keep = host, event, keep

    def wait(self) -> dict[str, np.ndarray]:
        self.event.synchronize()
        self.keep = ()  # device tensors may be freed now: their copy is done
        return {name: tensor.numpy() for name, tensor in self.host.items()}


class BatchForward:
    """Normalise and run one batch where the runner lives; asynchronous on CUDA torch runners.

    Parameters
    ----------
    runner : FeatureRunner
        ``runner(batch) -> {layer: (B, D) ndarray}``; a torch runner on CUDA
        also has ``forward_pooled(batch) -> {layer: (B, D) device tensor}``.
    normalize : callable
        uint8 (B, 3, S, S) on the runner's device -> float32 input
        (:meth:`~featcache.extract.decode.preprocess.Preprocessor.normalize_batch`).
    overlap : bool
        False: never asynchronous (each launch returns finished features).

    Attributes
    ----------
    device : torch.device or str
        Where batches are normalised (the runner's ``input_device``, else ``"cpu"``).
    on_cpu : bool
        The runner takes its input on the CPU: it accepts numpy batches (no torch needed).
    asynchronous : bool
        True on CUDA with a torch runner: :meth:`launch` returns before the
        forward is done and the features are copied out on a side stream.
    """

    def __init__(self, runner: Any, normalize: Callable[[Any], Any], overlap: bool = True) -> None:
        self.runner, self.normalize = runner, normalize
        device = getattr(runner, "input_device", "cpu")
        self.on_cpu = str(device) == "cpu"
        self.device: Any = "cpu"
        self.asynchronous = False
        self._slots: list[dict[str, torch.Tensor]] = [{}, {}]  # pinned double buffer
        self._launches = 0
        self._stream = None
        if not self.on_cpu:
            import torch

            self.device = torch.device(device)
            pooled = callable(getattr(runner, "forward_pooled", None))
            self.asynchronous = overlap and self.device.type == "cuda" and pooled
            self._stream = torch.cuda.Stream(self.device) if self.asynchronous else None

    def launch(self, images: torch.Tensor | np.ndarray, good: np.ndarray) -> _Ready | _InFlight:
        """Start the forward of the good rows of ``images`` (uint8 (B, 3, S, S), CPU or device).

        Returns
        -------
        handle
            ``handle.wait()`` -> ``{layer: (G, D) float32 ndarray}`` of the good rows. On CUDA
            the arrays view pinned buffers that the launch after next reuses: copy them first.
        """
        if isinstance(images, np.ndarray):  # the array loader: CPU runners, no torch
            if not self.on_cpu:
                raise TypeError("numpy batches are for runners that take their input on the CPU; this runner "
                                f"takes it on {self.device}. Hint: use the torch DataLoader (make_loader).")
            return _Ready(self.runner(self.normalize(images if good.all() else images[good])))
        import torch

        source = images
        images = images.to(self.device, non_blocking=True)
        if not good.all():
            images = images[torch.from_numpy(np.flatnonzero(good)).to(self.device)]
        batch = self.normalize(images)
        if not self.asynchronous:
            return _Ready(self.runner(batch))
        outputs = self.runner.forward_pooled(batch)
        slot = self._slots[self._launches % 2]
        self._launches += 1
        stream = self._stream
        assert stream is not None
        stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(stream):
            for name, value in outputs.items():
                pinned = slot.get(name)
                if pinned is None or pinned.shape[0] < value.shape[0] or pinned.shape[1:] != value.shape[1:]:
                    pinned = slot[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                host[name] = pinned[: value.shape[0]]
                host[name].copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return _InFlight(host, event, keep=(outputs, batch, images, source))


# ------------------------------------------------------------------ commits
class CommitQueue:
    """Commit finished blocks inline, or in one writer thread behind a bounded queue.

    An exception in the writer thread stops it and is raised by the next
    :meth:`submit` or by :meth:`close`; blocks queued before it stay uncommitted
    (a rerun extracts them again).

    Parameters
    ----------
    commit : callable
        ``commit(finished_block)``; runs in the writer thread when ``threaded``.
    threaded : bool
        Use a writer thread (CUDA: the commit of batch k overlaps the forward of k+1).
    max_pending : int
        Blocks waiting at most; :meth:`submit` blocks beyond that (bounded memory).
    """

    _STOP = object()

    def __init__(self, commit: Callable[[FinishedBlock], None], threaded: bool, max_pending: int = 2) -> None:
        self.commit, self.threaded = commit, threaded
        self.error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._work, name="featcache-block-writer", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self.error is None:
                try:
                    self.commit(item)
                except BaseException as error:  # noqa: BLE001 - handed to the loop's thread
                    self.error = error

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def submit(self, finished: FinishedBlock) -> None:
        """Commit ``finished`` (or queue it); raise a writer error from an earlier block."""
        if not self.threaded:
            self.commit(finished)
            return
        self._raise()
        self._queue.put(finished)

    def close(self) -> None:
        """Finish the queued commits and stop the thread; raise its error if there was one."""
        if self._thread is not None:
            self._queue.put(self._STOP)
            self._thread.join()
            self._thread = None
        self._raise()


# ----------------------------------------------------------------- progress
def format_eta(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` style duration ("?" when unknown)."""
    if not np.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress that reads well in a log (``dvc repro``) and, on a terminal, as a bar.

    A log line per committed block (at most one every ``interval`` seconds,
    and always the last one): ``extract NAME: 1,024/50,000 rows (2.0%),
    812.3 img/s, ETA 1:00``. The tqdm bar is shown only when stderr is a
    terminal.

    Parameters
    ----------
    label : str
        What is extracted (the store's file name).
    total : int
        Rows this run extracts.
    enabled : bool
        False: no log lines and no bar.
    interval : float
        Seconds between two log lines.
    """

    def __init__(self, label: str, total: int, enabled: bool, interval: float = 5.0) -> None:
        import sys

        self.label, self.total, self.enabled, self.interval = label, int(total), enabled, interval
        self.done = 0
        self.started = time.perf_counter()
        self._last_line = -float("inf")
        self._lock = threading.Lock()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=f"extract {label}", unit="img", mininterval=1.0)

    def batch_done(self, n_rows: int) -> None:
        """Advance the bar (main thread)."""
        if self._bar is not None:
            self._bar.update(n_rows)

    def block_committed(self, n_rows: int) -> None:
        """Count a committed block's rows; log a line (any thread)."""
        with self._lock:
            self.done += n_rows
            now = time.perf_counter()
            last = self.done >= self.total
            if not self.enabled or (now - self._last_line < self.interval and not last):
                return
            self._last_line = now
            elapsed = now - self.started
            rate = self.done / elapsed if elapsed > 0 else float("nan")
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            logger.info("extract %s: %s/%s rows (%.1f%%), %.1f img/s, ETA %s", self.label, f"{self.done:,}",
                        f"{self.total:,}", 100.0 * self.done / max(1, self.total), rate, format_eta(eta))

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_batches(loader: str, manifest: Manifest, rows: Sequence[int], preprocess: Preprocessor, *,
                 batch_size: int, num_workers: int | None = None, device: str = "cpu",
                 dataset: ImageReader | None = None, background: bool | None = None,
                 stats: Any = None) -> Iterable[Batch]:
    """The batches of ``rows`` that a plan's ``loader`` gives (the batch contract of ``run_blocks``).

    Parameters
    ----------
    loader : {"arrays", "torch", "device"}
        ``arrays``: PIL in a process pool, numpy uint8 batches (torch not
        imported); ``torch``: DataLoader workers, pinned CPU tensors for the copy
        to ``device``; ``device``: JPEGs read by workers and decoded in batches on
        ``device`` (:func:`~featcache.extract.decode.device.iter_device_batches`).
    manifest : Manifest
        All N rows.
    rows : sequence of int
        The rows to load.
    preprocess : Preprocessor
        Decode, resize and crop settings.
    batch_size, num_workers
        Rows per batch; decode worker processes (None: one per spare core).
    device : str
        Where the runner takes its input (the ``device`` loader decodes there).
    dataset : ImageReader, optional
        The images (default: a new reader over ``manifest``).
    background : bool, optional
        ``device`` loader: decode in a thread ahead of the caller (default: on CUDA).
    stats : DecodeStats, optional
        ``device`` loader: filled with where the rows were decoded.
    """
    if loader not in LOADERS:
        raise ValueError(f"loader {loader!r} is not one of {LOADERS}.")
    if loader == "device":
        from featcache.extract.decode.device import iter_device_batches

        return iter_device_batches(manifest, rows, preprocess=preprocess, device=device, batch_size=batch_size,
                                   num_workers=num_workers, background=background, stats=stats)
    if loader == "arrays":
        reader = dataset if dataset is not None else ImageReader(manifest, preprocess)
        return iter_array_batches(reader, rows, batch_size, num_workers)
    # A reader keeps its shard members and storage options (rebuilt from its paths, a member would read its whole .tar).
    dataset = dataset.as_dataset() if dataset is not None else ImageDataset(manifest, preprocess)
    return make_loader(dataset, rows, batch_size, num_workers, pin_memory=device.startswith("cuda"))


def reopen_transient_blocks(writer: StoreWriter) -> list[int]:
    """Make committed blocks pending again when a row of theirs failed a read for a transient cause.

    A server that was down or overloaded during an earlier run (``connection failed after 3 tries``,
    ``timeout ...``, ``HTTP 503 ...``) left those rows as bad images in committed blocks; a resume
    reads them again instead of keeping the outage in the store for good. Call before
    ``writer.pending_blocks()``.

    Returns
    -------
    list of int
        The reopened blocks.
    """
    blocks = writer.blocks_with_errors(is_transient_reason)
    for block in blocks:
        writer.discard_block(block)
    if blocks:
        logger.info("Reading %d committed blocks of %s again: rows of theirs failed with transient read errors "
                    "(timeouts, dropped connections, HTTP 5xx/429) in an earlier run", len(blocks), writer.path)
    return blocks
