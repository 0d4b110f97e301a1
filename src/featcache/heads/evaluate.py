"""Fit one head on train (+ val for selection) and score it on test (and, point estimates only, on val).

Features may be numpy or dask arrays (``FeatureStore(path).to_dask(layer, split)``):
out-of-core heads (``sgd``, ``streaming_mlp``) receive dask arrays unchanged and
stream them; in-memory heads get them read chunk by chunk into one numpy array.
A dask array is never passed to ``np.asarray`` whole; labels are materialised.

The val scores (``metrics["val"]``) are what ``compare`` selects the run to quote on, so that the test
split stays held out from the choice of run as it is from each head's choice of hyper-parameters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, is_classifier

from featcache.store.schema import TASKS
from featcache.util.serial import jsonable

from .bootstrap import metrics_with_ci
from .chunks import as_labels, materialise
from .metrics import classification_metrics, regression_metrics
from .trainable import check_trainable_rows

__all__ = ["RunResult", "fit_and_evaluate"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Outcome of :func:`fit_and_evaluate`.

    Attributes
    ----------
    metrics : dict
        JSON-serialisable test metrics (with ``ci``), sizes, timings, best params.
    predictions : ndarray of shape (n_test,)
        Predicted classes (values of ``head.classes_``) or targets.
    scores : ndarray of shape (n_test, K) or (n_test,)
        Class probabilities (classification) or predictions (regression).
    best_params : dict
        Hyper-parameters the head chose on the validation split.
    """

    metrics: dict[str, Any]
    predictions: np.ndarray
    scores: np.ndarray
    best_params: dict[str, Any] = field(default_factory=dict)


def _check_task(head: BaseEstimator, task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}.")
    if is_classifier(head) != (task == "classification"):
        kind = "a classifier" if is_classifier(head) else "a regressor"
        raise ValueError(
            f"task={task!r} but {type(head).__name__} is {kind}. "
            "Hint: build the head with make_head(name, task)."
        )


def _sync_n_classes(head: BaseEstimator, n_classes: int | None) -> None:
    """Give the head ``n_classes`` so its probabilities have K columns."""
    if n_classes is None or "n_classes" not in head.get_params(deep=False):
        return
    current = head.get_params(deep=False)["n_classes"]
    if current is None:
        head.set_params(n_classes=int(n_classes))
    elif current != n_classes:
        raise ValueError(
            f"n_classes={n_classes} but the head has n_classes={current}; they must agree."
        )


def _proba_columns(classes: np.ndarray, y: np.ndarray, name: str = "y_test") -> np.ndarray:
    """Labels (n,) -> their ``predict_proba`` column (n,), for metrics on ``classes_`` other than 0..K-1."""
    if np.array_equal(classes, np.arange(classes.size)):
        return y
    col = np.minimum(np.searchsorted(classes, y), classes.size - 1)
    unseen = classes[col] != y
    if unseen.any():
        raise ValueError(
            f"{name} holds the label {y[unseen][0]!r}, which is not among the head's classes "
            f"{classes[:10].tolist()}; allowed: labels seen in train or val. "
            "Hint: pass n_classes (with class indices 0..K-1) to give every class a column."
        )
    return col


def _val_scores(head: BaseEstimator, task: str, X_val: Any, y_val: np.ndarray | None) -> dict[str, float] | None:
    """The fitted head's point scores on the val rows: the test scores' metrics, without CIs.

    Parameters
    ----------
    head : estimator
        Fitted on train (val for selection only).
    task : {"classification", "regression"}
    X_val : array-like of shape (n_val, D), or None
        As the head predicts test rows: a dask array for a streaming head (predicted chunk by chunk).
    y_val : ndarray of shape (n_val,), or None

    Returns
    -------
    dict or None
        ``{metric: value}`` (:func:`~featcache.heads.metrics.classification_metrics` /
        :func:`~featcache.heads.metrics.regression_metrics`' scalar scores); None without val rows, or when the
        head was refit on train + val (``refit_on_trainval``): its val scores would not be held out.
    """
    if X_val is None or y_val is None or y_val.size == 0:
        return None
    if head.get_params(deep=False).get("refit_on_trainval"):
        log.info("%s: no val scores recorded (refit_on_trainval: it was fitted on the val rows).",
                 type(head).__name__)
        return None
    if task == "classification":
        k = int(head.classes_.size)
        out = classification_metrics(_proba_columns(head.classes_, y_val, "y_val"), head.predict_proba(X_val), k)
    else:
        out = regression_metrics(y_val, np.asarray(head.predict(X_val)))
    return {name: float(value) for name, value in out.items() if isinstance(value, float)}


def fit_and_evaluate(
    head: BaseEstimator,
    task: str,
    X_train: Any,
    y_train: Any,
    X_val: Any,
    y_val: Any,
    X_test: Any,
    y_test: Any,
    n_classes: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> RunResult:
    """Fit ``head`` in place on train (val for selection only) and score it on test.

    Parameters
    ----------
    head : estimator
        An unfitted head (see :func:`featcache.heads.make_head`). When ``n_classes``
        is given and the head's ``n_classes`` is None, it is set to ``n_classes``.
    task : {"classification", "regression"}
    X_train, y_train : array-like of shape (n_train, D), (n_train,)
        ``X_*`` may be dask arrays (streamed by out-of-core heads, read chunk by
        chunk into memory for the others); ``y_*`` may be dask arrays (computed).
    X_val, y_val : array-like of shape (n_val, D), (n_val,), or None
        None makes the head hold out part of train for selection.
    X_test, y_test : array-like of shape (n_test, D), (n_test,)
        Never seen by ``fit``.
    n_classes : int or None
        K for classification; None takes ``head.classes_.size``.
    n_boot, seed : int
        Bootstrap resamples and seed of the confidence intervals.

    Returns
    -------
    RunResult
        ``metrics`` holds the test metrics and ``ci`` plus ``n_features``,
        ``n_train``, ``n_val``, ``fit_seconds``, ``predict_seconds`` (test rows), ``best_params`` and ``val``:
        the same metrics on the val rows, point estimates (None without val rows, see :func:`_val_scores`).

    Raises
    ------
    ValueError
        Before any fit, for a train or test set without rows, or (regression) a constant train target.
    """
    _check_task(head, task)
    if task == "classification":
        _sync_n_classes(head, n_classes)
    n_train = int(X_train.shape[0]) if hasattr(X_train, "shape") else len(X_train)
    n_val = 0 if X_val is None else (int(X_val.shape[0]) if hasattr(X_val, "shape") else len(X_val))
    y_train, y_test = as_labels(y_train), as_labels(y_test)
    y_val = None if y_val is None else as_labels(y_val)
    n_test = int(X_test.shape[0]) if hasattr(X_test, "shape") else len(X_test)
    check_trainable_rows({"train": n_train, "val": n_val, "test": n_test},
                         np.asarray(y_train) if task == "regression" else None, "fit_and_evaluate's data",
                         "pass at least one row as X_{split} (a split of the store without rows?).",
                         "pass train targets with at least two distinct values.", ValueError)
    if not getattr(head, "_streaming", False):
        X_train, X_test = materialise(X_train, "X_train"), materialise(X_test, "X_test")
        X_val = None if X_val is None else materialise(X_val, "X_val")
    start = time.perf_counter()
    head.fit(X_train, y_train, X_val, y_val)
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    if task == "classification":
        scores = head.predict_proba(X_test)
        predictions = head.classes_[np.argmax(scores, axis=1)]
    else:
        scores = head.predict(X_test)
        predictions = scores
    predict_seconds = time.perf_counter() - start

    k = int(head.classes_.size) if task == "classification" else None
    y_true = _proba_columns(head.classes_, y_test) if task == "classification" else y_test
    metrics = metrics_with_ci(task, y_true, scores, k, n_boot=n_boot, seed=seed)
    best_params = jsonable(dict(head.best_params_))
    val = _val_scores(head, task, X_val, y_val)
    metrics.update(
        n_features=int(head.n_features_in_),
        n_train=n_train,
        n_val=n_val,
        fit_seconds=float(fit_seconds),
        predict_seconds=float(predict_seconds),
        best_params=best_params,
        val=val,
    )
    log.info(
        "%s (%s): %s in %.2fs fit / %.3fs predict",
        type(head).__name__, task, best_params, fit_seconds, predict_seconds,
    )
    return RunResult(
        metrics=metrics, predictions=np.asarray(predictions), scores=np.asarray(scores), best_params=best_params
    )
