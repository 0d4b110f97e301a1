"""Percentile-bootstrap confidence intervals of the test-set metrics, and a run's per-row arrays to rescore.

The resamples are B random draws, with replacement, of the n test rows, made in
chunks of row indices (B, n) that the metric kernels of :mod:`~featcache.heads.metrics`
score (the point value is the same kernel on the identity resample). The same
``n``, ``n_boot`` and ``seed`` give the same resamples in :func:`bootstrap_ci`,
:func:`metrics_with_ci` and :func:`resampled_scores`, so the runs of one test split
are rescored on the same rows (:mod:`~featcache.heads.paired`); :func:`simultaneous_cis`
widens the CIs of a family of such statistics so that they hold together (max-|t|), and
:func:`stepdown_max_t` says which of them differ from 0, family-wise (step-down max-|t|).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from featcache.util.checks import check_int

from .metrics import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    ClassificationKernel,
    RegressionKernel,
    classification_metrics,
    metric_kernel,
    regression_metrics,
    unknown_metric,
)

__all__ = ["ROW_FIELDS", "bootstrap_ci", "metrics_with_ci", "percentile_ci", "resampled_scores", "row_arrays",
           "simultaneous_cis", "stepdown_max_t"]

#: A run's per-row test arrays by task (:func:`row_arrays`).
ROW_FIELDS = {"classification": ("y_true", "y_pred", "p_true"), "regression": ("y_true", "y_pred")}
_MAX_INDEX_CELLS = 2_000_000  # bootstrap indices materialised per chunk


def _resamples(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
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


def _centred_t(stats: Sequence[np.ndarray]) -> tuple[list[float], list[float], dict[int, np.ndarray]]:
    """Per statistic its point value and bootstrap SE (NaN: < 2 finite resamples), and, for each whose SE > 0
    (by its index), the centred ``|stat_b - point| / SE`` on every resample: array of shape (B,)."""
    points, spreads, tails = [], [], {}
    for index, values in enumerate(stats):
        values = np.asarray(values, dtype=np.float64)
        boot = values[1:][np.isfinite(values[1:])]
        spread = float(np.std(boot, ddof=1)) if boot.size > 1 else math.nan
        points.append(float(values[0]))
        spreads.append(spread)
        if spread > 0:
            tails[index] = np.abs(values[1:] - values[0]) / spread
    return points, spreads, tails


def _max_t_quantile(tails: Sequence[np.ndarray], alpha: float) -> float | None:
    """The 1 - ``alpha`` quantile over the resamples of the max of ``tails`` (each of shape (B,)), or None."""
    if not tails:
        return None
    t_max = np.fmax.reduce(np.vstack(tails), axis=0)  # NaN only where every statistic is NaN
    t_max = t_max[np.isfinite(t_max)]
    return float(np.quantile(t_max, 1 - alpha)) if t_max.size else None


def simultaneous_cis(stats: Sequence[np.ndarray], alpha: float = 0.05) -> tuple[list[list[float] | None],
                                                                                  float | None]:
    """Simultaneous CIs of a family of statistics, by the bootstrap max-|t| (single-step) method.

    Each statistic j has a point value and its values on the same B resamples; with
    ``se_j`` the standard deviation of its resampled values, every resample b gives
    ``t_b = max_j |stat_jb - point_j| / se_j``, and ``c`` is the 1 - ``alpha`` quantile of
    those ``t_b``. The intervals ``point_j ± c * se_j`` then hold together, all of them at
    once, in 1 - ``alpha`` of the resamples: the chance that even one of them misses its
    true value is about ``alpha`` however many there are (family-wise, Romano & Wolf 2005;
    the bootstrap form of Tukey's and Dunnett's max-t intervals).

    Why this one: it needs only the (1 - alpha) quantile of one maximum, which
    1000 resamples estimate well, whereas Bonferroni or Holm on bootstrap p-values need
    tail probabilities of alpha / m (0.05 / 80 = 0.0006 for 40 runs and 2 metrics: below the
    1 / 1001 that 1000 resamples can resolve, so nothing could ever pass); and it takes the
    correlation among the statistics into account (runs compared with one reference share its
    noise), so it is less conservative than Bonferroni: with one statistic, c is about 1.96.

    Parameters
    ----------
    stats : sequence of ndarray
        Per statistic, an array of 1 + B values: the point value, then the value on each resample
        (the same resamples for all, e.g. :func:`resampled_scores`). NaN resamples are left out.
    alpha : float
        1 - the simultaneous confidence level.

    Returns
    -------
    cis : list of [lo, hi] or None
        Per statistic; ``[point, point]`` for one that does not vary over the resamples, None for one
        with fewer than 2 finite resampled values (no spread to measure).
    critical : float or None
        ``c`` (None when no statistic varies: then no interval is wider than its point).
    """
    _check_alpha(alpha)
    points, spreads, tails = _centred_t(stats)
    critical = _max_t_quantile(list(tails.values()), alpha)
    cis: list[list[float] | None] = []
    for point, spread in zip(points, spreads, strict=True):
        if math.isnan(spread):
            cis.append(None)
        else:
            half = critical * spread if spread > 0 and critical is not None else 0.0
            cis.append([point - half, point + half])
    return cis, critical


def stepdown_max_t(stats: Sequence[np.ndarray], alpha: float = 0.05) -> tuple[list[dict[str, Any] | None],
                                                                                list[dict[str, Any]]]:
    """Which statistics of a family differ from 0, family-wise, by the bootstrap step-down max-|t| (Romano-Wolf).

    Step 1 is :func:`simultaneous_cis`: with ``c_1`` the 1 - ``alpha`` quantile over the
    resamples of the max over the family of the centred ``|t*_jb| = |stat_jb - point_j| / se_j``,
    a statistic is called when ``point_j ± c_1 * se_j`` excludes 0. Each next step takes
    ``c_k``, the same quantile but of the max over the statistics not yet called only, and
    calls those of them whose ``point_j ± c_k * se_j`` excludes 0; it stops when a step
    calls none (Romano & Wolf 2005, Econometrica 73; Westfall & Young's step-down maxT).
    The largest ``|t|`` are called first; the chance of calling any statistic whose true value
    is 0 stays about ``alpha``, as with the single step, and since step 1 calls exactly what the
    single step calls, it never calls fewer (often more: ``c_k`` shrinks as the family does).
    It gives calls, not intervals: the intervals that hold together remain those of
    :func:`simultaneous_cis` (``c_1``), which for a statistic called at a later step may
    include 0. A family of one is one bootstrap-t test at ``alpha``: one step.

    Parameters
    ----------
    stats : sequence of ndarray
        As in :func:`simultaneous_cis`: per statistic, an array of 1 + B values (point, then each resample).
    alpha : float
        The family-wise error rate.

    Returns
    -------
    calls : list of dict or None
        Per statistic ``{"distinguishable": bool, "step": int or None, "critical_value": float or None,
        "t": float or None}``: ``step`` (from 1) and its ``c_k`` that called it, or the last step, which did
        not; ``t`` is ``|point| / se``. A statistic that does not vary over the resamples is called when its
        point is not 0, by no step (``step``, ``critical_value``, ``t`` None); None for one with fewer than 2
        finite resampled values (as in :func:`simultaneous_cis`).
    steps : list of dict
        Per step ``{"critical_value": c_k, "comparisons": statistics not yet called, "called": how many it
        called}``; empty when no statistic varies.
    """
    _check_alpha(alpha)
    points, spreads, tails = _centred_t(stats)
    calls: list[dict[str, Any] | None] = [
        None if math.isnan(spread) else {"distinguishable": bool(point > 0 or point < 0), "step": None,
                                         "critical_value": None, "t": None}
        for point, spread in zip(points, spreads, strict=True)]
    remaining, steps = sorted(tails), []
    while remaining:
        critical = _max_t_quantile([tails[index] for index in remaining], alpha)
        if critical is None:  # unreachable for SE > 0 (>= 2 finite resamples), kept for safety
            break
        called = []
        for index in remaining:
            point, half = points[index], critical * spreads[index]
            hit = bool(point - half > 0 or point + half < 0)  # the arithmetic of simultaneous_cis' bands
            calls[index] = {"distinguishable": hit, "step": len(steps) + 1, "critical_value": critical,
                            "t": abs(point) / spreads[index]}
            if hit:
                called.append(index)
        steps.append({"critical_value": critical, "comparisons": len(remaining), "called": len(called)})
        if not called:
            break
        remaining = [index for index in remaining if index not in set(called)]
    return calls, steps


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
        kernel = metric_kernel("classification", y_true, y_score, None)
    elif metric in REGRESSION_METRICS:
        kernel = metric_kernel("regression", y_true, y_score, None)
    else:
        raise unknown_metric(metric, CLASSIFICATION_METRICS + REGRESSION_METRICS)
    if metric not in kernel.names:
        raise unknown_metric(metric, kernel.names)
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
    kernel = metric_kernel(task, y_true, y_score, n_classes)
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
    kernel = metric_kernel(task, y_true, y_score, n_classes)
    if isinstance(kernel, RegressionKernel):
        return {"y_true": kernel.y, "y_pred": np.asarray(y_score, dtype=np.float64)}
    return {"y_true": kernel.y.astype(np.int32), "y_pred": kernel.pred.astype(np.int32),
            "p_true": kernel.p_true.astype(np.float32)}


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
    kernels = [RegressionKernel(np.asarray(r["y_true"], np.float64), np.asarray(r["y_pred"], np.float64))
               if task == "regression" else ClassificationKernel.from_rows(np.asarray(r["y_true"], np.int64),
               np.asarray(r["y_pred"], np.int64), np.asarray(r["p_true"]), n_classes) for r in runs]
    for name in (name for name in metrics if kernels and name not in kernels[0].names):
        raise unknown_metric(name, kernels[0].names)
    out = [{name: [kernel.compute(name, np.arange(kernel.y.size)[None, :])] for name in metrics} for kernel in kernels]
    for idx in _resamples(kernels[0].y.size, n_boot, seed) if kernels and n_boot else ():
        for kernel, scores in zip(kernels, out, strict=True):
            for name in metrics:
                scores[name].append(kernel.compute(name, idx))
    return [{name: np.concatenate(values) for name, values in scores.items()} for scores in out]
