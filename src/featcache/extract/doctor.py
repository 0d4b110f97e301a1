"""``featcache doctor``: what extraction runs on here, what ``auto`` picks, and the fix for what is missing.

It reports torch and its CUDA devices, onnxruntime and its execution
providers, OpenVINO and the precisions it runs natively on this CPU, whether
batched JPEG decoding works on the GPU (by decoding a test JPEG there), and
the :class:`~featcache.extract.plan.ExtractionPlan` that the shipped ``auto``
settings resolve to on this machine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

from featcache.extract.plan import CUDA_PROVIDER, ONNX_GPU_FIX, plan_extraction

__all__ = ["doctor_report", "gpu_decoder_line", "onnxruntime_status", "openvino_line"]


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
    if importlib.util.find_spec("onnxruntime") is None:
        return {"installed": False, "version": None, "providers": [], "packages": packages}
    import onnxruntime as ort

    return {"installed": True, "version": ort.__version__, "providers": list(ort.get_available_providers()),
            "packages": packages}


def gpu_decoder_line(cuda: bool) -> str:
    """The doctor's line on batched GPU JPEG decoding: checked by decoding a test JPEG on the device."""
    if not cuda:
        return "GPU JPEG decode: not available (no CUDA device); images are decoded with PIL on the CPU"
    from featcache.extract.decode.decoders import gpu_decode_status

    ok, text = gpu_decode_status("cuda")
    return f"GPU JPEG decode: {'yes' if ok else 'NO'}: {text}"


def openvino_line() -> str:
    """OpenVINO's version, the CPU and the autocasts it runs natively there (what ``extract.autocast: bf16`` gets)."""
    from featcache.extract.onnx.openvino_runner import native_autocasts, openvino_status

    status = openvino_status()
    if status["version"] is None:
        return ("openvino: not installed (extract.autocast: bf16 on the CPU then runs float32 with onnxruntime; "
                "pip install openvino)")
    native = sorted(native_autocasts())
    if "bf16" in native:
        use = f"native {', '.join(native)}: extract.autocast: bf16 runs OpenVINO's bf16 graph"
    else:
        use = (f"native {', '.join(native) or 'float32 only'}, no bf16: extract.autocast: bf16 runs float32 "
               "(onnxruntime)")
    return f"openvino {status['version']} on {status['cpu']}: {use}"


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
    if len(ort["packages"]) > 1:
        lines.append(f"  WARNING: both {' and '.join(ort['packages'])} are installed. Fix: {ONNX_GPU_FIX}.")
    elif cuda and ort["installed"] and CUDA_PROVIDER not in ort["providers"]:
        lines.append(f"  onnxruntime cannot use the GPU (fine: auto picks torch there). To run backend: onnx on the "
                     f"GPU: {ONNX_GPU_FIX}.")
    lines.append(openvino_line())
    lines.append(gpu_decoder_line(cuda))
    plan = plan_extraction()
    lines.append(f"extract_run.device: auto -> {plan.device}; extract.backend: auto -> {plan.backend}; "
                 f"extract.autocast: auto -> {plan.precision}; extract.decode: auto -> {plan.decode}")
    lines.append(f"plan with every setting auto: {plan.describe()}")
    return lines
