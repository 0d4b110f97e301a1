"""OpenVINO runner: the exported ONNX file of :class:`OnnxFeatureRunner`, run by OpenVINO's CPU plugin.

Why a second CPU runtime: onnxruntime has no bfloat16 kernels on x86, while
OpenVINO runs the same graph in bfloat16 on CPUs that compute it natively
(AVX512_BF16, AMX). On the 2-core AMD EPYC VM (AVX512_BF16) its bf16 forward is
1.6x (EfficientNet-Lite0) to 2.0x (resnet50) onnxruntime's float32 one; in
float32 it is 0.8-1.0x onnxruntime, in float16 0.5-0.8x on a Xeon that lists
native FP16 (``benchmarks/README.md``). So ``extract.backend: auto`` picks it
only for ``extract.autocast: bf16`` on a CPU that runs bf16 natively
(:func:`native_autocasts`, :data:`~featcache.extract.plan.OPENVINO_AUTO_AUTOCASTS`),
and the default stays onnxruntime.

The runner reads the same file, the same featcache metadata (OpenVINO keeps
the ONNX metadata under the model's ``framework`` runtime info) and the same
export cache; only the runtime differs.

Every runner compiles with one process-wide ``openvino.Core`` (:func:`openvino_core`),
kept for the life of the process. OpenVINO's CPU plugin maps its own
alternate signal stack (``sigaltstack``; large enough for AMX signal frames,
``SigAltStackSetup`` of openvinotoolkit/openvino#11894) on the thread that
compiles a model, and when its Core is destroyed unmaps it and puts back the
stack it found there. Two Cores destroyed in the order they were made leave the
thread's alternate stack pointing at unmapped memory, and the next signal
handled on it (CPython and ``faulthandler`` install their handlers with
``SA_ONSTACK``) kills the process with a segmentation fault (or, where the
memory was reused, corrupts it). One Core that is never destroyed installs its
stack once (ultralytics/ultralytics#25864 reached the same cure).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from typing import Any

import numpy as np

from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.store.schema import OPENVINO_PROVIDER

__all__ = ["INFERENCE_PRECISIONS", "OpenVinoFeatureRunner", "native_autocasts", "openvino_core", "openvino_status"]

logger = logging.getLogger(__name__)

#: ``extract.autocast`` (None: float32) -> OpenVINO's ``INFERENCE_PRECISION_HINT``.
INFERENCE_PRECISIONS: dict[str | None, str] = {None: "f32", "bf16": "bf16", "fp16": "f16"}

#: The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` entry that runs each autocast natively.
_CAPABILITIES = {"bf16": "BF16", "fp16": "FP16"}

_core_lock = threading.Lock()


@functools.cache
def _make_core() -> Any:
    import openvino

    return openvino.Core()


def openvino_core() -> Any:
    """The process-wide ``openvino.Core`` every runner compiles with; never destroyed (see the module's notes).

    Returns
    -------
    openvino.Core
        The same object on every call, from any thread.
    """
    with _core_lock:  # functools.cache alone may build two Cores when two threads race on the first call
        return _make_core()


def openvino_status() -> dict[str, Any]:
    """What OpenVINO offers here, without importing it when it is not installed.

    Returns
    -------
    dict
        ``version`` (None when not installed), ``cpu`` (the CPU's name) and
        ``capabilities`` (the CPU plugin's ``OPTIMIZATION_CAPABILITIES``,
        e.g. ``["BF16", "FP32", "INT8", ...]``).
    """
    if importlib.util.find_spec("openvino") is None:
        return {"version": None, "cpu": None, "capabilities": []}
    import openvino

    core = openvino_core()
    return {"version": openvino.__version__.split("-")[0], "cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            "capabilities": [str(name) for name in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]}


@functools.cache
def native_autocasts() -> frozenset[str]:
    """The autocasts (``bf16``, ``fp16``) OpenVINO's CPU plugin runs natively on this CPU; empty without OpenVINO.

    Elsewhere the plugin silently runs float32 for a bf16 request, so the plan
    resolves such a request to float32 (with a warning) instead of recording a
    precision that did not run.
    """
    capabilities = set(openvino_status()["capabilities"])
    return frozenset(autocast for autocast, name in _CAPABILITIES.items() if name in capabilities)


class OpenVinoFeatureRunner(OnnxFeatureRunner):
    """Run an ONNX file written by :func:`~featcache.extract.onnx.export.export_onnx` with OpenVINO on the CPU.

    The same ``FeatureRunner`` protocol, constructors (:meth:`from_source`,
    :meth:`from_model`, with ``autocast=``), metadata checks and
    ``onnx_sha256`` as :class:`OnnxFeatureRunner`.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file (with featcache metadata).
    device : {"cpu"}
        OpenVINO's CPU plugin; anything else is refused.
    intra_op_threads : int, optional
        ``INFERENCE_NUM_THREADS``; default one per physical core.
    autocast : {None, "bf16", "fp16"}
        The inference precision (None: float32). On a CPU without native
        support OpenVINO runs float32; :attr:`precision` says what ran.

    Attributes
    ----------
    provider : str
        :data:`~featcache.store.schema.OPENVINO_PROVIDER`.
    precision : str
        What the compiled model computes in: ``float32``, ``bfloat16`` or ``float16``.
    compiled : openvino.CompiledModel
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", intra_op_threads: int | None = None,
                 autocast: str | None = None) -> None:
        if autocast not in INFERENCE_PRECISIONS:
            raise ValueError(f"autocast {autocast!r} is not one of {list(INFERENCE_PRECISIONS)} "
                             "(None: float32). Hint: extract.autocast: bf16 on a CPU with native bfloat16.")
        self.autocast = autocast
        self._lock = threading.Lock()  # one infer request, which is not thread-safe
        super().__init__(path, device=device, intra_op_threads=intra_op_threads)

    def _open(self, kind: str, index: int, device: str) -> tuple[dict[str, str], str, list[str]]:
        """Compile the graph for OpenVINO's CPU plugin; return its featcache metadata, input and output names."""
        if kind != "cpu":
            raise ValueError(f"device {device!r}: the openvino backend runs OpenVINO's CPU plugin only. Hint: set "
                             "extract_run.device: cpu, or extract.backend: auto (torch on a GPU).")
        core = openvino_core()
        model = core.read_model(str(self.path))
        config = {"INFERENCE_NUM_THREADS": self.intra_op_threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[self.autocast]}
        self.compiled = core.compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(ran, ran)
        if ran != INFERENCE_PRECISIONS[self.autocast]:
            logger.warning("OpenVINO runs %s in %s, not the %s asked for: this CPU does not compute it natively.",
                           self.path.name, ran, INFERENCE_PRECISIONS[self.autocast])
        self.provider = OPENVINO_PROVIDER
        self.device = "cpu"
        info = model.get_rt_info()
        framework = info["framework"] if "framework" in info else {}  # the ONNX file's metadata_props
        metadata = {key: value.astype(str) for key, value in framework.items()}
        return metadata, model.inputs[0].get_any_name(), [output.get_any_name() for output in model.outputs]

    def _infer(self, array: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs, in order (copies: the request's own buffers are reused by the next batch)."""
        with self._lock:
            results = self._request.infer({0: array}, share_inputs=True, share_outputs=False)
            return [np.asarray(results[output]) for output in self.compiled.outputs]

    def __repr__(self) -> str:
        return (f"OpenVinoFeatureRunner({str(self.path)!r}, backbone={self.export_config.get('backbone')!r}, "
                f"layers={self.layer_names}, precision={self.precision!r})")
