"""A trained run's folder read back: what ``featcache predict`` and ``featcache export`` start from.

A run folder (``models/<dataset>/<backbone>/<layer>/<head>``, written by ``featcache train --model-dir``) holds
the saved head and ``featcache-run.json``: the backbone, layer, classes and the extraction config its features
came from. These functions read that record back as the extraction made the features: the folder checked
(:func:`saved_run_info`), the preprocessing with its pixel limit (:func:`stored_preprocessor`), the weights and
manifest paths resolved against the project (:func:`stored_weights`, :func:`project_path`) and, for int8
features, the very int8 graph (:func:`stored_int8_runner`).

The module imports no scikit-learn, h5py, torch or onnxruntime at import: a wrong ``--model`` is named in a
fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from featcache.errors import SAVED_HEAD_HINT, SavedHeadNotFoundError
from featcache.runs import read_json_object, read_run_info
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from featcache.extract.decode.preprocess import Preprocessor

__all__ = ["PROJECT_MARKERS", "project_path", "saved_run_info", "stored_int8_runner", "stored_preprocessor",
           "stored_weights"]


def saved_run_info(model_dir: str | Path) -> dict[str, Any]:
    """``featcache-run.json`` of a run folder, after checking the folder holds a readable ``head.json`` too.

    A wrong ``--model`` (of ``predict`` or ``export``) is named before scikit-learn, torch or onnxruntime loads
    (:func:`~featcache.heads.load_head` then checks the head's other files and their sha256).

    Parameters
    ----------
    model_dir : path
        A run folder written by ``featcache train --model-dir``.

    Returns
    -------
    dict
        The run's ``featcache-run.json`` (:func:`~featcache.runs.read_run_info`).
    """
    info = read_run_info(model_dir)
    path = Path(model_dir) / "head.json"
    if not path.is_file():
        raise SavedHeadNotFoundError(f"{model_dir} is not a usable saved head: {path.name} (the head's class and "
                                     f"parameters) is missing. {SAVED_HEAD_HINT}")
    read_json_object(path, f"{model_dir} is not a usable saved head: {path.name}")
    return info


def stored_preprocessor(config: Mapping[str, Any]) -> Preprocessor:
    """The preprocessing a store's extraction ``config`` records, its decompression-bomb limit included.

    Parameters
    ----------
    config : mapping
        A store's config (``extraction_config`` of a run's ``featcache-run.json``): ``preprocess`` plus
        ``extract.max_image_pixels``, recorded only when it differs from the default (None: no limit).

    Returns
    -------
    Preprocessor
        Images the extraction accepted are accepted again.
    """
    from featcache.extract.decode.preprocess import Preprocessor

    limit = config.get("extract", {}).get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    return Preprocessor.from_config(config["preprocess"], max_image_pixels=limit)


#: Files that mark a project's root: relative paths in a run's ``extraction_config`` are relative to it (DVC and
#: ``featcache train`` run there).
PROJECT_MARKERS = ("dvc.yaml", "params.yaml")


def stored_weights(config: Mapping[str, Any], model_dir: str | Path) -> str:
    """The ``weights`` of a run's extraction config, a relative file path resolved against the project.

    The extract stage ran in the project root (where ``dvc.yaml`` is), so a relative weights path there is
    relative to it, not to wherever ``featcache predict`` runs: it is resolved against the nearest folder
    above ``model_dir`` holding one of :data:`PROJECT_MARKERS` (the current folder when none does).

    Parameters
    ----------
    config : mapping
        ``extraction_config`` of ``featcache-run.json``.
    model_dir : path
        The run folder.

    Returns
    -------
    str
        ``pretrained``, ``random``, an absolute path, or the path as recorded when no project holds it.
    """
    weights = str(config["weights"])
    return weights if weights in ("pretrained", "random") else project_path(weights, model_dir)


def project_path(recorded: str, model_dir: str | Path) -> str:
    """A path a stage recorded (weights, a manifest), resolved against the project above ``model_dir``.

    Parameters
    ----------
    recorded : str
        The path as the stage recorded it.
    model_dir : path
        The run folder.

    Returns
    -------
    str
        ``recorded`` when absolute, or when no folder above ``model_dir`` holding one of :data:`PROJECT_MARKERS`
        has it; else that folder's file.
    """
    if Path(recorded).expanduser().is_absolute():
        return recorded
    for folder in Path(model_dir).resolve().parents:
        if any((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return str(folder / recorded) if (folder / recorded).exists() else recorded
    return recorded


def stored_int8_runner(config: Mapping[str, Any], source: Any, preprocess: Preprocessor, model_dir: str | Path,
                       onnx_cache: str) -> tuple[Any, str]:
    """The runner of the very int8 graph a run's features came from, or None and why there is none.

    Parameters
    ----------
    config : mapping
        The run's ``extraction_config``.
    source : WeightsSource
        Its backbone and weights (:func:`stored_weights`).
    preprocess : Preprocessor
        Its preprocessing (:func:`stored_preprocessor`): the graph is rebuilt from the same calibration images.
    model_dir : path
        The run folder (a relative manifest path is resolved against its project).
    onnx_cache : str
        The ONNX cache the store was extracted with (``extract_run.onnx_cache``).

    Returns
    -------
    runner : OnnxFeatureRunner or None
        Over the int8 graph found in the cache by its recorded sha256, or rebuilt with that sha256.
    why : str
        Empty with a runner.
    """
    from featcache.extract.onnx.quantize import recorded_int8_runner
    from featcache.pipeline.params.extract import INT8_GRAPH

    record = config["extract"].get(INT8_GRAPH)
    if record is None:
        return None, "the store's config records no int8 graph (extracted before featcache recorded it)"
    manifest = project_path(record["manifest"], model_dir)
    return recorded_int8_runner(record, source, config["layers"], config["extract"], preprocess, manifest,
                                cache_dir=onnx_cache)
