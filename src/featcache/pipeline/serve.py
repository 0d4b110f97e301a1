"""``featcache export``: a trained run folder as one self-contained ONNX file for serving.

The glue between a run folder (``models/<dataset>/<backbone>/<layer>/<head>``: ``featcache-run.json`` and the
saved head) and the library: the head's graph (:func:`featcache.heads.onnx_graph.head_graph`) after the
backbone's (:func:`featcache.extract.onnx.serve.feature_graph`, the weights, layers, pooling, input size and
storage rounding the run's ``extraction_config`` records, as ``featcache predict --images`` featurises),
described by :func:`~featcache.extract.onnx.serve.serving_description`.

The module imports no scikit-learn, torch, onnx or onnxruntime: a wrong ``--model`` exits in a fraction of a
second, before any of them loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from featcache.pipeline.predict import saved_run_info, stored_weights

__all__ = ["export_serving_model"]

logger = logging.getLogger(__name__)


def export_serving_model(model_dir: str | Path, out: str | Path, onnx_cache: str = "auto") -> Path:
    """Write a trained run (backbone, layer, head) as one ONNX file: images in, scores (and label) out.

    Parameters
    ----------
    model_dir : path
        A run folder written by ``featcache train --model-dir`` (the train stage of ``dvc repro``).
    out : path
        The ``.onnx`` file (written atomically; folders created).
    onnx_cache : str
        The ONNX export cache (as ``extract_run.onnx_cache``: ``auto``, ``none`` or a folder), where the
        backbone's export is looked for before exporting it.

    Returns
    -------
    Path
        ``out``: input ``images`` (B, 3, S, S) float32 normalised as ``preprocess`` in its description says;
        outputs ``scores`` ((B, K) probabilities in ``classes`` order, or (B,) predictions) and, for a
        classifier, ``label`` (B,) int64; the description in ``metadata_props["featcache_model"]``.

    Raises
    ------
    SavedHeadError
        For a missing or damaged run folder, before any library loads.
    ServingExportError
        For a store that kept int8 features (hint: ``featcache predict``, which runs its int8 graph).
    """
    info = saved_run_info(model_dir)
    config = info["extraction_config"]
    knobs = config["extract"]
    from featcache.extract.onnx.serve import (
        ServingExportError,
        feature_graph,
        serving_description,
        serving_model,
        write_serving_model,
    )

    if knobs.get("precision", "float32") == "int8":
        raise ServingExportError(
            f"{model_dir}: its head was trained on int8 features (extract.precision int8), whose quantised graph is "
            "not exported as a served model here; allowed: float32 or float16 stores. Hint: score with `featcache "
            "predict --model ... --images ...` (it runs the int8 graph), or re-extract with extract.precision float32 "
            "and retrain.")
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.heads import load_head
    from featcache.heads.onnx_graph import head_graph
    from featcache.heads.registry import head_label

    head = load_head(model_dir)
    graph = head_graph(head)  # an unsupported head is named before the backbone is exported
    source = resolve_weights(info["backbone"], stored_weights(config, model_dir), model=config.get("model"))
    preprocess = config["preprocess"]
    dtype = str(knobs.get("dtype", "float32"))
    features = feature_graph(source, info["layer"], pooling=knobs["pooling"], dtype=dtype,
                             input_size=int(preprocess["input_size"]), cache_dir=onnx_cache)
    name = head_label(str(info["head"]), info["task"]) if "head" in info else type(head).__name__
    description = serving_description(info["task"], info["classes"], preprocess, backbone=info["backbone"],
                                      layer=info["layer"], head=name,
                                      weights_id=source.weights_id, pooling=knobs["pooling"], dtype=dtype)
    path = write_serving_model(serving_model(features, graph, description), out)
    logger.info("Exported %s (%s %s %s) to %s", model_dir, info["backbone"], info["layer"], description["head"], path)
    return path
