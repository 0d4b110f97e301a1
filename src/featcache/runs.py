"""Run records: what a trained head leaves behind, in the files DVC and the report read.

A run (one head on one layer of one backbone, or one fine-tuning mode) is one
flat dict (:func:`featcache.heads.fit_and_evaluate`'s metrics plus where the run
comes from). It is written as two files, so that DVC shows numbers only:

- ``<name>.json``, the DVC **metrics** file: the test scores and nothing else,
  nested under the run's name, ``{backbone: {layer: {head: {accuracy: ...}}}}``,
  so ``dvc metrics show`` / ``dvc exp show`` name each column
  ``efficientnet_lite0.pool.logreg.accuracy`` instead of a file path;
- ``<name>.run.json``, the sidecar: every other field (dataset, task, node,
  the feature store's ``weights_id`` and ``weights_sha256``, confidence
  intervals, per-class recall, chosen hyper-parameters, sizes, timings).

:func:`read_run` merges them back into the flat dict (and reads the older
single-file format too). A saved head's folder holds ``featcache-run.json``
(:func:`write_run_info`): what ``featcache predict`` needs to featurise new images
exactly as at training time.

It imports only the leaves :mod:`featcache.util.atomic` and :mod:`featcache.errors`, so every stage and
subpackage may use it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featcache.errors import SAVED_HEAD_HINT, SavedHeadError, SavedHeadNotFoundError, UserError
from featcache.util.atomic import write_json

__all__ = ["INFO_KEYS", "MODEL_FILES", "RUN_FILE", "RUN_INFO_FORMAT", "RUN_INFO_KEYS", "SIDECAR_SUFFIX",
           "RunFileError", "RunNotFoundError", "model_sha256", "read_json_object", "read_run", "read_run_info",
           "run_key", "sidecar_path", "split_run", "write_run", "write_run_info"]

#: File beside a saved head describing where its features come from.
RUN_FILE = "featcache-run.json"

#: ``metrics/.../logreg.json`` -> ``metrics/.../logreg.run.json``.
SIDECAR_SUFFIX = ".run.json"


#: The ``format`` of the ``featcache-run.json`` this version writes (files from before it carry none).
RUN_INFO_FORMAT = "featcache-run/1"

#: The keys ``featcache predict`` reads from ``featcache-run.json``, and those of its ``extraction_config``.
RUN_INFO_KEYS = ("backbone", "layer", "task", "classes", "extraction_config")
_CONFIG_KEYS = ("weights", "preprocess", "extract")


class RunNotFoundError(SavedHeadNotFoundError):
    """A folder given as a saved run (``featcache predict --model``) that does not exist or holds no
    ``featcache-run.json`` (a :class:`~featcache.errors.SavedHeadNotFoundError`, so a FileNotFoundError)."""

class RunFileError(UserError, ValueError):
    """A run's metrics file or sidecar (``compare --metrics-dir``) that cannot be read: not UTF-8 JSON (truncated,
    damaged, or another file under a ``.json`` name), or a pair whose files name different runs."""


#: How to get a run's files back: the stage that writes both.
_RUN_FILE_HINT = ("Hint: rerun the stage that writes it (`dvc repro`, or `featcache train`/`finetune` with this "
                  "--metrics), or move the file out of the metrics folder.")

#: Numeric fields that describe a run rather than score it (they go to the sidecar, not to DVC metrics).
INFO_KEYS = frozenset({"n_features", "n_train", "n_val", "n_test", "n_bad_images", "fit_seconds", "predict_seconds"})

#: Fields that name the run: ``{backbone: {layer: {label or head: scores}}}`` in the metrics file.
_NAME_KEYS = ("backbone", "layer", "head")


def sidecar_path(metrics_path: str | Path) -> Path:
    """The sidecar of a metrics file: ``a/logreg.json`` -> ``a/logreg.run.json``."""
    path = Path(metrics_path)
    return path.with_name(path.name.removesuffix(".json") + SIDECAR_SUFFIX)


def run_key(run: Mapping[str, Any]) -> tuple[str, str, str]:
    """The run's name in its metrics file: ``(backbone, layer, label)``; ``label`` defaults to ``head``."""
    return str(run["backbone"]), str(run["layer"]), str(run.get("label") or run["head"])


def _is_score(key: str, value: Any) -> bool:
    return (key not in INFO_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def split_run(run: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat run into ``(metrics, info)``.

    Returns
    -------
    metrics : dict
        ``{backbone: {layer: {label: {score: number}}}}``: the finite numeric test
        scores (``accuracy``, ``rmse``, ``tta_accuracy``, ...), nothing else.
    info : dict
        Every other field (names, task, ``ci``, ``per_class_recall``,
        ``best_params``, sizes, timings, non-finite scores).
    """
    scores = {key: value for key, value in run.items() if _is_score(key, value)}
    info = {key: value for key, value in run.items() if key not in scores}
    backbone, layer, label = run_key(run)
    return {backbone: {layer: {label: scores}}}, info


def write_run(metrics_path: str | Path, run: Mapping[str, Any]) -> Path:
    """Write a run as its metrics file (numbers only) and its sidecar; returns the metrics path.

    The sidecar is written first, so a metrics file never exists without it.
    """
    missing = [key for key in _NAME_KEYS if key not in run]
    if missing:
        raise ValueError(f"a run record needs {list(_NAME_KEYS)}; {missing} missing (got {sorted(run)})")
    metrics, info = split_run(run)
    write_json(sidecar_path(metrics_path), info)
    return write_json(metrics_path, metrics)


def read_run(metrics_path: str | Path) -> dict[str, Any] | None:
    """The flat run dict of a metrics file (merged with its sidecar); None if it is no run.

    A file without a sidecar is read as the older single-file format (every field
    in one JSON), which is what it then must hold: ``backbone``, ``layer``,
    ``head`` and ``task``.

    Raises
    ------
    RunFileError
        When either file is not UTF-8 JSON, the sidecar names no run, or the metrics file lacks its run.
    """
    path = Path(metrics_path)
    payload = _read_json(path)
    side = sidecar_path(path)
    if side.is_file():
        info = _read_json(side)
        if not isinstance(info, dict) or not {"backbone", "layer"} <= info.keys() or not (
                info.get("label") or info.get("head")):
            raise RunFileError(f"{side} names no run (allowed: a sidecar with backbone, layer and head). "
                               f"{_RUN_FILE_HINT}")
        try:
            scores = payload
            for part in run_key(info):
                scores = scores[part]
        except (KeyError, TypeError):
            raise RunFileError(f"{path} does not hold the scores of the run its sidecar {side} names "
                               f"({'/'.join(run_key(info))}). Hint: rerun the stage that writes both.") from None
        payload = {**info, **scores}
    if not isinstance(payload, dict) or not {*_NAME_KEYS, "task"} <= payload.keys():
        return None
    return payload


def _read_json(path: Path) -> Any:
    """The JSON value of a run's file; a :class:`RunFileError` naming it when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise RunFileError(f"{path} is not a readable run file ({type(error).__name__}: {error}); allowed: the JSON "
                           f"a train or finetune stage writes. It is truncated or damaged, or no run's file. "
                           f"{_RUN_FILE_HINT}") from None


def write_run_info(model_dir: str | Path, info: Mapping[str, Any]) -> Path:
    """Write ``featcache-run.json`` (backbone, layer, task, classes, extraction config) beside a saved head.

    The file is written atomically and carries ``format`` (:data:`RUN_INFO_FORMAT`), so a later
    version reading it knows which layout it holds.
    """
    return write_json(Path(model_dir) / RUN_FILE, {**info, "format": RUN_INFO_FORMAT})


#: The files of a run folder that :func:`model_sha256` hashes: the saved head's ``head.json`` (the head's class,
#: parameters, fitted attributes and the sha256 of each of its other files) and :data:`RUN_FILE`.
MODEL_FILES = ("head.json", RUN_FILE)


def model_sha256(model_dir: str | Path) -> str:
    """The sha256 of a run folder's model: :data:`MODEL_FILES`' bytes, named, in order.

    ``head.json`` records the sha256 of the head's weight files, so the hash changes with any file of the model.
    The train stage records it in the run's sidecar, ``compare`` in its selection, and ``featcache export
    --selected`` checks the folder still holds that model.

    Parameters
    ----------
    model_dir : str or Path
        A run folder written by ``featcache train --model-dir``.

    Returns
    -------
    str
        64 hex digits.
    """
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update(name.encode() + b"\0" + (Path(model_dir) / name).read_bytes() + b"\0")
    return digest.hexdigest()


def read_json_object(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """The JSON object a saved run's file holds (``featcache-run.json``, ``head.json``).

    Parameters
    ----------
    path : str or Path
    name : str, optional
        How the messages name the file; default its path.

    Raises
    ------
    SavedHeadError
        When the file cannot be read or parsed (truncated, damaged) or holds another JSON value than an object.
    """
    name = str(path) if name is None else name
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SavedHeadError(f"{name} could not be read ({type(error).__name__}: {error}); it is truncated or "
                             f"damaged. {SAVED_HEAD_HINT}") from None
    if not isinstance(value, dict):
        raise SavedHeadError(f"{name} holds a JSON {type(value).__name__}, not an object. {SAVED_HEAD_HINT}")
    return value


def read_run_info(model_dir: str | Path) -> dict[str, Any]:
    """Read ``featcache-run.json`` of a saved run, checked to hold what ``featcache predict`` reads.

    Raises
    ------
    RunNotFoundError
        (a FileNotFoundError) Naming the folder and what a run folder is.
    SavedHeadError
        For a truncated file, one of another ``format`` than :data:`RUN_INFO_FORMAT`, or one written by an
        older version (a key of :data:`RUN_INFO_KEYS` missing, named with the keys it has).
    """
    path = Path(model_dir) / RUN_FILE
    if Path(model_dir).is_file():
        raise RunNotFoundError(f"{model_dir} is a file; allowed: a featcache run directory (it holds {RUN_FILE} "
                               f"and the saved head). Hint: pass its folder, {Path(model_dir).parent.as_posix()}, "
                               "if it is one (models/<dataset>/<backbone>/<layer>/<head>).")
    if not Path(model_dir).is_dir():
        raise RunNotFoundError(f"{path} not found: {model_dir} is not a featcache run directory. Hint: there is "
                               "no such folder; pass models/<dataset>/<backbone>/<layer>/<head>, written by "
                               "`featcache train` (the train stage of `dvc repro`).")
    if not path.is_file():
        raise RunNotFoundError(f"{path} not found: {model_dir} is not a featcache run directory, or an incomplete "
                               f"one. {SAVED_HEAD_HINT}")
    info = read_json_object(path)
    if info.get("format", RUN_INFO_FORMAT) != RUN_INFO_FORMAT:  # no format: written before it existed
        raise SavedHeadError(f"{path} has format {info['format']!r}; this featcache ({RUN_INFO_FORMAT!r}) cannot "
                             "read it. Hint: use the featcache version that trained it, or retrain with this one "
                             "(`dvc repro train`).")
    config = info.get("extraction_config")
    missing = [key for key in RUN_INFO_KEYS if key not in info]
    if isinstance(config, dict):
        missing += [f"extraction_config.{key}" for key in _CONFIG_KEYS if key not in config]
        if isinstance(config.get("extract"), dict) and "pooling" not in config["extract"]:
            missing.append("extraction_config.extract.pooling")
    elif config is not None:
        missing.append("extraction_config (not an object)")
    if missing:
        raise SavedHeadError(f"{path} lacks {', '.join(map(repr, missing))} (it has {sorted(info)}): it was written "
                             f"by an older featcache version, or edited. {SAVED_HEAD_HINT}")
    return info
