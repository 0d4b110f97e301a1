"""LightGBM trained on dask.distributed workers, returned as a regular LightGBM head.

:func:`fit_lightgbm_dask` trains with ``lightgbm.dask`` (``DaskLGBMRegressor``, given the
binary / multiclass objective for a classifier) on a dask array, e.g. ``FeatureStore(path).to_dask(layer,
"train")`` (the graph opens the HDF5 file by path, so it runs on any worker), and
wraps the resulting booster in a :class:`~featcache.heads.boosting.LightGBMHead`
(or :class:`~featcache.heads.boosting.LightGBMRegressorHead`): ``predict``,
``save_head`` and ``load_head`` work as for a head fitted in memory.

Early stopping
--------------
lightgbm.dask has no supported early stopping (LightGBM issues #3712, #4189, #6351:
each worker only sees the validation rows it holds, and ``early_stopping_rounds``
can make workers stop at different rounds and hang). Here no validation set is
given to the workers: training runs the full ``n_estimators`` rounds, then the
validation curve after every round is computed on the client by streaming ``X_val``
chunk by chunk through the booster, and the head keeps the round that LightGBM's own
``early_stopping(early_stopping_rounds)`` callback would have kept on that curve
(first best not improved upon for ``early_stopping_rounds`` rounds; all rounds when
None). The cost is the extra rounds trained past the stopping point: set
``n_estimators`` as a budget.

The curve is what :class:`~featcache.heads.boosting.LightGBMHead` early-stops on:

* without ``selection_metric``, the validation loss (multi-logloss / binary logloss /
  L2), class-weighted as LightGBM weighs it with ``eval_sample_weight``
  (:func:`validation_curve`); it is a sum over rows, accumulated chunk by chunk in
  O(n_rounds) memory;
* with ``selection_metric``, that metric of the validation rows (:func:`metric_curve`;
  higher or lower is better as :data:`~featcache.heads.metrics.LOWER_IS_BETTER` says),
  unweighted as the in-memory head's custom eval metric is (it ignores
  ``eval_sample_weight``). The values come from :mod:`featcache.heads.metrics`, the one
  place metrics are defined: a regression round is scored by
  :func:`~featcache.heads.metrics.metric_value` on its predictions; a classification
  round by the kernel that ``metric_value`` evaluates, built with
  :meth:`~featcache.heads.metrics.ClassificationKernel.from_rows` from the two per-row
  arrays every selection metric reads (the predicted class and the true class's
  probability), so no round keeps its (n_val, K) probabilities.

  Such metrics (balanced accuracy, macro F1, R^2) are not sums over chunks, so each
  round needs every val row at once: per row and round only those values are kept
  (classification: the class as the smallest integer type plus a float64, ~9-12
  bytes; regression: the float64 prediction), far less than the row's D features.
  Per-chunk sufficient statistics (confusion counts, error sums) would need O(1) per
  row, but turning them into metric values would re-implement the formulas of
  :mod:`~featcache.heads.metrics`. To bound memory on large val sets the rounds are
  scored in blocks of at most :data:`VAL_BUFFER_BYTES` of kept values: each further
  block streams ``X_val`` again (from the raw score of the block's first round), and
  blocks after the round where early stopping has decided are skipped.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np

from featcache.errors import ParamError
from featcache.store.schema import TASKS
from featcache.util.checks import check_int

from .boosting import LightGBMHead, LightGBMRegressorHead
from .chunks import DEFAULT_CHUNK_ROWS, RowChunks, as_labels, is_dask_array
from .class_weight import class_weights, row_weights
from .metrics import LOWER_IS_BETTER, ClassificationKernel, metric_kernel, metric_value
from .validation import PARAM_HINT, check_targets, encode_labels, resolve_classes

__all__ = ["VAL_BUFFER_BYTES", "fit_lightgbm_dask", "metric_curve", "validation_curve"]

log = logging.getLogger(__name__)

VAL_BUFFER_BYTES = 128 * 2**20
"""Most bytes of per-row values :func:`metric_curve` keeps at once (more rounds: more passes over ``X_val``)."""


def _as_dask(X: Any, name: str) -> Any:
    """``X`` as a dask array with known row chunks and one column chunk."""
    import dask.array as da

    if not is_dask_array(X):
        X = np.asarray(X)
        return da.from_array(X, chunks=(min(DEFAULT_CHUNK_ROWS, max(1, X.shape[0])), -1))
    if X.ndim != 2 or any(np.isnan(c) for c in X.chunks[0]):
        raise ValueError(
            f"{name} must be a 2-D dask array with known row chunks; got shape {X.shape}. "
            f"Hint: call {name}.compute_chunk_sizes() first."
        )
    return X.rechunk({1: -1}) if len(X.chunks[1]) > 1 else X


def _round_losses(raw: np.ndarray, y: np.ndarray, kind: str, weights: np.ndarray | None = None) -> np.ndarray:
    """Summed loss of rows with raw scores ``raw`` (n, K) or (n,) against ``y`` (each row times its weight)."""
    if kind == "regression":
        return np.sum((raw - y) ** 2)
    if kind == "binary":
        p = 1.0 / (1.0 + np.exp(-raw))
        p_true = np.where(y == 1, p, 1.0 - p)
    else:
        z = raw - raw.max(axis=1, keepdims=True)
        p_true = np.exp(z[np.arange(y.size), y]) / np.exp(z).sum(axis=1)
    losses = -np.log(np.clip(p_true, 1e-15, 1.0))
    return np.sum(losses if weights is None else weights * losses)


def validation_curve(booster: Any, X_val: Any, y_val: np.ndarray, kind: str,
                     class_weight: np.ndarray | None = None) -> np.ndarray:
    """Mean validation loss after each boosting round, streaming ``X_val`` by chunk.

    Parameters
    ----------
    booster : lightgbm.Booster
    X_val : ndarray or dask.array.Array of shape (n_val, D)
    y_val : ndarray of shape (n_val,)
        Encoded labels 0..K_seen-1 (classification) or targets (regression).
    kind : {"multiclass", "binary", "regression"}
    class_weight : ndarray of shape (K_seen,), optional
        Classification: the weight of each encoded class; the loss is then the
        weighted mean (as LightGBM's with ``eval_sample_weight``).

    Returns
    -------
    ndarray of shape (n_rounds,)
        Multi-logloss / binary logloss / mean squared error after rounds 1..n_rounds.
    """
    n_rounds = booster.current_iteration()
    totals = np.zeros(n_rounds)
    for Xc, yc in RowChunks(X_val, y_val, name="X_val"):
        raw = 0.0
        weights = None if kind == "regression" else row_weights(class_weight, yc)
        for i in range(n_rounds):  # a round's trees add to the raw score (round 1 holds the init score)
            raw = raw + booster.predict(Xc, start_iteration=i, num_iteration=1, raw_score=True)
            totals[i] += _round_losses(raw, yc, kind, weights)
    weights = None if kind == "regression" else row_weights(class_weight, y_val)
    return totals / (y_val.size if weights is None else weights.sum())


def _round_scores(raw: np.ndarray, kind: str) -> np.ndarray:
    """What LightGBM gives a custom eval metric for raw scores ``raw`` (n, K) or (n,), as the in-memory head reads it.

    Regression: the predictions (n,); binary: ``[1 - p, p]`` with ``p`` the sigmoid (n, 2); multiclass: the
    softmax (n, K).
    """
    if kind == "regression":
        return raw
    if kind == "binary":
        p = 1.0 / (1.0 + np.exp(-raw))
        return np.column_stack([1.0 - p, p])
    z = np.exp(raw - raw.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _class_dtype(n_seen: int) -> np.dtype:
    """The smallest integer type that holds the class indices 0..n_seen-1."""
    return np.dtype(np.uint8 if n_seen <= 2**8 else np.uint16 if n_seen <= 2**16 else np.int32)


def metric_curve(booster: Any, X_val: Any, y_val: np.ndarray, kind: str, name: str,
                 early_stopping_rounds: int | None = None) -> np.ndarray:
    """Metric ``name`` of the validation rows after each boosting round, streaming ``X_val`` by chunk.

    Each value is the one :class:`~featcache.heads.boosting.LightGBMHead`'s custom eval metric
    computes in memory (unweighted, see the module docstring).

    Parameters
    ----------
    booster : lightgbm.Booster
    X_val : ndarray or dask.array.Array of shape (n_val, D)
    y_val : ndarray of shape (n_val,)
        Encoded labels 0..K_seen-1 (classification) or targets (regression).
    kind : {"multiclass", "binary", "regression"}
    name : str
        A selection metric of the task (:data:`~featcache.heads.metrics.SELECTION_METRICS`).
    early_stopping_rounds : int or None
        Rounds are scored in blocks (:data:`VAL_BUFFER_BYTES`); the blocks after the round where
        ``early_stopping(early_stopping_rounds)`` has decided are skipped. None: every round.

    Returns
    -------
    ndarray of shape (n_scored,)
        The metric after rounds 1..n_scored: every round (n_rounds), unless blocks were skipped.
    """
    n_rounds, n_val = booster.current_iteration(), int(y_val.size)
    task = "regression" if kind == "regression" else "classification"
    n_seen = None if kind == "regression" else (2 if kind == "binary" else booster.num_model_per_iteration())
    dtypes = [np.dtype(np.float64)] if n_seen is None else [_class_dtype(n_seen), np.dtype(np.float64)]
    per_round = n_val * sum(d.itemsize for d in dtypes)
    block = int(min(n_rounds, max(1, VAL_BUFFER_BYTES // max(per_round, 1))))
    everyone = np.arange(n_val)[None, :]
    curve: list[float] = []
    for first in range(0, n_rounds, block):
        stop = min(n_rounds, first + block)
        kept = [np.empty((stop - first, n_val), dtype=d) for d in dtypes]
        chunks = RowChunks(X_val, y_val, name="X_val")
        for (Xc, yc), (lo, hi) in zip(chunks, chunks.bounds, strict=True):
            # the raw score before the block's first round (num_iteration=0 would mean every round)
            raw = booster.predict(Xc, num_iteration=first, raw_score=True) if first else 0.0
            for i in range(first, stop):
                raw = raw + booster.predict(Xc, start_iteration=i, num_iteration=1, raw_score=True)
                scores = _round_scores(raw, kind)
                if n_seen is None:
                    kept[0][i - first, lo:hi] = scores
                else:
                    kernel = metric_kernel(task, yc, scores, n_seen)
                    kept[0][i - first, lo:hi], kept[1][i - first, lo:hi] = kernel.pred, kernel.p_true
        for j in range(stop - first):
            if n_seen is None:
                curve.append(metric_value(task, name, y_val, kept[0][j]))
            else:
                kernel = ClassificationKernel.from_rows(y_val, kept[0][j].astype(np.int64), kept[1][j], n_seen)
                curve.append(float(kernel.compute(name, everyone)[0]))
        if early_stopping_rounds is not None and stop < n_rounds:
            values = np.asarray(curve)
            best = _early_stop(values if name in LOWER_IS_BETTER else -values, early_stopping_rounds)
            if values.size - best >= early_stopping_rounds:
                break
    return np.asarray(curve)


def _early_stop(curve: np.ndarray, rounds: int | None) -> int:
    """1-based round that ``lightgbm.early_stopping(rounds)`` keeps on ``curve`` (lower is better)."""
    if rounds is None:
        return int(curve.size)
    best = 0
    for i in range(1, curve.size):
        if curve[i] < curve[best]:
            best = i
        elif i - best >= rounds:
            break
    return best + 1


def fit_lightgbm_dask(
    client: Any, X_dask: Any, y_dask: Any, X_val: Any, y_val: Any, *, task: str = "classification",
    **params: Any,
) -> LightGBMHead | LightGBMRegressorHead:
    """Train LightGBM on a dask.distributed cluster; return a fitted LightGBM head.

    Parameters
    ----------
    client : distributed.Client
        The cluster the training runs on (e.g. ``Client(LocalCluster(n_workers=2))``).
    X_dask : dask.array.Array (or ndarray) of shape (n_train, D)
        Training features; a numpy array is wrapped into a dask array.
    y_dask : array-like or dask array of shape (n_train,)
        Labels/targets (small: computed here, then re-chunked like ``X_dask``).
    X_val : ndarray or dask.array.Array of shape (n_val, D)
        Validation features, streamed chunk by chunk on the client (see the module
        docstring: post-hoc early stopping).
    y_val : array-like of shape (n_val,)
    task : {"classification", "regression"}
    **params
        Constructor parameters of :class:`LightGBMHead` / :class:`LightGBMRegressorHead`
        (``n_estimators``, ``learning_rate``, ``num_leaves``, ``early_stopping_rounds``,
        ``n_classes``, ``class_weight``, ``random_state``, ...; ``class_weight="balanced"`` weighs the
        training rows and the validation curve as :class:`LightGBMHead` does). ``n_jobs`` is not passed on: each dask
        worker trains with its own thread count. ``selection_metric`` early-stops on that metric of the val rows
        (unweighted; the same round as :class:`LightGBMHead` would keep on the same booster).
        ``pca_components`` is not supported.

    Returns
    -------
    LightGBMHead or LightGBMRegressorHead
        Fitted: ``booster_``, ``best_iteration_``, ``best_params_``, ``n_features_in_``,
        ``classes_``/``train_classes_`` (classification), ``scaler_ = pca_ = None``,
        ``fit_seconds_`` and ``val_curve_`` (the loss, or ``selection_metric``, after each round scored: see
        :func:`metric_curve`; not saved by ``save_head``).
    """
    import dask.array as da
    import lightgbm

    start = time.perf_counter()
    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid; allowed: {', '.join(TASKS)}.")
    cls = LightGBMHead if task == "classification" else LightGBMRegressorHead
    head = cls(**params)  # unknown parameters raise TypeError naming them
    if head.pca_components is not None:
        raise ParamError(
            f"pca_components={head.pca_components!r} is not supported by fit_lightgbm_dask; allowed: None. "
            "Hint: reduce the features before (or use LightGBMHead in memory)."
        )
    check_int("early_stopping_rounds", head.early_stopping_rounds, 1, allow_none=True, hint=PARAM_HINT)
    X = _as_dask(X_dask, "X_dask")
    lgb_params = {k: v for k, v in head._lgbm_params(int(X.shape[1])).items() if k != "n_jobs"}
    classification = task == "classification"
    y, y_v, labels = as_labels(y_dask), as_labels(y_val), None
    if classification and head.n_classes is None:  # any labels, fitted on their indices (ClassifierHead.fit)
        labels, (y, y_v) = encode_labels(y, y_v)
    y = check_targets(y, classification, "y_dask")
    y_v = check_targets(y_v, classification, "y_val")
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"X_dask has {X.shape[0]} rows but y_dask has {y.shape[0]}; they must match.")
    if classification:
        classes = resolve_classes(head.n_classes, y, y_v)
        seen = np.unique(y)
        if seen.size < 2:
            raise ValueError(f"the training rows contain only the classes {seen.tolist()}; a classifier needs >= 2.")
        # counted over all training rows here: LightGBM's class_weight would count each worker's rows
        head.class_weight_ = class_weights(head.class_weight, y, classes.size)
    weights = row_weights(getattr(head, "class_weight_", None), y)
    if classification:
        # lightgbm.dask's classifier label-encodes each worker's rows alone: a part lacking a class trains on
        # shifted labels (or as binary). So the booster learns the seen classes' indices, objective set here.
        y, lgb_params["objective"] = np.searchsorted(seen, y), "binary" if seen.size == 2 else "multiclass"
        lgb_params.update({} if seen.size == 2 else {"num_class": int(seen.size)})
    model = lightgbm.DaskLGBMRegressor(client=client, **lgb_params)
    y_d = da.from_array(y, chunks=(X.chunks[0],))
    with warnings.catch_warnings():  # lightgbm.dask warns that n_jobs (always set) is ignored
        warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored", category=UserWarning)
        model.fit(X, y_d, sample_weight=None if weights is None else da.from_array(weights, chunks=(X.chunks[0],)))
    booster = model.booster_

    if classification:
        known = np.isin(y_v, seen)
        if not known.any():
            raise ValueError(f"no validation row has a class seen in training ({seen.tolist()}).")
        kind = "binary" if seen.size == 2 else "multiclass"
        X_v = X_val if known.all() else _subset_rows(X_val, known)
        y_v = np.searchsorted(seen, y_v[known])
        seen_weight = None if head.class_weight_ is None else head.class_weight_[seen]
        head.classes_, head.train_classes_ = (classes if labels is None else labels[classes]), seen
    else:
        X_v, kind, seen_weight = X_val, "regression", None
    metric = head.selection_metric
    if metric is None:
        curve = validation_curve(booster, X_v, y_v, kind, seen_weight)
    else:  # unweighted, as the in-memory head's custom eval metric
        curve = metric_curve(booster, X_v, y_v, kind, metric, head.early_stopping_rounds)
    best = _early_stop(curve if metric is None or metric in LOWER_IS_BETTER else -curve, head.early_stopping_rounds)
    head.booster_ = booster
    head.best_iteration_ = best
    head.best_params_ = {"n_estimators": best}
    head.n_features_in_ = int(X.shape[1])
    head.scaler_, head.pca_ = None, None
    head.val_curve_ = curve
    head.fit_seconds_ = time.perf_counter() - start
    log.info("fit_lightgbm_dask: %d workers, best round %d of %d (post-hoc early stopping %s on %s) in %.2fs",
             len(client.scheduler_info().get("workers", {})), best, booster.current_iteration(),
             head.early_stopping_rounds, metric or "the loss", head.fit_seconds_)
    return head


def _subset_rows(X: Any, keep: np.ndarray) -> Any:
    """Rows ``keep`` (bool mask) of a numpy or dask array (lazy for dask)."""
    return X[keep] if is_dask_array(X) else np.asarray(X)[keep]
