"""Input checks shared by the heads: parameters, feature matrices, labels, targets, classes.

Messages follow scikit-learn's: the parameter, the bad value, what is allowed and a hint. A bad
hyper-parameter raises :class:`~featcache.errors.ParamError`: a ValueError (scikit-learn's contract) that
``featcache`` reports without a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.utils.validation import check_array, check_X_y, column_or_1d, validate_data

from featcache.util.checks import check_int, check_number

from .param_types import PARAM_HINT

__all__ = [
    "FLOAT_DTYPES",
    "PARAM_HINT",
    "check_positive",
    "check_fraction",
    "check_feature_matrix",
    "check_features",
    "record_feature_names",
    "check_feature_names",
    "check_labels",
    "check_targets",
    "validate_xy",
    "resolve_classes",
    "encode_labels",
    "require_two_classes",
    "expand_columns",
    "sorted_grid",
]


FLOAT_DTYPES = (np.float64, np.float32)


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    """Raise ParamError (a ValueError) unless ``value`` is a finite real > 0 (>= 0 if ``allow_zero``)."""
    check_number(name, value, 0, low_closed=allow_zero, hint=PARAM_HINT)


def check_fraction(name: str, value: Any, closed_right: bool = False) -> None:
    """Raise ParamError (a ValueError) unless ``0 < value < 1`` (``<= 1`` if ``closed_right``)."""
    check_number(name, value, 0, 1, high_closed=closed_right, hint=PARAM_HINT)


#: What to do about NaN or infinite values, appended to scikit-learn's message naming the array.
NONFINITE_HINT = ("Allowed: finite numbers. Hint: drop those rows, or impute them (e.g. sklearn.impute.SimpleImputer "
                  "before the head in a Pipeline); a featcache store never holds them.")


def check_feature_matrix(X: Any, name: str = "X") -> np.ndarray:
    """``check_array`` of a feature matrix, whose NaN/inf error names ``name`` and says what to do.

    Parameters
    ----------
    X : array-like of shape (n, D)
    name : str
        The array's name in error messages (``"X"``, ``"X_val"``).

    Returns
    -------
    ndarray of shape (n, D), float32 or float64
        float32 and float64 input kept, anything else converted to float64.

    Raises
    ------
    ValueError
        For a non-2-D, empty, non-numeric or non-finite ``X``.
    """
    try:
        return check_array(X, dtype=FLOAT_DTYPES, input_name=name)
    except ValueError as err:
        if "contains NaN" in str(err) or "contains infinity" in str(err):
            raise ValueError(f"{err} {NONFINITE_HINT}") from err
        raise


def record_feature_names(head: Any, X: Any) -> None:
    """At fit: set ``head.feature_names_in_`` to the string column names of a DataFrame ``X``, or delete it.

    Parameters
    ----------
    head : estimator
    X : array-like of shape (n, D)
        Training features; only a DataFrame's column names are read.
    """
    validate_data(head, X, y="no_validation", reset=True, skip_check_array=True, ensure_2d=False)


def check_feature_names(head: Any, X: Any) -> None:
    """At predict: the columns of a DataFrame ``X`` must be the fitted ``feature_names_in_``, in order.

    Parameters
    ----------
    head : estimator
        A fitted head.
    X : array-like of shape (n, D)

    Raises
    ------
    ValueError
        For column names other than those seen in fit (missing, unexpected or reordered). An ``X``
        without names where names were fitted (or the reverse) only warns, as in scikit-learn.
    """
    validate_data(head, X, y="no_validation", reset=False, skip_check_array=True, ensure_2d=False)


def check_features(X: Any, head: Any, name: str = "X") -> np.ndarray:
    """Validate a feature matrix at predict time.

    Parameters
    ----------
    X : array-like of shape (n, D)
    head : estimator
        The fitted head (its ``n_features_in_`` is the expected D).
    name : str
        Name of ``X`` in error messages.

    Returns
    -------
    ndarray of shape (n, D), float32 or float64
    """
    check_feature_names(head, X)
    X = check_feature_matrix(X, name)
    expected = head.n_features_in_
    if X.shape[1] != expected:
        raise ValueError(
            f"{name} has {X.shape[1]} features, but {type(head).__name__} is expecting {expected} "
            "features as input. Hint: use the same backbone layer (and pooling) for training and prediction."
        )
    return X


def check_labels(y: np.ndarray, name: str) -> np.ndarray:
    """Check that ``y`` holds non-negative integer class indices; return int64."""
    if y.dtype.kind not in "iuf":
        raise ValueError(
            f"Unknown label type: {name} has dtype {y.dtype}; allowed with n_classes=K: integer class indices "
            "0..K-1. Hint: leave n_classes=None to use the labels as given, or map class names to indices first "
            "(the store's /label column)."
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


def check_targets(y: np.ndarray, classification: bool, name: str) -> np.ndarray:
    """Check class indices (classification) or finite regression targets.

    Parameters
    ----------
    y : ndarray of shape (n,)
        Class indices, or regression targets.
    classification : bool
        True: check ``y`` with :func:`check_labels`; False: check it holds finite numbers.
    name : str
        The array's name in error messages (e.g. ``"y_val"``).

    Returns
    -------
    ndarray of shape (n,)
        int64 class indices, or float64 targets (no copy when already that dtype).

    Raises
    ------
    ValueError
        For labels that are not non-negative integers, or targets that are
        non-numeric or not finite.
    """
    if classification:
        return check_labels(y, name)
    if y.dtype.kind not in "iuf" or not np.all(np.isfinite(y)):
        raise ValueError(
            f"{name} holds non-numeric or non-finite targets; allowed: finite numbers. "
            "Hint: drop rows whose target is NaN."
        )
    return y.astype(np.float64, copy=False)


def validate_xy(X: Any, y: Any, classification: bool, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a feature matrix and its labels or targets at fit time.

    Parameters
    ----------
    X : array-like of shape (n, D)
        Features; finite, numeric.
    y : array-like of shape (n,) or (n, 1)
        Class indices (classification) or regression targets.
    classification : bool
        True: ``y`` must be non-negative integer class indices (:func:`check_labels`);
        False: finite numbers.
    name : str
        The name of ``X`` in error messages, ``"X"`` or ``"X_val"``; ``y`` is
        named after it (``"y"``, ``"y_val"``).

    Returns
    -------
    X : ndarray of shape (n, D), float32 or float64
    y : ndarray of shape (n,), int64 (classification) or float64

    Raises
    ------
    ValueError
        For inconsistent lengths, non-finite features, or invalid labels/targets.
    """
    X = check_feature_matrix(X, name)
    y_name = "y" + name[1:]
    try:
        X, y = check_X_y(X, y, dtype=FLOAT_DTYPES, y_numeric=not classification)
    except ValueError as err:
        if "Input y contains" not in str(err):
            raise
        raise ValueError(f"{str(err).replace('Input y', f'Input {y_name}', 1)} Allowed: finite numbers. "
                         "Hint: drop the rows whose label or target is NaN.") from err
    y = column_or_1d(y)
    if classification:
        y = check_labels(y, y_name)
    else:
        y = y.astype(np.float64, copy=False)
        if not np.all(np.isfinite(y)):
            raise ValueError(
                f"{y_name} holds non-finite targets; allowed: finite numbers. "
                "Hint: drop rows whose target is NaN."
            )
    return X, y


def resolve_classes(n_classes: int | None, *label_arrays: np.ndarray | None) -> np.ndarray:
    """Return the class indices ``np.arange(K)`` of class index arrays.

    K is ``n_classes`` when given, else ``max index + 1`` over the given arrays: with
    ``n_classes=None`` the heads fit on the indices of :func:`encode_labels`, which
    cover 0..K-1, and ``classes_`` maps them back to the labels.

    Parameters
    ----------
    n_classes : int >= 2 or None
    *label_arrays : ndarray of shape (n_i,) or None
        Class indices (non-negative integers).

    Returns
    -------
    ndarray of shape (K,)

    Raises
    ------
    ValueError
        If an index is >= ``n_classes``.
    """
    check_int("n_classes", n_classes, 2, allow_none=True, hint=PARAM_HINT)
    top = max((int(a.max()) for a in label_arrays if a is not None and a.size), default=-1)
    if n_classes is None:
        return np.arange(max(top + 1, 2))
    if top >= n_classes:
        raise ValueError(
            f"label {top} found but n_classes={n_classes}; allowed labels: 0..{n_classes - 1}. "
            "Hint: set n_classes to the number of classes in the dataset (or None to infer it)."
        )
    return np.arange(n_classes)


def encode_labels(*label_arrays: Any) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Class labels of any sortable kind (ints, strings, integral floats) -> sorted classes and indices.

    Parameters
    ----------
    *label_arrays : array-like of shape (n_i,), or None
        The labels of each split (train, val); a column vector is raveled with
        scikit-learn's ``DataConversionWarning``.

    Returns
    -------
    classes : ndarray of shape (K,)
        ``np.unique`` of the labels of every array (strings as a str array).
    indices : list of (ndarray of shape (n_i,), int64, or None)
        Per array, the index of each label in ``classes`` (None stays None).

    Raises
    ------
    ValueError
        For non-integral or non-finite float labels (continuous targets) or labels
        of mixed, unorderable types.
    """
    arrays = [None if a is None else column_or_1d(a, warn=True) for a in label_arrays]
    given = [a for a in arrays if a is not None]
    for a in given:
        if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
            bad = a[~(np.isfinite(a) & (a == np.round(a)))][0]
            raise ValueError(
                f"Unknown label type: continuous (the label {float(bad)!r}); allowed: class labels "
                "(integers, integral floats or strings). Hint: use a regression head for continuous targets."
            )
    try:
        classes = np.unique(np.concatenate(given)) if given else np.array([], dtype=np.int64)
    except TypeError as err:
        raise ValueError(
            f"the labels mix types that cannot be sorted ({err}); allowed: labels of one kind "
            "(all integers or all strings). Hint: convert the labels with .astype(str)."
        ) from err
    indices = [None if a is None else np.searchsorted(classes, a).astype(np.int64) for a in arrays]
    if classes.dtype == object and all(isinstance(c, str) for c in classes):
        classes = classes.astype(str)  # saved by save_head without pickle
    return classes, indices


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
    n_classes : int
        Columns of the result (K).

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


def sorted_grid(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """A grid of numbers as a 1-D float64 array, sorted ascending without repeats.

    Parameters
    ----------
    values : sequence of float or ndarray
        Already checked (:func:`~featcache.heads.param_types.check_declared`: a grid field's annotation,
        e.g. ``Annotated[Sequence[Annotated[float, Positive()]], MinLength(1)] | np.ndarray``, bounds its
        items, an ndarray's too); an ndarray of any shape is raveled.

    Returns
    -------
    ndarray of shape (k,), float64
    """
    return np.unique(np.asarray(values, dtype=np.float64).ravel())
