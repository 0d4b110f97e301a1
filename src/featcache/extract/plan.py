"""The extraction plan: every machine-dependent choice of a run, resolved once, in one place.

``extract_run.device``, ``extract.backend``, ``autocast``, ``decode`` and ``extract_run.num_workers``
(``auto`` included) become one frozen :class:`ExtractionPlan`; the extract
stage, the store's config and attributes, the engine's choice of loader, the
dask path, ``featcache doctor`` and the benchmarks all read that object, and
nothing else resolves these settings. The rules:

* **device** ``auto``: CUDA when torch sees a device, else the CPU (decided
  without importing torch where CUDA is impossible);
* **backend** ``auto``: torch on CUDA (onnxruntime runs on a GPU only when asked
  for, ``backend: onnx``, and then only where its CUDA provider loads:
  :func:`build_runner` stops with the fix, never falls back to the CPU);
  onnxruntime on the CPU (the faster float32 CPU runtime, ``benchmarks/README.md``),
  torch when onnxruntime is not installed; OpenVINO on the CPU when
  ``autocast`` asks for bf16 and the CPU computes it natively (onnxruntime has
  no bf16 kernels on x86; OpenVINO's bf16 forward is 1.8-2.0x onnxruntime's
  float32 on an AVX512_BF16 CPU, 1.8-5.5x with AMX). Not for fp16: OpenVINO's
  float16 on the CPU measured 0.54-0.84x onnxruntime's float32 on a Xeon that
  lists native FP16 (:data:`OPENVINO_AUTO_AUTOCASTS`). ``openvino`` runs on the CPU only;
* **autocast** ``auto``: fp16 for torch on CUDA (cosine 0.99997 to float32 on an
  H200), float32 elsewhere; bf16 (cosine 0.997) is never picked by ``auto``;
  onnxruntime always runs the float32 graph, OpenVINO runs bf16/fp16 only
  where the CPU computes it natively (float32 otherwise, with a warning), fp16
  only when ``backend: openvino`` is set;
* **decode** ``auto``: JPEGs decoded in batches on the GPU when torch runs on
  CUDA (in this process, or in each dask worker), PIL otherwise; ``gpu`` on a
  CPU device runs the same device path (for tests);
* **loader**: ``device`` (batched device decode) for the ``gpu`` decode path;
  ``arrays`` (numpy batches from a process pool, torch not imported) when the
  runner takes its input on the CPU; ``torch`` (DataLoader workers, pinned
  memory) when it takes it on CUDA.

Usage::

    plan = plan_extraction(device="auto", backend="auto", autocast="auto", decode="auto")
    runner, built = build_runner(source, layers, plan, pooling="avg")
    extract_to_store(manifest, runner, preprocess, out, plan=plan, config=..., attrs={**plan.attrs(), **built})
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from featcache.errors import ExtractionError
from featcache.store.schema import AUTOCASTS, BACKENDS, DECODE_CHOICES, DECODE_PATHS, OPENVINO_PROVIDER, PRECISIONS
from featcache.util import compute

__all__ = ["CUDA_PROVIDER", "LOADERS", "ONNX_GPU_FIX", "OPENVINO_AUTO_AUTOCASTS", "PROTOBUF_LIMIT", "ExtractionPlan",
           "build_runner", "onnx_size_limit", "plan_extraction", "precision_name", "resolve_autocast",
           "resolve_backend", "resolve_decode", "resolve_precision", "runner_attrs", "too_large_for_onnx"]

logger = logging.getLogger(__name__)

#: How batches reach the runner: see the module docstring.
LOADERS = ("arrays", "torch", "device")

#: The autocasts for which ``backend: auto`` runs OpenVINO on a CPU that computes them natively: those measured
#: faster than onnxruntime's float32 (``benchmarks/README.md``). bf16: 1.8-2.0x the forward on an AVX512_BF16 EPYC,
#: 1.8-5.5x on an AMX Xeon. Not fp16: on that Xeon (AVX512_FP16, OpenVINO lists FP16) OpenVINO's float16 forward
#: ran 0.76-0.84x (Lite0) and 0.54-0.62x (resnet50) onnxruntime's float32 (three measurements).
OPENVINO_AUTO_AUTOCASTS = ("bf16",)

#: onnxruntime's CUDA execution provider.
CUDA_PROVIDER = "CUDAExecutionProvider"

#: The fix when onnxruntime cannot use the GPU (also printed by ``featcache doctor``).
ONNX_GPU_FIX = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
                "(or pip install 'featcache[gpu]' after uninstalling both): onnxruntime and onnxruntime-gpu "
                "installed together hide the CUDA provider")


def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _native_autocasts() -> frozenset[str]:
    from featcache.extract.onnx.openvino_runner import native_autocasts

    return native_autocasts()


#: Bytes one ONNX file holds: protobuf's 2 GiB, ``onnx.checker.MAXIMUM_PROTOBUF`` (featcache writes no
#: external-data files). Here so that planning imports no onnx (0.6 s on the 2-core VM).
PROTOBUF_LIMIT = 2**31 - 1


def onnx_size_limit() -> int:
    """:data:`PROTOBUF_LIMIT`, or ``onnx.checker.MAXIMUM_PROTOBUF`` when onnx is imported (the exports check that)."""
    onnx = sys.modules.get("onnx")
    return int(onnx.checker.MAXIMUM_PROTOBUF) if onnx is not None else PROTOBUF_LIMIT


def too_large_for_onnx(weight_bytes: int | None) -> bool:
    """Whether a model whose float32 weights take ``weight_bytes`` cannot be one ONNX file (None: not known)."""
    return weight_bytes is not None and weight_bytes >= onnx_size_limit()


def resolve_backend(backend: str, device: str, autocast: str | None = "auto", weight_bytes: int | None = None) -> str:
    """``auto`` -> ``torch`` on CUDA; on the CPU ``openvino`` for a native bf16/fp16 ``autocast``, else ``onnx``
    (``torch`` without onnxruntime, or for a model over the 2 GiB one ONNX file holds); explicit values pass.

    Parameters
    ----------
    backend : {"auto", "torch", "onnx", "openvino"}
    device : str
        The resolved device (``cpu``, ``cuda``, ``cuda:N``).
    autocast : {"auto", "none", "bf16", "fp16"} or None
        ``extract.autocast`` as set (OpenVINO is checked for only when it is bf16 or fp16).
    weight_bytes : int, optional
        The backbone's float32 weights (:attr:`~featcache.extract.zoo.registry.BackboneSpec.weight_bytes`), where
        known: at or over :func:`onnx_size_limit` ``auto`` runs torch on the CPU too (ONNX and OpenVINO run an
        export, which could not be written), saying so in the log.

    Raises
    ------
    ValueError
        For an unknown backend, or ``openvino`` on CUDA or without the package.
    """
    if backend not in BACKENDS:
        raise ValueError(f"extract.backend {backend!r} is not one of {BACKENDS}. Hint: 'auto' picks torch on CUDA "
                         "and onnxruntime on the CPU (OpenVINO for extract.autocast: bf16).")
    if backend == "openvino":
        if _is_cuda(device):
            raise ValueError(f"extract.backend: openvino runs OpenVINO's CPU plugin, but extract_run.device resolved "
                             f"to {device!r}. Hint: set extract_run.device: cpu, or extract.backend: auto (torch on a "
                             "GPU).")
        if importlib.util.find_spec("openvino") is None:
            raise ValueError("extract.backend: openvino needs the openvino package, which is not installed. "
                             "Hint: pip install openvino, or set extract.backend: auto.")
    if backend != "auto":
        return backend
    if _is_cuda(device):
        return "torch"
    if too_large_for_onnx(weight_bytes):
        logger.info("extract.backend auto: torch on the CPU, since the backbone's weights take %.2f GiB in float32, "
                    "over the %.0f GiB one ONNX file holds (onnxruntime and OpenVINO run an ONNX export)",
                    weight_bytes / 2**30, onnx_size_limit() / 2**30)
        return "torch"
    if autocast in OPENVINO_AUTO_AUTOCASTS and autocast in _native_autocasts():
        return "openvino"
    return "onnx" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def resolve_autocast(autocast: str | None, device: str, backend: str) -> str | None:
    """``auto`` -> ``fp16`` for torch on CUDA, None (float32) otherwise; ``none`` -> None.

    Parameters
    ----------
    autocast : {"auto", "none", "bf16", "fp16"} or None
    device : str
        The resolved device.
    backend : {"torch", "onnx", "openvino"}
        The resolved backend; onnxruntime runs the exported float32 graph,
        so an explicit ``bf16``/``fp16`` is ignored there (with a warning), and
        OpenVINO runs it only where the CPU computes it natively (float32
        otherwise, with a warning).
    """
    if autocast is None or autocast == "none":
        return None
    if autocast not in AUTOCASTS:
        raise ValueError(f"extract.autocast {autocast!r} is not one of {AUTOCASTS}. Hint: 'auto' is fp16 on CUDA, "
                         "float32 on the CPU.")
    if autocast == "auto":
        return "fp16" if _is_cuda(device) and backend == "torch" else None
    if backend == "onnx":
        hint = ("extract.backend: auto runs it with OpenVINO where the CPU computes bf16 natively"
                if autocast in OPENVINO_AUTO_AUTOCASTS else
                "OpenVINO's float16 on the CPU measured slower than float32 (0.54-0.84x), so auto does not pick it; "
                "extract.autocast: bf16 is the fast reduced precision on a CPU (extract.backend: openvino forces fp16)")
        logger.warning("extract.autocast %r is ignored by the onnx backend (it runs the float32 graph). Hint: %s.",
                       autocast, hint)
        return None
    if backend == "openvino" and autocast not in _native_autocasts():
        logger.warning("extract.autocast %r: this CPU has no native %s (OpenVINO's CPU capabilities), so OpenVINO "
                       "runs the float32 graph", autocast, autocast)
        return None
    return autocast


def resolve_decode(decode: str, device: str, backend: str = "torch") -> str:
    """The decode path: ``auto`` -> ``gpu`` for torch on CUDA, else ``cpu``.

    The same rule holds in one process and under ``extract_run.scheduler`` (each
    dask worker then decodes on its own device:
    :func:`~featcache.extract.distributed.extract_distributed`'s ``loader``).

    Parameters
    ----------
    decode : {"auto", "cpu", "gpu"}
        ``extract.decode``; ``gpu`` on a CPU device is allowed (the same code path, for tests).
    device, backend : str
        The resolved device and backend (the ONNX runner takes host batches).
    """
    if decode == "auto":
        return "gpu" if _is_cuda(device) and backend == "torch" else "cpu"
    if decode not in DECODE_PATHS:
        raise ValueError(f"extract.decode {decode!r} is not one of {', '.join(map(repr, DECODE_CHOICES))}.")
    return decode


def resolve_precision(precision: str, device: str, backend: str) -> bool:
    """Whether the forward runs int8: ``extract.precision`` checked against where it would run.

    int8 is a graph quantized by onnxruntime for its CPU provider, so it needs
    the ``onnx`` backend on the CPU device. Under ``extract_run.scheduler`` the
    driver calibrates and gates it once and the workers run its bytes
    (:class:`~featcache.extract.runner_spec.RunnerSpec`'s ``int8_graph``).

    Parameters
    ----------
    precision : {"float32", "int8"}
    device, backend : str
        The resolved device and backend.

    Raises
    ------
    ValueError
        For an unknown precision, or int8 anywhere but onnxruntime on the CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"extract.precision {precision!r} is not one of {PRECISIONS}.")
    if precision == "float32":
        return False
    if _is_cuda(device):
        raise ValueError(f"extract.precision: int8 runs onnxruntime's quantized graph on the CPU, but "
                         f"extract_run.device resolved to {device!r}. Hint: set extract_run.device: cpu, or "
                         "extract.precision: float32 on a GPU (fp16 autocast is its fast path).")
    if backend == "openvino":
        raise ValueError("extract.precision: int8 runs onnxruntime's quantized graph, but extract.backend resolved to "
                         "'openvino' (bf16/fp16 on the CPU). Hint: set extract.backend: onnx and extract.autocast: "
                         "none (int8 replaces bf16), or extract.precision: float32.")
    if backend != "onnx":
        raise ValueError(f"extract.precision: int8 needs extract.backend onnx (or auto), got {backend!r}"
                         + ("" if importlib.util.find_spec("onnxruntime") is not None else
                            " (onnxruntime is not installed)")
                         + ". Hint: set extract.backend: auto or onnx, or extract.precision: float32.")
    return True


def precision_name(autocast: str | None, int8: bool = False) -> str:
    """``float32``, ``float16``, ``bfloat16`` or ``int8``: what the forward ran in (a root attribute)."""
    return "int8" if int8 else {None: "float32", "fp16": "float16", "bf16": "bfloat16"}[autocast]


def runner_attrs(backend: str, device: str, autocast: str | None, int8: bool = False) -> dict[str, str]:
    """Root attributes that say what ran: ``backend``, ``provider`` and ``precision``.

    ``provider`` is onnxruntime's execution provider for ``onnx`` (CUDA on a
    GPU: :func:`build_runner` refuses any other there), :data:`~featcache.store.schema.OPENVINO_PROVIDER`
    for ``openvino``, the torch device otherwise.
    """
    if backend == "onnx":
        provider = CUDA_PROVIDER if _is_cuda(device) else "CPUExecutionProvider"
    else:
        provider = OPENVINO_PROVIDER if backend == "openvino" else str(device)
    return {"backend": backend, "provider": provider, "precision": precision_name(autocast, int8)}


@dataclass(frozen=True)
class ExtractionPlan:
    """What one extraction runs on, every ``auto`` resolved (build with :func:`plan_extraction`).

    Attributes
    ----------
    device : str
        Where the forward runs: ``cpu``, ``cuda`` or ``cuda:N``.
    backend : {"torch", "onnx", "openvino"}
    autocast : {None, "fp16", "bf16"}
        Autocast dtype of the forward (torch), or OpenVINO's inference precision; None for float32.
    decode : {"cpu", "gpu"}
        PIL in worker processes, or batched JPEG decode on ``device``.
    loader : {"arrays", "torch", "device"}
        How batches reach the runner (see the module docstring).
    num_workers : int or None
        Decode worker processes; None: one per spare core.
    scheduler : str
        ``none`` (this process), ``local`` (a local dask cluster) or a scheduler address.
    int8 : bool
        Whether onnxruntime runs a quantized graph (``extract.precision: int8``).
    """

    device: str
    backend: str
    autocast: str | None
    decode: str
    loader: str
    num_workers: int | None = None
    scheduler: str = "none"
    int8: bool = False

    @property
    def provider(self) -> str:
        """onnxruntime's execution provider, or the torch device."""
        return runner_attrs(self.backend, self.device, self.autocast)["provider"]

    @property
    def precision(self) -> str:
        """``float32``, ``float16``, ``bfloat16`` or ``int8``."""
        return precision_name(self.autocast, self.int8)

    @property
    def pin_memory(self) -> bool:
        """Whether host batches are pinned for the copy to the device."""
        return self.loader == "torch"

    @property
    def distributed(self) -> bool:
        """Whether dask workers extract (``scheduler`` is not ``none``)."""
        return self.scheduler != "none"

    def attrs(self) -> dict[str, str]:
        """Root attributes of the store: ``backend``, ``provider``, ``precision``, ``decode``."""
        return {**runner_attrs(self.backend, self.device, self.autocast, self.int8), "decode": self.decode}

    def config(self) -> dict[str, str]:
        """The choices that enter the store's ``config["extract"]`` (and its hash).

        ``backend`` and ``autocast`` as resolved (``none`` for float32); ``decode``
        only when it is ``gpu`` (a store never mixes PIL and device decoding; the
        CPU path is left out, as before ``extract.decode`` existed). ``precision``
        itself is a param (``extract.precision``), recorded with the int8 knobs.
        """
        config = {"backend": self.backend, "autocast": self.autocast or "none"}
        if self.decode == "gpu":
            config["decode"] = "gpu"
        return config

    def describe(self) -> str:
        """One line for logs and ``featcache doctor``."""
        where = "this process" if self.scheduler == "none" else f"dask ({self.scheduler})"
        return (f"device {self.device}, backend {self.backend} on {self.provider}, {self.precision}, "
                f"decode {self.decode}, loader {self.loader}, in {where}")


def plan_extraction(*, device: str = "auto", backend: str = "auto", autocast: str | None = "auto",
                    decode: str = "auto", num_workers: int | str | None = "auto",
                    scheduler: str = "none", precision: str = "float32",
                    device_setting: str = "extract_run.device", weight_bytes: int | None = None) -> ExtractionPlan:
    """Resolve the extraction settings (``auto`` included) on this machine into one plan.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or "cuda:N"
    backend : {"auto", "torch", "onnx", "openvino"}
    autocast : {"auto", "none", "bf16", "fp16"} or None
    decode : {"auto", "cpu", "gpu"}
    num_workers : int, "auto" or None
        Decode worker processes (``auto``/None: one per spare core).
    scheduler : str
        ``extract_run.scheduler``: ``none``, ``local`` or a dask scheduler address.
    precision : {"float32", "int8"}
        ``extract.precision`` (int8: onnxruntime on the CPU only, see :func:`resolve_precision`).
    device_setting : str
        What the user set ``device`` with, named in its errors (``predict`` passes ``--device``).
    weight_bytes : int, optional
        The backbone's float32 weights, where known before it is built (timm models): ``backend: auto``
        runs torch on the CPU for a model over the 2 GiB one ONNX file holds (:func:`resolve_backend`), unless
        ``precision`` is int8, which quantizes the ONNX export (the export then says whether it fits).

    Returns
    -------
    ExtractionPlan

    Raises
    ------
    featcache.errors.ExtractionError
        For a device that is not there (``cuda`` without one) or an unknown value.
    """
    try:
        if str(device).startswith("cuda:"):
            compute.resolve_device("cuda", setting=device_setting, error=ExtractionError)
            resolved_device = str(device)
        else:
            resolved_device = compute.resolve_device(device, setting=device_setting, error=ExtractionError)
        resolved_backend = resolve_backend(backend, resolved_device, autocast,
                                           weight_bytes=None if precision == "int8" else weight_bytes)
        resolved_autocast = resolve_autocast(autocast, resolved_device, resolved_backend)
        resolved_decode = resolve_decode(decode, resolved_device, resolved_backend)
        int8 = resolve_precision(precision, resolved_device, resolved_backend)
    except ExtractionError:
        raise
    except ValueError as error:
        raise ExtractionError(str(error)) from None
    if resolved_decode == "gpu":
        loader = "device"
    elif _is_cuda(resolved_device):
        loader = "torch"
    else:
        loader = "arrays"
    workers = None if num_workers in (None, "auto") else int(num_workers)
    return ExtractionPlan(device=resolved_device, backend=resolved_backend, autocast=resolved_autocast,
                          decode=resolved_decode, loader=loader, num_workers=workers, scheduler=scheduler,
                          int8=int8)


def build_runner(backbone: Any, layers: Sequence[str], plan: ExtractionPlan, *, pooling: str = "avg",
                 channels_last: bool = True, input_size: int | None = None, intra_op_threads: int | None = None,
                 onnx_cache: str | None = None, calibration: Any = None,
                 int8_min_cosine: float = 0.99) -> tuple[Any, dict[str, Any]]:
    """Build the feature runner of ``plan`` (its backend, device and precision).

    Parameters
    ----------
    backbone : WeightsSource or LoadedBackbone
        The backbone and its weights (:func:`~featcache.extract.zoo.weights.resolve_weights`
        or :func:`~featcache.extract.zoo.weights.load_backbone`). The model is built
        (``backbone.load()``) only when needed: an onnx runner whose export is
        cached needs none.
    layers : sequence of str
        Aliases or raw node names.
    plan : ExtractionPlan
        Where and how the runner runs.
    pooling, channels_last
        As for :class:`~featcache.extract.runners.torch_runner.TorchFeatureExtractor`.
    input_size : int, optional
        ONNX and OpenVINO: the exported input side (default: the registry's).
    intra_op_threads : int, optional
        ONNX and OpenVINO: threads of one operator.
    onnx_cache : str, optional
        ONNX and OpenVINO: the export cache (``extract_run.onnx_cache``: ``auto``, ``none`` or a folder).
    calibration : CalibrationImages, optional
        int8 only (required there): the calibration and held-out images
        (:func:`~featcache.extract.onnx.calibration.calibration_images`).
    int8_min_cosine : float
        int8 only: the parity gate (:func:`~featcache.extract.onnx.quantize.int8_runner`).

    Returns
    -------
    runner : FeatureRunner
        A :class:`TorchFeatureExtractor`, an :class:`OnnxFeatureRunner` or an
        :class:`OpenVinoFeatureRunner` (the same export, run by OpenVINO).
    attrs : dict
        :func:`runner_attrs` of what was built, with ``onnx_sha256`` for an ONNX runner
        (and the int8 facts for an int8 one).

    Raises
    ------
    featcache.errors.ExtractionError
        When ``onnx`` is asked for on CUDA but onnxruntime's CUDA provider does not load.
    """
    if plan.backend == "openvino":
        from featcache.extract.onnx.openvino_runner import OpenVinoFeatureRunner

        extra = {} if onnx_cache is None else {"cache_dir": onnx_cache}
        runner = OpenVinoFeatureRunner.from_source(backbone, layers, pooling=pooling, device=plan.device,
                                                   input_size=input_size, intra_op_threads=intra_op_threads,
                                                   autocast=plan.autocast, **extra)
    elif plan.backend == "onnx":
        from featcache.extract.onnx.runner import OnnxFeatureRunner

        extra = {} if onnx_cache is None else {"cache_dir": onnx_cache}
        runner = OnnxFeatureRunner.from_source(backbone, layers, pooling=pooling, device=plan.device,
                                               input_size=input_size, intra_op_threads=intra_op_threads, **extra)
        if _is_cuda(plan.device) and runner.provider != CUDA_PROVIDER:
            import onnxruntime

            raise ExtractionError(
                f"extract.backend is 'onnx' on {plan.device!r}, but onnxruntime runs on {runner.provider} "
                f"(available providers: {onnxruntime.get_available_providers()}). Hint: set extract.backend: auto "
                f"(torch on the GPU), or fix onnxruntime: {ONNX_GPU_FIX}."
            )
        if plan.int8:
            from featcache.extract.onnx.quantize import int8_runner

            if calibration is None:
                raise ValueError("build_runner: an int8 plan needs calibration images (calibration_images()).")
            extra = {} if onnx_cache is None else {"cache_dir": onnx_cache}
            runner, int8_attrs = int8_runner(runner, calibration, min_cosine=int8_min_cosine,
                                             intra_op_threads=intra_op_threads, **extra)
    else:
        from featcache.extract.runners.torch_runner import TorchFeatureExtractor

        loaded = backbone.load()
        runner = TorchFeatureExtractor(loaded.model, loaded.spec, layers, pooling=pooling, device=plan.device,
                                       channels_last=channels_last, autocast=plan.autocast)
    attrs: dict[str, Any] = dict(runner_attrs(plan.backend, plan.device, plan.autocast, plan.int8))
    if getattr(runner, "onnx_sha256", None):
        attrs["onnx_sha256"] = runner.onnx_sha256
    if plan.int8:
        attrs.update(int8_attrs)
    return runner, attrs
