"""One self-contained ONNX model for serving: the pooled backbone, the store's rounding, then a trained head.

:func:`backbone_graph` is the pooled backbone, one output per layer: the export cache's entry for the store's
layers (the graph the extract stage and ``featcache predict`` made and ran) or for the head's, else a fresh
export (:func:`~featcache.extract.onnx.export.export_onnx`); for a store of int8 features the caller passes
the store's very int8 graph instead. :func:`feature_graph` turns it into ``images (B, 3, S, S) float32 ->
features (B, D)``: the head's layer, or each layer of a fused one (``pool+block6``,
:func:`~featcache.store.schema.layer_parts`) rounded to the store's dtype and back (``Cast`` to float16 and to
float32 again, as ``featcache predict`` rounds) and concatenated in order, the other outputs pruned.
:func:`serving_model` appends a head's
graph (``features -> scores``, :func:`featcache.heads.onnx_graph.head_graph`; this module takes
it as an ``onnx.ModelProto`` and imports nothing of ``heads/``), adds ``label`` (B,) int64, the
index of the highest probability, for a classifier, and describes the whole in
``metadata_props[MODEL_KEY]`` (:func:`serving_description`: task, classes in order, the
preprocessing and the words that say how to apply it, backbone, layer, head, featcache's version),
the way a fine-tuned model's export does, so the file alone is enough to deploy it with
onnxruntime, Triton or onnxruntime-web.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

import featcache
from featcache.errors import UserError
from featcache.extract.decode.preprocess import preprocess_steps
from featcache.extract.onnx.cache import read_only_lookup, resolve_cache_dir, source_key
from featcache.extract.onnx.format import DEFAULT_OPSET, MODEL_KEY, PREPROCESSED_INPUT, model_io
from featcache.extract.zoo.weights import WeightsSource
from featcache.store.schema import FEATURE_DTYPES, canonical_json, layer_parts
from featcache.util.atomic import atomic_path

__all__ = ["FEATURES", "LABEL", "SCORES", "ServingExportError", "backbone_graph", "feature_graph",
           "serving_description", "serving_model", "write_serving_model"]

logger = logging.getLogger(__name__)

#: The value between the backbone and the head, and the served model's outputs.
FEATURES, SCORES, LABEL = "features", "scores", "label"

#: Prefix of every value of the head's graph inside the served model (no clash with the backbone's names).
_HEAD_PREFIX = "featcache_head/"


class ServingExportError(UserError, ValueError):
    """A run that cannot be served as one ONNX file (its storage, or a graph that does not fit the backbone)."""


def _cached_export(source: WeightsSource, layers: Sequence[str], pooling: str, input_size: int | None, opset: int,
                   cache_dir: str | os.PathLike[str] | None) -> onnx.ModelProto | None:
    """The export cache's entry for these weights and layers (what predict or extract ran), or None."""
    if not source.weights_sha256:  # random weights: no key without building the model
        return None
    key = source_key(source.spec, source.weights_sha256, layers, pooling, input_size, opset, "auto")
    found = read_only_lookup(resolve_cache_dir(cache_dir), key)
    if found is None:
        return None
    logger.info("Backbone graph from the ONNX export cache: %s", found[0])
    return onnx.load(str(found[0]))


def backbone_graph(source: WeightsSource, parts: Sequence[str], *, pooling: str, input_size: int | None = None,
                   opset: int = DEFAULT_OPSET, store_layers: Sequence[str] = (),
                   cache_dir: str | os.PathLike[str] | None = "auto") -> onnx.ModelProto:
    """The pooled backbone computing (at least) ``parts``: a cached export, else a fresh one of ``parts``.

    The cache is looked in for an export of the store's layers first (the graph the extract stage and
    ``featcache predict`` made and ran: its other outputs are pruned by :func:`feature_graph`), then of ``parts``.

    Parameters
    ----------
    source : WeightsSource
        The backbone and its weights (:func:`~featcache.extract.zoo.weights.resolve_weights`).
    parts : sequence of str
        The layers the head reads, in order (:func:`~featcache.store.schema.layer_parts`).
    pooling : str
    input_size : int, optional
        S; default the registry's.
    opset : int
    store_layers : sequence of str
        Every layer of the store, in its order (its ``layers`` config).
    cache_dir : path-like, "auto", "none" or None
        The ONNX export cache (``extract_run.onnx_cache``).

    Returns
    -------
    onnx.ModelProto
        Input ``images`` (B, 3, S, S); one output (B, D) per layer, named by it.
    """
    for layers in dict.fromkeys((tuple(store_layers), tuple(parts))):
        if layers and set(parts) <= set(layers):
            cached = _cached_export(source, layers, pooling, input_size, opset, cache_dir)
            if cached is not None:
                return cached
    from featcache.extract.onnx.export import export_onnx
    from featcache.extract.runners.torch_runner import TorchFeatureExtractor

    extractor = TorchFeatureExtractor(source.load().model, source.spec, list(parts), pooling=pooling, device="cpu",
                                      channels_last=False)
    with tempfile.TemporaryDirectory(prefix="featcache-serve-") as folder:
        path = export_onnx(extractor, Path(folder) / "backbone.onnx", opset=opset, input_size=input_size)
        return onnx.load(str(path))


def feature_graph(backbone: onnx.ModelProto, layer: str, *, dtype: str = "float32") -> onnx.ModelProto:
    """The backbone as the head's features came out of the store: ``images`` (B, 3, S, S) -> ``features`` (B, D).

    Parameters
    ----------
    backbone : onnx.ModelProto
        The pooled backbone with one output per layer, named by it (:func:`backbone_graph`, or the store's int8
        graph); not modified. Its outputs other than ``layer``'s parts are pruned with the nodes only they need.
    layer : str
        A layer alias, or a fused ``a+b`` (its parts concatenated in order).
    dtype : {"float32", "float16"}
        The store's dtype: float16 features are rounded to float16 and back.

    Returns
    -------
    onnx.ModelProto
        One input ``images``, one output ``features`` (B, D) float32.
    """
    if dtype not in FEATURE_DTYPES:
        raise ServingExportError(f"store dtype {dtype!r}; allowed: {', '.join(FEATURE_DTYPES)}. Hint: export the "
                                 "run of a store extracted with extract.dtype float16 or float32.")
    parts = layer_parts(layer)
    model = onnx.ModelProto()
    model.CopyFrom(backbone)
    graph = model.graph
    outputs = [value.name for value in graph.output]
    if not set(parts) <= set(outputs):
        raise ServingExportError(f"the exported backbone's outputs are {outputs}, not the layers {list(parts)}. "
                                 "Hint: clear the ONNX export cache (--onnx-cache none) and export again.")
    taken = {FEATURES, *(f"featcache_serve/{i}_{kind}" for i in range(len(parts)) for kind in ("float16", "rounded"))}
    if taken & _value_names(graph):
        raise ServingExportError(f"the exported backbone already has values named {sorted(taken & _value_names(graph))}"
                                 ". Hint: report this with the backbone's name.")
    rounded = []
    for index, part in enumerate(parts):
        value = part
        if dtype == "float16":  # the store kept float16: the head was fitted on features read back from it
            half = f"featcache_serve/{index}_float16"
            graph.node.append(helper.make_node("Cast", [value], [half], name=f"{half}_cast", to=TensorProto.FLOAT16))
            value = f"featcache_serve/{index}_rounded"
            graph.node.append(helper.make_node("Cast", [half], [value], name=f"{value}_cast", to=TensorProto.FLOAT))
        rounded.append(value)
    graph.node.append(helper.make_node("Concat", rounded, [FEATURES], name="featcache_serve/features", axis=1)
                      if len(rounded) > 1 else helper.make_node("Identity", rounded, [FEATURES],
                                                                name="featcache_serve/features"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", None]))
    _prune(graph)
    del model.metadata_props[:]  # the export's description names its layer outputs, gone here
    return model


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no graph output needs (the store's other layers), in place."""
    needed = {value.name for value in graph.output}
    kept = []
    for node in reversed(graph.node):
        if needed & set(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            for attribute in node.attribute:  # a subgraph's (If, Loop) outer-scope inputs
                for sub in [attribute.g, *attribute.graphs]:
                    needed.update(_value_names(sub))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    values = [value for value in graph.value_info if value.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(values)


def _value_names(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in [*graph.input, *graph.output, *graph.value_info]}
    names.update(tensor.name for tensor in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def serving_model(features: onnx.ModelProto, head: onnx.ModelProto, description: Mapping[str, Any]) -> onnx.ModelProto:
    """The backbone's :func:`feature_graph` followed by a head's graph, as one model.

    Parameters
    ----------
    features : onnx.ModelProto
        :func:`feature_graph`: ``images`` -> ``features`` (B, D).
    head : onnx.ModelProto
        ``features`` (B, D) float32 -> ``scores`` float32, (B, K) or (B,), in the same default opset
        (:func:`featcache.heads.onnx_graph.head_graph`).
    description : mapping
        :func:`serving_description`; its ``task`` decides whether ``label`` is added.

    Returns
    -------
    onnx.ModelProto
        Input ``images``; outputs ``scores`` and, for a classifier, ``label`` (B,) int64.

    Raises
    ------
    ServingExportError
        When the two together exceed the 2 GiB one ONNX file holds, or their value names or opsets clash.
    """
    nbytes = features.ByteSize() + head.ByteSize()
    if nbytes >= onnx.checker.MAXIMUM_PROTOBUF:
        raise ServingExportError(
            f"backbone and head take {nbytes / 2**30:.2f} GiB (backbone {features.ByteSize() / 2**30:.2f}), over "
            f"the {onnx.checker.MAXIMUM_PROTOBUF / 2**30:.0f} GiB one ONNX file holds (protobuf's limit). Hint: "
            "score with `featcache predict --model <run folder> --images ...` instead, or serve a smaller head "
            "(a knn head ships its training rows).")
    head = onnx.compose.add_prefix(head, _HEAD_PREFIX)
    head_in, head_out = head.graph.input[0].name, head.graph.output[0].name
    model = onnx.ModelProto()
    model.CopyFrom(features)
    graph = model.graph
    clash = _value_names(graph) & ({SCORES, LABEL} | _value_names(head.graph))
    if clash:
        raise ServingExportError(f"value names {sorted(clash)[:5]} are in the backbone's graph and the head's. "
                                 "Hint: report this with the backbone's name.")
    graph.node.append(helper.make_node("Identity", [FEATURES], [head_in], name=f"{_HEAD_PREFIX}input"))
    graph.node.extend(head.graph.node)
    graph.initializer.extend(head.graph.initializer)
    graph.node.append(helper.make_node("Identity", [head_out], [SCORES], name=f"{_HEAD_PREFIX}output"))
    del graph.output[:]
    scores = onnx.ValueInfoProto()
    scores.CopyFrom(head.graph.output[0])
    scores.name = SCORES
    graph.output.append(scores)
    if description["task"] == "classification":
        graph.node.append(helper.make_node("ArgMax", [SCORES], [LABEL], name="featcache_serve/label", axis=1,
                                           keepdims=0))
        graph.output.append(helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["batch"]))
    versions = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    for entry in head.opset_import:
        domain = entry.domain or "ai.onnx"
        if domain in versions and versions[domain] != entry.version:
            raise ServingExportError(f"the head's graph uses opset {entry.version} of {domain!r}, the backbone's "
                                     f"{versions[domain]}. Hint: build the head's graph with the backbone's opset.")
        if domain not in versions:
            model.opset_import.append(entry)
    model.ir_version = max(model.ir_version, head.ir_version)
    helper.set_model_props(model, {MODEL_KEY: canonical_json(dict(description))})
    model.doc_string = (f"featcache {featcache.__version__}: {description.get('backbone')} "
                        f"{description.get('layer')} {description.get('head')} ({description['task']})")
    model.graph.name = "featcache_serving"
    return model


def serving_description(task: str, classes: Sequence[str], preprocess: Mapping[str, Any], *, backbone: str,
                        layer: str, head: str, weights_id: str, pooling: str, dtype: str) -> dict[str, Any]:
    """What a served model is, as its ``metadata_props[MODEL_KEY]`` records it.

    Parameters
    ----------
    task : {"classification", "regression"}
    classes : sequence of str
        The order of the K probabilities (classification; ignored for regression).
    preprocess : mapping
        The store's ``preprocess`` config (``Preprocessor.config()``: input_size, resize_size,
        interpolation, mean, std, resize_mode, background).
    backbone, layer, head : str
        What the run trained: ``efficientnet_lite0``, ``block6`` (or ``pool+block6``), ``mlp``.
    weights_id : str
        The backbone's weights as the store records them.
    pooling : str
    dtype : str
        The store's dtype the features are rounded to.

    Returns
    -------
    dict
        :func:`~featcache.extract.onnx.format.model_io`'s ``task``, ``input``, ``output``, plus ``label``
        (classification), ``classes``, ``preprocess``, ``preprocess_steps``, ``backbone``, ``layer``,
        ``head``, ``weights_id``, ``pooling``, ``store_dtype`` and ``featcache_version``.
    """
    size = int(preprocess["input_size"])
    description: dict[str, Any] = {**model_io(task, size), "backbone": backbone, "layer": layer, "head": head,
                                   "weights_id": weights_id, "pooling": pooling, "store_dtype": dtype,
                                   "preprocess": dict(preprocess),
                                   "preprocess_steps": preprocess_steps(str(preprocess["resize_mode"])),
                                   "featcache_version": featcache.__version__}
    description["input"]["meaning"] = PREPROCESSED_INPUT
    if task == "classification":
        description["classes"] = [str(name) for name in classes]
        description["label"] = {"name": LABEL, "shape": ["batch"], "dtype": "int64",
                                "meaning": "index into `classes` of the highest probability"}
    return description


def write_serving_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (:func:`serving_model`) to ``path`` atomically, checked by ``onnx.checker`` first.

    Parameters
    ----------
    model : onnx.ModelProto
    path : path-like
        The ``.onnx`` file; folders are created.

    Returns
    -------
    Path
    """
    path = Path(path)
    with atomic_path(path) as partial:
        onnx.save(model, str(partial))
        onnx.checker.check_model(str(partial), full_check=True)
    logger.info("Wrote %s (%.1f MB, %d nodes)", path, path.stat().st_size / 1e6, len(model.graph.node))
    return path
