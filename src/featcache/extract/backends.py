"""Which runtime and precision extract features, decided in one place, and the runner that does it.

``extract.backend: auto`` (the default) picks

* **torch** on CUDA (fp16 autocast by default, see below); onnxruntime runs on
  a GPU only when asked for explicitly (``backend: onnx``), and then only
  where its CUDA execution provider really loads: otherwise extraction stops
  with the fix, it never falls back to the CPU silently;
* **onnxruntime** on the CPU (the faster CPU runtime, see ``benchmarks/``),
  torch when onnxruntime is not installed.

``extract.autocast: auto`` is fp16 on CUDA with torch (features match float32
to cosine 0.99997 on an H200) and none elsewhere; bf16 (cosine 0.997) is
never picked by ``auto``. The store's root attributes record what ran:
``backend``, ``provider`` and ``precision`` (:func:`runner_attrs`).

``featcache doctor`` prints :func:`doctor_report`: torch/CUDA, onnxruntime and
its providers, the GPU JPEG decoder, and what ``auto`` picks here, with the
fix for whatever is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from typing import Any, Sequence

__all__ = ["AUTOCASTS", "BACKENDS", "DECODE_PATHS", "build_runner", "doctor_report", "onnx_cuda_available",
           "onnxruntime_status", "precision_name", "resolve_autocast", "resolve_backend", "resolve_decode",
           "runner_attrs"]

logger = logging.getLogger(__name__)

#: ``extract.backend`` values.
BACKENDS = ("auto", "torch", "onnx")

#: ``extract.autocast`` values (``none``: float32).
AUTOCASTS = ("auto", "none", "bf16", "fp16")

_CUDA_PROVIDER = "CUDAExecutionProvider"

#: The fix when onnxruntime cannot use the GPU (also printed by ``featcache doctor``).
ONNX_GPU_FIX = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
                "(or pip install 'featcache[gpu]' after uninstalling both): onnxruntime and onnxruntime-gpu "
                "installed together hide the CUDA provider")


def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def onnxruntime_status() -> dict[str, Any]:
    """What onnxruntime offers here.

    Returns
    -------
    dict
        ``installed`` (bool), ``version`` (str or None), ``providers`` (list of
        str), ``packages`` (the onnxruntime distributions installed, e.g.
        ``["onnxruntime", "onnxruntime-gpu"]``).
    """
    packages = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        packages.append(name)
    if not _onnxruntime_installed():
        return {"installed": False, "version": None, "providers": [], "packages": packages}
    import onnxruntime as ort

    return {"installed": True, "version": ort.__version__, "providers": list(ort.get_available_providers()),
            "packages": packages}


def onnx_cuda_available() -> bool:
    """Whether onnxruntime lists its CUDA execution provider (loading it is checked when a runner is built)."""
    return _CUDA_PROVIDER in onnxruntime_status()["providers"]


#: Where images are decoded: PIL in worker processes, or batched on the runner's device.
DECODE_PATHS = ("cpu", "gpu")


def resolve_decode(decode: str, device: str) -> str:
    """The decode path: ``auto`` -> ``gpu`` when the runner's input device is CUDA, else ``cpu``.

    Parameters
    ----------
    decode : {"auto", "cpu", "gpu"}
        ``extract.decode``; ``gpu`` on a CPU device is allowed (the same code path, for tests).
    device : str
        Where the runner takes its input (``cuda``, ``cuda:1``, ``cpu``).
    """
    if decode == "auto":
        return "gpu" if str(device).startswith("cuda") else "cpu"
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode {decode!r} is not one of 'auto', {', '.join(map(repr, DECODE_PATHS))}.")
    return decode


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` -> ``torch`` on CUDA, ``onnx`` on CPU (``torch`` without onnxruntime); explicit values pass.

    Parameters
    ----------
    backend : {"auto", "torch", "onnx"}
    device : str
        The resolved device (``cpu``, ``cuda``, ``cuda:N``).

    Raises
    ------
    ValueError
        For an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"extract.backend {backend!r} is not one of {BACKENDS}. Hint: 'auto' picks torch on CUDA "
                         "and onnxruntime on the CPU.")
    if backend != "auto":
        return backend
    if _is_cuda(device):
        return "torch"
    return "onnx" if _onnxruntime_installed() else "torch"


def resolve_autocast(autocast: str | None, device: str, backend: str) -> str | None:
    """``auto`` -> ``fp16`` for torch on CUDA, None (float32) otherwise; ``none`` -> None.

    Parameters
    ----------
    autocast : {"auto", "none", "bf16", "fp16"} or None
    device : str
        The resolved device.
    backend : {"torch", "onnx"}
        The resolved backend; onnxruntime runs the exported float32 graph,
        so an explicit ``bf16``/``fp16`` is ignored there (with a warning).
    """
    if autocast is None or autocast == "none":
        return None
    if autocast not in AUTOCASTS:
        raise ValueError(f"extract.autocast {autocast!r} is not one of {AUTOCASTS}. Hint: 'auto' is fp16 on CUDA, "
                         "float32 on the CPU.")
    if autocast == "auto":
        return "fp16" if _is_cuda(device) and backend == "torch" else None
    if backend == "onnx":
        logger.warning("extract.autocast %r is ignored by the onnx backend (it runs the float32 graph)", autocast)
        return None
    return autocast


def precision_name(autocast: str | None) -> str:
    """``float32``, ``float16`` or ``bfloat16``: what the forward ran in (a root attribute)."""
    return {None: "float32", "fp16": "float16", "bf16": "bfloat16"}[autocast]


def runner_attrs(backend: str, device: str, autocast: str | None) -> dict[str, str]:
    """Root attributes that say what ran: ``backend``, ``provider`` and ``precision``.

    ``provider`` is onnxruntime's execution provider for ``onnx`` (CUDA on a
    GPU: :func:`build_runner` refuses any other there), the torch device
    otherwise. Pure: a dask driver states what its workers run without building a runner.
    """
    if backend == "onnx":
        provider = _CUDA_PROVIDER if _is_cuda(device) else "CPUExecutionProvider"
    else:
        provider = str(device)
    return {"backend": backend, "provider": provider, "precision": precision_name(autocast)}


def build_runner(backbone: Any, layers: Sequence[str], *, backend: str = "auto", device: str = "cpu",
                 pooling: str = "avg", channels_last: bool = True, autocast: str | None = "auto",
                 input_size: int | None = None, intra_op_threads: int | None = None,
                 onnx_cache: str | None = None) -> tuple[Any, dict[str, str]]:
    """Build the feature runner that ``backend``/``autocast`` resolve to on ``device``.

    Parameters
    ----------
    backbone : WeightsSource or LoadedBackbone
        The backbone and its weights (:func:`~featcache.extract.zoo.weights.resolve_weights`
        or :func:`~featcache.extract.zoo.weights.load_backbone`). The model is built
        (``backbone.load()``) only when needed: an onnx runner whose export is
        cached needs none.
    layers : sequence of str
        Aliases or raw node names.
    backend, autocast : str
        As in params (``auto`` resolved by :func:`resolve_backend` / :func:`resolve_autocast`).
    device : str
        The resolved device (``cpu``, ``cuda``, ``cuda:N``).
    pooling, channels_last
        As for :class:`~featcache.extract.runners.torch_runner.TorchFeatureExtractor`.
    input_size : int, optional
        ONNX only: the exported input side (default: the registry's).
    intra_op_threads : int, optional
        ONNX only: threads of one operator.
    onnx_cache : str, optional
        ONNX only: the export cache (``extract.onnx_cache``: ``auto``, ``none`` or a folder).

    Returns
    -------
    runner : FeatureRunner
        A :class:`TorchFeatureExtractor` or an :class:`OnnxFeatureRunner`.
    attrs : dict
        :func:`runner_attrs` of what was built.

    Raises
    ------
    featcache.errors.ExtractionError
        When ``onnx`` is asked for on CUDA but onnxruntime's CUDA provider does not load.
    """
    backend = resolve_backend(backend, device)
    autocast = resolve_autocast(autocast, device, backend)
    if backend == "onnx":
        from featcache.extract.onnx.runner import OnnxFeatureRunner

        extra = {} if onnx_cache is None else {"cache_dir": onnx_cache}
        runner = OnnxFeatureRunner.from_source(backbone, layers, pooling=pooling, device=device,
                                               input_size=input_size, intra_op_threads=intra_op_threads, **extra)
        if _is_cuda(device) and runner.provider != _CUDA_PROVIDER:
            from featcache.errors import ExtractionError

            raise ExtractionError(
                f"extract.backend is 'onnx' on {device!r}, but onnxruntime runs on {runner.provider} "
                f"(available providers: {onnxruntime_status()['providers']}). Hint: set extract.backend: auto "
                f"(torch on the GPU), or fix onnxruntime: {ONNX_GPU_FIX}."
            )
    else:
        from featcache.extract.runners.torch_runner import TorchFeatureExtractor

        loaded = backbone.load()
        runner = TorchFeatureExtractor(loaded.model, loaded.spec, layers, pooling=pooling, device=device,
                                       channels_last=channels_last, autocast=autocast)
    attrs = runner_attrs(backend, device, autocast)
    if getattr(runner, "onnx_sha256", None):
        attrs["onnx_sha256"] = runner.onnx_sha256
    return runner, attrs


def _gpu_decoder_line(cuda: bool) -> str:
    try:
        from featcache.extract.decode.device import gpu_decode_status
    except ImportError:
        gpu_decode_status = None
    if not cuda:
        return "GPU JPEG decode: not available (no CUDA device); images are decoded with PIL on the CPU"
    if gpu_decode_status is not None:
        ok, text = gpu_decode_status("cuda")
        return f"GPU JPEG decode: {'yes' if ok else 'NO'}: {text}"
    have_codec = importlib.util.find_spec("torchcodec") is not None
    return (f"GPU JPEG decode: torchcodec {'importable' if have_codec else 'missing (pip install torchcodec)'}, "
            "torchvision.io.decode_jpeg(device='cuda') available")


def doctor_report() -> list[str]:
    """What extraction would use on this machine and how to fix what is missing (``featcache doctor``)."""
    import torch

    lines = [f"torch {torch.__version__}"]
    cuda = torch.cuda.is_available()
    if cuda:
        names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        lines.append(f"CUDA: yes, {len(names)} device(s): {', '.join(names)} (torch CUDA {torch.version.cuda})")
    else:
        lines.append("CUDA: no (torch sees no CUDA device" + (
            "; this torch build has no CUDA support)" if torch.version.cuda is None else ")"))
    ort = onnxruntime_status()
    if ort["installed"]:
        lines.append(f"onnxruntime {ort['version']}: providers {', '.join(ort['providers'])}")
    else:
        lines.append("onnxruntime: not installed (pip install onnxruntime, or onnxruntime-gpu on a GPU machine)")
    if len([p for p in ort["packages"] if p.startswith("onnxruntime")]) > 1:
        lines.append(f"  WARNING: both {' and '.join(ort['packages'])} are installed. Fix: {ONNX_GPU_FIX}.")
    elif cuda and ort["installed"] and _CUDA_PROVIDER not in ort["providers"]:
        lines.append(f"  onnxruntime cannot use the GPU (fine: auto picks torch there). To run backend: onnx on the "
                     f"GPU: {ONNX_GPU_FIX}.")
    lines.append(_gpu_decoder_line(cuda))
    device = "cuda" if cuda else "cpu"
    backend = resolve_backend("auto", device)
    autocast = resolve_autocast("auto", device, backend)
    lines.append(f"extract.device: auto -> {device}; extract.backend: auto -> {backend}; "
                 f"extract.autocast: auto -> {precision_name(autocast)}")
    return lines
