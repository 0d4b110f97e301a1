"""Shared helpers for the heads: input validation, class bookkeeping, hold-out split.

Everything here is private to :mod:`featcache.heads`; the public estimators live in
:mod:`~featcache.heads.linear`, :mod:`~featcache.heads.boosting` and
:mod:`~featcache.heads.mlp`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
from sklearn.utils.validation import check_array, check_X_y, column_or_1d

__all__ = [
    "FLOAT_DTYPES",
    "Split",
    "as_float_list",
    "check_features",
    "check_fraction",
    "check_int",
    "check_positive",
    "expand_columns",
    "holdout_indices",
    "jsonable",
    "kfold_indices",
    "prepare_fit",
    "require_two_classes",
    "resolve_classes",
    "thread_limit",
]

log = logging.getLogger(__name__)

FLOAT_DTYPES = (np.float64, np.float32)


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


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(
            f"{name}={value!r} is invalid; allowed: an integer >= {minimum}{none}. "
            f"Hint: set {name} in the head's params."
        )


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real > 0 (>= 0 if ``allow_zero``)."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is invalid; allowed: a finite number {bound}.")


def check_fraction(name: str, value: Any, closed_right: bool = False) -> None:
    """Raise ValueError unless ``0 < value < 1`` (``<= 1`` if ``closed_right``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0
    ok = ok and (value <= 1 if closed_right else value < 1)
    if not ok:
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"{name}={value!r} is invalid; allowed: a number in {interval}.")


def check_features(X: Any, head: Any, name: str = "X") -> np.ndarray:
    """Validate a feature matrix at predict time.

    Parameters
    ----------
    X : array-like of shape (n, D)
    head : estimator
        The fitted head (its ``n_features_in_`` is the expected D).

    Returns
    -------
    ndarray of shape (n, D), float32 or float64
    """
    X = check_array(X, dtype=FLOAT_DTYPES, input_name=name)
    expected = head.n_features_in_
    if X.shape[1] != expected:
        raise ValueError(
            f"{name} has {X.shape[1]} features, but {type(head).__name__} is expecting {expected} "
            "features as input. Hint: use the same backbone layer (and pooling) for training and prediction."
        )
    return X


def _check_labels(y: np.ndarray, name: str) -> np.ndarray:
    """Check that ``y`` holds non-negative integer class indices; return int64."""
    if y.dtype.kind not in "iuf":
        raise ValueError(
            f"Unknown label type: {name} has dtype {y.dtype}; allowed: integer class indices 0..K-1. "
            "Hint: map class names to indices first (the store's /label column)."
        )
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError(
            f"Unknown label type: {name} holds non-integer values; allowed: integer class indices 0..K-1. "
            "Hint: use a regression head for continuous targets."
        )
    if y.size and y.min() < 0:
        raise ValueError(
            f"{name} contains the label {int(y.min())}; allowed: class indices >= 0. "
            "Hint: drop unlabelled rows (label -1) before fitting."
        )
    return y.astype(np.int64, copy=False)


def _validate_xy(X: Any, y: Any, classification: bool, name: str) -> tuple[np.ndarray, np.ndarray]:
    X, y = check_X_y(X, y, dtype=FLOAT_DTYPES, y_numeric=not classification)
    y = column_or_1d(y)
    if classification:
        y = _check_labels(y, "y" + name[1:])
    else:
        y = y.astype(np.float64, copy=False)
        if not np.all(np.isfinite(y)):
            raise ValueError(
                f"{'y' + name[1:]} holds non-finite targets; allowed: finite numbers. "
                "Hint: drop rows whose target is NaN."
            )
    return X, y


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
            raise ValueError(
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
    ValueError
        If there are fewer rows (or, stratified, fewer rows of every class) than folds.
    """
    n = y.shape[0]
    if n_folds > n:
        raise ValueError(
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
        raise ValueError(
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
    cv_folds : int >= 2 or None
        Ignored when ``X_val`` is given.
    """
    check_int("cv_folds", cv_folds, 2, allow_none=True)
    X, y = _validate_xy(X, y, classification, "X")
    if (X_val is None) != (y_val is None):
        raise ValueError(
            "X_val and y_val must be given together; got "
            f"X_val={'None' if X_val is None else 'array'}, y_val={'None' if y_val is None else 'array'}."
        )
    if X_val is not None:
        X_val, y_val = _validate_xy(X_val, y_val, classification, "X_val")
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
        raise ValueError(
            f"validation_fraction={validation_fraction} of {y.shape[0]} rows leaves "
            f"{fit_idx.size} fit / {sel_idx.size} hold-out rows; need >= 2 / >= 1. "
            "Hint: pass X_val/y_val or use more training rows."
        )
    return Split(X[fit_idx], y[fit_idx], X[sel_idx], y[sel_idx], X, y, None, None, held_out=True)


def resolve_classes(n_classes: int | None, *label_arrays: np.ndarray | None) -> np.ndarray:
    """Return ``classes_ = np.arange(K)``.

    K is ``n_classes`` when given, else ``max label + 1`` over the given label arrays.

    Raises
    ------
    ValueError
        If a label is >= ``n_classes``.
    """
    check_int("n_classes", n_classes, 2, allow_none=True)
    top = max((int(a.max()) for a in label_arrays if a is not None and a.size), default=-1)
    if n_classes is None:
        return np.arange(max(top + 1, 2))
    if top >= n_classes:
        raise ValueError(
            f"label {top} found but n_classes={n_classes}; allowed labels: 0..{n_classes - 1}. "
            "Hint: set n_classes to the number of classes in the dataset (or None to infer it)."
        )
    return np.arange(n_classes)


def require_two_classes(y: np.ndarray, what: str = "training rows") -> np.ndarray:
    """Return the sorted distinct labels of ``y``; raise if fewer than two."""
    seen = np.unique(y)
    if seen.size < 2:
        raise ValueError(
            f"the {what} contain only the classes {seen.tolist()}; a classifier needs >= 2. "
            "Hint: check the split assignment in the manifest."
        )
    return seen


def expand_columns(proba: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """Place probability columns of the ``seen`` classes into ``n_classes`` columns.

    Parameters
    ----------
    proba : ndarray of shape (n, len(seen))
    seen : ndarray of shape (n_seen,)
        Class index of each column of ``proba``.

    Returns
    -------
    ndarray of shape (n, n_classes)
        Zeros for classes the model never saw.
    """
    if seen.size == n_classes:
        return proba
    out = np.zeros((proba.shape[0], n_classes), dtype=proba.dtype)
    out[:, seen] = proba
    return out


@contextlib.contextmanager
def thread_limit(n_jobs: int | None) -> Iterator[None]:
    """Limit BLAS/OpenMP threads to ``n_jobs`` inside the block (no-op for None/-1)."""
    if n_jobs is None or n_jobs < 1:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n_jobs)):
        yield


def jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples recursively into JSON-native types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def as_float_list(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Validate a 1-D grid of positive finite numbers; return it sorted ascending."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(
            f"{name}={values!r} is invalid; allowed: a non-empty sequence of positive numbers, "
            "e.g. np.logspace(-4, 4, 9)."
        )
    return np.unique(arr)
