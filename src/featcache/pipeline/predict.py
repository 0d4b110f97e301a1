"""``featcache predict``: score a feature file or new images with a saved head.

A trained run directory (``models/<dataset>/<backbone>/<layer>/<head>``) holds
the head (saved without pickle) and ``featcache-run.json``: the backbone,
layer, classes and the extraction config the features came from, so new
images go through exactly the same backbone, preprocessing and pooling.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from featcache.errors import UserError
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.sources import IMAGE_EXTENSIONS
from featcache.heads import load_head
from featcache.runs import read_run_info
from featcache.store import FeatureStore, StaleStoreError
from featcache.store.reader import diff_config
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS, SPLITS
from featcache.util.checks import check_int

__all__ = ["FEATURE_CONFIG_KEYS", "PredictError", "feature_config", "predict_store", "predict_images",
           "stored_preprocessor", "write_predictions"]

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
        rows.append(row)
    return rows


def _score(head: Any, features: np.ndarray, task: str) -> np.ndarray:
    return head.predict_proba(features) if task == "classification" else head.predict(features)


def predict_store(model_dir: str | Path, store_path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Score the rows of a feature store (optionally one split) with a saved head.

    Each row: ``id``, ``split``, ``actual`` (the store's class name or target, empty when it has none),
    ``prediction`` and, for a classifier, ``p_<class>`` per class.
    """
    info = read_run_info(model_dir)
    head = load_head(model_dir)
    with FeatureStore(store_path) as store:
        diffs = diff_config(feature_config(store.config), feature_config(info["extraction_config"]))
        if diffs:
            raise StaleStoreError(
                f"feature store {store_path} was not extracted like the features of the head in {model_dir}: "
                + "; ".join(d.replace("params say", "the head's features had") for d in diffs)
                + ". Hint: extract the images with the head's settings (extraction_config in its "
                "featcache-run.json), or score the images with predict --images.")
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


def _image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    paths: list[Path] = []
    missing = [str(item) for item in map(Path, inputs) if not item.exists()]
    if missing:
        raise PredictError(f"No such file or folder: {missing}. Hint: give image files or folders of images.")
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            paths.append(item)
    if not paths:
        raise PredictError(f"No images found in {list(map(str, inputs))} (extensions {IMAGE_EXTENSIONS}). "
                           "Hint: give image files, or folders that contain them.")
    return paths


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
    limit = config.get("extract", {}).get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    return Preprocessor.from_config(config["preprocess"], max_image_pixels=limit)


def predict_images(model_dir: str | Path, inputs: Sequence[str | Path], batch_size: int = 32,
                   device: str = "auto") -> list[dict[str, Any]]:
    """Extract features of new images as at training time and score them.

    Images that fail to decode get ``prediction`` empty and an ``error`` column.

    Raises
    ------
    ParamError
        For a ``batch_size`` below 1, before anything loads.
    """
    check_int("batch_size", batch_size, 1, hint="Hint: pass --batch-size 32 (images scored per forward pass).")
    from featcache.extract.decode.loaders import ImageDataset, make_loader  # torch: only when images are scored
    from featcache.extract.plan import plan_extraction
    from featcache.extract.runners.torch_runner import TorchFeatureExtractor
    from featcache.extract.zoo.weights import load_backbone

    paths = _image_paths(inputs)  # a wrong path or device fails before the backbone loads
    plan = plan_extraction(device=device, backend="torch", autocast="none", decode="cpu",  # float32 torch features
                           device_setting="--device")
    info = read_run_info(model_dir)
    head = load_head(model_dir)
    config = info["extraction_config"]
    loaded = load_backbone(info["backbone"], config["weights"], model=config.get("model"))
    preprocess = stored_preprocessor(config)
    if config["extract"].get("precision", "float32") != "float32":
        logger.info("the head was trained on %s features; scoring float32 features (the int8 gate kept them within "
                    "cosine %s of float32)", config["extract"]["precision"], config["extract"].get("int8_min_cosine"))
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, [info["layer"]],
                                      pooling=config["extract"]["pooling"], device=plan.device)
    loader = make_loader(ImageDataset(paths, preprocess), range(len(paths)), batch_size, num_workers=0)
    rows: list[dict[str, Any]] = []
    for batch_rows, images, errors in loader:
        good = [i for i, error in enumerate(errors) if not error]
        features = extractor(preprocess.normalize_batch(images[good]))[info["layer"]] if good else None
        scores = _score(head, features, info["task"]) if good else []
        by_row = dict(zip(good, _rows([str(paths[int(batch_rows[i])]) for i in good], np.asarray(scores),
                                      info["task"], info["classes"])))
        for i, error in enumerate(errors):
            rows.append(by_row.get(i) or {"id": str(paths[int(batch_rows[i])]), "prediction": "", "error": error})
    return rows


def write_predictions(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Write prediction rows as CSV (columns: id, prediction, per-class probabilities, error)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out
