"""The worker side of sharded extraction (:mod:`featcache.extract.distributed`): task plan, job, tasks.

The driver groups pending blocks into batch-aligned tasks (:func:`plan_tasks`),
scatters one :class:`WorkerJob` to every worker and submits
:func:`extract_task` per task; :func:`probe_task` builds the runner once first
and reports its layers. Each worker builds its runner once per process (from
the picklable :class:`~featcache.extract.runner_spec.RunnerSpec`) and runs the
single-process loop (:func:`~featcache.extract.engine.run_blocks`), committing
each block with the writer's :class:`~featcache.store.blocks.BlockCommitter`.

With the ``device`` loader a worker decodes its JPEGs in batches on its
runner's device, reading files with a thread pool (a dask worker process
cannot start loader processes), and reports where its rows were decoded.

A worker running onnxruntime never imports torch: this module imports it only
for a torch runner or a CUDA device.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from featcache.extract.decode.loaders import ImageDataset
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import run_blocks
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.runner_spec import RunnerSpec
from featcache.store.blocks import BlockCommitter
from featcache.store.schema import LayerSpec
from featcache.util.compute import torch_version

__all__ = ["TaskResult", "WorkerJob", "extract_task", "plan_tasks", "probe_task"]

_JOB_LOCK = threading.Lock()  # guards each worker's lazily built dataset


def plan_tasks(pending: Sequence[int], block_sizes: Sequence[int], batch_size: int,
               blocks_per_task: int) -> list[tuple[int, ...]]:
    """Group pending blocks into tasks whose rows start at single-process batch boundaries.

    A single-process run feeds the concatenated rows of all pending blocks to
    the backbone in consecutive batches of ``batch_size``. A task is closed
    only where that row count is a multiple of ``batch_size``, so every task
    sees exactly the single-process batches (the last task ends at the end).

    Parameters
    ----------
    pending : sequence of int, (P,)
        Pending block indices, ascending.
    block_sizes : sequence of int, (P,)
        Rows of each pending block.
    batch_size : int
        Backbone batch size.
    blocks_per_task : int
        Minimum blocks per task (a task grows beyond it up to the next
        batch boundary).

    Returns
    -------
    list of tuple of int
        Consecutive groups of ``pending``, in order, covering it exactly.
    """
    tasks: list[tuple[int, ...]] = []
    current: list[int] = []
    offset = 0
    for block, size in zip(pending, block_sizes, strict=True):
        current.append(block)
        offset += size
        if len(current) >= blocks_per_task and offset % batch_size == 0:
            tasks.append(tuple(current))
            current = []
    if current:
        tasks.append(tuple(current))
    return tasks


@dataclass
class WorkerJob:
    """Everything a worker needs, scattered once to each worker."""

    manifest: Manifest
    preprocess: Preprocessor
    runner_spec: RunnerSpec
    committer: BlockCommitter
    layer_specs: tuple[LayerSpec, ...]
    batch_size: int
    on_error: str
    torch_threads: int
    loader: str | None = None
    read_threads: int | None = None
    _dataset: ImageDataset | None = field(default=None, repr=False, compare=False)

    def dataset(self) -> ImageDataset:
        """The job's dataset, built once per worker (absolute paths of N rows)."""
        with _JOB_LOCK:
            if self._dataset is None:
                self._dataset = ImageDataset(self.manifest, self.preprocess)
            return self._dataset


@dataclass(frozen=True)
class TaskResult:
    """What a worker reports of one task: its blocks and rows, bad images, time, place, export, decode counts."""

    blocks: tuple[int, ...]
    n_rows: int
    errors: list[tuple[str, str]]
    seconds: float
    where: str
    onnx_sha256: str | None = None
    decode_stats: Any = None  # DecodeStats of a device-decode task


def _set_torch_threads(n: int) -> None:
    """torch's intra-op threads, where torch runs (an onnxruntime worker never imports it)."""
    torch = sys.modules.get("torch")
    if torch is not None and n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _where() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _build(spec: RunnerSpec, input_size: int, threads: int) -> tuple[Any, dict[str, str]]:
    """The worker's runner (built once per process) with ``threads`` intra-op threads (torch and onnxruntime)."""
    if spec.backend == "torch" or spec.device.startswith("cuda"):
        import torch  # noqa: F401 - _set_torch_threads sets the threads of an imported torch

    _set_torch_threads(threads)
    runner, attrs = spec.build_with_attrs(input_size, threads)
    _set_torch_threads(threads)  # the runner may have imported torch
    return runner, attrs


def probe_task(spec: RunnerSpec, input_size: int, threads: int) -> tuple[list[LayerSpec], str, str, str | None]:
    """Build the runner on a worker; return its layer specs, torch version, location and ONNX sha256."""
    runner, attrs = _build(spec, input_size, threads)
    return runner.layer_specs(input_size), torch_version(), _where(), attrs.get("onnx_sha256")


def extract_task(job: WorkerJob, blocks: tuple[int, ...]) -> TaskResult:
    """Extract and commit ``blocks`` on a worker (the single-process engine's own loop).

    A task whose blocks are all committed already does nothing: dask recomputes the finished tasks whose
    results a dead worker held, and their blocks are on disk (its errors are then in the block files).
    """
    started = time.perf_counter()
    n_rows = sum(len(job.committer.block_range(block)) for block in blocks)
    if all(job.committer.check_block_file(block) is None for block in blocks):
        return TaskResult(blocks, n_rows, [], time.perf_counter() - started, _where(), None)
    runner, attrs = _build(job.runner_spec, job.preprocess.input_size, job.torch_threads)
    batches, stats = None, None
    if job.loader == "device":
        batches, stats = _device_batches(job, runner, blocks)
    errors = run_blocks(job.manifest, runner, job.committer, blocks, preprocess=job.preprocess,
                        layer_specs=job.layer_specs, batch_size=job.batch_size, num_workers=0,
                        on_error=job.on_error, dataset=job.dataset() if batches is None else None,
                        batches=batches)
    return TaskResult(blocks, n_rows, errors, time.perf_counter() - started, _where(), attrs.get("onnx_sha256"),
                      stats)


def _device_batches(job: WorkerJob, runner: Any, blocks: tuple[int, ...]) -> tuple[Any, Any]:
    """The task's rows decoded in batches on the runner's device, read by a thread pool; and their stats."""
    from featcache.extract.decode.device import DecodeStats, iter_device_batches
    from featcache.util.compute import default_num_workers

    rows = [row for block in blocks for row in job.committer.block_range(block)]
    stats = DecodeStats()
    threads = default_num_workers() if job.read_threads is None else job.read_threads
    batches = iter_device_batches(job.manifest, rows, preprocess=job.preprocess,
                                  device=str(getattr(runner, "input_device", "cpu")), batch_size=job.batch_size,
                                  num_workers=threads, reader="threads", stats=stats)
    return batches, stats
