"""Gradient-boosted tree heads (LightGBM) with early stopping on the validation split.

Training uses lightgbm's scikit-learn API; the fitted head keeps the native
``lightgbm.Booster`` (``booster_``) and predicts with it at the best iteration, so a
head reloaded from the native text model file behaves exactly like the fitted one.

Trees are invariant to feature scaling: these heads fit no scaler (``scaler_ = None``
is kept for uniformity with the other heads) unless ``pca_components`` is set, in
which case a StandardScaler and a PCA are fitted on the training rows and the trees
are grown on the principal components.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from .base import ClassifierHead, HeadBase, RegressorHead, params_dataclass
from .class_weight import class_weights, row_weights
from .metrics import LOWER_IS_BETTER, metric_value
from .param_types import AtLeast, Interval, NonNegative, Positive, check_declared
from .preprocessing import apply_preprocess, fit_preprocess
from .splits import Split
from .validation import check_features, require_two_classes, resolve_classes

__all__ = ["AUTO_COLUMNS", "LightGBMBase", "LightGBMHead", "LightGBMRegressorHead"]

log = logging.getLogger(__name__)

AUTO_COLUMNS = 200
"""Columns per tree of ``colsample_bytree=None``: the fraction min(1, max(0.1, 200 / D))."""



def _has_eval_xy(lightgbm: Any) -> bool:
    """Whether ``LGBMModel.fit`` takes ``eval_X``/``eval_y`` (lightgbm 4.7 deprecates ``eval_set``)."""
    return "eval_X" in inspect.signature(lightgbm.LGBMModel.fit).parameters


@params_dataclass
class LightGBMBase(HeadBase):
    """Shared parameters (documented in :class:`LightGBMHead`), fitting and prediction of the LightGBM heads."""

    n_estimators: Annotated[int, AtLeast(1)] = 300
    learning_rate: Annotated[float, Positive()] = 0.1
    num_leaves: Annotated[int, AtLeast(2)] = 15
    min_child_samples: Annotated[int, AtLeast(1)] = 10
    colsample_bytree: Annotated[float, Interval(0, 1, high_closed=True)] | None = None
    subsample: Annotated[float, Interval(0, 1, high_closed=True)] = 1.0
    reg_lambda: Annotated[float, NonNegative()] = 0.0
    max_bin: Annotated[int, AtLeast(2)] = 63
    early_stopping_rounds: Annotated[int, AtLeast(1)] | None = 20
    validation_fraction: Annotated[float, Interval(0, 1)] = 0.2
    pca_components: Annotated[int, AtLeast(1)] | Annotated[float, Interval(0, 1)] | None = None
    random_state: Annotated[int, AtLeast(0)] | None = 0
    n_jobs: int = 2

    def _colsample(self, n_features: int) -> float:
        """``colsample_bytree``, or for None about ``AUTO_COLUMNS`` columns per tree (10 % .. 100 %)."""
        if self.colsample_bytree is not None:
            return self.colsample_bytree
        return float(min(1.0, max(0.1, AUTO_COLUMNS / max(n_features, 1))))

    def _lgbm_params(self, n_features: int) -> dict[str, Any]:
        check_declared(self)  # the rules in the fields' annotations
        seed = 0 if self.random_state is None else int(self.random_state)
        return {
            "n_estimators": self.n_estimators,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_child_samples": self.min_child_samples,
            "colsample_bytree": self._colsample(n_features),
            "subsample": self.subsample,
            # bagging is only active with a positive frequency
            "subsample_freq": 1 if self.subsample < 1.0 else 0,
            "reg_lambda": self.reg_lambda,
            "max_bin": self.max_bin,
            "random_state": seed,
            "n_jobs": self.n_jobs,
            "deterministic": True,
            "force_col_wise": True,  # many dense features: ~1.7x faster than row-wise here
            "verbosity": -1,
        }

    def _fit_booster(self, split: Split, eval_rows: np.ndarray | None = None,
                     seen: np.ndarray | None = None, weights: np.ndarray | None = None) -> None:
        """Train with early stopping on the selection rows; set ``booster_`` and friends.

        ``seen`` (classifiers): the sorted classes of the fit rows; labels are passed to LightGBM as
        their index into it, because LightGBM 4.7 label-encodes ``eval_set`` but not ``eval_X``/``eval_y``.
        ``weights`` (classifiers, (K,)): class weights of the training rows and of the early-stopping rows.
        """
        params = self._lgbm_params(split.X_fit.shape[1])  # validates every parameter first
        X_sel, y_sel, y_fit = split.X_sel, split.y_sel, split.y_fit
        if eval_rows is not None:
            X_sel, y_sel = X_sel[eval_rows], y_sel[eval_rows]
        fit_weight, sel_weight = row_weights(weights, y_fit), row_weights(weights, y_sel)
        if seen is not None:
            y_fit, y_sel = np.searchsorted(seen, y_fit), np.searchsorted(seen, y_sel)
        X_fit = split.X_fit
        self.scaler_, self.pca_ = None, None
        if self.pca_components is not None:
            self.scaler_, self.pca_, X_fit = fit_preprocess(X_fit, self.pca_components, self.random_state)
            X_sel = apply_preprocess(X_sel, self.scaler_, self.pca_)
            params["colsample_bytree"] = self._colsample(X_fit.shape[1])
        import lightgbm  # on first fit: building or checking a head does not load it

        model_cls = lightgbm.LGBMClassifier if self._classification else lightgbm.LGBMRegressor
        model = model_cls(**params)
        callbacks = []
        if self.early_stopping_rounds:
            callbacks.append(lightgbm.early_stopping(self.early_stopping_rounds, verbose=False))
        if _has_eval_xy(lightgbm):
            eval_kwargs: dict[str, Any] = {"eval_X": (X_sel,), "eval_y": (y_sel,)}
        else:  # lightgbm < 4.7
            eval_kwargs = {"eval_set": [(X_sel, y_sel)]}
        if sel_weight is not None:  # LightGBM's own class_weight leaves the eval rows unweighted
            eval_kwargs["eval_sample_weight"] = [sel_weight]
        if self.selection_metric is not None:  # the only metric early stopping watches
            model.set_params(metric="None")
            eval_kwargs["eval_metric"] = self._eval_metric(None if seen is None else seen.size)
        model.fit(X_fit, y_fit, sample_weight=fit_weight, callbacks=callbacks, **eval_kwargs)
        booster = model.booster_
        best = int(booster.best_iteration) if booster.best_iteration > 0 else booster.current_iteration()
        self.booster_ = booster
        self.best_iteration_ = best
        self.best_params_ = {"n_estimators": best}
        self.n_features_in_ = int(split.X_train.shape[1])
        log.info(
            "%s: best iteration %d of %d (early stopping %s)",
            type(self).__name__, best, self.n_estimators, self.early_stopping_rounds,
        )

    def _eval_metric(self, n_seen: int | None) -> Callable[[np.ndarray, np.ndarray], tuple[str, float, bool]]:
        """LightGBM's custom eval metric of ``selection_metric`` (``n_seen``: classes of the fit rows, or None)."""
        name, task = self.selection_metric, "regression" if n_seen is None else "classification"

        def evaluate(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[str, float, bool]:
            if n_seen is not None and y_pred.ndim == 1:  # binary objective: P(second seen class)
                y_pred = np.column_stack([1.0 - y_pred, y_pred])
            return name, metric_value(task, name, y_true, y_pred, n_seen), name not in LOWER_IS_BETTER

        return evaluate

    def _raw_predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "booster_")
        X = apply_preprocess(check_features(X, self), self.scaler_, self.pca_)
        return np.asarray(self.booster_.predict(X, num_iteration=self.best_iteration_), dtype=np.float64)


@params_dataclass
class LightGBMHead(ClassifierHead, LightGBMBase):
    """LightGBM classifier, early-stopped on the validation split.

    Parameters
    ----------
    n_estimators : int
        Maximum number of boosting rounds (a cost cap when early stopping does not
        trigger).
    learning_rate, num_leaves, min_child_samples, colsample_bytree, subsample, reg_lambda, max_bin
        LightGBM parameters of the same names (``subsample < 1`` turns bagging on
        with ``subsample_freq=1``). Histograms are built column-wise.

        ``colsample_bytree=None`` samples about 200 columns per tree
        (``min(1, max(0.1, 200 / D))``: all of 32 features, ~10 % of 2048), so the
        cost of a round stays bounded on wide CNN features. Defaults are sized for
        those on 2 cores: at 14k x 2048 a round costs ~0.12 CPU s with 63 bins, 15
        leaves and ~10 % of the columns, against ~1.7 s with 255 bins, 31 leaves and
        50 % (benchmarks/bench_heads.py).
    early_stopping_rounds : int or None
        Stop after this many rounds without improvement of the validation
        multi-logloss; None trains all ``n_estimators`` rounds.
    class_weight : {None, "balanced"}
        ``"balanced"``: each training row weighs ``n_samples / (n_classes * count)`` of
        its class over the training rows (passed as ``sample_weight``, as LightGBM's
        own ``class_weight="balanced"`` does), and the validation rows of early
        stopping weigh the same per class (``eval_sample_weight``; LightGBM's own
        ``class_weight`` would leave the early-stopping loss unweighted), as the MLP's
        validation loss does.
    selection_metric : {None, "accuracy", "balanced_accuracy", "macro_f1", "log_loss"}
        Early-stop on this metric of the validation rows instead of the
        multi-logloss (a custom eval metric; the best iteration is its best).
    n_jobs : int
        LightGBM threads. On a CPU shared with other jobs, OpenMP threads that
        wait on descheduled peers can make 2 threads many times slower than 1;
        use 1 there (or ``OMP_WAIT_POLICY=PASSIVE``).
    validation_fraction : float
        Stratified hold-out of the training rows used for early stopping when no
        ``X_val`` is given (the model is not refit on the full training rows).
    pca_components : None, int or float in (0, 1)
        Grow the trees on this many principal components (int) or this fraction of
        explained variance (float) of the standardised features; scaler and PCA are
        fitted on the training rows only. None: raw features, no scaler.
    n_classes : int or None
        Number of classes K, or None for the labels seen (see :class:`~featcache.heads.base.ClassifierHead`).
    random_state : int or None
        Seed of LightGBM and of the hold-out split (None means 0 for LightGBM).

    Attributes
    ----------
    booster_ : lightgbm.Booster
    best_iteration_ : int
    best_params_ : dict
        ``{"n_estimators": best_iteration_}``.
    classes_ : ndarray of shape (K,)
    train_classes_ : ndarray of shape (n_seen,)
        Indices into ``classes_`` of the classes present in the training rows (one
        booster output per class).
    class_weight_ : ndarray of shape (K,) or None
        The class weights over the training rows (None: unweighted).
    n_features_in_ : int
    scaler_ : StandardScaler or None
        Only with ``pca_components``.
    pca_ : PCA or None
        Only with ``pca_components``.
    fit_seconds_ : float

    Notes
    -----
    Validation rows whose class never occurs in the training rows cannot be scored by
    LightGBM; they are left out of the early-stopping set (with a warning).
    """

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Boost on train, early-stopping on the val rows of classes seen in training."""
        check_declared(self)  # class_weight's spelling before it is used
        split = self._split(X, y, X_val, y_val)
        classes = resolve_classes(self.n_classes, split.y_train, split.y_val)
        seen = require_two_classes(split.y_fit)
        self.class_weight_ = class_weights(self.class_weight, split.y_fit, classes.size)
        known = np.isin(split.y_sel, seen)
        if not known.any():
            raise ValueError(
                f"no validation row has a class seen in training (train classes {seen.tolist()}). "
                "Hint: check the split assignment."
            )
        if not known.all():
            log.warning(
                "LightGBMHead: %d validation rows of classes %s unseen in training are left out "
                "of early stopping", int((~known).sum()), np.unique(split.y_sel[~known]).tolist(),
            )
        self._fit_booster(split, None if known.all() else np.flatnonzero(known), seen, self.class_weight_)
        self.classes_ = classes
        self.train_classes_ = seen

    def _seen_proba(self, X: Any) -> np.ndarray:
        raw = self._raw_predict(X)
        if raw.ndim == 1:  # binary objective: P(second seen class)
            raw = np.column_stack([1.0 - raw, raw])
        return raw


@params_dataclass
class LightGBMRegressorHead(RegressorHead, LightGBMBase):
    """LightGBM regressor (L2), early-stopped on the validation split.

    Parameters are those of :class:`LightGBMHead` without ``n_classes``; the
    hold-out (when no ``X_val`` is given) is a plain random one.

    Attributes
    ----------
    booster_, best_iteration_, best_params_, n_features_in_, scaler_, pca_, fit_seconds_
        As in :class:`LightGBMHead`.
    """

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Boost on train, early-stopping on val RMSE (L2)."""
        self._fit_booster(self._split(X, y, X_val, y_val))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets, shape (n,), float64."""
        return self._raw_predict(X)
