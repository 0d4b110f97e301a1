"""Test-set metrics with percentile-bootstrap confidence intervals.

Every scalar metric is computed by one vectorised kernel that takes a matrix of row
indices of shape (B, n): the point estimate uses the identity resample
(``B = 1``), the bootstrap uses B random resamples. Point value and intervals thus
share one definition.

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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from featcache.store.schema import TASKS
from featcache.util.checks import check_int

__all__ = [
    "CLASSIFICATION_METRICS",
    "PREDICTION_COLUMNS",
    "REGRESSION_METRICS",
    "ROW_FIELDS",
    "bootstrap_ci",
    "classification_metrics",
    "confusion_rows",
    "log_loss_score",
    "metrics_with_ci",
    "percentile_ci",
    "prediction_rows",
    "regression_metrics",
    "resampled_scores",
    "row_arrays",
]

EPS = 1e-15
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "top5_accuracy")
REGRESSION_METRICS = ("rmse", "mae", "r2")
#: The columns of a test-predictions CSV (:func:`prediction_rows`): what DVC's plots read as x and y.
PREDICTION_COLUMNS = ("actual", "predicted")
#: A run's per-row test arrays by task (:func:`row_arrays`).
ROW_FIELDS = {"classification": ("y_true", "y_pred", "p_true"), "regression": ("y_true", "y_pred")}
_MAX_INDEX_CELLS = 2_000_000  # bootstrap indices materialised per chunk


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
class _Classification:
    """Per-row quantities of a classification test set; kernels map (B, n) -> (B,)."""

    def __init__(self, y: np.ndarray, proba: np.ndarray) -> None:
        self.y, self.K = y, proba.shape[1]
        self.pred = proba.argmax(axis=1)
        self.correct = (self.pred == y).astype(np.float64)
        self.row_ll = _log_loss_of(_p_true(y, proba))
        p_true = proba[np.arange(y.size), y]
        self.top5 = (np.sum(proba > p_true[:, None], axis=1) < 5).astype(np.float64)
        self.names = tuple(m for m in CLASSIFICATION_METRICS if m != "top5_accuracy" or self.K > 5)

    @classmethod
    def from_rows(cls, y: np.ndarray, pred: np.ndarray, p_true: np.ndarray, n_classes: int) -> "_Classification":
        """The kernel of a run's :func:`row_arrays` (every metric but ``top5_accuracy``, which needs all of K)."""
        self = cls.__new__(cls)
        self.y, self.K, self.pred, self.correct = y, n_classes, pred, (pred == y).astype(np.float64)
        self.row_ll, self.names = _log_loss_of(p_true.astype(np.float64)), CLASSIFICATION_METRICS[:4]
        return self

    def counts(self, idx: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        B = idx.shape[0]
        flat = (np.arange(B)[:, None] * self.K + labels[idx]).ravel()
        w = None if weights is None else weights[idx].ravel()
        return np.bincount(flat, weights=w, minlength=B * self.K).reshape(B, self.K)

    def compute(self, name: str, idx: np.ndarray) -> np.ndarray:
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
        raise _unknown_metric(name, self.names)


class _Regression:
    """Per-row quantities of a regression test set; kernels map (B, n) -> (B,)."""

    names: tuple[str, ...] = REGRESSION_METRICS

    def __init__(self, y: np.ndarray, pred: np.ndarray) -> None:
        self.y, self.err = y, pred - y

    def compute(self, name: str, idx: np.ndarray) -> np.ndarray:
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
        raise _unknown_metric(name, self.names)


def _unknown_metric(name: str, allowed: Sequence[str]) -> ValueError:
    return ValueError(f"unknown metric {name!r}; allowed: {', '.join(allowed)}. "
                      "Hint: top5_accuracy needs K > 5; r2/rmse/mae need 1-D predictions.")


def _prepare(task: str, y_true: Any, y_score: Any, n_classes: int | None) -> _Classification | _Regression:
    if task == "classification":
        return _Classification(*_check_proba(y_true, y_score, n_classes))
    if task == "regression":
        pred = np.asarray(y_score, dtype=np.float64)
        if pred.ndim != 1:
            raise ValueError(f"regression predictions must have shape (n,); got {pred.shape}.")
        return _Regression(_check_y_true(y_true, pred.size).astype(np.float64), pred)
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}.")


def _point(kernel: _Classification | _Regression, name: str) -> float:
    return float(kernel.compute(name, np.arange(kernel.y.size)[None, :])[0])


def _resamples(n: int, n_boot: int, seed: int):
    """Yield bootstrap index chunks of shape (b, n); deterministic for (n, n_boot, seed)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_INDEX_CELLS // n)
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def _check_alpha(alpha: Any) -> None:
    """Raise ValueError unless ``alpha`` (1 - confidence level) is a number in (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} is invalid; allowed: a number in (0, 1), e.g. 0.05. "
                         "Hint: alpha is 1 - the confidence level (0.05 for 95 % intervals).")


def percentile_ci(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    """The percentile interval ``(lo, hi)`` of 1 - ``alpha`` of bootstrap ``stats`` (NaN resamples left out)."""
    _check_alpha(alpha)
    lo, hi = np.nanpercentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- public
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
    kernel = _Classification(*_check_proba(y_true, proba, n_classes))
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
    kernel = _prepare("regression", y_true, y_pred, None)
    out: dict[str, Any] = {name: _point(kernel, name) for name in kernel.names}
    out["n_test"] = int(kernel.y.size)
    return out


def bootstrap_ci(
    metric: str | Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    y_score: Any,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval over test rows.

    Parameters
    ----------
    metric : str or callable
        A metric name (classification: ``y_score`` of shape (n, K); regression:
        shape (n,)), computed vectorised; or ``metric(y_true, y_score) -> float``,
        evaluated once per resample (slow).
    y_true : array-like of shape (n,)
    y_score : array-like of shape (n, K) or (n,)
    n_boot : int
        Number of resamples.
    alpha : float
        1 - confidence level.
    seed : int
        The same seed, data and ``n_boot`` give the same interval (and the same
        resamples as :func:`metrics_with_ci`).

    Returns
    -------
    (lo, hi) : tuple of float
    """
    check_int("n_boot", n_boot, 1)
    _check_alpha(alpha)
    if callable(metric):
        yt, ys = np.asarray(y_true), np.asarray(y_score)
        stats = np.concatenate([
            [metric(yt[row], ys[row]) for row in idx] for idx in _resamples(yt.shape[0], n_boot, seed)
        ])
        return percentile_ci(np.asarray(stats, dtype=np.float64), alpha)
    if metric in CLASSIFICATION_METRICS:
        kernel = _prepare("classification", y_true, y_score, None)
    elif metric in REGRESSION_METRICS:
        kernel = _prepare("regression", y_true, y_score, None)
    else:
        raise _unknown_metric(metric, CLASSIFICATION_METRICS + REGRESSION_METRICS)
    if metric not in kernel.names:
        raise _unknown_metric(metric, kernel.names)
    stats = np.concatenate([kernel.compute(metric, idx) for idx in _resamples(kernel.y.size, n_boot, seed)])
    return percentile_ci(stats, alpha)


def metrics_with_ci(
    task: str,
    y_true: Any,
    y_score: Any,
    n_classes: int | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Point metrics plus ``"ci": {metric: [lo, hi]}`` for every scalar metric.

    Parameters
    ----------
    task : {"classification", "regression"}
    y_true : array-like of shape (n,)
    y_score : array-like of shape (n, K) (probabilities) or (n,) (predictions)
    n_classes : int or None
        K for classification; None takes ``y_score.shape[1]``.
    n_boot : int
        Resamples; 0 gives an empty ``ci`` dict.
    seed, alpha
        As in :func:`bootstrap_ci`. All metrics share the same resamples.

    Returns
    -------
    dict
    """
    _check_alpha(alpha)
    kernel = _prepare(task, y_true, y_score, n_classes)
    if task == "classification":
        out = classification_metrics(kernel.y, y_score, kernel.K)
    else:
        out = regression_metrics(kernel.y, y_score)
    check_int("n_boot", n_boot, 0)
    ci: dict[str, list[float]] = {}
    if n_boot:
        stats: dict[str, list[np.ndarray]] = {name: [] for name in kernel.names}
        for idx in _resamples(kernel.y.size, n_boot, seed):
            for name in kernel.names:
                stats[name].append(kernel.compute(name, idx))
        ci = {name: list(percentile_ci(np.concatenate(s), alpha)) for name, s in stats.items()}
    out["ci"] = ci
    return out


def row_arrays(task: str, y_true: Any, y_score: Any, n_classes: int | None = None) -> dict[str, np.ndarray]:
    """A run's per-row test arrays (:data:`ROW_FIELDS`), from which :func:`resampled_scores` rescores it.

    Parameters
    ----------
    task, y_true, y_score, n_classes
        As in :func:`metrics_with_ci`.

    Returns
    -------
    dict of ndarray
        Classification: ``y_true``, ``y_pred`` (class indices, int32), ``p_true`` (the true class's probability,
        rows normalised, float32); regression: ``y_true``, ``y_pred`` (float64).
    """
    kernel = _prepare(task, y_true, y_score, n_classes)
    if isinstance(kernel, _Regression):
        return {"y_true": kernel.y, "y_pred": np.asarray(y_score, dtype=np.float64)}
    return {"y_true": kernel.y.astype(np.int32), "y_pred": kernel.pred.astype(np.int32),
            "p_true": _p_true(kernel.y, np.asarray(y_score, dtype=np.float64)).astype(np.float32)}


def resampled_scores(task: str, runs: Sequence[Any], metrics: Sequence[str], n_classes: int, *, n_boot: int = 1000,
                     seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Each run's ``metrics`` on its test rows, then on each resample of them: every run on the same resamples.

    Parameters
    ----------
    task : {"classification", "regression"}
    runs : sequence of mapping
        Per-row arrays (:func:`row_arrays`) of the same n test rows.
    metrics : sequence of str
        Any metric but ``top5_accuracy`` (it needs every class's probability).
    n_classes : int
        K (classification); ignored for regression.
    n_boot, seed : int
        The resamples of :func:`metrics_with_ci` for the same n, ``n_boot`` and ``seed``.

    Returns
    -------
    list of dict
        Per run, ``{metric: array of 1 + n_boot}``: the point value, then the value on each resample.
    """
    check_int("n_boot", n_boot, 0)
    kernels = [_Regression(np.asarray(r["y_true"], np.float64), np.asarray(r["y_pred"], np.float64))
               if task == "regression" else _Classification.from_rows(np.asarray(r["y_true"], np.int64),
               np.asarray(r["y_pred"], np.int64), np.asarray(r["p_true"]), n_classes) for r in runs]
    for name in (name for name in metrics if kernels and name not in kernels[0].names):
        raise _unknown_metric(name, kernels[0].names)
    out = [{name: [kernel.compute(name, np.arange(kernel.y.size)[None, :])] for name in metrics} for kernel in kernels]
    for idx in _resamples(kernels[0].y.size, n_boot, seed) if kernels and n_boot else ():
        for kernel, scores in zip(kernels, out, strict=True):
            for name in metrics:
                scores[name].append(kernel.compute(name, idx))
    return [{name: np.concatenate(values) for name, values in scores.items()} for scores in out]


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
