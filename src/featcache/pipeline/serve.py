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

import json
import logging
from pathlib import Path
from typing import Any

from featcache.errors import UserError
from featcache.pipeline.run_folder import saved_run_info, stored_int8_runner, stored_preprocessor, stored_weights

__all__ = ["SelectionReportError", "export_selected", "export_serving_model", "runtime_differences", "selected_run"]

logger = logging.getLogger(__name__)


class SelectionReportError(UserError, ValueError):
    """A compare report that names no selected run, or whose selected model is no longer in the models folder."""


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
        backbone's export (a store of int8 features: its int8 graph) is looked for before making it.

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
        For a store of int8 features whose int8 graph is neither in the cache nor can be rebuilt (the reason).
    """
    info = saved_run_info(model_dir)
    config = info["extraction_config"]
    knobs = config["extract"]
    from featcache.extract.onnx.serve import (
        backbone_graph,
        feature_graph,
        serving_description,
        serving_model,
        write_serving_model,
    )
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.heads import load_head
    from featcache.heads.onnx_graph import head_graph
    from featcache.heads.registry import head_label
    from featcache.store.schema import layer_parts

    head = load_head(model_dir)
    graph = head_graph(head)  # an unsupported head is named before the backbone is exported
    source = resolve_weights(info["backbone"], stored_weights(config, model_dir), model=config.get("model"))
    preprocess = config["preprocess"]
    if knobs.get("precision", "float32") == "int8":
        backbone = _int8_graph(config, source, model_dir, onnx_cache)
    else:
        backbone = backbone_graph(source, layer_parts(info["layer"]), pooling=knobs["pooling"],
                                  input_size=int(preprocess["input_size"]), store_layers=config.get("layers", ()),
                                  cache_dir=onnx_cache)
    dtype = str(knobs.get("dtype", "float32"))
    features = feature_graph(backbone, info["layer"], dtype=dtype)
    if (differences := runtime_differences(knobs)):
        logger.warning("%s: the head's features were %s; the file computes float32 features with onnxruntime from "
                       "images preprocessed as its description says, so its scores may differ from the evaluated "
                       "ones within that rounding (as `featcache predict` on the CPU).", model_dir,
                       " and ".join(differences))
    name = head_label(str(info["head"]), info["task"]) if "head" in info else type(head).__name__
    description = serving_description(info["task"], info["classes"], preprocess, backbone=info["backbone"],
                                      layer=info["layer"], head=name,
                                      weights_id=source.weights_id, pooling=knobs["pooling"], dtype=dtype)
    path = write_serving_model(serving_model(features, graph, description), out)
    logger.info("Exported %s (%s %s %s) to %s", model_dir, info["backbone"], info["layer"], description["head"], path)
    return path


def runtime_differences(knobs: dict[str, Any]) -> list[str]:
    """How the store's extraction computed its features otherwise than a served file does (float32 onnxruntime
    on images decoded by PIL), from its config's ``extract`` section: e.g. ``["computed with fp16 autocast
    (torch)", "decoded on the GPU (nvJPEG)"]``; empty for the onnxruntime and float32 torch stores (their features agree
    with the file's within float32 rounding: README "One ONNX file for serving")."""
    differences = []
    autocast = knobs.get("autocast") or "none"
    if autocast != "none":
        differences.append(f"computed with {autocast} autocast ({knobs.get('backend', 'torch')})")
    if knobs.get("decode") == "gpu":
        differences.append("decoded on the GPU (nvJPEG)")
    return differences


def _int8_graph(config: dict[str, Any], source: Any, model_dir: str | Path, onnx_cache: str) -> Any:
    """The store's very int8 graph (as ``featcache predict`` runs it), or ServingExportError saying why not."""
    import onnx

    from featcache.extract.onnx.serve import ServingExportError

    runner, why = stored_int8_runner(config, source, stored_preprocessor(config), model_dir, onnx_cache)
    if runner is None:
        raise ServingExportError(
            f"{model_dir}: its head was trained on int8 features (extract.precision int8), but {why}. Hint: pass "
            "--onnx-cache with the extract_run.onnx_cache the store was extracted with, or keep its manifest and "
            "train images in place so the int8 graph is rebuilt.")
    return onnx.load(str(runner.path))


def selected_run(report: str | Path) -> dict[str, Any]:
    """The run ``compare`` selected (on validation, else the test-best), as its report's ``selection`` records it.

    Parameters
    ----------
    report : path
        ``compare``'s JSON report (``reports/compare.json``).

    Returns
    -------
    dict
        ``folder``: the run's folder under the dataset's models folder, ``<backbone>/<layer>/<head>`` with the
        registry's head name (a report from before compare recorded them: its ``run`` label); ``model_sha256``:
        the model compare saw (:func:`featcache.runs.model_sha256`), or None when not recorded; ``run``: the label.
    """
    path = Path(report)
    try:
        selection = json.loads(path.read_text())["selection"]
        run = selection["run"]
        parts = [selection[key] for key in ("backbone", "layer", "head")] if "head" in selection else [run]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SelectionReportError(
            f"{str(path)!r} names no selected run ({type(error).__name__}: {error}); allowed: the compare.json that "
            "`featcache compare` writes. Hint: run `dvc repro compare` first.") from None
    folder = Path(*parts) if all(isinstance(part, str) and part for part in parts) else None
    if folder is None or folder.is_absolute() or ".." in folder.parts or len(folder.parts) != 3:
        raise SelectionReportError(f"{str(path)!r}: selection {run!r} is not a run <backbone>/<layer>/<head>. "
                                   "Hint: rerun `dvc repro compare`.")
    return {"folder": folder.as_posix(), "model_sha256": selection.get("model_sha256"), "run": run}


def export_selected(report: str | Path, models: str | Path, out: str | Path, onnx_cache: str = "auto") -> Path:
    """:func:`export_serving_model` of the run ``compare`` selected: the pipeline's ``export`` stage.

    The stage depends on the report's ``selection`` only (DVC reruns it when the selected run or its model
    changes, not when another run does), so the run folder is checked to hold the very model compare selected
    (its :func:`~featcache.runs.model_sha256`, when the report records one).

    Parameters
    ----------
    report : path
        ``reports/compare.json`` (:func:`selected_run`).
    models : path
        The dataset's models folder (``models/<dataset>``): the run's folder is ``<models>/<backbone>/<layer>/<head>``.
    out : path
        The ``.onnx`` file.
    onnx_cache : str
        As :func:`export_serving_model`.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    SelectionReportError
        For a report without a selected run, or a run folder holding another model than the report selected.
    """
    selected = selected_run(report)
    model_dir = Path(models) / selected["folder"]
    logger.info("Exporting the run compare selected: %s (%s)", selected["run"], model_dir)
    recorded = selected["model_sha256"]
    if recorded is not None:
        from featcache.runs import model_sha256

        saved_run_info(model_dir)  # a missing or damaged folder is named as such
        found = model_sha256(model_dir)
        if found != recorded:
            raise SelectionReportError(
                f"{model_dir} holds another model (sha256 {found[:12]}...) than the one {report} selected "
                f"({recorded[:12]}...): it was retrained or replaced after compare ran. Hint: rerun `dvc repro` "
                "(train, compare, then export), or pass --models the folder compare's runs were trained into.")
    return export_serving_model(model_dir, out, onnx_cache=onnx_cache)
