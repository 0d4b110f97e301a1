"""A torch runner's forward replayed from a captured CUDA graph (fixed batch shape, padded last batch).

A forward of resnet50 or EfficientNet-Lite0 is a few hundred kernels; each
launch costs the host a few microseconds of Python and driver work, on the
same thread (and under the same GIL) that hands batches to the GPU. A CUDA
graph captures the whole forward once for a fixed input shape and replays it
with one launch. :class:`GraphedRunner` wraps a
:class:`~featcache.extract.runners.torch_runner.TorchFeatureExtractor` on
CUDA:

* the graph is captured for ``(batch_size, 3, S, S)`` when the runner is
  built (before any decode thread runs: a capture must not see other threads'
  CUDA calls), after three warm-up forwards on a side stream;
* a batch of ``G <= batch_size`` rows is copied into the graph's static input
  (rows ``G:`` zeroed: the last batch, or a batch with bad rows, is padded),
  the graph is replayed on the caller's current stream, and the first ``G``
  rows of each static output are cloned (the next replay overwrites them);
* a larger batch, another input size, or a CPU device runs the eager forward.

The features are those of the eager forward at batch ``batch_size`` (the
same kernels; padding rows do not mix with others in inference mode).
Memory: the graph keeps its own pool of the forward's activations for
``batch_size`` rows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from featcache.store.schema import LayerSpec

__all__ = ["GraphedRunner"]

logger = logging.getLogger(__name__)

#: Eager forwards on a side stream before capture (cudnn autotuning, lazy initialisation).
WARMUP_FORWARDS = 3


class GraphedRunner:
    """``runner.forward_pooled`` of up to ``batch_size`` rows of size ``input_size``, replayed from a CUDA graph.

    Parameters
    ----------
    runner : TorchFeatureExtractor
        The eager runner (its ``device``, ``forward_pooled``, ``layer_specs``).
    batch_size : int
        Rows of the captured batch; smaller batches are padded to it.
    input_size : int
        S of the (B, 3, S, S) input.

    Attributes
    ----------
    graphed : bool
        Whether a graph was captured (False on the CPU, or when capture failed: the eager forward runs).
    """

    def __init__(self, runner: Any, batch_size: int, input_size: int) -> None:
        if batch_size < 1 or input_size < 1:
            raise ValueError(f"batch_size and input_size must be >= 1, got {batch_size!r}, {input_size!r}.")
        self.runner = runner
        self.batch_size, self.input_size = batch_size, input_size
        self.device = torch.device(runner.input_device)
        self.graphed = False
        self._graph: Any = None
        self._input: torch.Tensor | None = None
        self._outputs: dict[str, torch.Tensor] = {}
        if self.device.type == "cuda":
            self._capture()

    @property
    def input_device(self) -> torch.device:
        """Where the engine puts and normalises input batches (the runner's device)."""
        return self.device

    def layer_specs(self, input_size: int | None = None) -> list[LayerSpec]:
        """The runner's layer specs."""
        return self.runner.layer_specs(input_size)

    def __getattr__(self, name: str) -> Any:  # spec, pooling, aliases, ... of the eager runner
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one forward of a zero batch; eager forward if that fails."""
        shape = (self.batch_size, 3, self.input_size, self.input_size)
        with torch.inference_mode():
            static = torch.zeros(shape, dtype=torch.float32, device=self.device)
            side = torch.cuda.Stream(self.device)
            caller = torch.cuda.current_stream(self.device)
            side.wait_stream(caller)
            try:
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_FORWARDS):
                        self.runner.forward_pooled(static)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outputs = self.runner.forward_pooled(static)
            except RuntimeError as error:  # a model the graph cannot hold (host syncs, dynamic shapes)
                # torch.cuda.graph's exit ends the capture before it restores the caller's stream: when ending
                # raises, its capture stream stays current, and every later kernel of this thread would run there.
                torch.cuda.set_stream(caller)
                logger.warning("CUDA graph capture of %s failed (%s); the eager forward runs",
                               getattr(getattr(self.runner, "spec", None), "name", "the runner"), error)
                torch.cuda.synchronize(self.device)
                return
        self._graph, self._input, self._outputs, self.graphed = graph, static, outputs, True
        logger.info("captured the forward as a CUDA graph: batches of %d x 3 x %d x %d", *shape[:1], *shape[2:])

    def forward_pooled(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features ``{layer: (G, D) float32}`` of a (G, 3, S, S) float32 batch on the device.

        Asynchronous on CUDA like the eager runner's: the returned tensors are
        the caller's (clones of the graph's outputs), valid on the current stream.
        """
        rows = int(batch.shape[0])
        if not self.graphed or rows > self.batch_size or tuple(batch.shape[1:]) != (3, self.input_size,
                                                                                     self.input_size):
            return self.runner.forward_pooled(batch)
        assert self._input is not None
        with torch.inference_mode():
            self._input[:rows].copy_(batch)
            if rows < self.batch_size:
                self._input[rows:].zero_()
            self._graph.replay()
            return {name: value[:rows].clone() for name, value in self._outputs.items()}

    def __call__(self, batch: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """Pooled features as host arrays ``{layer: (G, D) float32}`` (synchronous)."""
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        outputs = self.forward_pooled(batch.to(self.device, non_blocking=True))
        return {name: value.cpu().numpy() for name, value in outputs.items()}
