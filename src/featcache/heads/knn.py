"""Weighted k-nearest-neighbour heads: the standard training-free probe of frozen features.

The k-NN evaluation of the self-supervised literature (Wu et al. 2018; DINO, Caron et al.
2021): every row is L2-normalised (a zero row stays zero), the similarity of a query to a
training row is their cosine (the dot product of the normalised rows), and the k most
similar training rows vote with weight ``exp(cos / T)`` (T = 0.07 by default). The
classifier's probabilities are the normalised class votes; the regressor predicts the
weighted mean of the neighbours' targets, with the same weights.

Fitting only normalises and keeps the training rows (float32) and their labels or targets;
k is chosen from the grid ``ks`` on the validation rows, if any. Queries are compared with
the training rows in blocks of ``batch_size`` rows, so the similarity matrix in memory is
(batch_size, n_train) float32 (about ``12 * batch_size * n_train`` bytes with the top-k
indices), whatever the number of queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from .base import ClassifierHead, HeadBase, RegressorHead, params_dataclass
from .class_weight import class_weights, weighted_selection_metric
from .metrics import log_loss_score, metric_value, selection_key
from .param_types import AtLeast, MinLength, Positive, check_declared
from .splits import prepare_fit
from .validation import check_features, require_two_classes, resolve_classes, validate_xy

__all__ = ["DEFAULT_K", "PROBA_FLOOR", "KNNBase", "KNNHead", "KNNRegressorHead", "l2_normalise", "vote_weights"]

log = logging.getLogger(__name__)

#: The k used without validation rows (clipped to the training rows), unless ``ks`` holds a single k.
DEFAULT_K = 20

#: The smoothing of :meth:`KNNHead.predict_proba`: ``(votes / total + PROBA_FLOOR) / (1 + K * PROBA_FLOOR)``,
#: so that no class has probability 0 and the log loss stays finite (at most ``-log(PROBA_FLOOR)``, about 9.2).
PROBA_FLOOR = 1e-4


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (computed in float64), as float32; a zero row stays zero.

    Parameters
    ----------
    X : ndarray of shape (n, D)

    Returns
    -------
    ndarray of shape (n, D), float32
    """
    X = np.asarray(X, dtype=np.float64)
    scale = np.abs(X).max(axis=1, keepdims=True, initial=0.0)  # so that the norm of huge values does not overflow
    X = np.divide(X, scale, out=np.zeros_like(X), where=scale > 0)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0).astype(np.float32)


def vote_weights(sims: np.ndarray, temperature: float) -> np.ndarray:
    """The neighbours' weights ``exp(sim / T)``, each row divided by its largest (same votes, no overflow).

    Parameters
    ----------
    sims : ndarray of shape (n, k)
        Cosine similarities of each query's neighbours, most similar first.
    temperature : float
        T > 0.

    Returns
    -------
    ndarray of shape (n, k), float64
        ``exp((sim - max_sim) / T)``: proportional per row to ``exp(sim / T)``, the nearest weighing 1.
    """
    sims = np.asarray(sims, dtype=np.float64)
    return np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)


@params_dataclass
class KNNBase(HeadBase):
    """Shared parameters (documented in :class:`KNNHead`), the neighbour search and the choice of k."""

    ks: Annotated[Sequence[Annotated[int, AtLeast(1)]], MinLength(1)] | np.ndarray = (1, 3, 5, 10, 20, 50)
    temperature: Annotated[float, Positive()] = 0.07
    batch_size: Annotated[int, AtLeast(1)] = 512

    def _data(self, X: Any, y: Any, X_val: Any, y_val: Any) -> tuple[np.ndarray, ...]:
        """Validated (X, y, X_val, y_val); X_val and y_val None when not given."""
        check_declared(self)
        if X_val is None and y_val is None:
            return (*validate_xy(X, y, self._classification, "X"), None, None)
        # with validation rows prepare_fit only validates (no hold-out: validation_fraction is not read)
        split = prepare_fit(X, y, X_val, y_val, classification=self._classification, validation_fraction=0.5,
                            random_state=None)
        return split.X_train, split.y_train, split.X_val, split.y_val

    def _neighbours(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` training rows most similar to each row of ``X``, in blocks of ``batch_size`` queries.

        Parameters
        ----------
        X : ndarray of shape (n, D)
            Query features (not normalised).
        k : int
            1 <= k <= n_train.

        Returns
        -------
        sims : ndarray of shape (n, k), float32
            Cosine similarities, most similar first (ties: the lower training row first).
        idx : ndarray of shape (n, k), int64
            Their row indices into the training rows.
        """
        train = self.train_rows_
        n_train = train.shape[0]
        sims = np.empty((X.shape[0], k), dtype=np.float32)
        idx = np.empty((X.shape[0], k), dtype=np.int64)
        for start in range(0, X.shape[0], self.batch_size):
            block = l2_normalise(X[start:start + self.batch_size]) @ train.T  # (b, n_train) float32
            if k < n_train:
                top = np.argpartition(block, n_train - k, axis=1)[:, n_train - k:]
            else:
                top = np.broadcast_to(np.arange(n_train), block.shape)
            top_sims = np.take_along_axis(block, top, axis=1)
            order = np.lexsort((top, -top_sims), axis=1)  # by similarity, descending; then by row
            idx[start:start + block.shape[0]] = np.take_along_axis(top, order, axis=1)
            sims[start:start + block.shape[0]] = np.take_along_axis(top_sims, order, axis=1)
        return sims, idx

    def _grid(self, n_train: int) -> np.ndarray:
        """The distinct ks, each clipped to ``n_train``, ascending (int64)."""
        return np.unique(np.minimum(np.asarray(self.ks, dtype=np.int64).ravel(), n_train))

    def _choose_k(self, X_val: np.ndarray | None, y_val: np.ndarray | None) -> None:
        """Set ``best_params_`` and ``search_results_``: the k of the grid that scores best on the validation
        rows (see :class:`KNNHead` Notes), or without them the default k."""
        n_train = self.train_rows_.shape[0]
        grid = self._grid(n_train)
        if X_val is None:
            k = int(grid[0]) if grid.size == 1 else min(DEFAULT_K, n_train)
            log.info("%s: no validation rows, so k=%d is not chosen on data (ks=%s: the single k, else the "
                     "default %d, clipped to the %d training rows)", type(self).__name__, k,
                     np.asarray(self.ks).ravel().tolist(), DEFAULT_K, n_train)
            self.best_params_, self.search_results_ = {"k": k}, []
            return
        sims, idx = self._neighbours(X_val, int(grid[-1]))
        weights = vote_weights(sims, self.temperature)
        results = [{"k": int(k), **self._val_scores(weights[:, :k], idx[:, :k], y_val)} for k in grid]
        best = min(results, key=self._sort_key)
        self.best_params_, self.search_results_ = {"k": best["k"]}, results

    def _val_scores(self, weights: np.ndarray, idx: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
        """The validation scores of one k (the first k columns of the neighbours)."""
        raise NotImplementedError

    def _sort_key(self, row: dict[str, Any]) -> tuple:
        """The k that minimises this wins."""
        raise NotImplementedError

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Keep the normalised training rows and their targets; choose k on the validation rows."""
        X, y, X_val, y_val = self._data(X, y, X_val, y_val)
        self._set_train(X, y, y_val)
        self.n_features_in_ = int(X.shape[1])
        self._choose_k(X_val, y_val)

    def _set_train(self, X: np.ndarray, y: np.ndarray, y_val: np.ndarray | None) -> None:
        raise NotImplementedError

    def _predict_neighbours(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Checked query rows -> (weights, idx) of their ``best_params_["k"]`` neighbours, each (n, k)."""
        check_is_fitted(self, "train_rows_")
        X = check_features(X, self)
        sims, idx = self._neighbours(X, int(self.best_params_["k"]))
        return vote_weights(sims, self.temperature), idx


@params_dataclass
class KNNHead(ClassifierHead, KNNBase):
    """Weighted k-NN classifier on cosine similarity: the k nearest training rows vote ``exp(cos / T)``.

    Parameters
    ----------
    ks : sequence of int >= 1
        Grid of k; each k above the number of training rows is clipped to it.
    temperature : float > 0
        T of the vote weight ``exp(cos / T)`` (0.07: the DINO k-NN evaluation); a small T lets the nearest
        neighbours outvote the rest, a large one tends to a plain majority vote.
    batch_size : int >= 1
        Query rows compared with all training rows at a time (memory: ``(batch_size, n_train)`` float32).
    n_classes : int or None
        Number of classes K, or None for the labels seen (see :class:`~featcache.heads.base.ClassifierHead`).
    class_weight : {None, "balanced"}
        ``"balanced"``: each neighbour's vote is also multiplied by its class's weight
        ``n_train / (n_present * count_k)`` over the training rows (:mod:`~featcache.heads.class_weight`),
        and k is chosen on validation balanced accuracy unless ``selection_metric`` is set (see Notes).
    selection_metric : {None, "accuracy", "balanced_accuracy", "macro_f1", "log_loss"}
        Choose k on this validation metric (see Notes); None: accuracy, then log-loss (balanced accuracy,
        then log-loss, under ``class_weight="balanced"``).

    Attributes
    ----------
    train_rows_ : ndarray of shape (n_train, D), float32
        The L2-normalised training rows.
    train_labels_ : ndarray of shape (n_train,), int64
        Their class indices into ``classes_``.
    classes_ : ndarray of shape (K,)
    train_classes_ : ndarray of shape (n_seen,)
        Indices into ``classes_`` of the classes present in the training rows.
    class_weight_ : ndarray of shape (K,) or None
    n_features_in_ : int
    best_params_ : dict
        ``{"k": int}``.
    search_results_ : list of dict
        One dict per k of the grid (clipped, distinct): ``k``, ``val_accuracy``, ``val_log_loss`` (and
        ``val_<metric>`` of the metric k is chosen on, if another); empty without validation rows.
    fit_seconds_ : float

    Notes
    -----
    Selection (validation rows only): highest validation accuracy, ties broken by lower
    validation log-loss, then by smaller k; with ``selection_metric``, the best validation
    value of that metric, ties broken by lower log-loss (higher accuracy for ``log_loss``),
    then by smaller k. Under ``class_weight="balanced"`` with ``selection_metric=None`` that metric is
    balanced accuracy (:func:`~featcache.heads.class_weight.weighted_selection_metric`): on plain accuracy of an
    imbalanced validation split a small k wins, where the weights change few votes (k=1: none), and selecting
    on balanced accuracy raised the test balanced accuracy by 6.1 / 1.2 points on the digits made imbalanced
    (benchmarks/README.md "Imbalanced classes"). Without validation rows k is the single value of ``ks``, or else
    ``DEFAULT_K`` = 20, clipped to the training rows (a log line says so).
    ``predict_proba`` smooths the votes by ``PROBA_FLOOR`` (1e-4): every class, one absent
    from the training rows too, gets a probability > 0, so the log loss stays finite.
    """

    def _set_train(self, X: np.ndarray, y: np.ndarray, y_val: np.ndarray | None) -> None:
        if y.size < 2:
            raise ValueError(f"{type(self).__name__} got 1 training row (n_samples=1); allowed: >= 2 rows of >= 2 "
                             "classes. Hint: pass more training rows.")
        self.classes_ = resolve_classes(self.n_classes, y, y_val)
        self.train_classes_ = require_two_classes(y)
        self.class_weight_ = class_weights(self.class_weight, y, self.classes_.size)
        self.train_rows_ = l2_normalise(X)
        self.train_labels_ = y.astype(np.int64)

    def _proba(self, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """(n, k) neighbour weights and rows -> (n, K) smoothed vote distribution, float64."""
        labels = self.train_labels_[idx]
        if self.class_weight_ is not None:
            weights = weights * self.class_weight_[labels]
        n, K = idx.shape[0], self.classes_.size
        flat = (np.arange(n)[:, None] * K + labels).ravel()
        votes = np.bincount(flat, weights=weights.ravel(), minlength=n * K).reshape(n, K)
        votes /= votes.sum(axis=1, keepdims=True)
        return (votes + PROBA_FLOOR) / (1.0 + K * PROBA_FLOOR)

    def _metric(self) -> str | None:
        """The metric k is chosen on: ``selection_metric``, else balanced accuracy under ``class_weight``."""
        return weighted_selection_metric(self.selection_metric, self.class_weight)

    def _val_scores(self, weights: np.ndarray, idx: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
        proba = self._proba(weights, idx)
        row = {"val_accuracy": float(np.mean(proba.argmax(axis=1) == y_val)),
               "val_log_loss": log_loss_score(y_val, proba)}
        m = self._metric()
        if m is not None:
            row[f"val_{m}"] = metric_value("classification", m, y_val, proba, self.classes_.size)
        return row

    def _sort_key(self, row: dict[str, Any]) -> tuple:
        m = self._metric()
        if m is None:
            return (-row["val_accuracy"], row["val_log_loss"], row["k"])
        tie = -row["val_accuracy"] if m == "log_loss" else row["val_log_loss"]
        return (selection_key(m, row[f"val_{m}"]), tie, row["k"])

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities: the neighbours' weighted votes, smoothed (see Notes).

        Parameters
        ----------
        X : array-like of shape (n, D)

        Returns
        -------
        ndarray of shape (n, K), float64
            Columns in ``classes_`` order; every entry > 0, rows sum to 1.
        """
        weights, idx = self._predict_neighbours(X)
        return self._proba(weights, idx)


@params_dataclass
class KNNRegressorHead(RegressorHead, KNNBase):
    """Weighted k-NN regressor on cosine similarity: the ``exp(cos / T)``-weighted mean of the k nearest targets.

    Parameters
    ----------
    ks, temperature, batch_size
        As in :class:`KNNHead`.
    selection_metric : {None, "rmse", "mae", "r2"}
        Choose k on this validation metric; None: RMSE.

    Attributes
    ----------
    train_rows_ : ndarray of shape (n_train, D), float32
        The L2-normalised training rows.
    train_targets_ : ndarray of shape (n_train,), float64
    n_features_in_ : int
    best_params_ : dict
        ``{"k": int}``.
    search_results_ : list of dict
        ``k``, ``val_rmse`` (and ``val_<selection_metric>``) per k; empty without validation rows.
    fit_seconds_ : float

    Notes
    -----
    Selection: lowest validation RMSE (with ``selection_metric``, the best value of that
    metric first, then RMSE), ties broken by smaller k; without validation rows, as
    :class:`KNNHead`.
    """

    def _set_train(self, X: np.ndarray, y: np.ndarray, y_val: np.ndarray | None) -> None:
        self.train_rows_ = l2_normalise(X)
        self.train_targets_ = y.astype(np.float64)

    def _mean(self, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """(n, k) neighbour weights and rows -> (n,) weighted mean of their targets, float64."""
        return np.sum(weights * self.train_targets_[idx], axis=1) / weights.sum(axis=1)

    def _val_scores(self, weights: np.ndarray, idx: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
        pred = self._mean(weights, idx)
        m = self.selection_metric
        return {"val_rmse": float(np.sqrt(np.mean((pred - y_val) ** 2))),
                **({f"val_{m}": metric_value("regression", m, y_val, pred)} if m else {})}

    def _sort_key(self, row: dict[str, Any]) -> tuple:
        m = self.selection_metric
        return (*((selection_key(m, row[f"val_{m}"]),) if m else ()), row["val_rmse"], row["k"])

    def predict(self, X: Any) -> np.ndarray:
        """(n, D) features -> predicted targets, shape (n,), float64."""
        return self._mean(*self._predict_neighbours(X))
