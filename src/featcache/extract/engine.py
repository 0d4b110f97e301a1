"""Extraction engine: manifest + backbone + runner -> one HDF5 feature store.

Rows are decoded by worker processes into uint8 crops (decode overlaps the
forward pass), normalised where the runner takes its input, run through the backbone in
large batches, and committed to the store in row blocks. A crash loses at most
the blocks in flight: a rerun with the same config extracts only the blocks
that are missing (and those with an input file modified since their commit:
:mod:`~featcache.extract.freshness`).

Seams:

* **Loaders.** The :class:`~featcache.extract.plan.ExtractionPlan` names the
  loader and :func:`~featcache.extract.blockloop.make_batches` builds it: ``arrays`` (PIL in a process
  pool, numpy batches, torch not imported) for runners that take their input
  on the CPU, ``torch`` (DataLoader workers, pinned memory) for a runner on
  CUDA, ``device`` (JPEGs decoded in batches on the GPU). Any other decoder
  plugs in as a ``loader_factory(rows, batch_size)`` that follows the batch
  contract of :func:`run_blocks`.
* **Sharding.** :func:`run_blocks` commits to a ``StoreWriter`` or to its
  picklable ``BlockCommitter``; :func:`build_root_attrs` and
  :func:`~featcache.extract.report.build_report` give a sharded driver the same store and report.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

import featcache
from featcache.errors import ExtractionError
from featcache.extract.blockloop import (
    BatchForward,
    BlockAssembler,
    CommitQueue,
    FinishedBlock,
    Progress,
    make_batches,
    reopen_transient_blocks,
)
from featcache.extract.decode.loaders import Batch, ImageReader, LoaderFactory
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.freshness import reopen_changed_blocks
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.plan import ExtractionPlan
from featcache.extract.report import BadImageLog, ExtractionReport, build_report, log_resume
from featcache.store.schema import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLOCK_ROWS,
    DEFAULT_FEATURE_DTYPE,
    DEFAULT_MAX_BAD_FRACTION,
    ON_ERROR,
    SHARDS_ATTR,
    LayerSpec,
    canonical_json,
    sha256_text,
)
from featcache.store.writer import StoreWriter
from featcache.util.compute import torch_version

__all__ = ["BlockSink", "ExtractionReport",
           "FeatureRunner", "build_report", "build_root_attrs", "check_bad_rows", "check_max_bad_fraction",
           "check_on_error", "extract_to_store", "run_blocks"]

logger = logging.getLogger(__name__)


class FeatureRunner(Protocol):
    """What the engine needs from a backend (torch or ONNX)."""

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        """Normalised float32 (B, 3, S, S) batch (on the runner's ``input_device``, if any; numpy only for
        runners that take their input on the CPU) -> ``{alias: (B, D) array}`` for every layer."""

    def layer_specs(self, input_size: int | None = None) -> list[LayerSpec]:
        """The output layers (alias, node, dim, pooling, map shape) in store order, for inputs of side
        ``input_size`` (default: the backbone's)."""


def extract_to_store(
    manifest: Manifest,
    runner: FeatureRunner,
    preprocess: Preprocessor,
    out: str | Path,
    *,
    config: Mapping[str, Any],
    plan: ExtractionPlan | None = None,
    attrs: Mapping[str, Any] | None = None,
    dtype: str = DEFAULT_FEATURE_DTYPE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    on_error: str = "skip",
    progress: bool = True,
    lock_timeout: float = 0.0,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    loader_factory: LoaderFactory | None = None,
    overlap: bool | None = None,
) -> ExtractionReport:
    """Extract every manifest row with ``runner`` and write one feature store.

    Parameters
    ----------
    manifest : Manifest
        N images with ids, labels/targets and splits.
    runner : FeatureRunner
        Maps a normalised float32 (B, 3, S, S) batch to ``{layer: (B, D) array}``.
    preprocess : Preprocessor
        Geometry and normalisation of the runner's input: the default loaders resize/crop each image to uint8
        pixels (B, 3, S, S), which the engine normalises on the runner's input device with
        :meth:`~featcache.extract.decode.preprocess.Preprocessor.normalize_batch`; its ``input_size`` (S) is
        passed to ``runner.layer_specs``.
    out : path
        Final ``.h5`` path (written atomically).
    config : mapping
        Every extraction-relevant param; stored as canonical JSON with its
        sha256. A different config never resumes or appends to old blocks.
    plan : ExtractionPlan, optional
        The resolved choices of the run: its ``loader`` and ``num_workers``
        make the batches (:func:`~featcache.extract.blockloop.make_batches`). Default: the loader the
        runner's input device calls for, one decode worker per spare core.
    attrs : mapping, optional
        Extra root attributes (backbone, weights_id, backend, ...).
    dtype : {"float16", "float32"}
        Storage dtype of the features (``extract.dtype``).
    batch_size : int
        Images per forward of the backbone (and per loader batch).
    block_rows : int
        Rows per committed block: the unit of resume, and the largest HDF5
        chunk. A crash loses at most the blocks in flight.
    on_error : {"skip", "fail"}
        Bad images are reported by id and reason; ``skip`` drops their rows,
        ``fail`` stops before the final file is written.
    progress : bool
        Log a line per committed block (at most one every few seconds), and a bar when stderr is a terminal.
    lock_timeout : float
        Seconds to wait for another writer of ``out`` to let go of its lock;
        ``0`` fails at once with :class:`~featcache.store.errors.StoreLockedError`.
    max_bad_fraction : float
        With ``skip``: if every row, or more than this fraction of them, is a bad image, fail naming the first
        reasons instead of writing the final file (see :func:`check_bad_rows`).
    loader_factory : callable, optional
        ``loader_factory(rows, batch_size)`` -> batches of the rows to extract, following the batch contract of
        :func:`run_blocks`: the seam for a decoder of your own, used instead of the plan's loader.
    overlap : bool, optional
        Overlap decode, forward, copy-out and commits (see :func:`run_blocks`); default: on CUDA.

    Returns
    -------
    ExtractionReport
        With ``decode_stats`` when the plan's ``device`` loader decoded the rows.

    Raises
    ------
    ValueError
        For an invalid ``on_error`` or ``max_bad_fraction``.
    ExtractionError
        At the first bad image with ``on_error="fail"``, or for too many bad rows (:func:`check_bad_rows`).
    StoreLockedError
        If another process still writes ``out`` after ``lock_timeout``.
    """
    check_on_error(on_error)
    check_max_bad_fraction(max_bad_fraction)
    started = time.perf_counter()
    root_attrs = build_root_attrs(manifest, config, attrs)
    if getattr(runner, "onnx_sha256", None):  # the ONNX file that made the features (as the dask path records it)
        root_attrs.setdefault("onnx_sha256", runner.onnx_sha256)
    layer_specs = runner.layer_specs(preprocess.input_size)
    with StoreWriter(out, ids=manifest.ids, splits=manifest.splits, classes=manifest.classes,
                     labels=manifest.labels, targets=manifest.targets, layers=layer_specs, attrs=root_attrs,
                     dtype=dtype, block_rows=block_rows, lock_timeout=lock_timeout) as writer:
        reopen_transient_blocks(writer)
        reopen_changed_blocks(writer, manifest)
        pending = writer.pending_blocks()
        n_resumed = writer.n_blocks - len(pending)
        rows = [row for block in pending for row in writer.block_range(block)]
        if n_resumed:
            log_resume(out, n_resumed, writer.n_blocks, len(rows), len(manifest))
        batches = loader_factory(rows, batch_size) if loader_factory is not None and rows else None
        stats = None
        if batches is None and plan is not None and plan.loader == "device":
            from featcache.extract.decode.device import DecodeStats

            stats = DecodeStats()
        run_blocks(manifest, runner, writer, pending, preprocess=preprocess, layer_specs=layer_specs,
                   batch_size=batch_size, num_workers=plan.num_workers if plan else None,
                   loader=plan.loader if plan else None, on_error=on_error, progress=progress,
                   label=Path(out).name, batches=batches, overlap=overlap, decode_stats=stats)
        check_bad_rows(writer.committed_errors(), len(manifest), max_bad_fraction, out)
        path = writer.finalize()
    return build_report(path, manifest, n_extracted=len(rows), n_resumed_blocks=n_resumed,
                        seconds=time.perf_counter() - started, decode_stats=stats)


def check_on_error(on_error: str) -> None:
    """Raise ValueError unless ``on_error`` is ``"skip"`` or ``"fail"``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error {on_error!r} is not one of {ON_ERROR}. Hint: 'skip' reports bad images and "
                         "goes on, 'fail' stops at the first one.")


def check_max_bad_fraction(max_bad_fraction: float) -> None:
    """Raise ValueError unless ``0 <= max_bad_fraction <= 1``."""
    if isinstance(max_bad_fraction, bool) or not isinstance(max_bad_fraction, (int, float)) \
            or not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction {max_bad_fraction!r} must be a number in [0, 1] "
                         f"(default {DEFAULT_MAX_BAD_FRACTION}).")


def check_bad_rows(errors: Sequence[tuple[str, str]], n_input: int, max_bad_fraction: float,
                   out: str | Path) -> None:
    """Refuse a store that is all (or mostly) bad images: that is a broken input, not a dataset.

    Parameters
    ----------
    errors : sequence of (id, reason)
        Every skipped row of the store (resumed blocks included), in row order.
    n_input : int
        N, the manifest rows.
    max_bad_fraction : float
        Largest allowed ``len(errors) / n_input``; all rows bad fails even at 1.
    out : path
        The store (named in the message).

    Raises
    ------
    ExtractionError
        Naming the count, the limit and the first reasons. Committed blocks
        are kept, so a rerun with a higher ``extract_run.max_bad_fraction``
        finalizes without extracting again.
    """
    n_bad = len(errors)
    if n_bad == 0 or (n_bad < n_input and n_bad / n_input <= max_bad_fraction):  # not * n_input: 0.29 * 100 < 29
        return
    first = "; ".join(f"{id_}: {reason}" for id_, reason in errors[:5])
    what = "every row" if n_bad >= n_input else f"more than extract_run.max_bad_fraction={max_bad_fraction:g} of rows"
    raise ExtractionError(
        f"{n_bad} of {n_input} images ({n_bad / max(1, n_input):.0%}) could not be decoded for {Path(out).name}: "
        f"{what}. First reasons: {first}. The final file was not written (the committed blocks are kept). "
        "Hint: check data.path and the image files (a rerun reads rows a server failed, timeouts or HTTP 5xx, again); "
        "if so many bad images are expected, raise extract_run.max_bad_fraction and rerun (nothing else is extracted)."
    )


def build_root_attrs(manifest: Manifest, config: Mapping[str, Any],
                     attrs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Root attributes of a store extracted from ``manifest`` with ``config``.

    Parameters
    ----------
    manifest : Manifest
        The N rows (its sha256 is stored).
    config : mapping
        Every extraction-relevant param; stored as canonical JSON with its sha256.
    attrs : mapping, optional
        Extra root attributes (backbone, weights_id, backend, provider, ...);
        they win over the computed ones.

    Returns
    -------
    dict
        ``config``, ``config_sha256``, ``manifest_sha256``, ``featcache_version``,
        ``torch_version``, ``python_version`` and ``attrs``; for a manifest of
        WebDataset shards also ``shards`` (JSON: each shard's path, sha256, size, samples).
    """
    config_json = canonical_json(config)
    shards = {} if manifest.shards is None else {SHARDS_ATTR: canonical_json({"shards": [
        {key: shard[key] for key in ("path", "sha256", "size", "n_samples")} for shard in manifest.shards]})}
    return {
        "config": config_json,
        "config_sha256": sha256_text(config_json),
        "manifest_sha256": manifest.sha256(),
        **shards,
        "featcache_version": featcache.__version__,
        "torch_version": torch_version(),
        "python_version": platform.python_version(),
        **dict(attrs or {}),
    }


class BlockSink(Protocol):
    """Where :func:`run_blocks` commits finished blocks: a ``StoreWriter`` or its ``BlockCommitter``."""

    block_rows: int
    n_rows: int

    def block_range(self, block: int) -> range:
        """Rows ``[block * block_rows, min((block + 1) * block_rows, n_rows))``."""

    def commit_block(self, block: int, kept_rows: np.ndarray, features: Mapping[str, np.ndarray],
                     errors: Sequence[tuple[str, str]] = ()) -> Any:
        """Commit one block atomically (the arguments of ``StoreWriter.commit_block``; the result is ignored).

        ``kept_rows``: int64 (M,) rows extracted; ``features``: ``{alias: (M, D)}`` in ``kept_rows`` order;
        ``errors``: the block's E bad images as ``(id, reason)``, ``M + E`` the block size.
        """


def run_blocks(manifest: Manifest, runner: FeatureRunner, sink: BlockSink, blocks: Sequence[int], *,
               preprocess: Preprocessor, layer_specs: Sequence[LayerSpec], batch_size: int = DEFAULT_BATCH_SIZE,
               num_workers: int | None = None, loader: str | None = None, on_error: str = "skip",
               progress: bool = False, label: str = "", dataset: ImageReader | None = None,
               batches: Iterable[Batch] | None = None, overlap: bool | None = None,
               decode_stats: Any = None) -> list[tuple[str, str]]:
    """Extract the rows of ``blocks`` and commit each block to ``sink`` as soon as it is complete.

    The loop shared by :func:`extract_to_store` and the dask workers of
    :mod:`featcache.extract.distributed` (see :mod:`featcache.extract.blockloop`
    for its pieces). Batches of uint8 pixels are normalised on the runner's
    device, only their good rows go through the runner, and each batch's
    features are sliced into preallocated per-block arrays; bad rows are
    tracked by masks. On CUDA (a torch runner) the forward of batch k+1
    overlaps the copy-out and the commit of batch k (pinned buffers, a side
    stream, one writer thread behind a bounded queue).

    **Batch contract** (the seam for other decoders, e.g. a GPU JPEG decoder):
    ``batches`` yields ``(rows, images, reasons)`` with ``rows`` torch.int64
    (B,), ``images`` torch.uint8 (B, 3, S, S) on the CPU (pinned or not) or
    already on the runner's device, ``reasons`` a list of B strings, empty for
    a good row; a bad row's pixels are zeros and its reason non-empty. The
    rows are exactly those of ``blocks``, each once, in any order (the same
    order as the default loader keeps batches, and so features, identical).

    Parameters
    ----------
    manifest : Manifest
        All N rows (ids for the error table).
    runner : FeatureRunner
        Normalised batch -> ``{layer: (B, D)}``; its ``input_device`` (if
        any) is where batches are normalised.
    sink : BlockSink
        ``StoreWriter`` (one process) or ``BlockCommitter`` (a worker).
    blocks : sequence of int
        Block indices to extract, ascending.
    preprocess : Preprocessor
        Pixels (the default loader) and :meth:`~Preprocessor.normalize_batch`.
    layer_specs : sequence of LayerSpec
        The runner's layers, in store order.
    batch_size, num_workers
        Loader settings (``num_workers=None``: one decode worker per spare core).
    loader : {"arrays", "torch", "device"}, optional
        The plan's loader (:func:`~featcache.extract.blockloop.make_batches`); default: ``arrays`` when the
        runner takes its input on the CPU, else ``torch``.
    on_error : {"skip", "fail"}
        ``fail`` raises :class:`ExtractionError` at the first bad image
        (blocks completed before it are committed).
    progress : bool
        Log a line per committed block (and a bar on a terminal), labelled ``label``.
    label : str
        What the progress lines and bar name (:func:`extract_to_store` passes the store's file name).
    dataset : ImageReader, optional
        The loader's images (default: a new reader over ``manifest``).
    batches : iterable of Batch, optional
        Use these batches instead of the plan's loader (see the contract); a
        generator is closed when the loop ends.
    overlap : bool, optional
        Overlap the stages: the device loader decodes in a thread on its own
        stream, the forward's features are copied out on a side stream while
        the next batch runs, blocks are committed in a writer thread. Default:
        on CUDA only. ``False`` runs every step in order on the calling thread
        (the reference the GPU tests hold the overlapped loop to, byte for byte).
    decode_stats : DecodeStats, optional
        Filled by the ``device`` loader with where the rows were decoded.

    Returns
    -------
    list of (id, reason)
        The bad images of this run, in row order.
    """
    check_on_error(on_error)
    rows = np.fromiter((row for block in blocks for row in sink.block_range(block)), dtype=np.int64)
    if rows.size == 0:
        return []
    forward = BatchForward(runner, preprocess.normalize_batch, overlap=overlap is not False)
    overlapped = forward.asynchronous if overlap is None else overlap
    if batches is None:
        batches = make_batches(loader or ("arrays" if forward.on_cpu else "torch"), manifest, rows.tolist(),
                               preprocess, batch_size=batch_size, num_workers=num_workers,
                               device=str(forward.device), dataset=dataset,
                               background=None if overlap is None else overlap, stats=decode_stats)
    assembler = BlockAssembler(sink.block_rows, sink.n_rows, {spec.alias: spec.dim for spec in layer_specs},
                               manifest.ids)
    meter = Progress(label, rows.size, progress)
    errors: list[tuple[str, str]] = []
    bad_log = BadImageLog()

    def commit(finished: FinishedBlock) -> None:
        sink.commit_block(finished.block, finished.kept_rows, finished.features, errors=finished.errors)
        meter.block_committed(finished.kept_rows.size + len(finished.errors))

    commits = CommitQueue(commit, threaded=overlapped)
    in_flight: tuple[np.ndarray, np.ndarray, list[str], Any] | None = None

    def finish() -> None:  # place the batch in flight; commit the blocks it completes
        nonlocal in_flight
        if in_flight is not None:
            batch_rows, good, reasons, handle = in_flight
            in_flight = None
            features = handle.wait() if handle is not None else {}
            for finished in assembler.add(batch_rows, good, features, reasons):
                commits.submit(finished)

    try:
        for batch_rows, images, reasons in batches:
            batch_rows = np.asarray(batch_rows)  # numpy, or a CPU tensor of the torch loaders
            good = np.fromiter((not reason for reason in reasons), dtype=bool, count=len(reasons))
            if not good.all():
                _report_bad(manifest, batch_rows, good, reasons, errors, on_error, bad_log)
            handle = forward.launch(images, good) if good.any() else None
            finish()  # on CUDA: the previous batch, while this one runs on the device
            in_flight = (batch_rows.astype(np.int64, copy=False), good, list(reasons), handle)
            if not forward.asynchronous:
                finish()
            meter.batch_done(len(reasons))
        finish()
    except BaseException:
        try:  # blocks completed before the failure are committed: nothing done is lost
            finish()
            commits.close()
        except BaseException as secondary:  # noqa: BLE001 - the first error is the one to report
            logger.warning("while stopping after an error, committing failed too: %s: %s",
                           type(secondary).__name__, secondary)
        raise
    else:
        commits.close()
    finally:
        meter.close()
        close = getattr(batches, "close", None)
        if callable(close):  # a generator loader (process pool, decode thread) stops now, not when collected
            close()
    return errors


def _report_bad(manifest: Manifest, rows: np.ndarray, good: np.ndarray, reasons: Sequence[str],
                errors: list[tuple[str, str]], on_error: str, bad_log: BadImageLog) -> None:
    """Log the bad rows of a batch (to ``bad_log``), add them to ``errors``; raise at the first one with ``fail``."""
    for index in np.flatnonzero(~good).tolist():
        row = int(rows[index])
        # Where the user can find it: the absolute path (or URL), with ``:member`` for a shard row.
        where = manifest.describe(row) if manifest.members is not None else manifest.location(row)
        bad_log("Bad image %s (%s): %s", manifest.ids[row], where, reasons[index])
        if on_error == "fail":
            raise ExtractionError(
                f"Bad image {manifest.ids[row]!r} ({where}): {reasons[index]}. "
                "Nothing was written to the final file. Hint: fix or remove it, or set "
                "extract.on_error: skip to skip and report bad images."
            )
        errors.append((manifest.ids[row], reasons[index]))
