"""A picklable recipe of a feature runner, built once per (dask worker) process on its own device.

:class:`RunnerSpec` travels to the workers instead of a model object;
:meth:`RunnerSpec.build` builds the runner that :func:`~featcache.extract.plan.plan_extraction`
resolves on the worker (torch, onnxruntime or OpenVINO) once per process. An int8 spec carries the
bytes of the graph the driver calibrated and gated (``int8_graph``): its workers run that very graph
and need neither the backbone's weights nor torch. :func:`worker_device` pins
each worker of a multi-GPU machine to its own GPU, :func:`local_workers`
sizes a local cluster (one worker per GPU).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from featcache.extract.plan import ExtractionPlan, build_runner, plan_extraction, runner_attrs
from featcache.store.schema import BACKENDS

__all__ = ["RunnerSpec", "local_workers", "worker_device"]

logger = logging.getLogger("featcache.extract.distributed")

#: Per-process cache of built runners and their attributes, keyed by (spec, input size, intra-op threads).
_RUNNERS: dict[tuple["RunnerSpec", int | None, int | None], tuple[Any, dict[str, str]]] = {}
_RUNNERS_LOCK = threading.Lock()


# ---------------------------------------------------------------------- spec
@dataclass(frozen=True)
class RunnerSpec:
    """Picklable recipe of a feature runner (torch, onnxruntime or OpenVINO, see :mod:`featcache.extract.plan`).

    Workers receive this spec, not a model object, and build the extractor
    once per process (:meth:`build` caches it).

    Attributes
    ----------
    backbone : str
        Registry name, e.g. ``"resnet18"`` or ``"efficientnet_lite0"``.
    weights : str
        ``"pretrained"``, ``"random"`` or the path of a local state dict; a path
        must exist on every worker.
    layers : tuple of str
        Layer aliases or raw graph node names (``"default"`` for the registry
        default); a list is converted to a tuple.
    pooling : str
        Pooling of conv maps (``"avg"``, ``"max"``, ``"avg2x2"``, ``"none"``).
    device : str
        Torch device of the forward pass on the workers (``"cpu"``, ``"cuda"``).
    channels_last : bool
        Run convolutions in NHWC memory format.
    autocast : {None, "bf16", "fp16"}
        Autocast dtype of the forward pass; None for float32.
    seed : int
        Seed of the random initialisation (``weights="random"``); the same
        seed gives identical weights in every process.
    backend : {"torch", "onnx", "openvino", "auto"}
        Runtime on the workers; ``auto`` resolves on each worker (torch on
        CUDA, onnxruntime on CPU, OpenVINO for a native CPU bf16). ONNX and
        OpenVINO workers open the cached export (or export the model once per process).
    onnx_cache : str, optional
        ONNX only: the export cache (``extract_run.onnx_cache``: ``auto``, ``none``
        or a folder every worker sees); None: the default (``auto``).
    model : str or None
        ``timm/<model>``: the backbone is that timm model (``backbones.<name>.model``).
    int8_graph : bytes or None
        ``extract.precision: int8``: the ``.onnx`` bytes of the int8 graph the driver
        calibrated and gated (:func:`~featcache.extract.onnx.quantize.int8_runner`);
        the workers run it on the CPU as it is (``backend`` ``onnx``, ``device``
        ``cpu``). Left out of the repr.
    """

    backbone: str
    weights: str
    layers: tuple[str, ...]
    pooling: str
    device: str = "cpu"
    channels_last: bool = True
    autocast: str | None = None
    seed: int = 0
    backend: str = "torch"
    onnx_cache: str | None = None
    model: str | None = None
    int8_graph: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            raise TypeError(f"RunnerSpec.layers must be a sequence of layer names, not the string {self.layers!r}.")
        object.__setattr__(self, "layers", tuple(str(layer) for layer in self.layers))
        if not self.layers:
            raise ValueError("RunnerSpec.layers is empty. Hint: use ('default',) for the penultimate layer.")
        if not self.backbone or not self.weights:
            raise ValueError(f"RunnerSpec needs a backbone and weights, got {self.backbone!r}, {self.weights!r}.")
        if self.autocast not in (None, "auto", "bf16", "fp16"):
            raise ValueError(f"RunnerSpec.autocast {self.autocast!r} is not one of None, 'auto', 'bf16', 'fp16'.")
        if self.backend not in BACKENDS:
            raise ValueError(f"RunnerSpec.backend {self.backend!r} is not one of {BACKENDS}.")
        if self.int8_graph is not None:
            if not isinstance(self.int8_graph, bytes) or not self.int8_graph:
                raise TypeError("RunnerSpec.int8_graph must be the int8 graph's .onnx bytes, got "
                                f"{type(self.int8_graph).__name__}.")
            if (self.backend, self.device) != ("onnx", "cpu"):
                raise ValueError(f"RunnerSpec.int8_graph runs on onnxruntime's CPU provider, but the spec says "
                                 f"backend {self.backend!r} on {self.device!r}. Hint: backend='onnx', device='cpu'.")

    @classmethod
    def from_plan(cls, plan: ExtractionPlan, backbone: str, weights: str, layers: Sequence[str], pooling: str,
                  channels_last: bool = True, seed: int = 0, onnx_cache: str | None = None,
                  model: str | None = None, int8_graph: bytes | None = None) -> RunnerSpec:
        """The spec of the runner ``plan`` chose (its backend, device and precision), for the dask workers.

        An int8 plan needs ``int8_graph``: the bytes of the graph the driver calibrated and gated
        (``Path(runner.path).read_bytes()`` of :func:`~featcache.extract.plan.build_runner`'s runner).
        """
        if plan.int8 != (int8_graph is not None):
            raise ValueError("RunnerSpec.from_plan: an int8 plan needs int8_graph (the bytes of the graph the "
                             "driver calibrated), and only an int8 plan takes one; got "
                             f"precision {plan.precision!r} and {'no ' if int8_graph is None else ''}graph.")
        return cls(backbone, weights, tuple(layers), pooling, device=plan.device, channels_last=channels_last,
                   autocast=plan.autocast, seed=seed, backend=plan.backend, onnx_cache=onnx_cache, model=model,
                   int8_graph=int8_graph)

    def build(self, input_size: int | None = None, intra_op_threads: int | None = None) -> Any:
        """The runner of this spec, built once per process and then cached (see :meth:`build_with_attrs`).

        Returns
        -------
        TorchFeatureExtractor or OnnxFeatureRunner
            Maps a (B, 3, S, S) float32 batch to ``{layer: (B, D) float32 array}``.
            Shared by every caller in this process: do not modify it.
        """
        return self.build_with_attrs(input_size, intra_op_threads)[0]

    def build_with_attrs(self, input_size: int | None = None,
                         intra_op_threads: int | None = None) -> tuple[Any, dict[str, str]]:
        """The runner of this spec and the store attributes of what was built, once per process.

        On a machine with several GPUs a ``"cuda"`` spec runs on this
        worker's own GPU (:func:`worker_device`).

        Parameters
        ----------
        input_size : int, optional
            ONNX only: the exported input side (default: the registry's); part
            of the cache key.
        intra_op_threads : int, optional
            ONNX only: onnxruntime's intra-op threads (default: one per
            physical core, as in a single-process run). The features do not
            depend on it (``tests/extract/onnx/test_threads.py``), the speed does.

        Returns
        -------
        runner : TorchFeatureExtractor or OnnxFeatureRunner
            Maps a (B, 3, S, S) float32 batch to ``{layer: (B, D) float32 array}``.
            Shared by every caller in this process: do not modify it.
        attrs : dict of str to str
            :func:`~featcache.extract.plan.build_runner`'s attributes (``backend``,
            ``provider``, ``precision``, and ``onnx_sha256`` for an ONNX runner).

        Raises
        ------
        featcache.extract.zoo.weights.WeightsNotFoundError
            If the weights are not available in this process's machine.
        """
        key = (self, input_size, intra_op_threads)
        with _RUNNERS_LOCK:
            built = _RUNNERS.get(key)
            if built is None and self.int8_graph is not None:
                built = _RUNNERS[key] = _int8_graph_runner(self.int8_graph, intra_op_threads)
            if built is None:
                from featcache.extract.zoo.weights import resolve_weights

                started = time.perf_counter()
                source = resolve_weights(self.backbone, self.weights, seed=self.seed, model=self.model)
                plan = plan_extraction(device=worker_device(self.device), backend=self.backend,
                                       autocast=self.autocast, decode="cpu")
                built = build_runner(source, list(self.layers), plan, pooling=self.pooling,
                                     channels_last=self.channels_last, input_size=input_size,
                                     intra_op_threads=intra_op_threads, onnx_cache=self.onnx_cache)
                _RUNNERS[key] = built
                logger.info("built %s (%s, %s on %s) in pid %d in %.1f s", self.backbone, source.weights_id,
                            built[1]["backend"], built[1]["provider"], os.getpid(), time.perf_counter() - started)
            return built[0], dict(built[1])


def _int8_graph_runner(graph: bytes, intra_op_threads: int | None) -> tuple[Any, dict[str, str]]:
    """An onnxruntime CPU runner over ``graph`` (the driver's int8 graph), from a file of this process.

    The file lives in a temporary folder removed with the runner; the attributes
    are the ones a single-process int8 run records of what ran.
    """
    from featcache.extract.onnx.runner import OnnxFeatureRunner

    folder = tempfile.TemporaryDirectory(prefix="featcache-int8-worker-")
    path = Path(folder.name) / f"int8-{hashlib.sha256(graph).hexdigest()[:16]}.onnx"
    path.write_bytes(graph)
    runner = OnnxFeatureRunner(path, device="cpu", intra_op_threads=intra_op_threads)
    weakref.finalize(runner, folder.cleanup)
    logger.info("int8 graph %s (%.1f MB, from the driver) on %s in pid %d", runner.onnx_sha256[:12],
                len(graph) / 1e6, runner.provider, os.getpid())
    return runner, {**runner_attrs("onnx", "cpu", None, int8=True), "onnx_sha256": runner.onnx_sha256}


def worker_device(device: str, worker_name: Any = None) -> str:
    """The device a dask worker uses for ``device``: its own GPU when the machine has several.

    ``"cuda"`` on a machine with G > 1 visible GPUs becomes ``cuda:k`` with
    ``k = worker index mod G`` (LocalCluster names its workers 0, 1, ...), so
    one worker per GPU puts each on its own device. An explicit ``cuda:N``,
    ``cpu``, a single GPU, or a worker without an integer name (e.g. one
    started with ``CUDA_VISIBLE_DEVICES`` set, which then sees one GPU) keep
    ``device``.

    Parameters
    ----------
    device : str
        The spec's device.
    worker_name : optional
        The dask worker's name; default: the current worker's (None outside a worker).
    """
    if device != "cuda":
        return device
    import torch

    if torch.cuda.device_count() < 2:
        return device
    if worker_name is None:
        try:
            from distributed import get_worker

            worker_name = get_worker().name
        except (ImportError, ValueError):
            return device
    try:
        index = int(worker_name)
    except (TypeError, ValueError):
        logger.warning("dask worker %r has no integer name: it uses %s. Hint: start one worker per GPU with "
                       "CUDA_VISIBLE_DEVICES set per worker (or dask-cuda's LocalCUDACluster).", worker_name, device)
        return device
    return f"cuda:{index % torch.cuda.device_count()}"


def local_workers(n_workers: int | str, device: str) -> int:
    """Workers of a LocalCluster: ``auto`` -> one per GPU on CUDA (at least 1), else 2; an int is kept."""
    if n_workers != "auto":
        return int(n_workers)
    if str(device).startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count())
    return 2
