"""Sharded extraction on a dask.distributed cluster: distribute row BLOCKS.

A feature store is assembled from per-block files (see
:mod:`featcache.store.blocks`), so sharding an extraction means handing
pending blocks to workers:

1. the driver opens the :class:`~featcache.store.writer.StoreWriter` (it holds
   the output lock and knows which blocks are still pending);
2. pending blocks are grouped into tasks; each task runs on a worker, which
   builds the backbone once per worker process (from a picklable
   :class:`~featcache.extract.runner_spec.RunnerSpec`, never a model object;
   :mod:`featcache.extract.dask_tasks` is the worker side), streams the task's rows through
   exactly the loop of :func:`~featcache.extract.engine.extract_to_store`
   (:func:`~featcache.extract.engine.run_blocks`) and commits each block into
   the SAME parts directory with the writer's picklable
   :meth:`~featcache.store.writer.StoreWriter.block_committer`;
3. the driver adopts every block a worker reports
   (:meth:`~featcache.store.writer.StoreWriter.adopt_block` checks the file)
   and calls :meth:`~featcache.store.writer.StoreWriter.finalize`.

The final HDF5 file is byte-identical to a single-process
:func:`~featcache.extract.engine.extract_to_store` run with the same inputs:
block files carry the same kept rows, features, errors and fingerprint, and
tasks are cut at batch boundaries of the single-process run
(:func:`~featcache.extract.dask_tasks.plan_tasks`), so every image goes
through the backbone in the same batch as it would in one process (CPU
convolutions are not batch-size invariant: a batch of 1 takes another kernel
path). The workers report what
they built (an ONNX runner's ``onnx_sha256``, the same root attribute a
single-process run records; every task must report the same one). Workers run
``threads_per_worker`` intra-op threads, a single process one per core:
onnxruntime's features do not depend on that count
(``tests/extract/onnx/test_threads.py``); torch's CPU kernels do, so the
extract stage records ``torch_threads`` in a torch-on-CPU store's config (a
dask run and a single process then differ in that key and never share
blocks). A failed or interrupted run keeps its committed blocks;
rerunning (distributed or not) extracts only the missing ones. Dask cannot
stop a task a worker is executing (a cancelled one runs to its end and may
still commit its block), so a failed run releases the output only once no
task of it executes anywhere (up to ``STOP_TIMEOUT_S``).

With ``loader="device"`` (``extract.decode: gpu``) every worker decodes its
JPEGs in batches on its own device
(:func:`~featcache.extract.decode.device.iter_device_batches`): a pool of
threads in the worker reads the files and probes the headers (a dask worker
process cannot start loader processes), and the decode runs in a thread on
its own CUDA stream ahead of the forward. Several workers may share one GPU
(``n_workers`` above the GPU count): each brings its own host threads, so the
per-image Python of one worker runs while another's batches are on the GPU.
The workers report where their rows were decoded
(:class:`~featcache.extract.decode.device.DecodeStats`); the driver logs the
sum.

A worker running onnxruntime never imports torch (like a single-process ONNX
run): this module, :mod:`featcache.extract.dask_tasks` and
:mod:`featcache.extract.runner_spec` import it only for a torch runner or a
CUDA device.

Requirements: the workers must see the images, and the output's parent
folder, under the same absolute paths as the driver (one machine, or a shared
file system). Relative paths are made absolute on the driver.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from featcache.errors import ExtractionError
from featcache.extract.blockloop import Progress, reopen_transient_blocks
from featcache.extract.dask_tasks import TaskResult, WorkerJob, extract_task, plan_tasks, probe_task
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import (
    ExtractionReport,
    build_report,
    build_root_attrs,
    check_bad_rows,
    check_max_bad_fraction,
    check_on_error,
)
from featcache.extract.freshness import reopen_changed_blocks
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.plan import LOADERS
from featcache.extract.report import BadImageLog, log_resume
from featcache.extract.runner_spec import RunnerSpec
from featcache.store.errors import StoreError
from featcache.store.schema import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLOCK_ROWS,
    DEFAULT_FEATURE_DTYPE,
    DEFAULT_MAX_BAD_FRACTION,
)
from featcache.store.writer import StoreWriter
from featcache.util.dask_client import ClientHandle

__all__ = ["THREADS_PER_WORKER", "extract_distributed"]

logger = logging.getLogger(__name__)

#: Default intra-op threads of each worker (torch and onnxruntime): one worker process per core.
THREADS_PER_WORKER = 1

#: After a failure, how long the driver waits for tasks the workers are still
#: executing (dask cannot interrupt them) before it releases the output.
STOP_TIMEOUT_S = 120.0


# ------------------------------------------------------------- driver side
def _adopt_blocks(writer: StoreWriter, blocks: Sequence[int], where: str) -> None:
    """Count the blocks a worker committed as committed in ``writer`` (each file is checked)."""
    for block in blocks:
        try:
            writer.adopt_block(block)
        except StoreError as exc:
            raise ExtractionError(
                f"Worker {where} reported block {block} committed, but the driver cannot use it: {exc} "
                "The driver and the workers must share the output folder under the same absolute path "
                "(one machine or a shared file system)."
            ) from exc


def _check_onnx_sha256(expected: str | None, found: str, where: str) -> None:
    """Every worker must run the same ONNX file (another export could give other features)."""
    if expected != found:
        raise ExtractionError(
            f"Worker {where} runs the ONNX export {found[:12]}, but the store records {str(expected)[:12]}: "
            "the workers' export caches hold different exports (another torch/onnx version exported them?), "
            "and the features would mix two graphs. Hint: point extract_run.onnx_cache at one folder every worker "
            "sees, or give the workers the same torch/onnx versions; committed blocks are kept."
        )


def _raise_task_failure(future: Any, blocks: tuple[int, ...], writer: StoreWriter) -> None:
    """Re-raise a failed task's error; wrap anything that is not an ExtractionError."""
    try:
        exc = future.exception()
    except BaseException as cancelled:  # noqa: BLE001 - CancelledError and friends: reported as the task's error
        exc = cancelled
    if isinstance(exc, ExtractionError):
        raise exc
    committed = writer.n_blocks - len(writer.pending_blocks())
    if exc is None or "CancelledError" in (cls.__name__ for cls in type(exc).__mro__):
        # Cancelled by the scheduler, without a reason: 'NoneType: None' told the user nothing.
        why = (f"dask cancelled it (status {future.status!r}): most often every worker that held the job, scattered "
               "to each worker at the start, died or left (the out-of-memory killer, a preempted machine), and dask "
               "cannot recompute scattered data; the scheduler's log says which")
    else:
        why = f"{type(exc).__name__}: {exc}"
    raise ExtractionError(
        f"Distributed extraction of {writer.path} failed in the task for blocks "
        f"{blocks[0]}..{blocks[-1]}: {why}. At least {committed} of {writer.n_blocks} blocks are "
        f"committed in {writer.parts_dir} and are kept; rerun to resume (only missing blocks are extracted)."
    ) from exc


def _run_tasks(client: Any, job: WorkerJob, tasks: list[tuple[int, ...]], writer: StoreWriter,
               progress: bool) -> Iterator[TaskResult]:
    """Submit one future per task; yield results as they complete, adopting their blocks."""
    from distributed import as_completed

    token = uuid.uuid4().hex[:12]
    job_future = client.scatter(job, broadcast=True, hash=False)
    futures = {}
    try:
        for blocks in tasks:
            key = f"featcache-extract-{token}-blocks-{blocks[0]:06d}-{blocks[-1]:06d}"
            future = client.submit(extract_task, job_future, blocks, key=key, pure=False)
            futures[future] = blocks
        total = sum(len(writer.block_range(b)) for blocks in tasks for b in blocks)
        meter = Progress(f"{Path(writer.path).name} (dask)", total, progress)
        bad_log = BadImageLog()
        try:
            for future in as_completed(list(futures)):
                blocks = futures[future]
                if future.status != "finished":
                    _raise_task_failure(future, blocks, writer)
                result: TaskResult = future.result()
                del futures[future]  # released: a worker that dies later holds no result dask would recompute
                if result.onnx_sha256 is not None:
                    _check_onnx_sha256(writer.attrs.get("onnx_sha256"), result.onnx_sha256, result.where)
                _adopt_blocks(writer, result.blocks, result.where)
                for sample_id, reason in result.errors:
                    bad_log("Bad image %s skipped (on %s): %s", sample_id, result.where, reason)
                logger.debug("blocks %s done on %s in %.1f s", result.blocks, result.where, result.seconds)
                meter.batch_done(result.n_rows)
                meter.block_committed(result.n_rows)
                yield result
        finally:
            meter.close()
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            logger.info("cancelling %d unfinished extraction tasks", len(pending))
            client.cancel(pending)
            _wait_until_stopped(client, f"featcache-extract-{token}-", writer)
        client.cancel([job_future])


def _running_task_keys(prefix: str, dask_worker: Any = None) -> list[str]:
    """Keys starting with ``prefix`` that still execute on this worker (run there by ``client.run``).

    Cancelling a future does not stop a task a worker is executing: dask marks
    it ``cancelled`` and lets it run to its end, so it may still commit a block.
    """
    return [str(key) for key, task in dask_worker.state.tasks.items()
            if str(key).startswith(prefix) and task.state in _STILL_RUNNING]


#: Worker task states of a task whose function has not returned yet
#: (``cancelled``/``resumed``: it was executing when its future was cancelled).
_STILL_RUNNING = frozenset({"executing", "long-running", "cancelled", "resumed"})


def _wait_until_stopped(client: Any, prefix: str, writer: StoreWriter,
                        timeout: float = STOP_TIMEOUT_S, poll: float = 0.2) -> None:
    """Return once no task of this run executes on any worker (or after ``timeout`` seconds).

    The writer's lock is released after this: a rerun must not scan the parts
    directory while a cancelled task of this run still writes a block there.
    """
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            running = [key for keys in client.run(_running_task_keys, prefix).values() for key in keys]
        except Exception as exc:  # noqa: BLE001 - a worker gone or a closed client: nothing left to wait for here
            logger.debug("could not ask the workers which tasks still run: %s", exc)
            return
        if not running:
            return
        if time.monotonic() >= deadline:
            logger.warning(
                "%d cancelled extraction tasks still run after %.0f s; they may still commit blocks into %s, "
                "which a rerun keeps or replaces", len(running), timeout, writer.parts_dir)
            return
        if not announced:
            logger.info("waiting for %d running extraction tasks to finish their block (up to %.0f s)",
                        len(running), timeout)
            announced = True
        time.sleep(poll)


def _total_decode_stats(results: Sequence[TaskResult]) -> Any:
    """Where the workers decoded their rows, summed and logged (None without device-decode tasks)."""
    stats = [result.decode_stats for result in results if result.decode_stats is not None]
    if not stats:
        return None
    total = sum(stats[1:], stats[0])
    logger.info("%s", total.summary(f"{len({result.where for result in results})} dask workers"))
    return total


def extract_distributed(
    manifest: Manifest,
    runner_spec: RunnerSpec,
    preprocess: Preprocessor,
    out: str | Path,
    *,
    config: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
    dtype: str = DEFAULT_FEATURE_DTYPE,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_error: str = "skip",
    client: Any = None,
    scheduler_address: str | None = None,
    n_workers: int = 2,
    threads_per_worker: int = THREADS_PER_WORKER,
    blocks_per_task: int = 1,
    progress: bool = True,
    lock_timeout: float = 0.0,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    loader: str | None = None,
    read_threads: int | None = None,
) -> ExtractionReport:
    """Extract every manifest row on a dask.distributed cluster into one feature store.

    The output is identical to :func:`~featcache.extract.engine.extract_to_store`
    with the same manifest, runner, preprocess, config, attrs, dtype,
    ``block_rows`` and ``batch_size`` (byte for byte with the default gzip; see
    the module docstring), and resumes from the same committed blocks, which
    either function may have written. Both record an ONNX runner's
    ``onnx_sha256`` (unless ``attrs`` holds it; then every worker must run that file).

    Parameters
    ----------
    manifest : Manifest
        N images with ids, labels/targets and splits; its images must be
        readable by the workers under the same absolute paths.
    runner_spec : RunnerSpec
        How each worker builds its extractor (once per worker process).
    preprocess : Preprocessor
        Image -> (3, S, S) float32 tensor, as the runner expects.
    out : path
        Final ``.h5`` path (written atomically by the driver).
    config : mapping
        Every extraction-relevant param; stored as canonical JSON with its sha256.
    attrs : mapping, optional
        Extra root attributes (backbone, weights_id, backend, ...).
    dtype : {"float16", "float32"}
        Storage dtype of the features.
    block_rows : int
        Rows per committed block: the unit of sharding and of resume.
    batch_size : int
        Images per forward pass. Tasks always start at a multiple of
        ``batch_size`` rows, so choose ``block_rows`` as a multiple of it to
        get one task per block.
    on_error : {"skip", "fail"}
        ``skip`` drops bad images and reports them; ``fail`` raises
        :class:`ExtractionError` naming the file and writes no final file.
    client : distributed.Client, optional
        Use this client (it is not closed).
    scheduler_address : str, optional
        Otherwise connect to this scheduler (e.g. ``"tcp://10.0.0.5:8786"``).
    n_workers, threads_per_worker : int
        Otherwise start a ``LocalCluster`` of ``n_workers`` processes with
        ``threads_per_worker`` threads each, closed afterwards.
        ``threads_per_worker`` is also the torch thread count set in every
        worker (with any cluster).
    blocks_per_task : int
        Minimum blocks per task; more amortises task overhead, fewer
        balances better.
    progress : bool
        Log progress per finished task (a bar only on a terminal).
    lock_timeout : float
        Seconds to wait for another writer of ``out``.
    max_bad_fraction : float
        As for :func:`extract_to_store`.
    loader : {None, "arrays", "torch", "device"}
        ``device``: each worker decodes JPEGs in batches on its runner's device
        (the plan's loader for ``extract.decode: gpu``; the output equals a
        single-process run with that loader). Otherwise each worker decodes
        with PIL in its task thread.
    read_threads : int, optional
        ``device`` loader: threads per worker that read files and probe headers
        (0: the task's own thread; default:
        :func:`~featcache.util.compute.default_num_workers` on the worker).

    Returns
    -------
    ExtractionReport
        Same fields and meaning as :func:`extract_to_store`'s report
        (``errors`` lists every skipped row of the store, resumed blocks included;
        ``decode_stats`` sums the workers' counts with the ``device`` loader).

    Raises
    ------
    ExtractionError
        On a bad image with ``on_error="fail"`` (the worker's error, naming
        the file), or when a worker task fails (committed blocks are kept for
        a resume).
    featcache.store.errors.StoreLockedError
        If another process writes ``out``.
    ValueError
        On invalid arguments.
    """
    check_on_error(on_error)
    check_max_bad_fraction(max_bad_fraction)
    for name, value in (("block_rows", block_rows), ("batch_size", batch_size), ("n_workers", n_workers),
                        ("threads_per_worker", threads_per_worker), ("blocks_per_task", blocks_per_task)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(runner_spec, RunnerSpec):
        raise TypeError(f"runner_spec must be a RunnerSpec (a picklable recipe, not a model), "
                        f"got {type(runner_spec).__name__}.")
    if client is not None and scheduler_address is not None:
        raise ValueError("Give either client or scheduler_address, not both.")
    if loader is not None and loader not in LOADERS:
        raise ValueError(f"loader {loader!r} is not one of {', '.join(map(repr, LOADERS))} (or None).")
    if read_threads is not None and (isinstance(read_threads, bool) or not isinstance(read_threads, int)
                                     or read_threads < 0):
        raise ValueError(f"read_threads must be an integer >= 0 or None, got {read_threads!r}.")
    started = time.perf_counter()
    root_attrs = build_root_attrs(manifest, config, attrs)
    # Workers may run elsewhere (or in another cwd): give them absolute image paths.
    worker_manifest = replace(manifest, root=Path(manifest.root).absolute())

    handle = ClientHandle(client, scheduler_address, n_workers, threads_per_worker)
    try:
        spec = handle.client.scatter(runner_spec, hash=False)  # an int8 spec carries its graph: not in a task
        probe = handle.client.submit(probe_task, spec, preprocess.input_size, threads_per_worker,
                                     pure=False, key=f"featcache-probe-{uuid.uuid4().hex[:12]}")
        try:
            layer_specs, worker_torch, where, onnx_sha256 = probe.result()
        except Exception as exc:
            raise ExtractionError(
                f"Building {runner_spec.backbone} ({runner_spec.weights}) on a dask worker failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if worker_torch != root_attrs["torch_version"]:
            logger.warning("worker %s runs torch %s but the driver runs %s; the store records the driver's",
                           where, worker_torch, root_attrs["torch_version"])
        if onnx_sha256 is not None:  # what a single-process run records of the ONNX runner it built
            root_attrs.setdefault("onnx_sha256", onnx_sha256)
            _check_onnx_sha256(root_attrs["onnx_sha256"], onnx_sha256, where)
        with StoreWriter(out, ids=manifest.ids, splits=manifest.splits, classes=manifest.classes,
                         labels=manifest.labels, targets=manifest.targets, layers=layer_specs, attrs=root_attrs,
                         dtype=dtype, block_rows=block_rows, lock_timeout=lock_timeout) as writer:
            try:
                reopen_transient_blocks(writer)
                reopen_changed_blocks(writer, manifest)
                pending = writer.pending_blocks()
                n_resumed = writer.n_blocks - len(pending)
                if n_resumed:
                    log_resume(out, n_resumed, writer.n_blocks,
                               sum(len(writer.block_range(block)) for block in pending), len(manifest))
                tasks = plan_tasks(pending, [len(writer.block_range(b)) for b in pending], batch_size,
                                   blocks_per_task)
                if blocks_per_task == 1 and len(tasks) < len(pending):
                    logger.info("block_rows=%d is not a multiple of batch_size=%d: %d blocks grouped into %d "
                                "batch-aligned tasks", block_rows, batch_size, len(pending), len(tasks))
                job = WorkerJob(worker_manifest, preprocess, runner_spec, writer.block_committer(),
                                tuple(layer_specs), batch_size, on_error, threads_per_worker, loader, read_threads)
                results = list(_run_tasks(handle.client, job, tasks, writer, progress)) if tasks else []
                check_bad_rows(writer.committed_errors(), len(manifest), max_bad_fraction, out)
                path = writer.finalize()
            finally:
                # Stop our own workers before the lock is released, so no block lands after it.
                handle.close()
    finally:
        handle.close()
    n_rows = sum(result.n_rows for result in results)
    return build_report(path, manifest, n_extracted=n_rows, n_resumed_blocks=n_resumed,
                        seconds=time.perf_counter() - started, note=f"{len(results)} tasks on dask",
                        decode_stats=_total_decode_stats(results))
