"""Which rows select and which rows fit: the validation split, a hold-out, or k folds.

:func:`prepare_fit` validates one ``fit`` call's data into a :class:`Split`;
:class:`SelectionSets` preprocesses each selection set (validation split,
hold-out, or each cross-validation fold) with a scaler (and PCA) fitted on its
own fitting rows; :func:`average_rows` averages a grid's scores over the sets.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler

from featcache.errors import ParamError
from featcache.util.checks import check_int

from .preprocessing import apply_preprocess, fit_preprocess
from .validation import PARAM_HINT, check_fraction, validate_xy

__all__ = [
    "Split",
    "holdout_indices",
    "kfold_indices",
    "prepare_fit",
    "SelectionSet",
    "SelectionSets",
    "average_rows",
]

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Validated data for one ``fit`` call.

    Attributes
    ----------
    X_fit, y_fit : ndarray of shape (n_fit, D) and (n_fit,)
        Rows the model is trained on during selection (train, minus the hold-out
        when no validation split was given).
    X_sel, y_sel : ndarray of shape (n_sel, D) and (n_sel,)
        Rows used for model selection only (the validation split or the hold-out).
    X_train, y_train : ndarray of shape (n_train, D) and (n_train,)
        The full training split as passed to ``fit``.
    X_val, y_val : ndarray or None
        The validation split as passed to ``fit`` (validated), or None.
    held_out : bool
        True when ``X_sel`` was carved out of the training split.
    folds : list of (ndarray, ndarray) or None
        ``(fit_idx, sel_idx)`` row indices into ``X_train`` per cross-validation
        fold (k-fold selection without a validation split); ``X_fit``/``X_sel``
        are then the full training rows and an empty selection set.
    """

    X_fit: np.ndarray
    y_fit: np.ndarray
    X_sel: np.ndarray
    y_sel: np.ndarray
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray | None
    y_val: np.ndarray | None
    held_out: bool
    folds: list[tuple[np.ndarray, np.ndarray]] | None = None


def holdout_indices(
    y: np.ndarray, fraction: float, random_state: int | None, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(y))`` into (fit, hold-out) indices, stratified when possible.

    Returns
    -------
    fit_idx, sel_idx : ndarray of shape (n_fit,), (n_sel,)
        Sorted row indices.
    """
    idx = np.arange(y.shape[0])
    strat = y if stratify else None
    try:
        fit_idx, sel_idx = train_test_split(
            idx, test_size=fraction, stratify=strat, random_state=random_state
        )
    except ValueError as err:
        if strat is None:
            raise ParamError(
                f"cannot hold out validation_fraction={fraction} of {y.shape[0]} rows: {err}. "
                "Hint: pass X_val/y_val explicitly."
            ) from err
        log.warning("stratified hold-out impossible (%s); using a random hold-out", err)
        fit_idx, sel_idx = train_test_split(idx, test_size=fraction, random_state=random_state)
    return np.sort(fit_idx), np.sort(sel_idx)


def kfold_indices(
    y: np.ndarray, n_folds: int, random_state: int | None, stratify: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled (stratified when ``stratify``) k-fold ``(fit_idx, sel_idx)`` pairs.

    Raises
    ------
    ParamError
        (a ValueError) If there are fewer rows (or, stratified, fewer rows of every class) than folds.
    """
    n = y.shape[0]
    if n_folds > n:
        raise ParamError(
            f"cv_folds={n_folds} is larger than the {n} training rows; allowed: 2..{n}. "
            "Hint: lower cv_folds or pass X_val/y_val."
        )
    splitter = (StratifiedKFold if stratify else KFold)(n_splits=n_folds, shuffle=True, random_state=random_state)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class" warning
            return [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros((n, 1)), y)]
    except ValueError as err:
        counts = np.bincount(y.astype(np.int64)) if stratify else None
        raise ParamError(
            f"cannot build cv_folds={n_folds} stratified folds: {err} (class counts "
            f"{counts.tolist() if counts is not None else '-'}). Hint: lower cv_folds or pass X_val/y_val."
        ) from err


def prepare_fit(
    X: Any,
    y: Any,
    X_val: Any,
    y_val: Any,
    *,
    classification: bool,
    validation_fraction: float,
    random_state: int | None,
    cv_folds: int | None = None,
) -> Split:
    """Validate train/val inputs and build the selection split.

    When ``X_val`` is None, a (stratified, for classification) ``validation_fraction``
    of the training rows is held out with ``random_state``; with ``cv_folds`` set,
    ``cv_folds`` shuffled (stratified, for classification) folds are built instead.

    Parameters
    ----------
    X : array-like of shape (n_train, D)
    y : array-like of shape (n_train,)
    X_val : array-like of shape (n_val, D) or None
    y_val : array-like of shape (n_val,) or None
        Given together, or both None.
    classification : bool
        True: ``y``/``y_val`` are non-negative integer class indices, and the
        hold-out and folds are stratified; False: finite regression targets.
    validation_fraction : float in (0, 1)
        Share of the training rows held out for selection when ``X_val`` is
        None and ``cv_folds`` is None; ignored otherwise.
    random_state : int or None
        Seed of the hold-out split or the fold shuffle.
    cv_folds : int >= 2 or None
        Ignored when ``X_val`` is given.

    Returns
    -------
    Split

    Raises
    ------
    ValueError
        For invalid inputs, only one of ``X_val``/``y_val``, or a feature
        count of ``X_val`` that differs from ``X``'s.
    ParamError
        (a ValueError) For an invalid ``cv_folds`` or ``validation_fraction``,
        or a split that leaves fewer than 2 fit / 1 hold-out rows.
    """
    check_int("cv_folds", cv_folds, 2, allow_none=True, hint=PARAM_HINT)
    X, y = validate_xy(X, y, classification, "X")
    if (X_val is None) != (y_val is None):
        raise ValueError(
            "X_val and y_val must be given together; got "
            f"X_val={'None' if X_val is None else 'array'}, y_val={'None' if y_val is None else 'array'}."
        )
    if X_val is not None:
        X_val, y_val = validate_xy(X_val, y_val, classification, "X_val")
        if X_val.shape[1] != X.shape[1]:
            raise ValueError(
                f"X_val has {X_val.shape[1]} features but X has {X.shape[1]}. "
                "Hint: train and val must come from the same layer."
            )
        return Split(X, y, X_val, y_val, X, y, X_val, y_val, held_out=False)
    if cv_folds is not None:
        folds = kfold_indices(y, cv_folds, random_state, stratify=classification)
        return Split(X, y, X[:0], y[:0], X, y, None, None, held_out=False, folds=folds)
    check_fraction("validation_fraction", validation_fraction)
    fit_idx, sel_idx = holdout_indices(y, validation_fraction, random_state, classification)
    if fit_idx.size < 2 or sel_idx.size < 1:
        raise ParamError(
            f"validation_fraction={validation_fraction} of {y.shape[0]} rows leaves "
            f"{fit_idx.size} fit / {sel_idx.size} hold-out rows; need >= 2 / >= 1. "
            "Hint: pass X_val/y_val or use more training rows."
        )
    return Split(X[fit_idx], y[fit_idx], X[sel_idx], y[sel_idx], X, y, None, None, held_out=True)


class SelectionSet(NamedTuple):
    """One preprocessed selection set; ``scaler``/``pca`` were fitted on its fit rows."""

    X_fit: np.ndarray
    y_fit: np.ndarray
    X_sel: np.ndarray
    y_sel: np.ndarray
    scaler: StandardScaler
    pca: PCA | None


class SelectionSets:
    """Preprocessed selection sets of a :class:`~featcache.heads.splits.Split`.

    Iterating yields one :class:`SelectionSet` (train, or train minus the hold-out,
    against the validation or hold-out rows; built once and cached) or one per
    cross-validation fold (rebuilt on every iteration, so the k preprocessed folds
    are never all in memory). Each set's scaler and PCA are fitted on its fit rows.

    Parameters
    ----------
    split : Split
    pca_components : None, int or float
    random_state : int or None
    dtype : numpy dtype or None
        Cast of the preprocessed features (float64 for lbfgs: the solver would
        otherwise copy float32 input on every fit); None keeps the scaler's dtype.
    """

    def __init__(self, split: Split, pca_components: int | float | None, random_state: int | None,
                 dtype: Any = None) -> None:
        self.split, self.pca_components, self.random_state, self.dtype = split, pca_components, random_state, dtype
        self._cached = None if split.folds is not None else [self._build(split.X_fit, split.y_fit, split.X_sel,
                                                                          split.y_sel)]

    def _build(self, X_fit: np.ndarray, y_fit: np.ndarray, X_sel: np.ndarray, y_sel: np.ndarray) -> SelectionSet:
        scaler, pca, X_fit_t = fit_preprocess(X_fit, self.pca_components, self.random_state)
        X_sel_t = apply_preprocess(X_sel, scaler, pca)
        if self.dtype is not None:
            X_fit_t, X_sel_t = X_fit_t.astype(self.dtype, copy=False), X_sel_t.astype(self.dtype, copy=False)
        return SelectionSet(X_fit_t, y_fit, X_sel_t, y_sel, scaler, pca)

    def __iter__(self) -> Iterator[SelectionSet]:
        if self._cached is not None:
            yield from self._cached
            return
        X, y = self.split.X_train, self.split.y_train
        for fit_idx, sel_idx in self.split.folds:
            yield self._build(X[fit_idx], y[fit_idx], X[sel_idx], y[sel_idx])

    def final(self, X_final: np.ndarray) -> tuple[StandardScaler, PCA | None, np.ndarray]:
        """Scaler, PCA and transformed rows for the final refit on ``X_final``.

        Reuses the cached set's preprocessing when ``X_final`` is its fit rows (a
        validation split was given), else fits anew on ``X_final`` only.
        """
        if self._cached is not None and X_final is self.split.X_fit:
            cached = self._cached[0]
            return cached.scaler, cached.pca, cached.X_fit
        scaler, pca, X_t = fit_preprocess(X_final, self.pca_components, self.random_state)
        return scaler, pca, (X_t if self.dtype is None else X_t.astype(self.dtype, copy=False))


def average_rows(
    name: str, values: np.ndarray, stage: str, per_set: list[list[dict[str, Any]]], folds: bool
) -> list[dict[str, Any]]:
    """One result row per value: the scores of each selection set, averaged over sets.

    ``n_iter`` is the maximum and ``converged`` the conjunction over sets; with
    ``folds`` a ``cv_folds`` entry records the number of folds.
    """
    rows = []
    for i, value in enumerate(values):
        scores = [per[i] for per in per_set]
        row: dict[str, Any] = {name: float(value), "stage": stage}
        for key in scores[0]:
            vals = [sc[key] for sc in scores]
            if key == "n_iter":
                row[key] = int(max(vals))
            elif key == "converged":
                row[key] = bool(all(vals))
            else:
                row[key] = float(np.mean(vals))
        if folds:
            row["cv_folds"] = len(per_set)
        rows.append(row)
    return rows
