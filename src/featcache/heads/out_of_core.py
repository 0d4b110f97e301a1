"""Out-of-core heads: features streamed one row chunk at a time (numpy or dask input).

For feature matrices that do not fit in memory, e.g.
``FeatureStore(path).to_dask(layer, split, rows_per_chunk=...)``: only one row chunk
of features is ever materialised (peak memory is independent of the number of
rows); labels/targets are small and held in memory.

- :class:`StreamingLogisticHead` / :class:`StreamingRidgeHead`: SGD (log-loss /
  squared error, L2) with ``partial_fit`` over shuffled row chunks, a scaler
  fitted in one streaming pass over the training chunks, the regularisation
  ``alpha`` chosen on the validation rows (one streamed fit per candidate) and
  early stopping on the validation score.
- :class:`StreamingMLPHead` / :class:`StreamingMLPRegressorHead`: the MLP of
  :mod:`~featcache.heads.mlp` (same module builder and training loop) fed
  mini-batches cut from streamed chunks (:mod:`featcache.heads.streaming_mlp`).
- :func:`fit_lightgbm_dask`: LightGBM trained on dask.distributed workers
  (:mod:`featcache.heads.dask_boosting`).

All of them are importable from here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.utils.validation import check_is_fitted

from .base import ClassifierHead, HeadBase, RegressorHead, params_dataclass
from .chunks import DEFAULT_CHUNK_ROWS, RowChunks, stream_outputs, streaming_sources
from .class_weight import row_weights
from .dask_boosting import fit_lightgbm_dask
from .metrics import log_loss_score, metric_value, selection_key
from .param_types import AtLeast, Interval, MinLength, Positive, check_declared
from .preprocessing import fit_scaler_streaming
from .streaming_mlp import StreamingMLPHead, StreamingMLPRegressorHead
from .validation import sorted_grid

__all__ = [
    "DEFAULT_SGD_ALPHAS",
    "StreamingLogisticHead",
    "StreamingMLPHead",
    "StreamingMLPRegressorHead",
    "StreamingRidgeHead",
    "fit_lightgbm_dask",
]

DEFAULT_SGD_ALPHAS: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
"""Candidate L2 strengths of the SGD heads (each candidate is one streamed fit)."""


@params_dataclass
class _StreamingLinearBase(HeadBase):
    """Shared parameters (documented in :class:`StreamingLogisticHead`) and streamed SGD fitting of the SGD heads."""

    alphas: Annotated[Sequence[Annotated[float, Positive()]], MinLength(1)] | np.ndarray | None = None
    max_epochs: Annotated[int, AtLeast(1)] = 20
    patience: Annotated[int, AtLeast(1)] = 3
    average: bool = True
    learning_rate: str = "optimal"
    eta0: float = 0.01
    chunk_rows: Annotated[int, AtLeast(1)] = DEFAULT_CHUNK_ROWS
    validation_fraction: Annotated[float, Interval(0, 1)] = 0.2
    random_state: Annotated[int, AtLeast(0)] | None = 0

    _streaming = True  # fit_and_evaluate passes dask arrays through unchanged

    def make_model(self, alpha: float, seed: int) -> SGDClassifier | SGDRegressor:
        """An unfitted SGD linear model with this head's ``learning_rate``, ``eta0`` and ``average``.

        Parameters
        ----------
        alpha : float
            L2 regularisation strength.
        seed : int
            ``random_state`` of the model.

        Returns
        -------
        SGDClassifier or SGDRegressor
            ``log_loss`` (classifiers) or ``squared_error`` (regressors) loss.
        """
        common = {"penalty": "l2", "alpha": float(alpha), "average": self.average, "random_state": seed}
        if self._classification:
            return SGDClassifier(loss="log_loss", learning_rate=self.learning_rate, eta0=self.eta0, **common)
        return SGDRegressor(loss="squared_error", learning_rate=self.learning_rate, eta0=self.eta0, **common)

    def _fit_alpha(self, alpha: float, train: RowChunks, val: RowChunks, seed: int) -> dict[str, Any]:
        """One streamed fit with early stopping; returns the best model and its history."""
        model = self.make_model(alpha, seed)
        rng = np.random.default_rng(seed)
        best: dict[str, Any] = {"key": None, "model": None, "epoch": 0}
        history = []
        for epoch in range(1, self.max_epochs + 1):
            for Xc, yc in train.iter(rng.permutation(len(train))):
                order = rng.permutation(Xc.shape[0])
                self._partial_fit(model, self.scaler_.transform(Xc)[order], yc[order])
            scores = self._score(model, val)
            history.append({"epoch": epoch, **scores})
            key = self._key(scores)
            if best["key"] is None or key < best["key"]:
                best = {"key": key, "model": copy.deepcopy(model), "epoch": epoch, "scores": scores}
            elif epoch - best["epoch"] >= self.patience:
                break
        return {**best, "history": history}

    def _selection_score(self, task: str, parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """``{"val_<selection_metric>": value}`` of the validation chunks' (labels, scores), or {} without one."""
        if self.selection_metric is None:
            return {}
        y, scores = (np.concatenate(arrays) for arrays in zip(*parts))
        return {f"val_{self.selection_metric}": metric_value(task, self.selection_metric, y, scores)}

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Stream the training chunks; choose alpha and the epoch on the validation rows."""
        check_declared(self)  # the rules in the fields' annotations (alphas...)
        grid = sorted_grid(DEFAULT_SGD_ALPHAS if self.alphas is None else self.alphas)
        seed = 0 if self.random_state is None else int(self.random_state)
        train, val = streaming_sources(self, X, y, X_val, y_val, random_state=self._seed())
        self._set_targets(train.served_y, train.y, val.y)
        self.scaler_ = fit_scaler_streaming(train)
        self.pca_ = None
        results, fits = [], []
        for alpha in grid:
            fit = self._fit_alpha(float(alpha), train, val, seed)
            fits.append(fit)
            results.append({"alpha": float(alpha), "best_epoch": fit["epoch"], "epochs_run": len(fit["history"]),
                            **fit["scores"]})
        # best validation score; ties go to the stronger regularisation (larger alpha)
        i = min(range(len(fits)), key=lambda j: (*fits[j]["key"], -results[j]["alpha"]))
        self.estimator_ = fits[i]["model"]
        self.best_epoch_ = int(fits[i]["epoch"])
        self.best_params_ = {"alpha": results[i]["alpha"], "epochs": self.best_epoch_}
        self.history_ = fits[i]["history"]
        self.search_results_ = results
        self.n_features_in_ = train.n_features


@params_dataclass
class StreamingLogisticHead(ClassifierHead, _StreamingLinearBase):
    """L2 logistic regression (one-vs-rest SGD, ``loss="log_loss"``) fitted chunk by chunk.

    Parameters
    ----------
    alphas : sequence of float or None
        Candidate L2 strengths; None means ``(1e-5, 1e-4, 1e-3)``. Each candidate is
        a full streamed fit; keep the grid small.
    max_epochs : int
        Passes over the training chunks per candidate.
    patience : int
        Stop a candidate after this many epochs without a better validation score.
    average : bool
        Averaged SGD (Polyak averaging of the weights).
    learning_rate : str
        SGD schedule (``"optimal"``, ``"invscaling"``, ``"adaptive"``, ``"constant"``).
    eta0 : float
        Initial step size for the non-``"optimal"`` schedules.
    chunk_rows : int
        Rows per chunk when an in-memory array is given (dask arrays keep their chunks).
    validation_fraction : float
        Stratified hold-out of the training rows when no ``X_val`` is given (held-out
        rows are skipped chunk by chunk; no refit on the full training rows).
    n_classes : int or None
        Number of classes K, or None for the labels seen (see :class:`~featcache.heads.base.ClassifierHead`).
    class_weight : {None, "balanced"}
        ``"balanced"``: each training row weighs ``n_samples / (n_classes * count)``
        of its class, counted over the training rows (after the hold-out), passed to
        ``partial_fit`` as ``sample_weight`` (which SGD's own ``class_weight="balanced"``
        refuses); as :class:`~featcache.heads.linear.LogisticRegressionHead` weighs.
    selection_metric : {None, "accuracy", "balanced_accuracy", "macro_f1", "log_loss"}
        Choose alpha and the epoch on this validation metric (see Notes).
    random_state : int or None
        Seed of the chunk order, the row order within chunks, SGD and the hold-out.

    Attributes
    ----------
    scaler_ : StandardScaler
        Fitted with ``partial_fit`` in one pass over the training chunks.
    pca_ : None
    estimator_ : SGDClassifier
        The chosen candidate at its best epoch.
    classes_ : ndarray of shape (K,)
    class_weight_ : ndarray of shape (K,) or None
        The class weights over the training rows (None: unweighted).
    n_features_in_ : int
    best_epoch_ : int
    best_params_ : dict
        ``{"alpha": float, "epochs": int}``.
    history_ : list of dict
        ``epoch``, ``val_accuracy``, ``val_log_loss`` per epoch of the chosen candidate.
    search_results_ : list of dict
        Per candidate: ``alpha``, ``best_epoch``, ``epochs_run`` and its best scores.
    fit_seconds_ : float

    Notes
    -----
    Early stopping and selection use the same order: highest validation accuracy,
    then lowest validation log-loss (then the larger alpha); with ``selection_metric``,
    the best validation value of that metric first (``val_<metric>`` in the history). ``fit`` accepts numpy
    or dask ``X``/``X_val`` and numpy ``y``/``y_val``; ``predict``/``predict_proba``
    stream dask input too and return numpy.
    """

    def _partial_fit(self, model: SGDClassifier, X: np.ndarray, y: np.ndarray) -> None:
        # SGD's partial_fit refuses class_weight="balanced": the weights come from the class counts
        model.partial_fit(X, y, classes=self.classes_, sample_weight=row_weights(self.class_weight_, y))

    def _score(self, model: SGDClassifier, val: RowChunks) -> dict[str, float]:
        correct, loss, n, parts = 0, 0.0, 0, []
        for Xc, yc in val:
            proba = model.predict_proba(self.scaler_.transform(Xc))
            correct += int(np.sum(proba.argmax(axis=1) == yc))
            loss += log_loss_score(yc, proba) * yc.size
            n += yc.size
            parts.append((yc, proba))
        scores = {"val_accuracy": correct / n, "val_log_loss": loss / n}
        return {**scores, **self._selection_score("classification", parts)}

    def _key(self, scores: dict[str, float]) -> tuple[float, ...]:
        m = self.selection_metric
        if m is None:
            return (-scores["val_accuracy"], scores["val_log_loss"])
        return (selection_key(m, scores[f"val_{m}"]),
                -scores["val_accuracy"] if m == "log_loss" else scores["val_log_loss"])

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (one-vs-rest, normalised), shape (n, K), float64; X numpy or dask."""
        check_is_fitted(self, "estimator_")
        return stream_outputs(self, X, self.estimator_.predict_proba).astype(np.float64, copy=False)



@params_dataclass
class StreamingRidgeHead(RegressorHead, _StreamingLinearBase):
    """Ridge regression by SGD (squared error, L2) fitted chunk by chunk.

    Parameters are those of :class:`StreamingLogisticHead` without ``n_classes``
    (``learning_rate`` defaults to ``"invscaling"``); the target is standardised
    with the training mean/std and the hold-out is a plain random one.

    Attributes
    ----------
    scaler_, pca_, n_features_in_, best_epoch_, best_params_, search_results_, fit_seconds_
        As in :class:`StreamingLogisticHead`.
    estimator_ : SGDRegressor
    history_ : list of dict
        ``epoch``, ``val_rmse`` per epoch of the chosen candidate.
    y_mean_, y_scale_ : float
        Target standardisation, from the training rows.
    """

    learning_rate: str = "invscaling"

    def _partial_fit(self, model: SGDRegressor, X: np.ndarray, y: np.ndarray) -> None:
        model.partial_fit(X, self._scale_target(y))

    def _predict_scaled(self, model: SGDRegressor, X: np.ndarray) -> np.ndarray:
        return self._unscale_target(model.predict(X))

    def _score(self, model: SGDRegressor, val: RowChunks) -> dict[str, float]:
        sse, n, parts = 0.0, 0, []
        for Xc, yc in val:
            pred = self._predict_scaled(model, self.scaler_.transform(Xc))
            sse += float(np.sum((pred - yc) ** 2))
            n += yc.size
            parts.append((yc, pred))
        return {"val_rmse": float(np.sqrt(sse / n)), **self._selection_score("regression", parts)}

    def _key(self, scores: dict[str, float]) -> tuple[float, ...]:
        m = self.selection_metric
        return (*((selection_key(m, scores[f"val_{m}"]),) if m else ()), scores["val_rmse"])

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets, shape (n,), float64; X numpy or dask."""
        check_is_fitted(self, "estimator_")
        return stream_outputs(self, X, lambda Xt: self._predict_scaled(self.estimator_, Xt)).astype(np.float64)
