"""Linear heads: multinomial L2 logistic regression and its regression twin, ridge.

The regularisation strength is chosen on the validation split with a coarse-to-fine
log grid (CLIP_benchmark linear-probe style): evaluate a coarse log grid, then a finer
log grid between the coarse neighbours of the best value, then refit with the best
value on train (or train + val when ``refit_on_trainval``).

Without a validation split the selection uses a hold-out of the training rows, or,
with ``cv_folds=k``, the mean score over k shuffled (stratified, for classification)
folds of the training rows. Features are standardised and optionally reduced by PCA
(``pca_components``); both are fitted on the rows each model is trained on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.utils.validation import check_is_fitted

from featcache.util.compute import thread_limit

from .base import ClassifierHead, HeadBase, RegressorHead, params_dataclass
from .class_weight import class_weights
from .metrics import log_loss_score, metric_value, selection_key
from .param_types import AtLeast, Interval, MinLength, Positive, check_declared
from .preprocessing import apply_preprocess
from .splits import SelectionSets, Split, average_rows
from .validation import (
    check_features,
    expand_columns,
    require_two_classes,
    resolve_classes,
    sorted_grid,
)

__all__ = ["DEFAULT_ALPHAS", "DEFAULT_CS", "LinearSearchBase", "LogisticRegressionHead", "RidgeHead", "log_grid_search"]

log = logging.getLogger(__name__)

DEFAULT_CS: np.ndarray = np.logspace(-4, 4, 9)
"""Coarse grid of inverse regularisation strengths for :class:`LogisticRegressionHead`."""

DEFAULT_ALPHAS: np.ndarray = np.logspace(-3, 5, 9)
"""Coarse grid of regularisation strengths for :class:`RidgeHead`."""


def log_grid_search(
    grid: np.ndarray,
    evaluate: Callable[[np.ndarray, str], list[dict[str, Any]]],
    sort_key: Callable[[dict[str, Any]], tuple],
    name: str,
    refine: bool,
    refine_points: int,
) -> tuple[float, list[dict[str, Any]]]:
    """Coarse-to-fine search over a positive log-spaced grid.

    Parameters
    ----------
    grid : ndarray of shape (n_grid,)
        Coarse grid, sorted ascending.
    evaluate : callable
        ``evaluate(values, stage)`` fits one model per value (ascending) and returns
        one result dict per value, each holding ``name`` and the validation scores.
    sort_key : callable
        Maps a result dict to a tuple; the smallest tuple wins.
    name : str
        The hyper-parameter's key in the result dicts (``"C"`` or ``"alpha"``).
    refine : bool
        Whether to evaluate ``refine_points`` log-spaced values between the coarse
        neighbours of the best coarse value (values already evaluated are skipped).
    refine_points : int

    Returns
    -------
    best : float
        Best value over every evaluated point.
    results : list of dict
        Every evaluation, coarse first.
    """
    results = evaluate(grid, "coarse")
    best_coarse = min(results, key=sort_key)[name]
    if refine and grid.size > 1:
        i = int(np.argmin(np.abs(grid - best_coarse)))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        fine = np.logspace(np.log10(lo), np.log10(hi), refine_points)
        done = np.array([r[name] for r in results])
        fine = np.array([v for v in fine if not np.any(np.isclose(v, done, rtol=1e-9, atol=0))])
        if fine.size:
            results = results + evaluate(fine, "refine")
    best = float(min(results, key=sort_key)[name])
    return best, results


def _final_rows(split: Split, refit_on_trainval: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the final refit: train, or train + val when requested and available."""
    if refit_on_trainval and split.X_val is not None:
        return np.concatenate([split.X_train, split.X_val]), np.concatenate([split.y_train, split.y_val])
    return split.X_train, split.y_train


#: ``score_path(values, X_fit, y_fit, X_sel, y_sel)``: one result dict per grid value (ascending)
#: on one selection set (validation split, hold-out or fold).
ScorePath = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], list[dict[str, Any]]]


@params_dataclass
class LinearSearchBase(HeadBase):
    """Shared parameters (documented in :class:`LogisticRegressionHead`) and search-then-refit of the linear heads."""

    refine: bool = True
    refine_points: Annotated[int, AtLeast(2)] = 3
    refit_on_trainval: bool = False
    validation_fraction: Annotated[float, Interval(0, 1)] = 0.2
    cv_folds: Annotated[int, AtLeast(2)] | None = None
    pca_components: Annotated[int, AtLeast(1)] | Annotated[float, Interval(0, 1)] | None = None
    random_state: Annotated[int, AtLeast(0)] | None = 0

    def _search_and_refit(
        self, name: str, grid: np.ndarray, split: Split, sets: SelectionSets, score_path: ScorePath,
        sort_key: Callable[[dict[str, Any]], tuple], refit: Callable[[float, np.ndarray, np.ndarray], Any],
    ) -> float:
        """Choose ``name`` by :func:`log_grid_search` over ``sets``, then refit on the final rows.

        ``refit(best, X_final, y_final)`` returns the fitted final model, given the
        final rows (n_final, D') preprocessed like the selection sets. Sets
        ``scaler_``, ``pca_``, ``estimator_``, ``n_features_in_``, ``best_params_``
        and ``search_results_``; returns the chosen value.
        """
        def evaluate(values: np.ndarray, stage: str) -> list[dict[str, Any]]:
            per_set = [score_path(values, *s[:4]) for s in sets]
            return average_rows(name, values, stage, per_set, folds=split.folds is not None)

        best, results = log_grid_search(grid, evaluate, sort_key, name, bool(self.refine), self.refine_points)
        X_final, y_final = _final_rows(split, self.refit_on_trainval)
        self.scaler_, self.pca_, X_final = sets.final(X_final)
        self.estimator_ = refit(best, X_final, y_final)
        self.n_features_in_ = int(split.X_train.shape[1])
        self.best_params_ = {name: best}
        self.search_results_ = results
        return best


@params_dataclass
class LogisticRegressionHead(ClassifierHead, LinearSearchBase):
    """Multinomial L2 logistic regression with C chosen on the validation split.

    Parameters
    ----------
    Cs : sequence of float or None
        Coarse grid of inverse regularisation strengths; None means
        ``np.logspace(-4, 4, 9)``.
    refine : bool
        Evaluate a finer log grid between the neighbours of the best coarse C.
    refine_points : int
        Number of points of the finer grid (end points included, duplicates skipped).
        The default 3 adds the geometric midpoints next to the best coarse C (one or
        two fits); each fit is a few passes over the training matrix, which dominate
        the cost on wide features (benchmarks/bench_heads.py).
    max_iter, tol : int, float
        lbfgs stopping criteria.
    refit_on_trainval : bool
        Refit the final model (and its scaler) on train + val instead of train.
    validation_fraction : float
        Stratified hold-out of the training rows used for selection when no
        ``X_val`` is given; the final model is then refit on the full training rows.
    cv_folds : int >= 2 or None
        When no ``X_val`` is given, choose C by the mean score over ``cv_folds``
        shuffled stratified folds of the training rows instead of one hold-out
        (each fold fits its own scaler/PCA); ignored when ``X_val`` is given.
    pca_components : None, int or float in (0, 1)
        Reduce the standardised features by PCA to this many components (int) or to
        this fraction of explained variance (float); fitted on training rows only.
    n_classes : int or None
        Number of classes K, or None for the labels seen (see :class:`~featcache.heads.base.ClassifierHead`).
    class_weight : {None, "balanced"}
        scikit-learn's ``LogisticRegression(class_weight=...)``: ``"balanced"`` weighs
        each class by ``n_samples / (n_classes * count)`` over the rows of each fit
        (the selection fits and the final refit).
    selection_metric : {None, "accuracy", "balanced_accuracy", "macro_f1", "log_loss"}
        Choose C on this validation metric (see Notes); None: accuracy, then log-loss.
    random_state : int or None
        Seed of the hold-out split, the folds and the PCA solver.
    n_jobs : int or None
        BLAS/OpenMP threads during fit (None or -1: no limit).

    Attributes
    ----------
    scaler_ : StandardScaler
        Fitted on the final training rows only.
    pca_ : PCA or None
        Fitted on the scaled final training rows; None without ``pca_components``.
    estimator_ : LogisticRegression
        Final model; it may know fewer than K classes (``train_classes_``).
    classes_ : ndarray of shape (K,)
    train_classes_ : ndarray of shape (n_seen,)
        Indices into ``classes_`` of the classes present in the final training rows.
    class_weight_ : ndarray of shape (K,) or None
        The class weights of the final refit (None: unweighted).
    n_features_in_ : int
    n_iter_ : int
        lbfgs iterations of the final refit.
    best_params_ : dict
        ``{"C": float}``.
    search_results_ : list of dict
        One dict per evaluated C: ``C``, ``stage`` (coarse/refine), ``val_accuracy``,
        ``val_log_loss``, ``n_iter``, ``converged`` (means over folds and
        ``cv_folds`` with k-fold selection).
    fit_seconds_ : float

    Notes
    -----
    Selection: highest validation accuracy, ties broken by lower validation
    log-loss, then by smaller C; with ``selection_metric``, the best validation
    value of that metric (``val_<metric>`` in ``search_results_``), ties broken by
    lower log-loss (higher accuracy for ``log_loss``), then by smaller C. The grid
    is walked in ascending C with warm starts; the final refit starts cold.
    """

    Cs: Annotated[Sequence[Annotated[float, Positive()]], MinLength(1)] | np.ndarray | None = None
    max_iter: Annotated[int, AtLeast(1)] = 1000
    tol: Annotated[float, Positive()] = 1e-4
    n_jobs: int | None = 1

    def make_model(self, C: float, warm_start: bool) -> LogisticRegression:
        """An unfitted lbfgs ``LogisticRegression`` with this head's ``max_iter``, ``tol`` and ``class_weight``.

        Used for the C search (warm-started along the grid), the final refit,
        and to restore a saved head (:mod:`featcache.heads.persistence`).

        Parameters
        ----------
        C : float
            Inverse L2 regularisation strength.
        warm_start : bool
            Start each ``fit`` from the previous solution.

        Returns
        -------
        LogisticRegression
        """
        return LogisticRegression(
            C=float(C), solver="lbfgs", max_iter=self.max_iter, tol=self.tol, warm_start=warm_start,
            class_weight=self.class_weight,
        )

    def _fit_quiet(self, model: LogisticRegression, X: np.ndarray, y: np.ndarray) -> bool:
        """Fit ``model``; return False (and log) when lbfgs hit ``max_iter``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X, y)
        converged = int(np.max(model.n_iter_)) < self.max_iter
        if not converged:
            log.info("lbfgs did not converge for C=%g within max_iter=%d", model.C, self.max_iter)
        return converged

    def _score_path(
        self, values: np.ndarray, X_fit: np.ndarray, y_fit: np.ndarray, X_sel: np.ndarray,
        y_sel: np.ndarray, n_classes: int,
    ) -> list[dict[str, Any]]:
        """Scores on one selection set of each C in ``values`` (ascending, warm-started)."""
        require_two_classes(y_fit)
        model = self.make_model(values[0], warm_start=True)
        rows = []
        for C in values:
            model.set_params(C=float(C))
            converged = self._fit_quiet(model, X_fit, y_fit)
            if int(np.max(model.n_iter_)) == 0:
                # The warm start already met ``tol`` (lbfgs' gradient is scaled by 1/n), so this C was
                # never fitted and would score like the previous one: fit it from scratch.
                model = self.make_model(C, warm_start=False)
                converged = self._fit_quiet(model, X_fit, y_fit)
                model.set_params(warm_start=True)
            proba = expand_columns(model.predict_proba(X_sel), model.classes_, n_classes)
            rows.append({
                "val_accuracy": float(np.mean(proba.argmax(axis=1) == y_sel)),
                "val_log_loss": log_loss_score(y_sel, proba),
                "n_iter": int(np.max(model.n_iter_)),
                "converged": converged,
            })
            if self.selection_metric is not None:
                rows[-1][f"val_{self.selection_metric}"] = metric_value(
                    "classification", self.selection_metric, y_sel, proba, n_classes)
        return rows

    def _sort_key(self, r: dict[str, Any]) -> tuple:
        """The C that minimises this wins (see Notes)."""
        m = self.selection_metric
        if m is None:
            return (-r["val_accuracy"], r["val_log_loss"], r["C"])
        return (selection_key(m, r[f"val_{m}"]), -r["val_accuracy"] if m == "log_loss" else r["val_log_loss"], r["C"])

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Choose C on the validation split (or hold-out, or k folds), then refit."""
        check_declared(self)  # the rules in the fields' annotations (Cs, pca_components...)
        grid = sorted_grid(DEFAULT_CS if self.Cs is None else self.Cs)
        split = self._split(X, y, X_val, y_val, self.cv_folds)
        classes = resolve_classes(self.n_classes, split.y_train, split.y_val)
        require_two_classes(split.y_train if split.folds else split.y_fit)

        def refit(C: float, X_final: np.ndarray, y_final: np.ndarray) -> LogisticRegression:
            self.train_classes_ = require_two_classes(y_final)
            self.class_weight_ = class_weights(self.class_weight, y_final, classes.size)
            model = self.make_model(C, warm_start=False)
            self._fit_quiet(model, X_final, y_final)
            return model

        with thread_limit(self.n_jobs):
            sets = SelectionSets(split, self.pca_components, self.random_state, dtype=np.float64)
            self._search_and_refit(
                "C", grid, split, sets, lambda values, *rows: self._score_path(values, *rows, classes.size),
                self._sort_key, refit,
            )
        self.n_iter_ = int(np.max(self.estimator_.n_iter_))
        self.classes_ = classes

    def _seen_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        X = check_features(X, self)
        proba = self.estimator_.predict_proba(apply_preprocess(X, self.scaler_, self.pca_))
        return proba.astype(np.float64, copy=False)


@params_dataclass
class RidgeHead(RegressorHead, LinearSearchBase):
    """Ridge regression with alpha chosen on validation RMSE (coarse-to-fine log grid).

    Parameters
    ----------
    alphas : sequence of float or None
        Coarse grid; None means ``np.logspace(-3, 5, 9)``.
    refine, refine_points, refit_on_trainval, validation_fraction, random_state
        As in :class:`LogisticRegressionHead` (the hold-out is a plain random one).
    cv_folds : int >= 2 or None
        As in :class:`LogisticRegressionHead`, with plain shuffled k-fold (mean
        fold RMSE).
    selection_metric : {None, "rmse", "mae", "r2"}
        Choose alpha on this validation metric (``val_<metric>`` in ``search_results_``); None: RMSE.
    pca_components : None, int or float in (0, 1)
        As in :class:`LogisticRegressionHead`.

    Attributes
    ----------
    scaler_ : StandardScaler
    pca_ : PCA or None
    estimator_ : Ridge
    n_features_in_ : int
    best_params_ : dict
        ``{"alpha": float}``.
    search_results_ : list of dict
        ``alpha``, ``stage``, ``val_rmse`` per evaluated alpha (mean over folds,
        plus ``cv_folds``, with k-fold selection).
    fit_seconds_ : float

    Notes
    -----
    Selection: lowest validation RMSE, ties broken by the larger alpha; with
    ``selection_metric``, the best validation value of that metric first.
    """

    alphas: Annotated[Sequence[Annotated[float, Positive()]], MinLength(1)] | np.ndarray | None = None

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Choose alpha on the validation split (or hold-out, or k folds), then refit."""
        check_declared(self)
        grid = sorted_grid(DEFAULT_ALPHAS if self.alphas is None else self.alphas)
        split = self._split(X, y, X_val, y_val, self.cv_folds)
        sets = SelectionSets(split, self.pca_components, self.random_state)

        def score_path(values: np.ndarray, X_fit: np.ndarray, y_fit: np.ndarray,
                       X_sel: np.ndarray, y_sel: np.ndarray) -> list[dict[str, Any]]:
            preds = (Ridge(alpha=float(alpha)).fit(X_fit, y_fit).predict(X_sel) for alpha in values)
            return [{"val_rmse": float(np.sqrt(np.mean((pred - y_sel) ** 2))),
                     **({f"val_{m}": metric_value("regression", m, y_sel, pred)} if m else {})} for pred in preds]

        m = self.selection_metric
        self._search_and_refit(
            "alpha", grid, split, sets, score_path,
            lambda r: (*((selection_key(m, r[f"val_{m}"]),) if m else ()), r["val_rmse"], -r["alpha"]),
            lambda alpha, X_final, y_final: Ridge(alpha=alpha).fit(X_final, y_final),
        )

    def predict(self, X: Any) -> np.ndarray:
        """(n, D) features -> predicted targets, shape (n,), float64."""
        check_is_fitted(self, "estimator_")
        X = check_features(X, self)
        X = apply_preprocess(X, self.scaler_, self.pca_)
        return self.estimator_.predict(X).astype(np.float64, copy=False)
