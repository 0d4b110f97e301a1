"""``train`` stage: one head on one (backbone, layer) of a feature store -> metrics, plot, model.

The layer may be fused, ``pool+block6`` (several layers of the store side by side: what
:class:`~featcache.store.FeatureStore` reads for such a name).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from featcache.heads.bootstrap import row_arrays
from featcache.heads.metrics import PREDICTION_COLUMNS, prediction_rows
from featcache.heads.paired import ids_sha256, rows_path, write_rows
from featcache.heads.registry import STREAMING_HEADS, head_label
from featcache.heads.trainable import check_trainable_rows
from featcache.pipeline.params.base import StageParams, as_sections, load_sections
from featcache.pipeline.params.data import DataParams
from featcache.pipeline.params.extract import (
    BackboneParams,
    ExtractParams,
    configured_backbone,
    default_backbones,
    extraction_config,
    stored_choices,
)
from featcache.pipeline.params.train import (
    TrainParams,
    check_dask_heads,
    check_heads_sections,
    check_train_metric,
    stage_head_params,
)
from featcache.pipeline.train_dask import dask_lightgbm
from featcache.runs import model_sha256, write_run, write_run_info
from featcache.store import FeatureStore, StoreError
from featcache.store.schema import SPLITS
from featcache.util.atomic import write_csv

if TYPE_CHECKING:
    from featcache.store.reader import FeatureStore as Store

__all__ = ["TrainSections", "check_classes_trainable", "check_store_rows", "expected_store_config",
           "load_train_sections", "train"]

logger = logging.getLogger(__name__)


class TrainSections(StageParams):
    """The sections the train stage reads: ``data``, ``train``, ``heads``, and ``extract``/``backbones``
    to check that a store is not stale (as plain values: the train stage imports no extractor)."""

    data: DataParams = DataParams()
    extract: ExtractParams = ExtractParams()
    backbones: dict[str, BackboneParams] = Field(default_factory=default_backbones)
    train: TrainParams = TrainParams()
    heads: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _head_sections(self) -> "TrainSections":
        check_heads_sections(self.heads, self.data.task)
        check_train_metric(self.train.metric, self.data.task)
        check_dask_heads(self.heads, self.train, self.data.task)
        return self


def load_train_sections(path: str | Path = "params.yaml") -> TrainSections:
    """Read and validate the sections of ``path`` that the train stage reads."""
    return load_sections(TrainSections, path)


def expected_store_config(params: Any, backbone: str, store: Store) -> dict[str, Any]:
    """The config a store of ``backbone`` extracted with ``params`` records, for :meth:`FeatureStore.check_config`.

    What the extract stage resolved on its machine is taken from the store: an
    ``auto`` backend or autocast, the decode path (features of either path are
    valid for the same params), a ``default`` layer (the registry's default
    when the store was extracted) and the preprocessing (the backbone
    registry's recipe: the extract stage's code, which DVC tracks).
    """
    config = extraction_config(params, backbone)
    chosen = configured_backbone(params, backbone)
    stored_layers = store.config.get("layers", [])
    if len(stored_layers) == len(chosen.layers):
        config["layers"] = [stored if layer == "default" else layer
                            for layer, stored in zip(chosen.layers, stored_layers)]
    config["extract"].update(stored_choices(params.extract, store.config.get("extract", {})))
    if "preprocess" in store.config:
        config["preprocess"] = store.config["preprocess"]
    return config


def check_classes_trainable(classes: list[str], y_train: np.ndarray, errors: list[tuple[str, str]]) -> None:
    """The store has at least two classes, and every class keeps a training row in it.

    ``prepare`` checks this on the manifest; a hand-made ``manifest.csv`` (its label and split columns), or
    a class whose training images were all skipped as bad images at extraction, would otherwise fail in the
    head (one class) or vanish from the heads while the report still lists it.

    Raises
    ------
    StoreError
        Naming the classes and, for a class without training rows, how many images extraction skipped.
    """
    if len(classes) < 2:
        raise StoreError(
            f"The feature store holds {len(classes)} class ({classes}); allowed: at least 2 for a classifier. "
            "Hint: give its manifest images of at least two classes (its label column, or class folders), then "
            "extract again; for numeric targets set data.task: regression.")
    missing = [name for k, name in enumerate(classes) if not np.any(y_train == k)]
    if missing and not errors:
        raise StoreError(
            f"Classes without any training row in the feature store: {missing}; extraction skipped no image, "
            "so its manifest gives them no 'train' row. Hint: a hand-made manifest.csv? its split column decides: "
            "give some of their rows the split 'train' (or rebuild it with `featcache prepare`, which refuses "
            "this), then extract again.")
    if missing:
        raise StoreError(
            f"Classes without any training row in the feature store: {missing}; extraction skipped "
            f"{len(errors)} bad images (first: {errors[:3]}). Hint: fix or replace those images and rerun, or "
            "remove the classes (data.classes, or their folders); FeatureStore(path).errors() lists every "
            "skipped image with its reason.")


def check_store_rows(store_path: str | Path, task: str, y: dict[str, np.ndarray], n_skipped: int) -> None:
    """The store's train and test splits hold rows, and a regression train target is not constant.

    ``prepare`` checks its manifest; a hand-made ``manifest.csv`` (or images skipped at extraction) can still
    give a store the heads cannot be fit or scored on.

    Raises
    ------
    StoreError
        Naming the empty split and the rows per split, or the constant target.
    """
    check_trainable_rows(
        {split: len(rows) for split, rows in y.items()}, y["train"] if task == "regression" else None,
        f"Feature store {store_path}",
        "its manifest has no '{split}' rows (a hand-made manifest.csv? its split column decides) or extraction "
        f"skipped them ({n_skipped} bad images); rebuild the manifest with `featcache prepare` (which refuses "
        "this) or give rows the split '{split}', then extract again.",
        "the manifest it was extracted from has one target value on every train row; fix its target column "
        "(or rebuild it with `featcache prepare`), then extract again.", StoreError)


def train(params: Any, store_path: str | Path, backbone: str, layer: str, head: str,
          metrics_path: str | Path, model_dir: str | Path | None = None,
          predictions_path: str | Path | None = None) -> dict[str, Any]:
    """Fit ``head`` on the train split of ``layer``, select on val, score on test.

    The store is checked against the current params first: a stale feature
    file (extracted with other params) is refused, naming the changed key.

    Outputs: the run record (``metrics_path``: the test scores, for DVC; its
    sidecar ``<name>.run.json``: everything else, see :mod:`featcache.runs`,
    including the store's ``weights_id`` and ``weights_sha256``: which weights
    made the features; its ``<name>.rows.npz``: the per-test-row arrays, the
    sha256 of the test ids and the bootstrap's ``n_boot`` and ``seed``, from
    which ``compare`` pairs runs on the same test rows);
    optionally the test predictions as ``actual,predicted`` CSV (class names,
    or numbers for regression; DVC's confusion-matrix plot reads it) and the
    saved head with ``featcache-run.json`` (what ``featcache predict`` needs).

    Parameters
    ----------
    params : TrainSections, Params, path or mapping
        Validated params (``data``, ``extract``, ``backbones.<backbone>`` and ``heads.<head>`` are used), or a
        params file's path or mapping (validated here).
    store_path : path
        The feature store ``extract`` wrote for ``backbone``.
    backbone : str
        A key of ``params.backbones``.
    layer : str
        A layer of the store (:attr:`~featcache.store.FeatureStore.layers`), or several joined by ``+``
        (``pool+block6``): the head trains on them side by side, and the run record's ``node`` and ``pooling``
        are theirs joined by ``+``.
    head : str
        A head name (:func:`featcache.heads.head_names`).
    metrics_path : path
        The JSON test scores to write; the sidecar goes beside it.
    model_dir : path, optional
        Save the fitted head there (:func:`featcache.heads.save_head`).
    predictions_path : path, optional
        Write the test predictions there as CSV.

    Returns
    -------
    dict
        The whole run record (scores and sidecar fields, flat).
    """
    from featcache.heads import fit_and_evaluate, make_head, save_head  # only the chosen head's module

    params = as_sections(params, TrainSections)
    task = params.data.task
    # Checked first: an unconfigured backbone, an unknown head or hyper-parameter name fails before the store
    # is opened.
    configured_backbone(params, backbone)
    estimator = make_head(head, task, stage_head_params(params.heads, params.train, head, task))
    on_dask = dask_lightgbm(estimator, head, task, params.train)  # None: the head trains in this process
    with FeatureStore(store_path) as store:
        config = expected_store_config(params, backbone, store)
        store.check_config(config)
        y_of = store.labels if task == "classification" else store.targets
        y = {split: y_of(split) for split in SPLITS}
        check_store_rows(store_path, task, y, len(store.errors()))
        # Streaming heads read the store chunk by chunk (out of core); the others load the split.
        read = store.to_dask if head in STREAMING_HEADS else store.read
        X = {split: read(layer, split) for split in SPLITS if on_dask is None or split != "train"}
        classes = list(store.classes)
        if task == "classification":
            check_classes_trainable(classes, y["train"], store.errors())
        layer_info = store.layer_info(layer)
        test_ids = store.ids("test")
        weights = {key: str(store.attrs[key]) for key in ("weights_id", "weights_sha256") if key in store.attrs}
    if on_dask is not None:  # LightGBM on dask: the workers read the train rows from the file
        X["train"] = on_dask.train_rows(store_path, layer)
    has_val = len(y["val"]) > 0
    n_classes = len(classes) if task == "classification" else None
    result = fit_and_evaluate(on_dask or estimator, task, X["train"], y["train"], X["val"] if has_val else None,
                              y["val"] if has_val else None, X["test"], y["test"], n_classes=n_classes,
                              n_boot=params.train.n_boot, seed=params.train.seed)
    run = {"dataset": params.data.name, "backbone": backbone, "layer": layer, "head": head,
           "label": head_label(head, task), "task": task, "node": layer_info["node"],
           "pooling": layer_info["pooling"], **weights, **result.metrics}
    if on_dask is not None:
        run["dask"] = on_dask.record
    write_rows(rows_path(metrics_path), row_arrays(task, y["test"], result.scores, n_classes),
               {"task": task, "ids_sha256": ids_sha256(test_ids), "n_boot": params.train.n_boot,
                "seed": params.train.seed, **({"n_classes": n_classes} if n_classes else {})})
    if model_dir is not None:  # saved first: the run's sidecar records its model's sha256 (compare's selection)
        save_head(estimator, model_dir)
        write_run_info(model_dir, {"dataset": params.data.name, "backbone": backbone, "layer": layer, "head": head,
                                   "task": task, "classes": classes, "extraction_config": config})
        run["model_sha256"] = model_sha256(model_dir)
    write_run(metrics_path, run)
    if predictions_path is not None:
        write_csv(predictions_path, prediction_rows(task, y["test"], result.predictions, classes),
                  PREDICTION_COLUMNS)
    metric = params.train.ranking_metric(task)
    logger.info("%s/%s/%s: test %s = %.4f", backbone, layer, run["label"], metric, run[metric])
    return run
