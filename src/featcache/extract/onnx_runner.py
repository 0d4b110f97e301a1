"""ONNX backend: export a truncated, pooled extractor and run it with onnxruntime.

:func:`export_onnx` turns a :class:`~featcache.extract.torch_runner.TorchFeatureExtractor`
into one ONNX file whose graph ends with the pooling, so each graph output is
already the (B, D) feature of one requested layer::

    images (B, 3, S, S) float32  ->  <layer 1> (B, D1), <layer 2> (B, D2), ...

The batch axis is dynamic (``batch``); the spatial size S is fixed at export.
The file carries its own description in ``metadata_props`` (``featcache_export``:
backbone, layers, pooling, opset, input size, versions; ``featcache_layers``:
the :class:`~featcache.store.writer.LayerSpec` of every output), so
:class:`OnnxFeatureRunner` needs nothing but the file.

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

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import featcache
from featcache.errors import UserError
from featcache.extract.registry import BackboneSpec
from featcache.extract.torch_runner import TorchFeatureExtractor, pool_features
from featcache.store.schema import canonical_json
from featcache.store.writer import LayerSpec

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "INPUT_NAME",
    "OnnxExportError",
    "OnnxFeatureRunner",
    "export_onnx",
    "physical_cores",
]

logger = logging.getLogger(__name__)

#: Default ONNX opset: the lowest one the torch.export-based exporter emits natively.
DEFAULT_OPSET = 18

#: Lowest opset accepted by :func:`export_onnx`.
MIN_OPSET = 13

#: Lowest opset the torch.export-based ("dynamo") exporter can produce.
DYNAMO_MIN_OPSET = 18

#: Allowed values of the ``exporter`` argument.
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")

#: Name of the graph input.
INPUT_NAME = "images"

#: ``metadata_props`` keys written by :func:`export_onnx`.
EXPORT_KEY = "featcache_export"
LAYERS_KEY = "featcache_layers"

_DEVICES = ("cpu", "cuda")
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


class OnnxExportError(UserError, RuntimeError):
    """The exporter failed or produced a model that does not match the request."""


def physical_cores() -> int:
    """Physical CPU cores usable by this process (at least 1).

    ``psutil``'s physical count when available, capped by the CPU affinity
    mask (containers, ``taskset``); the logical count otherwise.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil ships with distributed
        physical = None
    return max(1, min(physical or usable, usable))


# --------------------------------------------------------------------- export
class _PooledOutputs(nn.Module):
    """Truncated feature module + pooling -> tuple of (B, D) tensors in layer order."""

    def __init__(self, module: nn.Module, names: Sequence[str], pooling: str) -> None:
        super().__init__()
        self.module = module
        self.names = list(names)
        self.pooling = pooling

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.module(images)
        return tuple(pool_features(outputs[name], self.pooling) for name in self.names)


def _resolve_exporter(exporter: str, opset: int) -> str:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {EXPORTERS}. Hint: 'auto' picks 'dynamo' for "
                         f"opset >= {DYNAMO_MIN_OPSET} and 'torchscript' below.")
    if exporter == "auto":
        return "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ValueError(f"exporter 'dynamo' cannot produce opset {opset}; it emits opset >= {DYNAMO_MIN_OPSET} "
                         f"(its down-conversion fails on ReduceMean). Hint: use opset >= {DYNAMO_MIN_OPSET} or "
                         "exporter='torchscript'.")
    return exporter


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
    return record


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
    ValueError
        For an opset, input size or exporter that is not allowed.
    OnnxExportError
        If the exported model does not have the requested opset or outputs.
    onnx.checker.ValidationError
        If the exported model is not valid ONNX.
    """
    latest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= latest:
        raise ValueError(f"opset {opset!r} is not allowed; use an int in {MIN_OPSET}..{latest} "
                         f"(the installed onnx's range). Hint: the default {DEFAULT_OPSET} suits onnxruntime >= 1.14.")
    size = int(input_size or extractor.spec.input_size)
    if size < 1:
        raise ValueError(f"input_size {input_size!r} must be a positive int. Hint: leave it None for the "
                         f"backbone's {extractor.spec.input_size}.")
    kind = _resolve_exporter(exporter, opset)
    path = Path(path)
    names = extractor.layer_names
    specs = extractor.layer_specs(size)

    module = copy.deepcopy(extractor.module).to(device="cpu", dtype=torch.float32)
    module = module.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
    wrapper = _PooledOutputs(module, names, extractor.pooling).eval()
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
        "torch_version": torch.__version__.split("+")[0],
    }
    props = {prop.key: prop.value for prop in model.metadata_props}
    props[EXPORT_KEY] = canonical_json(config)
    props[LAYERS_KEY] = json.dumps([_layer_spec_dict(spec) for spec in specs], separators=(",", ":"))
    onnx.helper.set_model_props(model, props)
    model.doc_string = f"featcache {featcache.__version__}: {extractor.spec.name} {names} ({extractor.pooling})"

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        onnx.save(model, str(partial))
        onnx.checker.check_model(str(partial), full_check=True)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Wrote %s (%.1f MB, %d nodes)", path, path.stat().st_size / 1e6, len(model.graph.node))
    return path


# --------------------------------------------------------------------- runner
def _parse_device(device: str | torch.device) -> tuple[str, int]:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in _DEVICES:
        raise ValueError(f"device {device!r} is not one of {_DEVICES} (optionally 'cuda:N'). "
                         "Hint: 'cuda' needs the onnxruntime-gpu package (pip install 'featcache[gpu]').")
    return parsed.type, parsed.index or 0


class OnnxFeatureRunner:
    """Run an ONNX file written by :func:`export_onnx` with onnxruntime.

    Implements the engine's ``FeatureRunner`` protocol: ``runner(batch)``
    returns ``{layer: (B, D) float32 array}``.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file (with featcache metadata).
    device : {"cpu", "cuda"} or "cuda:N"
        ``cuda`` uses the CUDA execution provider (package onnxruntime-gpu)
        with the CPU provider as fallback for unsupported nodes; when the
        CUDA provider is not installed a warning is logged and the CPU is used.
    intra_op_threads : int, optional
        Threads of one operator; default :func:`physical_cores`.

    Attributes
    ----------
    path : Path
        The model file.
    provider : str
        The execution provider actually used (``session.get_providers()[0]``).
    export_config : dict
        ``featcache_export`` metadata: backbone, layers, pooling, opset,
        input_size, exporter, featcache_version, torch_version.
    input_size : int
        Side S of the (B, 3, S, S) input the model was exported for.
    session : onnxruntime.InferenceSession
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", intra_op_threads: int | None = None) -> None:
        self.path = Path(path)
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None  # set by from_model when it owns the file
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {str(self.path)!r} does not exist. Hint: write it with "
                                    "featcache.extract.onnx_runner.export_onnx or use OnnxFeatureRunner.from_model.")
        kind, index = _parse_device(device)
        if intra_op_threads is not None and (not isinstance(intra_op_threads, int) or intra_op_threads < 1):
            raise ValueError(f"intra_op_threads {intra_op_threads!r} must be a positive int or None "
                             "(None: one per physical core).")
        available = ort.get_available_providers()
        providers: list[Any] = [_CPU]
        if kind == "cuda":
            if _CUDA in available:
                providers = [(_CUDA, {"device_id": index}), _CPU]
            else:
                logger.warning("device %r requested but onnxruntime has no CUDAExecutionProvider (available: %s); "
                               "running on CPU. Hint: pip install onnxruntime-gpu (featcache[gpu]).",
                               device, available)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or physical_cores()
        self.intra_op_threads = options.intra_op_num_threads
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        self.provider: str = self.session.get_providers()[0]
        if kind == "cuda" and _CUDA in available and self.provider != _CUDA:
            logger.warning("CUDAExecutionProvider could not be initialised for %s; running on %s.",
                           self.path, self.provider)
        self.device = "cuda" if self.provider == _CUDA else "cpu"

        meta = self.session.get_modelmeta().custom_metadata_map
        if EXPORT_KEY not in meta or LAYERS_KEY not in meta:
            raise ValueError(f"{self.path} lacks the {EXPORT_KEY!r}/{LAYERS_KEY!r} metadata (found keys "
                             f"{sorted(meta)}). Hint: export it with featcache.extract.onnx_runner.export_onnx.")
        self._export_config: dict[str, Any] = json.loads(meta[EXPORT_KEY])
        self._specs = [LayerSpec(**{**record, "map_shape": tuple(record["map_shape"])})
                       for record in json.loads(meta[LAYERS_KEY])]
        self.input_size = int(self._export_config["input_size"])
        self._input_name = self.session.get_inputs()[0].name
        outputs = [output.name for output in self.session.get_outputs()]
        if outputs != [spec.alias for spec in self._specs]:
            raise ValueError(f"{self.path}: graph outputs {outputs} do not match the layers in its metadata "
                             f"{[spec.alias for spec in self._specs]}. Hint: re-export the model.")
        logger.info("ONNX runner %s: %s on %s, %d intra-op threads", self.path.name, self.layer_names,
                    self.provider, self.intra_op_threads)

    @classmethod
    def from_model(cls, model: nn.Module, spec: BackboneSpec, layers: Sequence[str], pooling: str = "avg",
                   device: str = "cpu", path: str | os.PathLike[str] | None = None, opset: int = DEFAULT_OPSET,
                   *, input_size: int | None = None, intra_op_threads: int | None = None,
                   exporter: str = "auto") -> "OnnxFeatureRunner":
        """Export ``model``'s layers and open the result.

        Parameters
        ----------
        model : nn.Module
            The backbone (not modified).
        spec : BackboneSpec
            Its registry entry.
        layers : sequence of str
            Aliases or raw node names, as for :class:`TorchFeatureExtractor`.
        pooling : str
            One of :data:`featcache.store.schema.POOLINGS`.
        device : str
            See :class:`OnnxFeatureRunner`.
        path : path-like, optional
            Where to write the ``.onnx`` file; default a temporary folder that
            lives as long as the runner.
        opset, input_size, exporter
            See :func:`export_onnx`.
        intra_op_threads : int, optional
            See :class:`OnnxFeatureRunner`.

        Returns
        -------
        OnnxFeatureRunner
        """
        extractor = TorchFeatureExtractor(model, spec, layers, pooling=pooling, device="cpu", channels_last=False)
        tmpdir = None
        if path is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="featcache-onnx-")
            path = Path(tmpdir.name) / f"{spec.name}.onnx"
        export_onnx(extractor, path, opset=opset, input_size=input_size, exporter=exporter)
        runner = cls(path, device=device, intra_op_threads=intra_op_threads)
        runner._tmpdir = tmpdir  # removed when the runner is garbage-collected
        return runner

    @property
    def layer_names(self) -> list[str]:
        """Layer names, in output order."""
        return [spec.alias for spec in self._specs]

    @property
    def export_config(self) -> dict[str, Any]:
        """The ``featcache_export`` metadata (a copy)."""
        return json.loads(json.dumps(self._export_config))

    def layer_specs(self, input_size: int | None = None) -> list[LayerSpec]:
        """The :class:`LayerSpec` of every output, read from the model's metadata.

        Parameters
        ----------
        input_size : int, optional
            Must be None or the exported input size S.

        Raises
        ------
        ValueError
            If ``input_size`` differs from the exported one.
        """
        if input_size is not None and int(input_size) != self.input_size:
            raise ValueError(f"input_size {input_size} differs from the {self.input_size} that {self.path.name} "
                             f"was exported for (allowed: {self.input_size} or None). Hint: re-export with "
                             f"input_size={input_size}, or preprocess to {self.input_size}.")
        return list(self._specs)

    def __call__(self, batch: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """Pooled features of a batch.

        Parameters
        ----------
        batch : torch.Tensor or numpy.ndarray
            (B, 3, S, S) normalised images, S = :attr:`input_size`; any device
            and float dtype (converted to float32 on CPU).

        Returns
        -------
        dict of str to numpy.ndarray
            Layer name -> (B, D) float32 array, in :attr:`layer_names` order.
        """
        if isinstance(batch, torch.Tensor):
            array = batch.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        else:
            array = np.ascontiguousarray(batch, dtype=np.float32)
        expected = (3, self.input_size, self.input_size)
        if array.ndim != 4 or tuple(array.shape[1:]) != expected:
            raise ValueError(f"batch has shape {tuple(array.shape)}; expected (B, {', '.join(map(str, expected))}). "
                             f"Hint: use a Preprocessor with input_size={self.input_size}.")
        if array.shape[0] == 0:
            return {spec.alias: np.zeros((0, spec.dim), dtype=np.float32) for spec in self._specs}
        outputs = self.session.run(None, {self._input_name: array})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self.layer_names, outputs)}

    def __repr__(self) -> str:
        config = self._export_config
        return (f"OnnxFeatureRunner({str(self.path)!r}, backbone={config.get('backbone')!r}, "
                f"layers={self.layer_names}, provider={self.provider!r})")
