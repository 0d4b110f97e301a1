"""Torch feature extractor: many named layers in one truncated forward pass.

The model is traced with torch.fx (torchvision's ``create_feature_extractor``,
with timm's leaf modules for timm models), so the graph ends at the deepest
requested node and nothing after it runs. In-place operations are rewritten to
their out-of-place forms, so a pre-activation node and its in-place ReLU can be
requested together and both come back correct.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
from typing import Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from featcache.errors import UserError
from featcache.extract.zoo.registry import BackboneSpec, LayerAlias, pooling_problem, resolve_layer
from featcache.store.schema import MAP_POOLINGS, POOLINGS, LayerSpec

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish)

__all__ = ["PoolingError", "TorchFeatureExtractor", "check_pooling", "graph_node_names", "make_inplace_safe",
           "pool_features"]

logger = logging.getLogger(__name__)

_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.iand: operator.and_, operator.ior: operator.or_,
}


def _fx_functions(spec: BackboneSpec):
    """(create_feature_extractor, node names of a model) for ``spec``'s family.

    A timm model by name (``timm:`` weights) is traced by :mod:`featcache.extract.zoo.timm_models`, whose graph
    also holds timm's own ``pre_logits`` feature; the registry's timm entries and torchvision use the libraries'.
    """
    if spec.weights.startswith("timm:"):
        from featcache.extract.zoo import timm_models

        return timm_models.create_feature_extractor, timm_models.graph_node_names
    if spec.family == "timm":
        from timm.models._features_fx import create_feature_extractor, get_graph_node_names
    else:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    return create_feature_extractor, lambda model: get_graph_node_names(model)[1]


def graph_node_names(model: nn.Module, spec: BackboneSpec) -> list[str]:
    """Node names of the model's eval-mode graph (what raw layer names may use).

    Parameters
    ----------
    model : torch.nn.Module
        The backbone (:func:`~featcache.extract.zoo.weights.load_backbone`'s ``model``).
    spec : BackboneSpec
        Its spec: timm models are traced with timm's FX helpers, the others with torchvision's.

    Returns
    -------
    list of str
        The eval-mode graph's node names, in graph order.
    """
    _, get_names = _fx_functions(spec)
    return get_names(model)


def make_inplace_safe(module: nn.Module) -> int:
    """Rewrite in-place operations of a traced module to out-of-place ones.

    Sets ``inplace=False`` on every submodule that has the flag, replaces
    ``operator.iadd``-style calls and ``tensor.relu_()``-style methods and
    ``inplace=True`` keyword arguments in the FX graph. The out-of-place
    form returns a new tensor, so later operations that read the mutated
    input are pointed at that new tensor (as they saw the mutated value
    before); the graph outputs keep the value at the node they name.

    Returns
    -------
    int
        Number of rewritten operations (for logging and tests).
    """
    count = 0
    was_inplace = set()
    for name, sub in module.named_modules():
        if getattr(sub, "inplace", False) is True:
            sub.inplace = False
            was_inplace.add(name)
            count += 1
    if isinstance(module, fx.GraphModule):
        order = {node: index for index, node in enumerate(module.graph.nodes)}
        for node in list(module.graph.nodes):
            rewritten = node.op == "call_module" and node.target in was_inplace
            if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
                node.target = _INPLACE_OPERATORS[node.target]
                count += 1
                rewritten = True
            elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_") \
                    and hasattr(torch.Tensor, node.target[:-1]):
                node.target = node.target[:-1]
                count += 1
                rewritten = True
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
                count += 1
                rewritten = True
            if rewritten and node.args and isinstance(node.args[0], fx.Node):
                mutated = node.args[0]
                for user in list(mutated.users):
                    if user.op != "output" and order[user] > order[node]:
                        user.replace_input_with(mutated, node)
        module.recompile()
    return count


class PoolingError(UserError, ValueError):
    """A pooling that does not apply to a layer (``cls`` of a conv map, ``avg2x2`` of tokens, ``cls`` without a
    class token)."""


def pool_features(activation: torch.Tensor, pooling: str, prefix_tokens: int = 0, nhwc: bool = False) -> torch.Tensor:
    """Pool a (B, C, H, W) map or a (B, N, C) token map to (B, D); flatten anything else to (B, D).

    The same operations run in torch and, exported, in the ONNX graph.

    Parameters
    ----------
    activation : torch.Tensor
        (B, C, H, W) conv map, (B, N, C) transformer tokens, or (B, D) vector.
    pooling : str
        Conv maps: ``avg`` / ``max`` (D = C), ``avg2x2`` (D = 4C, a 2x2 spatial
        pyramid level) or ``none`` (D = C*H*W). Token maps: ``avg`` / ``max``
        over the patch tokens (D = C; the first ``prefix_tokens`` left out),
        ``cls`` (token 0, D = C) or ``none`` (D = N*C).
    prefix_tokens : int
        Leading tokens of a token map that are not patch tokens (class,
        distillation, register tokens).
    nhwc : bool
        The 4-d map is (B, H, W, C) (timm's Swin stages): read as (B, C, H, W).

    Returns
    -------
    torch.Tensor
        (B, D) features, D as listed under ``pooling``, in the activation's dtype.

    Raises
    ------
    PoolingError
        For a pooling that does not apply to the map's kind.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}.")
    if activation.ndim == 4:
        if nhwc:
            activation = activation.permute(0, 3, 1, 2)
        if pooling not in MAP_POOLINGS["conv"]:
            raise PoolingError(f"pooling {pooling!r} does not apply to a conv map {tuple(activation.shape[1:])}; "
                               f"conv maps take {list(MAP_POOLINGS['conv'])}.")
        if pooling == "avg":
            activation = activation.mean(dim=(2, 3))
        elif pooling == "max":
            activation = activation.amax(dim=(2, 3))
        elif pooling == "avg2x2":
            activation = F.adaptive_avg_pool2d(activation, 2)
    elif activation.ndim == 3:
        if pooling not in MAP_POOLINGS["tokens"]:
            raise PoolingError(f"pooling {pooling!r} does not apply to a token map {tuple(activation.shape[1:])}; "
                               f"token maps take {list(MAP_POOLINGS['tokens'])}.")
        if pooling == "avg":
            activation = activation[:, prefix_tokens:].mean(dim=1)
        elif pooling == "max":
            activation = activation[:, prefix_tokens:].amax(dim=1)
        elif pooling == "cls":
            activation = activation[:, 0]
    return activation.flatten(1)


class TorchFeatureExtractor:
    """Extract several layers of a backbone in one truncated forward pass.

    The model is deep-copied, so the caller's model (and its train/eval
    state) is never changed.

    Parameters
    ----------
    model : nn.Module
        The backbone, e.g. from :func:`featcache.extract.zoo.weights.load_backbone`.
    spec : BackboneSpec
        Its registry entry.
    layers : sequence of str
        Aliases or raw graph node names; ``"default"`` means the registry default.
    pooling : str
        Pooling of conv and token maps, one of :data:`featcache.store.schema.POOLINGS`
        (see :func:`pool_features`).
    device : str or torch.device
        Where the forward runs.
    channels_last : bool
        Use the NHWC memory format (faster convolutions on CPU and GPU).
    autocast : str or None
        ``"bf16"`` or ``"fp16"`` to run under ``torch.autocast``; None for float32.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, layers: Sequence[str], pooling: str = "avg",
                 device: str | torch.device = "cpu", channels_last: bool = True, autocast: str | None = None) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}. Hint: 'avg' keeps one value per channel.")
        if not layers:
            raise ValueError("No layers requested. Hint: use ['default'] for the penultimate layer.")
        if autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast {autocast!r} is not one of None, 'bf16', 'fp16'.")
        self.spec = spec
        self.pooling = pooling
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.autocast = autocast
        create, _ = _fx_functions(spec)
        work = copy.deepcopy(model).eval()
        nodes = graph_node_names(work, spec)
        self.aliases: dict[str, tuple[str, LayerAlias | None]] = {}
        for layer in layers:
            name = spec.default_layer if layer == "default" else layer
            if name in self.aliases:
                continue
            self.aliases[name] = resolve_layer(spec, name, nodes)
        for name in self.aliases:
            check_pooling(spec, name, pooling)  # registry layers; raw nodes are checked by their first forward
        #: Layer name -> keyword arguments of :func:`pool_features` (token prefix, NHWC layout).
        self.pool_args: dict[str, dict[str, object]] = {
            name: {"prefix_tokens": spec.num_prefix_tokens, "nhwc": alias is not None and alias.kind == "nhwc"}
            for name, (_, alias) in self.aliases.items()
        }
        modules = dict(work.named_modules())
        self._post_relu = {
            name: alias.post_relu if alias is not None else isinstance(modules.get(node), _ACTIVATIONS)
            for name, (node, alias) in self.aliases.items()
        }
        return_nodes = {node: name for name, (node, _) in self.aliases.items()}
        if len(return_nodes) != len(self.aliases):
            raise ValueError(f"Two requested layers map to the same node: {layers}.")
        self.module = create(work, return_nodes=return_nodes).eval()
        n_rewritten = make_inplace_safe(self.module)
        logger.debug("Rewrote %d in-place operations of %s", n_rewritten, spec.name)
        self.module.to(self.device)
        if channels_last:
            self.module.to(memory_format=torch.channels_last)
        self._map_shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def input_device(self) -> torch.device:
        """Where the engine should put (and normalise) input batches: the forward's device."""
        return self.device

    @property
    def layer_names(self) -> list[str]:
        """Requested layer names, in request order (aliases or raw nodes)."""
        return list(self.aliases)

    def _autocast_context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        # No cast cache: one forward casts each weight once, and a CUDA graph capture needs it off
        # (featcache.extract.runners.graphs).
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=False)

    @torch.inference_mode()
    def forward_raw(self, batch: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Raw (unpooled) activations, layer name -> (B, ...) float32 tensor (a numpy batch is wrapped, not copied)."""
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast_context():
            outputs = self.module(batch)
        return {name: outputs[name].float() for name in self.aliases}

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """Pooled features of a batch.

        Parameters
        ----------
        batch : torch.Tensor or numpy.ndarray
            (B, 3, H, W) normalised images.

        Returns
        -------
        dict of str to numpy.ndarray
            Layer name -> (B, D) float32 array.
        """
        return {name: value.cpu().numpy() for name, value in self.forward_pooled(batch).items()}

    @torch.inference_mode()
    def forward_pooled(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Like :meth:`__call__`, but the (B, D) float32 tensors stay on :attr:`device` (asynchronous on CUDA)."""
        raw = self.forward_raw(batch)
        if self._map_shapes is None:
            self._map_shapes = {name: tuple(value.shape[1:]) for name, value in raw.items()}
        return {name: pool_features(value, self.pooling, **self.pool_args[name]) for name, value in raw.items()}

    def layer_specs(self, input_size: int | None = None) -> list[LayerSpec]:
        """Describe each output (node, dim, pooling, map shape) by one dummy forward.

        Returns
        -------
        list of featcache.store.LayerSpec
        """
        size = input_size or self.spec.input_size
        raw = self.forward_raw(torch.zeros(1, 3, size, size))
        specs = []
        for name, value in raw.items():
            node, alias = self.aliases[name]
            try:
                pooled = pool_features(value, self.pooling, **self.pool_args[name])
            except PoolingError as error:
                raise PoolingError(f"layer {name!r} of backbone {self.spec.name!r}: {error} "
                                   f"Set another pooling (extract.pooling, or backbones.{self.spec.name}.pooling)."
                                   ) from None
            pooling = self.pooling if value.ndim in (3, 4) else "none"
            map_shape = tuple(int(v) for v in value.shape[1:])
            if self.pool_args[name]["nhwc"]:
                map_shape = (map_shape[2], map_shape[0], map_shape[1])
            tokens = value.ndim == 3
            specs.append(LayerSpec(alias=name, node=node, dim=int(pooled.shape[1]), pooling=pooling,
                                   map_shape=map_shape, post_relu=self._post_relu[name],
                                   prefix_tokens=self.spec.num_prefix_tokens if tokens else 0))
        return specs


def check_pooling(spec: BackboneSpec, name: str, pooling: str) -> None:
    """Raise :class:`PoolingError` when ``pooling`` does not apply to the registry layer ``name`` of ``spec``."""
    problem = pooling_problem(spec, name, pooling)
    if problem is not None:
        raise PoolingError(problem)
