"""``train`` stage: one head on one (backbone, layer) of a feature store -> metrics, plot, model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.heads import fit_and_evaluate, make_head, save_head
from featcache.heads.metrics import confusion_rows
from featcache.heads.registry import head_label, task_params
from featcache.pipeline.config import expected_config
from featcache.runs import write_run, write_run_info
from featcache.store import FeatureStore
from featcache.util.atomic import write_csv

if TYPE_CHECKING:
    from featcache.pipeline.config import Params

__all__ = ["train", "STREAMING_HEADS"]

logger = logging.getLogger(__name__)

#: Heads that train from dask arrays over the HDF5 chunks instead of in-memory arrays.
STREAMING_HEADS = ("sgd", "streaming_mlp")


def train(params: Params, store_path: str | Path, backbone: str, layer: str, head: str,
          metrics_path: str | Path, model_dir: str | Path | None = None,
          predictions_path: str | Path | None = None) -> dict[str, Any]:
    """Fit ``head`` on the train split of ``layer``, select on val, score on test.

    The store is checked against the current params first: a stale feature
    file (extracted with other params) is refused, naming the changed key.

    Outputs: the run record (``metrics_path``: the test scores, for DVC; its
    sidecar ``<name>.run.json``: everything else, see :mod:`featcache.runs`);
    optionally the test predictions as ``actual,predicted`` CSV (class names,
    or numbers for regression; DVC's confusion-matrix plot reads it) and the
    saved head with ``featcache-run.json`` (what ``featcache predict`` needs).

    Returns
    -------
    dict
        The whole run record (scores and sidecar fields, flat).
    """
    task = params.data.task
    with FeatureStore(store_path) as store:
        # Either decode path, and whatever an ``auto`` backend/autocast resolved to where the store was
        # extracted, is valid for the same params: keep the store's.
        stored = store.config.get("extract", {})
        config = expected_config(params, backbone, decode=stored.get("decode", "cpu"), stored=stored)
        store.check_config(config)
        # Streaming heads read the store chunk by chunk (out of core); the others load the split.
        read = store.to_dask if head in STREAMING_HEADS else store.read
        X = {split: read(layer, split) for split in ("train", "val", "test")}
        y_of = store.labels if task == "classification" else store.targets
        y = {split: y_of(split) for split in ("train", "val", "test")}
        classes = list(store.classes)
        layer_info = store.layer_info(layer)
    has_val = len(y["val"]) > 0
    estimator = make_head(head, task, task_params(head, task, params.heads.get(head, {})))
    result = fit_and_evaluate(estimator, task, X["train"], y["train"], X["val"] if has_val else None,
                              y["val"] if has_val else None, X["test"], y["test"],
                              n_classes=len(classes) if task == "classification" else None,
                              n_boot=params.train.n_boot, seed=params.train.seed)
    run = {"dataset": params.data.name, "backbone": backbone, "layer": layer, "head": head,
           "label": head_label(head, task), "task": task, "node": layer_info["node"],
           "pooling": layer_info["pooling"], **result.metrics}
    write_run(metrics_path, run)
    if predictions_path is not None:
        if task == "classification":
            rows = confusion_rows(y["test"], result.predictions, classes)
        else:
            rows = [{"actual": float(a), "predicted": float(b)} for a, b in zip(y["test"], result.predictions)]
        write_csv(predictions_path, rows, ["actual", "predicted"])
    if model_dir is not None:
        save_head(estimator, model_dir)
        write_run_info(model_dir, {"dataset": params.data.name, "backbone": backbone, "layer": layer, "head": head,
                                   "task": task, "classes": classes, "extraction_config": config})
    metric = "accuracy" if task == "classification" else "rmse"
    logger.info("%s/%s/%s: test %s = %.4f", backbone, layer, run["label"], metric, run[metric])
    return run
