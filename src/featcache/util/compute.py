"""Where computation runs: devices, CPU counts and torch's thread limit; a model's float32 weight bytes.

torch is imported inside the functions that need it, so importing this module
stays cheap for commands that run no model.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = [
    "DEVICES",
    "cuda_impossible",
    "default_num_workers",
    "float32_weight_bytes",
    "physical_cores",
    "resolve_device",
    "thread_limit",
    "torch_threads",
    "torch_version",
    "usable_cpus",
]

#: Device names a user may ask for (``auto``: CUDA when available, else the CPU).
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def torch_version() -> str:
    """torch's version without its local tag (``2.4.1``, not ``2.4.1+cu121``), without importing torch.

    Stores and ONNX exports record it; a dask driver compares its own with its workers'.

    Returns
    -------
    str
        The imported torch's ``__version__`` when torch is imported, else the installed package's version.

    Raises
    ------
    importlib.metadata.PackageNotFoundError
        When torch is neither imported nor installed.
    """
    torch = sys.modules.get("torch")
    version = torch.__version__ if torch is not None else importlib.metadata.version("torch")
    return str(version).split("+")[0]


def resolve_device(device: str, *, setting: str = "device", error: type[Exception] = ValueError) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit choice is checked.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        The requested device.
    setting : str
        The setting's name in messages (``extract_run.device``, ``device``).
    error : type of Exception
        Raised (with the allowed values and a hint) on an unknown or unavailable device.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda"``.
    """
    if device not in DEVICES:
        raise error(f"{setting} is {device!r}; allowed: {', '.join(DEVICES)}.")
    if device == "cpu" or (device == "auto" and "torch" not in sys.modules and cuda_impossible()):
        return "cpu"  # decided without importing torch (seconds of start-up)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise error(f"{setting} is 'cuda' but no CUDA device is visible. Hint: use 'auto' or 'cpu'.")
    return device


def cuda_impossible() -> bool:
    """True when no CUDA device can be visible to torch here, decided without importing torch.

    ``CUDA_VISIBLE_DEVICES`` hides every device, the platform is macOS, or
    (Linux) no NVIDIA driver is loaded: no ``/proc/driver/nvidia``, no
    ``/dev/nvidia*`` and no WSL GPU bridge ``/dev/dxg``. False means "ask
    torch", not "CUDA is there".
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    if sys.platform == "darwin":
        return True
    if sys.platform.startswith("linux"):
        return not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/dxg") or glob.glob("/dev/nvidia*"))
    return False


def usable_cpus() -> int:
    """Logical CPUs this process may run on (the affinity mask: containers, ``taskset``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical CPU cores usable by this process (at least 1).

    ``psutil``'s physical count when available, capped by the CPU affinity
    mask (containers, ``taskset``); the logical count otherwise.
    """
    usable = usable_cpus()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil ships with distributed
        physical = None
    return max(1, min(physical or usable, usable))


def default_num_workers() -> int:
    """Decode workers for this machine: leave one core for the forward pass, at most 8."""
    return max(1, min(8, usable_cpus() - 1))


@contextlib.contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n_threads)``, restoring the old value after.

    Parameters
    ----------
    n_threads : int or None
        Intra-op threads; None leaves torch's setting alone.
    """
    import torch

    previous = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def thread_limit(n_jobs: int | None) -> Iterator[None]:
    """Limit BLAS/OpenMP threads to ``n_jobs`` inside the block (no-op for None/-1)."""
    if n_jobs is None or n_jobs < 1:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n_jobs)):
        yield


def float32_weight_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers in float32 (shared tensors counted once).

    What its weights take in an exported float32 ONNX file; a module on the ``meta`` device is measured
    without any memory (:func:`~featcache.extract.zoo.timm_models.timm_backbone`).
    """
    tensors = {id(tensor): tensor for tensor in [*module.parameters(), *module.buffers()]}
    return sum(tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
               for tensor in tensors.values())
