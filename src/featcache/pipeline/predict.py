"""``featcache predict``: score a feature file or new images with a saved head.

A trained run directory (``models/<dataset>/<backbone>/<layer>/<head>``) holds
the head (saved without pickle) and ``featcache-run.json``: the backbone,
layer, classes and the extraction config the features came from, so new
images go through exactly the same backbone, preprocessing and pooling, on the
same runtime (the ``extract.backend`` and autocast the store recorded:
onnxruntime on the CPU for a store made that way) and with the same storage
rounding (a float16 store's features are rounded to float16 before the head):
``predict --images`` gives the predictions ``predict --store`` gives for the
same images. A head trained on int8 features runs the store's very int8 graph (found in the ONNX cache by its
recorded sha256, else rebuilt from the manifest it was calibrated on), or float32 with one warning saying why.
A head trained on a fused layer (``pool+block6``, :func:`~featcache.store.schema.layer_parts`) reads those
layers of the store side by side; on images, one pass of the backbone (float32 or the int8 graph) gives every
part, each rounded to the storage dtype and concatenated in the same order.

Both write one CSV layout: ``id``, (``split``, ``actual`` with ``--store``),
``prediction``, ``p_<class>`` per class for a classifier, and ``error`` (empty
unless that image could not be read: such an image gets a row, it neither stops
the run nor vanishes).

The module imports no scikit-learn, h5py, torch or onnxruntime: the arguments and the model folder are
checked first, so a wrong path exits in a fraction of a second, and the libraries load only to score.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from featcache.errors import UserError
from featcache.pipeline.image_inputs import image_paths
from featcache.pipeline.run_folder import (
    project_path,
    saved_run_info,
    stored_int8_runner,
    stored_preprocessor,
    stored_weights,
)
from featcache.store.schema import SPLITS, layer_parts
from featcache.util.checks import check_int

if TYPE_CHECKING:  # the store (h5py), the head (scikit-learn) and the runtimes load only to score
    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.store import FeatureStore

__all__ = ["FEATURE_CONFIG_KEYS", "PredictError", "feature_config", "predict_store", "predict_images",
           "write_predictions"]

logger = logging.getLogger(__name__)

#: The parts of a store's config that change a layer's features: a store that differs in any of them gives
#: features the head was not trained on. The dataset, the list of layers, the backend and the storage dtype
#: do not (a head scores another dataset's store extracted the same way).
FEATURE_CONFIG_KEYS: tuple[str, ...] = ("backbone", "model", "weights", "preprocess", "extract.pooling",
                                        "extract.precision", "extract.resize_mode")


class PredictError(UserError, ValueError):
    """Bad input to ``featcache predict``: no images, a missing path, features of another width."""


def feature_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`FEATURE_CONFIG_KEYS` of an extraction ``config`` (nested as in the config; absent keys left out)."""
    out: dict[str, Any] = {}
    for key in FEATURE_CONFIG_KEYS:
        section, _, name = key.partition(".")
        if not name:
            if config.get(section) is not None:
                out[section] = config[section]
        elif config.get(section, {}).get(name) is not None:
            out.setdefault(section, {})[name] = config[section][name]
    return out


def _rows(ids: Sequence[str], scores: np.ndarray, task: str, classes: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for index, sample_id in enumerate(ids):
        if task == "classification":
            row = {"id": sample_id, "prediction": classes[int(np.argmax(scores[index]))]}
            row.update({f"p_{name}": round(float(p), 6) for name, p in zip(classes, scores[index])})
        else:
            row = {"id": sample_id, "prediction": float(scores[index])}
        rows.append({**row, "error": ""})
    return rows


def _failed_row(sample_id: str, error: str, task: str, classes: Sequence[str]) -> dict[str, Any]:
    """The row of an image that could not be read: the columns of a scored row, empty, and its ``error``."""
    probabilities = {f"p_{name}": "" for name in classes} if task == "classification" else {}
    return {"id": sample_id, "prediction": "", **probabilities, "error": error}


def _score(head: Any, features: np.ndarray, task: str) -> np.ndarray:
    return head.predict_proba(features) if task == "classification" else head.predict(features)


def predict_store(model_dir: str | Path, store_path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Score the rows of a feature store (optionally one split) with a saved head.

    Each row: ``id``, ``split``, ``actual`` (the store's class name or target, empty when it has none),
    ``prediction``, for a classifier ``p_<class>`` per class, and ``error`` (empty: a store holds no bad image).
    """
    info = saved_run_info(model_dir)  # a wrong --model is named before h5py or scikit-learn loads
    from featcache.store import FeatureStore, StaleStoreError
    from featcache.store.reader import diff_config

    with FeatureStore(store_path) as store:
        diffs = diff_config(feature_config(store.config), feature_config(info["extraction_config"]))
        if diffs:
            raise StaleStoreError(
                f"feature store {store_path} was not extracted like the features of the head in {model_dir}: "
                + "; ".join(d.replace("params say", "the head's features had") for d in diffs)
                + ". Hint: extract the images with the head's settings (extraction_config in its "
                "featcache-run.json), or score the images with predict --images.")
        from featcache.heads import load_head  # scikit-learn (and the head's library) once the inputs are good

        head = load_head(model_dir)
        features = store.read(info["layer"], split)
        ids = list(store.ids(split))
        known = _known_answers(store, split, info["task"])
    if features.shape[1] != head.n_features_in_:
        raise PredictError(f"Layer {info['layer']!r} of {store_path} has {features.shape[1]} features but the head "
                           f"was trained on {head.n_features_in_}. Hint: use the store of backbone "
                           f"{info['backbone']!r}.")
    rows = _rows(ids, _score(head, features, info["task"]), info["task"], info["classes"])
    return [{"id": row["id"], **extra, **{k: v for k, v in row.items() if k != "id"}}
            for row, extra in zip(rows, known)]


def _known_answers(store: FeatureStore, split: str | None, task: str) -> list[dict[str, Any]]:
    """Each row's split and its known answer in the store (class name or target; empty when it has none)."""
    names = np.full(store.n_rows, "", dtype=object)
    for name in SPLITS:
        names[store.split_mask(name)] = name
    names = names[store.split_mask(split)]
    if task == "classification":
        classes = list(store.classes)
        actual = [classes[k] if 0 <= k < len(classes) else "" for k in store.labels(split).tolist()]
    else:
        actual = ["" if np.isnan(t) else float(t) for t in store.targets(split).tolist()]
    return [{"split": name, "actual": value} for name, value in zip(names.tolist(), actual)]


def _plan(config: Mapping[str, Any], device: str) -> tuple[Any, int | None]:
    """The extraction plan that runs new images as the store's extraction ran (its backend and autocast), and
    torch's thread count to run it with (the recorded one, for torch on the CPU; else None)."""
    from featcache.extract.plan import plan_extraction

    knobs = config["extract"]
    backend = knobs.get("backend", "torch")  # stores from before the backend was recorded ran torch
    threads = knobs.get("torch_threads")  # recorded for torch on the CPU only
    if backend == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        logger.warning("the head's features were extracted by onnxruntime, which is not installed: scoring with "
                       "torch (features within float32 rounding of onnxruntime's). Hint: pip install onnxruntime.")
        backend = "torch"
    if device == "auto" and (backend != "torch" or threads is not None):
        device = "cpu"  # onnxruntime and OpenVINO made the features on the CPU (their GPU use is explicit)
    autocast = knobs.get("autocast", "none")
    plan = plan_extraction(device=device, backend=backend, autocast=autocast, decode="cpu", num_workers=0,
                           device_setting="--device")
    if plan.backend == "torch" and plan.autocast is not None and not plan.device.startswith("cuda"):
        logger.warning("the head's features were extracted with %s autocast on a GPU; scoring float32 features on "
                       "the CPU (within the autocast's rounding). Hint: --device cuda on a GPU machine.", autocast)
        plan = plan_extraction(device=device, backend=backend, autocast="none", decode="cpu", num_workers=0,
                               device_setting="--device")
    if knobs.get("decode") == "gpu":
        logger.info("the head's JPEGs were decoded on the GPU; decoding with PIL here")
    return plan, (int(threads) if threads is not None and plan.backend == "torch" and plan.device == "cpu" else None)


def _int8_runner(config: Mapping[str, Any], source: Any, preprocess: Preprocessor, model_dir: str | Path,
                 onnx_cache: str, backend: str) -> Any:
    """The runner of the int8 graph the head's features came from, or None (float32) after one warning."""
    from featcache.pipeline.params.extract import INT8_GRAPH

    record = config["extract"].get(INT8_GRAPH)
    manifest = project_path(record["manifest"], model_dir) if record else ""
    if backend != "onnx":
        why = "onnxruntime, which runs it, is not installed"
    else:
        runner, why = stored_int8_runner(config, source, preprocess, model_dir, onnx_cache)
        if runner is not None:
            return runner
    logger.warning(
        "the head was trained on int8 features, but %s: scoring float32 features instead (the int8 gate kept "
        "them within cosine %s of float32; probabilities may differ from predict --store's). Hint: for the very "
        "int8 features, pass --onnx-cache with the extract_run.onnx_cache the store was extracted with, or keep "
        "its manifest%s and train images in place so the graph is rebuilt (re-extract if it has none).",
        why, config["extract"].get("int8_min_cosine"), f" ({manifest})" if manifest else "")
    return None


def predict_images(model_dir: str | Path, inputs: Sequence[str | Path], batch_size: int = 32,
                   device: str = "auto", onnx_cache: str = "auto") -> list[dict[str, Any]]:
    """Extract features of new images as the head's features were extracted and score them.

    The same backbone, weights, preprocessing and pooling, on the same runtime (the store's recorded
    ``extract.backend`` and autocast; ``device="auto"`` runs onnxruntime and OpenVINO on the CPU, as ``auto``
    extraction does), with the store's storage rounding (float16): the predictions equal
    :func:`predict_store`'s for the same images.

    Parameters
    ----------
    model_dir : path
        A run folder written by ``featcache train --model-dir``.
    inputs : sequence of path or str
        Image files, folders (searched recursively; hidden files skipped) or glob patterns.
    batch_size : int
        Images per forward pass.
    device : {"auto", "cpu", "cuda"} or "cuda:N"
    onnx_cache : str
        The ONNX export cache (as ``extract_run.onnx_cache``: ``auto``, ``none`` or a folder): where the
        exports, and the int8 graph of an int8 store (by its recorded sha256), are looked for.

    Returns
    -------
    list of dict
        One row per image, in input order: ``id`` (the path), ``prediction``, ``p_<class>`` per class for a
        classifier, ``error`` (empty, or why the image could not be read: its other columns are empty).

    Raises
    ------
    ParamError
        For a ``batch_size`` below 1, before anything loads.
    PredictError
        For a missing path or no images, before the model loads.
    SavedHeadError
        For an incomplete or damaged ``model_dir`` (one without a readable ``featcache-run.json`` or ``head.json``
        before scikit-learn, torch or onnxruntime is imported).
    """
    check_int("batch_size", batch_size, 1, hint="Hint: pass --batch-size 32 (images scored per forward pass).")
    paths = image_paths(inputs, PredictError)  # a wrong path, device or model folder fails before the model is read
    if device != "auto":  # only an explicit device is checked here (CUDA's presence may need torch)
        from featcache.extract.plan import plan_extraction

        plan_extraction(device=device, backend="torch", autocast="none", decode="cpu", device_setting="--device")
    info = saved_run_info(model_dir)
    from featcache.extract.decode.loaders import ImageReader
    from featcache.extract.plan import build_runner
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.heads import load_head
    from featcache.util.compute import torch_threads

    head = load_head(model_dir)
    config = info["extraction_config"]
    knobs = config["extract"]
    plan, threads = _plan(config, device)
    source = resolve_weights(info["backbone"], stored_weights(config, model_dir), model=config.get("model"))
    preprocess = stored_preprocessor(config)
    parts = layer_parts(info["layer"])  # a fused layer's parts come out of one pass of the backbone
    runner = None
    if knobs.get("precision", "float32") == "int8":  # its graph computes every layer of the store
        runner = _int8_runner(config, source, preprocess, model_dir, onnx_cache, plan.backend)
    if runner is None:
        runner, _ = build_runner(source, list(parts), plan, pooling=knobs["pooling"],
                                 channels_last=knobs.get("channels_last", True), onnx_cache=onnx_cache)
    reader = ImageReader(paths, preprocess)
    stored = np.dtype(knobs.get("dtype", "float32"))  # the head was fitted on features read back from this dtype
    task, classes = info["task"], info["classes"]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        batch = [reader.read(row) for row in range(start, min(start + batch_size, len(paths)))]
        good = [item for item in batch if not item[2]]
        scored: dict[int, dict[str, Any]] = {}
        if good:
            pixels = np.stack([item[1] for item in good])
            with torch_threads(threads) if threads is not None else contextlib.nullcontext():
                outputs = runner(preprocess.normalize_batch(pixels))
            features = np.concatenate([np.asarray(outputs[part], dtype=np.float32).astype(stored).astype(np.float32)
                                       for part in parts], axis=1)
            scored = dict(zip([item[0] for item in good],
                              _rows([str(paths[item[0]]) for item in good], _score(head, features, task), task,
                                    classes)))
        for index, _, error in batch:
            rows.append(scored.get(index) or _failed_row(str(paths[index]), error, task, classes))
    return rows


def write_predictions(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Write prediction rows as CSV: ``id``, (``split``, ``actual``), ``prediction``, ``p_<class>``..., ``error``.

    The columns are those of the rows in their order, ``error`` always last (and present), whichever row comes
    first (a failed image's row included).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns and key != "error")
    columns.append("error")
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out
