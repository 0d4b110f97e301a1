"""One self-contained ONNX model for serving: the pooled backbone, the store's rounding, then a trained head.

:func:`feature_graph` is the backbone part, ``images (B, 3, S, S) float32 -> features (B, D)``: the
extractor's own export (:func:`~featcache.extract.onnx.export.export_onnx`, or the export cache's entry
for the same weights, layers, pooling and opset, which ``featcache predict`` and the extract stage
fill), each layer of a fused one (``pool+block6``, :func:`~featcache.store.schema.layer_parts`)
rounded to the store's dtype and back (``Cast`` to float16 and to float32 again, as
``featcache predict`` rounds), the parts concatenated in order. :func:`serving_model` appends a head's
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

__all__ = ["FEATURES", "LABEL", "SCORES", "ServingExportError", "feature_graph", "serving_description",
           "serving_model", "write_serving_model"]

logger = logging.getLogger(__name__)

#: The value between the backbone and the head, and the served model's outputs.
FEATURES, SCORES, LABEL = "features", "scores", "label"

#: Prefix of every value of the head's graph inside the served model (no clash with the backbone's names).
_HEAD_PREFIX = "featcache_head/"


class ServingExportError(UserError, ValueError):
    """A run that cannot be served as one ONNX file (its storage, or a graph that does not fit the backbone)."""


def _backbone_model(source: WeightsSource, parts: Sequence[str], pooling: str, input_size: int | None, opset: int,
                    cache_dir: str | os.PathLike[str] | None) -> onnx.ModelProto:
    """The cached export of these weights and layers (what predict and extract ran), else a fresh export."""
    key = (source_key(source.spec, source.weights_sha256, parts, pooling, input_size, opset, "auto")
           if source.weights_sha256 else None)
    found = read_only_lookup(resolve_cache_dir(cache_dir), key)
    if found is not None:
        logger.info("Backbone graph from the ONNX export cache: %s", found[0])
        return onnx.load(str(found[0]))
    from featcache.extract.onnx.export import export_onnx
    from featcache.extract.runners.torch_runner import TorchFeatureExtractor

    extractor = TorchFeatureExtractor(source.load().model, source.spec, list(parts), pooling=pooling, device="cpu",
                                      channels_last=False)
    with tempfile.TemporaryDirectory(prefix="featcache-serve-") as folder:
        path = export_onnx(extractor, Path(folder) / "backbone.onnx", opset=opset, input_size=input_size)
        return onnx.load(str(path))


def feature_graph(source: WeightsSource, layer: str, *, pooling: str, dtype: str = "float32",
                  input_size: int | None = None, opset: int = DEFAULT_OPSET,
                  cache_dir: str | os.PathLike[str] | None = "auto") -> onnx.ModelProto:
    """The backbone as the head's features came out of the store: ``images`` (B, 3, S, S) -> ``features`` (B, D).

    Parameters
    ----------
    source : WeightsSource
        The backbone and its weights (:func:`~featcache.extract.zoo.weights.resolve_weights`).
    layer : str
        A layer alias, or a fused ``a+b`` (its parts concatenated in order).
    pooling : str
        As the store was extracted (``extract.pooling``).
    dtype : {"float32", "float16"}
        The store's dtype: float16 features are rounded to float16 and back.
    input_size : int, optional
        S; default the registry's.
    opset : int
        ONNX opset of the export.
    cache_dir : path-like, "auto", "none" or None
        The ONNX export cache looked in first (``extract_run.onnx_cache``).

    Returns
    -------
    onnx.ModelProto
        One input ``images``, one output ``features`` (B, D) float32.
    """
    if dtype not in FEATURE_DTYPES:
        raise ServingExportError(f"store dtype {dtype!r}; allowed: {', '.join(FEATURE_DTYPES)}. Hint: export the "
                                 "run of a store extracted with extract.dtype float16 or float32.")
    parts = layer_parts(layer)
    model = _backbone_model(source, parts, pooling, input_size, opset, cache_dir)
    graph = model.graph
    outputs = [value.name for value in graph.output]
    if outputs != list(parts):
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
    del model.metadata_props[:]  # the export's description names its layer outputs, gone here
    return model


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
    """
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
