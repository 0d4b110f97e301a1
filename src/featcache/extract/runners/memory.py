"""Will a batch fit? Estimate extraction memory before any work and fail early.

The runner's traced graph (torch.fx, as built by
:class:`~featcache.extract.runners.torch_runner.TorchFeatureExtractor`) is run once on
a batch of **one** image with :class:`torch.fx.passes.shape_prop.ShapeProp`,
which records every node's output size. A liveness pass over the graph then
gives the peak of the activations alive at the same time (a node's output is
freed after its last user runs), i.e. the activation memory per image. Times
``batch_size``, plus the input batches that the DataLoader keeps in flight,
this is compared with the memory available now: ``psutil.virtual_memory().available``
on CPU, ``torch.cuda.mem_get_info`` on CUDA (host memory is still checked for
the input batches).

Usage (``pipeline/extract.py``, after building the runner, before extracting)::

    check_batch_memory(runner, preprocess.input_size, knobs.batch_size, device)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featcache.errors import ExtractionError

if TYPE_CHECKING:  # torch is imported only where a torch runner exists (an ONNX runner needs none)
    import torch
    from torch import fx

__all__ = ["MemoryEstimate", "activation_bytes_per_image", "available_memory", "check_batch_memory",
           "estimate_batch_memory"]

logger = logging.getLogger(__name__)

#: Allocator fragmentation, convolution workspaces and layout reorders (channels_last) on top of
#: the live activations the graph shows; calibrated on efficientnet_lite0 / resnet18 on CPU.
OVERHEAD = 1.5

#: Fraction of the available memory a run may plan to use (the rest: the OS, other processes).
USABLE_FRACTION = 0.9

# runner -> {input_size: bytes}: the graph of a runner never changes, so it is measured once per size.
_MEASURED: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class MemoryEstimate:
    """What one extraction batch needs and what is available.

    Attributes
    ----------
    batch_size : int
        The batch size checked.
    per_image_bytes : int
        Activation bytes per image on the compute device (with :data:`OVERHEAD`).
    input_bytes : int
        Bytes of one normalised input image on the device (3 x S x S float32); the
        batches queued in the loader hold uint8 pixels (a quarter of that).
    device_bytes : int
        Estimated peak on the compute device for a whole batch.
    host_bytes : int
        Estimated host memory for the batches in flight (equals ``device_bytes`` plus
        the queued inputs on CPU).
    device_available, host_available : int
        Bytes available now on the device and in host RAM.
    device : str
        ``cpu`` or ``cuda[:N]``.
    """

    batch_size: int
    per_image_bytes: int
    input_bytes: int
    device_bytes: int
    host_bytes: int
    device_available: int
    host_available: int
    device: str

    @property
    def fits(self) -> bool:
        """Whether both the device and the host estimates fit in the usable memory."""
        return (self.device_bytes <= USABLE_FRACTION * self.device_available
                and self.host_bytes <= USABLE_FRACTION * self.host_available)

    def max_batch_size(self) -> int:
        """The largest batch size that fits (at least 0)."""
        per_batch_image = self.device_bytes / max(1, self.batch_size)
        per_host_image = self.host_bytes / max(1, self.batch_size)
        fit_device = int(USABLE_FRACTION * self.device_available // max(1.0, per_batch_image))
        fit_host = int(USABLE_FRACTION * self.host_available // max(1.0, per_host_image))
        return max(0, min(fit_device, fit_host))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _tensor_bytes(meta: Any) -> int:
    """Bytes of the tensors described by a ShapeProp ``tensor_meta`` (possibly nested)."""
    if meta is None:
        return 0
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        numel = 1
        for dim in meta.shape:
            numel *= int(dim)
        import torch

        return numel * torch.empty((), dtype=meta.dtype).element_size()
    if isinstance(meta, dict):
        return sum(_tensor_bytes(value) for value in meta.values())
    if isinstance(meta, (list, tuple)):
        return sum(_tensor_bytes(value) for value in meta)
    return 0


def _graph_module(runner: Any) -> fx.GraphModule | None:
    if "torch" not in sys.modules:  # no torch runner can exist: do not import torch to find out
        return None
    from torch import fx

    module = getattr(runner, "module", None)
    return module if isinstance(module, fx.GraphModule) else None


def activation_bytes_per_image(runner: Any, input_size: int) -> int | None:
    """Peak live activation bytes of one image through ``runner``'s traced graph.

    Parameters
    ----------
    runner : TorchFeatureExtractor
        Anything with an ``fx.GraphModule`` as ``.module`` (and optionally
        ``device``, ``channels_last`` and ``_autocast_context``).
    input_size : int
        Side S of the (1, 3, S, S) input.

    Returns
    -------
    int or None
        Bytes, without :data:`OVERHEAD`; None when the runner has no torch
        graph (e.g. the ONNX runner).
    """
    module = _graph_module(runner)
    if module is None:
        return None
    try:
        cached = _MEASURED.setdefault(runner, {})
    except TypeError:  # not weak-referenceable: measure every time
        cached = {}
    if input_size not in cached:
        cached[input_size] = _peak_live_bytes(runner, module, input_size)
    return cached[input_size]


def _peak_live_bytes(runner: Any, module: fx.GraphModule, input_size: int) -> int:
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    device = getattr(runner, "device", torch.device("cpu"))
    sample = torch.zeros(1, 3, input_size, input_size, device=device)
    if getattr(runner, "channels_last", False):
        sample = sample.contiguous(memory_format=torch.channels_last)
    autocast = getattr(runner, "_autocast_context", None)
    context = autocast() if callable(autocast) else contextlib.nullcontext()
    with torch.inference_mode(), context:
        ShapeProp(module).propagate(sample)
    nodes = list(module.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    last_use = {node: max((position[user] for user in node.users), default=position[node]) for node in nodes}
    size = {node: _tensor_bytes(node.meta.get("tensor_meta")) for node in nodes}
    frees: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if node.op not in ("get_attr", "output"):
            frees.setdefault(last_use[node], []).append(node)
    live = peak = 0
    for index, node in enumerate(nodes):
        if node.op in ("get_attr", "output"):  # weights are already resident; the output aliases its inputs
            continue
        live += size[node]
        peak = max(peak, live)
        for done in frees.get(index, []):
            live -= size[done]
    return int(peak)


def available_memory(device: str | torch.device = "cpu") -> tuple[int, int]:
    """(bytes available on ``device``, bytes available in host RAM) right now."""
    import psutil

    host = int(psutil.virtual_memory().available)
    if str(device) == "cpu":
        return host, host
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), host
    return host, host


def estimate_batch_memory(runner: Any, input_size: int, batch_size: int, device: str | torch.device = "cpu", *,
                          num_workers: int | None = None, prefetch_factor: int = 4,
                          available: tuple[int, int] | None = None) -> MemoryEstimate | None:
    """Estimate the memory of extracting with ``batch_size`` (see the module docstring).

    Parameters
    ----------
    runner : TorchFeatureExtractor
        Anything with an ``fx.GraphModule`` as ``.module`` (see
        :func:`activation_bytes_per_image`); other runners give None.
    input_size : int
        Side S of the (B, 3, S, S) input batches.
    batch_size : int
        B, the images per forward to check.
    device : str or torch.device
        Where the runner computes (``cpu``, ``cuda[:N]``); on CUDA the input
        queue is counted in host memory only.
    num_workers, prefetch_factor : int
        DataLoader settings: up to ``num_workers * prefetch_factor`` uint8
        input batches wait in host memory (shared memory) while one runs;
        ``num_workers=None`` means
        :func:`~featcache.util.compute.default_num_workers`.
    available : (int, int), optional
        (device, host) bytes available; default: measured now.

    Returns
    -------
    MemoryEstimate or None
        None when the runner has no torch graph to measure.
    """
    activations = activation_bytes_per_image(runner, input_size)
    if activations is None:
        return None
    import torch

    from featcache.util.compute import default_num_workers

    device = torch.device(device)
    workers = default_num_workers() if num_workers is None else num_workers
    per_image = int(activations * OVERHEAD)
    input_bytes = 3 * input_size * input_size * 4
    queued = max(1, workers * prefetch_factor) + 1  # batches waiting in workers' queues + the one collated
    queued_bytes = 3 * input_size * input_size  # loaders hand over uint8 pixels; normalised on the device
    device_bytes = batch_size * (per_image + input_bytes)
    if device.type == "cuda":
        host_bytes = batch_size * queued_bytes * queued
    else:
        host_bytes = device_bytes + batch_size * queued_bytes * queued
    device_available, host_available = available if available is not None else available_memory(device)
    return MemoryEstimate(batch_size=batch_size, per_image_bytes=per_image, input_bytes=input_bytes,
                          device_bytes=device_bytes, host_bytes=host_bytes, device_available=device_available,
                          host_available=host_available, device=str(device))


def check_batch_memory(runner: Any, input_size: int, batch_size: int, device: str | torch.device = "cpu", *,
                       num_workers: int | None = None, prefetch_factor: int = 4,
                       available: tuple[int, int] | None = None) -> MemoryEstimate | None:
    """Fail before any work when ``batch_size`` images will not fit in memory.

    The parameters are those of :func:`estimate_batch_memory`.

    Raises
    ------
    ExtractionError
        Naming ``extract_run.batch_size``, the estimate, the available memory and
        the largest batch size that fits.

    Returns
    -------
    MemoryEstimate or None
        The estimate (None when the runner cannot be measured: nothing is checked).
    """
    estimate = estimate_batch_memory(runner, input_size, batch_size, device, num_workers=num_workers,
                                     prefetch_factor=prefetch_factor, available=available)
    if estimate is None:
        logger.debug("batch memory not checked: the runner has no torch graph to measure")
        return None
    logger.info("extract_run.batch_size=%d: about %s on %s (%s per image), %s available", batch_size,
                _gib(estimate.device_bytes), estimate.device, _gib(estimate.per_image_bytes),
                _gib(estimate.device_available))
    if estimate.fits:
        return estimate
    on_device = estimate.device_bytes > USABLE_FRACTION * estimate.device_available
    needed, have = ((estimate.device_bytes, estimate.device_available) if on_device
                    else (estimate.host_bytes, estimate.host_available))
    where = "GPU memory" if on_device and estimate.device.startswith("cuda") else "RAM"
    fit = estimate.max_batch_size()
    hint = (f"set extract_run.batch_size to {fit} or less" if fit >= 1
            else "even one image does not fit: free memory, use a smaller backbone or input, or fewer layers")
    raise ExtractionError(
        f"extract_run.batch_size={batch_size} needs about {_gib(needed)} of {where} "
        f"({_gib(estimate.per_image_bytes + estimate.input_bytes)} per image for the activations and input, "
        f"estimated from the traced graph), but only {_gib(have)} is available "
        f"({int(USABLE_FRACTION * 100)}% of it is usable). Hint: {hint}"
        + ("; fewer extract_run.num_workers also lowers the queued input batches." if not on_device else ".")
    )
