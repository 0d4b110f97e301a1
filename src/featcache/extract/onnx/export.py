"""ONNX export: a truncated, pooled extractor as one ONNX file that describes itself.

:func:`export_onnx` turns a :class:`~featcache.extract.runners.torch_runner.TorchFeatureExtractor`
into one ONNX file whose graph ends with the pooling, so each graph output is
already the (B, D) feature of one requested layer::

    images (B, 3, S, S) float32  ->  <layer 1> (B, D1), <layer 2> (B, D2), ...

The batch axis is dynamic (``batch``); the spatial size S is fixed at export.
The file carries its own description in ``metadata_props`` (:data:`~featcache.extract.onnx.format.EXPORT_KEY`:
backbone, layers, pooling, opset, input size, versions; :data:`~featcache.extract.onnx.format.LAYERS_KEY`:
the :class:`~featcache.store.schema.LayerSpec` of every output), so
:class:`~featcache.extract.onnx.runner.OnnxFeatureRunner` needs nothing but the file.

Exporter choice (torch 2.14): the ``torch.export``-based ("dynamo") exporter is
used for opset >= 18. It specialises the static spatial size, so timm's
TF-"same" padding folds into the convolutions (EfficientNet-Lite0: 94 nodes,
1.4-2x faster in onnxruntime on CPU than the TorchScript export's 631 nodes
with runtime pad arithmetic, which also cannot export ``avg2x2`` pooling
there). It cannot emit opset < 18 (its down-conversion fails on
``ReduceMean``), so those opsets go through the deprecated TorchScript exporter
(``dynamo=False``), which still works in torch 2.14.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx
import torch
from torch import nn

import featcache
from featcache.errors import ParamError, UserError
from featcache.extract.onnx.format import (
    DEFAULT_OPSET,
    DYNAMO_MIN_OPSET,
    EXPORT_KEY,
    INPUT_NAME,
    LAYERS_KEY,
    MIN_OPSET,
    resolve_exporter,
)
from featcache.extract.runners.torch_runner import TorchFeatureExtractor, pool_features
from featcache.store.schema import LayerSpec, canonical_json
from featcache.util.atomic import atomic_path
from featcache.util.compute import float32_weight_bytes, torch_version

__all__ = ["OnnxExportError", "export_onnx"]

logger = logging.getLogger(__name__)


class OnnxExportError(UserError, RuntimeError):
    """The exporter failed or produced a model that does not match the request."""


class _PooledOutputs(nn.Module):
    """Truncated feature module + pooling -> tuple of (B, D) tensors in layer order."""

    def __init__(self, module: nn.Module, names: Sequence[str], pooling: str,
                 pool_args: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self.module = module
        self.names = list(names)
        self.pooling = pooling
        self.pool_args = {name: dict((pool_args or {}).get(name, {})) for name in self.names}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.module(images)
        return tuple(pool_features(outputs[name], self.pooling, **self.pool_args[name]) for name in self.names)


def _run_exporter(wrapper: nn.Module, dummy: torch.Tensor, opset: int, exporter: str,
                  n_outputs: int) -> onnx.ModelProto:
    """Export ``wrapper`` with a dynamic batch axis; graph I/O names are fixed up afterwards."""
    if exporter == "dynamo":
        program = torch.onnx.export(
            wrapper, (dummy,), dynamo=True, opset_version=opset, verbose=False, optimize=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        return program.model_proto
    outputs = [f"output_{i}" for i in range(n_outputs)]
    with tempfile.TemporaryDirectory(prefix="featcache-onnx-export-") as workdir, warnings.catch_warnings():
        target = Path(workdir) / "torchscript.onnx"
        # torch >= 2.9 marks the TorchScript exporter deprecated; it is chosen on purpose for opset < 18.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper, (dummy,), str(target), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=outputs, dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
            do_constant_folding=True,
        )
        return onnx.load(str(target))


def _graph_value_names(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Every value name of ``graph`` and its subgraphs (added to ``names``)."""
    names.update(v.name for v in graph.input)
    names.update(v.name for v in graph.output)
    names.update(v.name for v in graph.value_info)
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _graph_value_names(sub, names)
    return names


def _apply_renames(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    """Rename values everywhere in ``graph`` and its subgraphs (one simultaneous rename)."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    for tensor in graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = mapping.get(sparse.values.name, sparse.values.name)
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) if name else name for name in node.input]
        node.output[:] = [mapping.get(name, name) if name else name for name in node.output]
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _apply_renames(sub, mapping)


def _name_graph_io(model: onnx.ModelProto, output_names: Sequence[str]) -> None:
    """Name the input :data:`INPUT_NAME` and the outputs ``output_names``, keeping SSA form.

    Names are kept as given (ONNX accepts dots and other characters in value
    names); an internal value that already carries one of the wanted names is
    renamed instead (``relu`` -> ``relu__1``), and an output that aliases the
    input, an initializer or an earlier output gets its own ``Identity``.
    """
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != len(output_names):
        raise OnnxExportError(f"Exported graph has {len(graph.input)} inputs and {len(graph.output)} outputs; "
                              f"expected 1 and {len(output_names)}. Hint: report this with the torch version.")
    used = _graph_value_names(graph, set())

    def fresh(base: str) -> str:
        index = 1
        while f"{base}__{index}" in used:
            index += 1
        used.add(f"{base}__{index}")
        return f"{base}__{index}"

    taken = {graph.input[0].name, *(t.name for t in graph.initializer)}
    for output in graph.output:
        if output.name in taken:
            alias = fresh(output.name)
            graph.node.append(onnx.helper.make_node("Identity", [output.name], [alias], name=f"{alias}_identity"))
            output.name = alias
        taken.add(output.name)
    mapping = {graph.input[0].name: INPUT_NAME}
    mapping.update({output.name: name for output, name in zip(graph.output, output_names)})
    mapping = {old: new for old, new in mapping.items() if old != new}
    for new in set(mapping.values()):
        if new in used and new not in mapping:
            mapping[new] = fresh(new)
    _apply_renames(graph, mapping)


def _layer_spec_dict(spec: LayerSpec) -> dict[str, Any]:
    record = dataclasses.asdict(spec)
    record["map_shape"] = list(spec.map_shape)
    if len(spec.map_shape) != 2:  # prefix_tokens describes token maps only (and conv exports keep their bytes)
        record.pop("prefix_tokens")
    return record


def _check_fits_one_file(extractor: TorchFeatureExtractor) -> None:
    """Refuse, before exporting, a backbone whose float32 weights exceed what one ONNX file holds."""
    nbytes = float32_weight_bytes(extractor.module)
    if nbytes >= onnx.checker.MAXIMUM_PROTOBUF:
        raise OnnxExportError(
            f"{extractor.spec.name} {extractor.layer_names}: its weights take {nbytes / 2**30:.2f} GiB in float32, "
            f"over the {onnx.checker.MAXIMUM_PROTOBUF / 2**30:.0f} GiB one ONNX file holds (protobuf's limit; "
            "featcache writes no external-data files). Hint: set extract.backend: torch, or auto (which runs torch "
            "for a model that large on the CPU too, unless extract.precision is int8, which quantizes the ONNX "
            "export), and score with `featcache predict` rather than one exported file.")


def export_onnx(extractor: TorchFeatureExtractor, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET,
                input_size: int | None = None, *, exporter: str = "auto") -> Path:
    """Export a truncated extractor, pooling included, to one ONNX file.

    The extractor's module is deep-copied and exported in float32, contiguous
    (NCHW) memory format, on CPU, without autocast, whatever the extractor's
    own ``device`` / ``channels_last`` / ``autocast`` settings.

    Parameters
    ----------
    extractor : TorchFeatureExtractor
        The multi-layer extractor; its layer names, order and pooling are kept.
    path : path-like
        Output ``.onnx`` file, written atomically (temporary file, then
        ``os.replace``); parent folders are created.
    opset : int
        Default-domain ONNX opset, recorded in the model's ``opset_import``;
        ``MIN_OPSET`` (13) .. the installed onnx's latest.
    input_size : int, optional
        Side S of the square input; default ``extractor.spec.input_size``.
    exporter : {"auto", "dynamo", "torchscript"}
        torch.onnx exporter; ``auto``: ``dynamo`` for opset >= 18, else
        ``torchscript`` (see the module docstring).

    Returns
    -------
    Path
        ``path``. The graph has one input ``images`` (B, 3, S, S) float32 and
        one output per layer, named as ``extractor.layer_names`` and in that
        order, each (B, D) float32; B is the dynamic axis ``batch``.

    Raises
    ------
    ParamError
        (a ValueError) For an opset or input size that is not allowed.
    ValueError
        For an exporter that is not allowed.
    OnnxExportError
        If the exported model does not have the requested opset or outputs, or the backbone's float32 weights
        do not fit one ONNX file (2 GiB, refused before exporting).
    onnx.checker.ValidationError
        If the exported model is not valid ONNX.
    """
    latest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= latest:
        raise ParamError(f"opset {opset!r} is not allowed; use an int in {MIN_OPSET}..{latest} "
                         f"(the installed onnx's range). Hint: the default {DEFAULT_OPSET} suits onnxruntime >= 1.14.")
    size = int(input_size or extractor.spec.input_size)
    if size < 1:
        raise ParamError(f"input_size {input_size!r} must be a positive int. Hint: leave it None for the "
                         f"backbone's {extractor.spec.input_size}.")
    kind = resolve_exporter(exporter, opset)
    path = Path(path)
    names = extractor.layer_names
    _check_fits_one_file(extractor)
    specs = extractor.layer_specs(size)

    module = copy.deepcopy(extractor.module).to(device="cpu", dtype=torch.float32)
    module = module.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
    wrapper = _PooledOutputs(module, names, extractor.pooling, extractor.pool_args).eval()
    # Batch 2: torch.export specialises example dims of size 0 and 1.
    dummy = torch.zeros(2, 3, size, size, dtype=torch.float32)
    logger.info("Exporting %s %s (pooling %s, %dx%d) to ONNX opset %d with the %s exporter",
                extractor.spec.name, names, extractor.pooling, size, size, opset, kind)
    try:
        model = _run_exporter(wrapper, dummy, opset, kind, len(names))
    except Exception as error:  # noqa: BLE001 - re-raised with what was attempted and a hint
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        hint = (f"use opset >= {DYNAMO_MIN_OPSET} (the dynamo exporter)" if kind == "torchscript"
                else "try another pooling or layer, or exporter='torchscript' with opset 17")
        raise OnnxExportError(f"The {kind} ONNX exporter failed on {extractor.spec.name} {names} "
                              f"(pooling {extractor.pooling!r}, opset {opset}, input {size}): "
                              f"{type(error).__name__}: {first_line}. Hint: {hint}.") from error
    versions = {entry.domain: entry.version for entry in model.opset_import}
    got = versions.get("", versions.get("ai.onnx"))
    if got != opset:
        raise OnnxExportError(f"The {kind} exporter produced opset {got}, not the requested {opset}. "
                              f"Hint: use opset >= {DYNAMO_MIN_OPSET} with exporter='dynamo' or 'auto'.")
    _name_graph_io(model, names)
    for node in model.graph.node:  # exporter stack traces: local paths, no use at run time
        del node.metadata_props[:]
    config = {
        "backbone": extractor.spec.name, "layers": names, "pooling": extractor.pooling, "opset": opset,
        "input_size": size, "exporter": kind, "featcache_version": featcache.__version__,
        "torch_version": torch_version(),
    }
    props = {prop.key: prop.value for prop in model.metadata_props}
    props[EXPORT_KEY] = canonical_json(config)
    props[LAYERS_KEY] = json.dumps([_layer_spec_dict(spec) for spec in specs], separators=(",", ":"))
    onnx.helper.set_model_props(model, props)
    model.doc_string = f"featcache {featcache.__version__}: {extractor.spec.name} {names} ({extractor.pooling})"

    with atomic_path(path) as partial:
        onnx.save(model, str(partial))
        onnx.checker.check_model(str(partial), full_check=True)
    logger.info("Wrote %s (%.1f MB, %d nodes)", path, path.stat().st_size / 1e6, len(model.graph.node))
    return path
