"""Test-set metrics: point scores, and the test-predictions rows of the DVC plots.

Every scalar metric is computed by one vectorised kernel (:class:`ClassificationKernel`,
:class:`RegressionKernel`) that takes a matrix of row indices of shape (B, n): the point
estimate uses the identity resample (``B = 1``), the bootstrap
(:mod:`~featcache.heads.bootstrap`) uses B random resamples. Point value and intervals
thus share one definition.

Conventions (match scikit-learn where it defines them):

- ``balanced_accuracy``: mean recall over classes present in ``y_true``.
- ``macro_f1``: mean F1 over classes present in ``y_true`` or the predictions
  (F1 = 2 TP / (n_true + n_pred), zero when TP = 0).
- ``log_loss``: mean of ``-log(clip(p_true, 1e-15, 1))`` after normalising rows.
- ``top5_accuracy`` (K > 5 only): the true class's probability is among the five
  largest (ties counted in the true class's favour).
- ``r2``: 1 - SS_res / SS_tot; a constant ``y_true`` gives 1.0 for a perfect fit,
  else 0.0 (scikit-learn's ``force_finite``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featcache.store.schema import TASKS

__all__ = [
    "CLASSIFICATION_METRICS",
    "DEFAULT_METRIC",
    "LOWER_IS_BETTER",
    "PREDICTION_COLUMNS",
    "REGRESSION_METRICS",
    "SELECTION_METRICS",
    "STEP_METRICS",
    "ClassificationKernel",
    "RegressionKernel",
    "classification_metrics",
    "confusion_rows",
    "log_loss_score",
    "metric_kernel",
    "metric_value",
    "selection_key",
    "prediction_rows",
    "regression_metrics",
    "unknown_metric",
]

EPS = 1e-15
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "top5_accuracy")
REGRESSION_METRICS = ("rmse", "mae", "r2")
#: The metrics a head can select on (its validation rows) and compare can rank by, per task (``train.metric``):
#: the reported ones but ``top5_accuracy``.
SELECTION_METRICS = {"classification": tuple(m for m in CLASSIFICATION_METRICS if m != "top5_accuracy"),
                     "regression": REGRESSION_METRICS}
#: The metric compare ranks by when ``train.metric`` is null, per task.
DEFAULT_METRIC = {"classification": "accuracy", "regression": "rmse"}
#: The metrics of which lower is better (higher is better for every other).
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae"})
#: Metrics of the predicted class only: a step function of a head's scores, flat until a row's prediction flips.
#: On a few validation rows per class they pick an early-stopping point by chance (benchmarks/README.md
#: "Imbalanced classes"), so ``train.metric`` does not pass them to early-stopped heads (``HeadEntry.early_stopped``).
STEP_METRICS = frozenset({"accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy"})
#: The columns of a test-predictions CSV (:func:`prediction_rows`): what DVC's plots read as x and y.
PREDICTION_COLUMNS = ("actual", "predicted")


# ----------------------------------------------------------------------------- inputs
def _check_y_true(y_true: Any, n_rows: int | None = None) -> np.ndarray:
    y = np.asarray(y_true).ravel()
    if y.size == 0:
        raise ValueError("y_true is empty; metrics need at least one test row.")
    if n_rows is not None and y.size != n_rows:
        raise ValueError(f"y_true has {y.size} rows but the scores have {n_rows}; they must match.")
    return y


def _check_proba(y_true: Any, proba: Any, n_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"proba must have shape (n, K); got {p.shape}. Hint: pass predict_proba output.")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"proba has {p.shape[1]} columns but n_classes={n_classes}; they must match.")
    bad_rows = ~np.all(np.isfinite(p), axis=1)
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        raise ValueError(f"proba holds non-finite values in {int(bad_rows.sum())} rows, e.g. row {row}: "
                         f"{p[row].tolist()[:10]}; allowed: finite probabilities. Hint: the head diverged or the "
                         "features hold NaN/inf; check the features and lower the learning rate.")
    y = _check_y_true(y_true, p.shape[0])
    if y.dtype.kind != "f":
        wrong = np.ones(y.shape, dtype=bool) if y.dtype.kind not in "iu" else np.zeros(y.shape, dtype=bool)
    else:
        wrong = ~(np.isfinite(y) & (y == np.round(y)))
    if wrong.any():
        bad = y[wrong][0]
        raise ValueError(f"y_true holds the label {bad.item() if isinstance(bad, np.generic) else bad!r} (dtype "
                         f"{y.dtype}); allowed: integer class indices 0..{p.shape[1] - 1}. Hint: map class names to "
                         "indices first; use regression metrics for continuous targets.")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true holds labels {int(y.min())}..{int(y.max())}; allowed: 0..{p.shape[1] - 1}.")
    return y, p


def log_loss_score(y_true: Any, proba: Any) -> float:
    """Mean clipped cross-entropy, ``labels = range(K)``.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Class indices 0..K-1.
    proba : array-like of shape (n, K)
        Class probabilities; each row is divided by its sum first.

    Returns
    -------
    float
        The mean of ``-log(p_true)``, ``p_true`` clipped to ``[EPS, 1]`` (a zero probability costs ``-log(EPS)``).
    """
    y, p = _check_proba(y_true, proba, None)
    return float(np.mean(_log_loss_of(_p_true(y, p))))


def _p_true(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The true class's probability per row, each row of ``p`` divided by its sum first."""
    total = p.sum(axis=1)
    total[total <= 0] = 1.0
    return p[np.arange(y.size), y] / total


def _log_loss_of(p_true: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(p_true, EPS, 1.0))


# ----------------------------------------------------------------------------- kernels
class ClassificationKernel:
    """Per-row quantities of a classification test set; :meth:`compute` maps row indices (B, n) -> (B,).

    Parameters
    ----------
    y : ndarray of shape (n,)
        Class indices 0..K-1, int64 (checked by :func:`metric_kernel`).
    proba : ndarray of shape (n, K)
        Class probabilities, float64.

    Attributes
    ----------
    y, K, pred, names
        The labels, K, the predicted class per row, and the metrics :meth:`compute` knows.
    p_true : ndarray of shape (n,)
        The true class's probability per row, each row of ``proba`` divided by its sum first.
    """

    def __init__(self, y: np.ndarray, proba: np.ndarray) -> None:
        self.y, self.K = y, proba.shape[1]
        self.pred = proba.argmax(axis=1)
        self.correct = (self.pred == y).astype(np.float64)
        self.p_true = _p_true(y, proba)
        self.row_ll = _log_loss_of(self.p_true)
        score_true = proba[np.arange(y.size), y]
        self.top5 = (np.sum(proba > score_true[:, None], axis=1) < 5).astype(np.float64)
        self.names = tuple(m for m in CLASSIFICATION_METRICS if m != "top5_accuracy" or self.K > 5)

    @classmethod
    def from_rows(cls, y: np.ndarray, pred: np.ndarray, p_true: np.ndarray, n_classes: int) -> "ClassificationKernel":
        """The kernel of a run's per-row arrays (:func:`~featcache.heads.bootstrap.row_arrays`): every metric but
        ``top5_accuracy``, which needs all of K."""
        self = cls.__new__(cls)
        self.y, self.K, self.pred, self.correct = y, n_classes, pred, (pred == y).astype(np.float64)
        self.p_true = p_true.astype(np.float64)
        self.row_ll, self.names = _log_loss_of(self.p_true), CLASSIFICATION_METRICS[:4]
        return self

    def counts(self, idx: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        B = idx.shape[0]
        flat = (np.arange(B)[:, None] * self.K + labels[idx]).ravel()
        w = None if weights is None else weights[idx].ravel()
        return np.bincount(flat, weights=w, minlength=B * self.K).reshape(B, self.K)

    def compute(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Metric ``name`` on each row of ``idx`` (B, n) of test-row indices; returns (B,)."""
        if name == "accuracy":
            return self.correct[idx].mean(axis=1)
        if name == "log_loss":
            return self.row_ll[idx].mean(axis=1)
        if name == "top5_accuracy":
            return self.top5[idx].mean(axis=1)
        n_true = self.counts(idx, self.y)
        tp = self.counts(idx, self.y, self.correct)
        if name == "balanced_accuracy":
            present = n_true > 0
            recall = np.divide(tp, n_true, out=np.zeros_like(tp), where=present)
            return recall.sum(axis=1) / present.sum(axis=1)
        if name == "macro_f1":
            denom = n_true + self.counts(idx, self.pred)
            present = denom > 0
            f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
            return f1.sum(axis=1) / present.sum(axis=1)
        raise unknown_metric(name, self.names)


class RegressionKernel:
    """Per-row quantities of a regression test set (targets ``y`` and errors ``pred - y``, float64 (n,));
    :meth:`compute` maps row indices (B, n) -> (B,)."""

    names: tuple[str, ...] = REGRESSION_METRICS

    def __init__(self, y: np.ndarray, pred: np.ndarray) -> None:
        self.y, self.err = y, pred - y

    def compute(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Metric ``name`` on each row of ``idx`` (B, n) of test-row indices; returns (B,)."""
        if name == "rmse":
            return np.sqrt(np.mean(self.err[idx] ** 2, axis=1))
        if name == "mae":
            return np.mean(np.abs(self.err[idx]), axis=1)
        if name == "r2":
            ys = self.y[idx]
            ss_res = np.sum(self.err[idx] ** 2, axis=1)
            ss_tot = np.sum((ys - ys.mean(axis=1, keepdims=True)) ** 2, axis=1)
            ok = ss_tot > 0
            r2 = np.where(ss_res == 0, 1.0, 0.0)
            r2[ok] = 1.0 - ss_res[ok] / ss_tot[ok]
            return r2
        raise unknown_metric(name, self.names)


def unknown_metric(name: str, allowed: Sequence[str]) -> ValueError:
    """The error (to raise) for the metric ``name``, not among ``allowed``."""
    return ValueError(f"unknown metric {name!r}; allowed: {', '.join(allowed)}. "
                      "Hint: top5_accuracy needs K > 5; r2/rmse/mae need 1-D predictions.")


def metric_kernel(task: str, y_true: Any, y_score: Any,
                  n_classes: int | None) -> ClassificationKernel | RegressionKernel:
    """The checked kernel of a test set.

    Parameters
    ----------
    task : {"classification", "regression"}
    y_true : array-like of shape (n,)
    y_score : array-like of shape (n, K) (probabilities) or (n,) (predictions)
    n_classes : int or None
        K for classification; None takes ``y_score.shape[1]``.

    Returns
    -------
    ClassificationKernel or RegressionKernel

    Raises
    ------
    ValueError
        For an unknown task, shapes that do not match, non-finite probabilities or labels outside 0..K-1.
    """
    if task == "classification":
        return ClassificationKernel(*_check_proba(y_true, y_score, n_classes))
    if task == "regression":
        pred = np.asarray(y_score, dtype=np.float64)
        if pred.ndim != 1:
            raise ValueError(f"regression predictions must have shape (n,); got {pred.shape}.")
        return RegressionKernel(_check_y_true(y_true, pred.size).astype(np.float64), pred)
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}.")


def _point(kernel: ClassificationKernel | RegressionKernel, name: str) -> float:
    return float(kernel.compute(name, np.arange(kernel.y.size)[None, :])[0])


def metric_value(task: str, name: str, y_true: Any, y_score: Any, n_classes: int | None = None) -> float:
    """One metric of a set of rows, e.g. a head's validation score on :data:`SELECTION_METRICS`.

    Parameters
    ----------
    task : {"classification", "regression"}
    name : str
        A metric of the task (as :func:`classification_metrics` / :func:`regression_metrics` name it).
    y_true : array-like of shape (n,)
    y_score : array-like of shape (n, K) (probabilities) or (n,) (predictions)
    n_classes : int or None
        K for classification; None takes ``y_score.shape[1]``.

    Returns
    -------
    float
    """
    return _point(metric_kernel(task, y_true, y_score, n_classes), name)


def selection_key(name: str, value: float) -> float:
    """``value`` of metric ``name`` as a key to minimise (negated where higher is better)."""
    return float(value) if name in LOWER_IS_BETTER else -float(value)


# ----------------------------------------------------------------------------- point metrics
def classification_metrics(y_true: Any, proba: Any, n_classes: int) -> dict[str, Any]:
    """Point metrics of a classifier on the test split.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Class indices 0..K-1.
    proba : array-like of shape (n, K)
    n_classes : int
        K; must equal ``proba.shape[1]``.

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``log_loss``,
        ``top5_accuracy`` (only when K > 5), ``per_class_recall`` (list of K floats,
        None for classes absent from ``y_true``) and ``n_test``.
    """
    kernel = ClassificationKernel(*_check_proba(y_true, proba, n_classes))
    out: dict[str, Any] = {name: _point(kernel, name) for name in kernel.names}
    full = np.arange(kernel.y.size)[None, :]
    n_true, tp = kernel.counts(full, kernel.y)[0], kernel.counts(full, kernel.y, kernel.correct)[0]
    out["per_class_recall"] = [float(t / c) if c > 0 else None for t, c in zip(tp, n_true, strict=True)]
    out["n_test"] = int(kernel.y.size)
    return out


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, Any]:
    """Point metrics of a regressor: ``rmse``, ``mae``, ``r2``, ``n_test``.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n,)
        Targets and predictions.

    Returns
    -------
    dict
        ``rmse``, ``mae``, ``r2`` (float) and ``n_test`` (int).
    """
    kernel = metric_kernel("regression", y_true, y_pred, None)
    out: dict[str, Any] = {name: _point(kernel, name) for name in kernel.names}
    out["n_test"] = int(kernel.y.size)
    return out


def confusion_rows(y_true: Any, y_pred: Any, classes: Sequence[str]) -> list[dict[str, str]]:
    """One ``{"actual": name, "predicted": name}`` dict per test row (DVC confusion plot).

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n,)
        Class indices into ``classes``.
    classes : sequence of str of length K

    Returns
    -------
    list of dict
        n dicts ``{"actual": classes[y_true[i]], "predicted": classes[y_pred[i]]}``.

    Raises
    ------
    ValueError
        For arrays of different lengths, or an index outside 0..K-1.
    """
    yt, yp = np.asarray(y_true, dtype=np.int64).ravel(), np.asarray(y_pred, dtype=np.int64).ravel()
    if yt.shape != yp.shape:
        raise ValueError(f"y_true has {yt.size} rows but y_pred has {yp.size}; they must match.")
    names = [str(c) for c in classes]
    for label in (yt, yp):
        if label.size and (label.min() < 0 or label.max() >= len(names)):
            raise ValueError(
                f"label {int(label.max()) if label.max() >= len(names) else int(label.min())} has no name; "
                f"allowed: 0..{len(names) - 1} (classes={names[:10]}{'...' if len(names) > 10 else ''})."
            )
    return [{"actual": names[t], "predicted": names[p]} for t, p in zip(yt.tolist(), yp.tolist(), strict=True)]


def prediction_rows(task: str, y_true: Any, y_pred: Any, classes: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One :data:`PREDICTION_COLUMNS` dict per test row, for the test-predictions CSV and its DVC plot.

    The train and finetune stages both write it; the plot's template follows
    ``data.task``: a confusion matrix of class names (classification) or a
    predicted-vs-true scatter of numbers (regression).

    Parameters
    ----------
    task : {"classification", "regression"}
    y_true, y_pred : array-like of shape (n,)
        Class indices into ``classes`` (classification) or values (regression).
    classes : sequence of str
        The K class names (classification only).

    Returns
    -------
    list of dict
        ``{"actual": name, "predicted": name}`` (classification, see :func:`confusion_rows`) or
        ``{"actual": float, "predicted": float}`` (regression).
    """
    if task == "classification":
        return confusion_rows(y_true, y_pred, classes)
    if task != "regression":
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}.")
    yt, yp = np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(y_pred, dtype=np.float64).ravel()
    if yt.shape != yp.shape:
        raise ValueError(f"y_true has {yt.size} rows but y_pred has {yp.size}; they must match.")
    return [{"actual": t, "predicted": p} for t, p in zip(yt.tolist(), yp.tolist(), strict=True)]
