"""The ``class_weight`` parameter of the classification heads: scikit-learn's ``"balanced"`` weights.

``class_weight="balanced"`` weighs each class ``k`` by ``n_samples / (n_classes * count_k)``
over the training rows a head fits on (``n_classes``: the classes present there), as
``sklearn.utils.class_weight.compute_class_weight("balanced", ...)`` does: each class then
carries the same total weight in the training loss (and, where a head selects on a loss,
in the validation loss). A class absent from the training rows gets weight 1 (it has no
training row; its validation rows, if any, keep their plain weight).
"""

from __future__ import annotations

import numpy as np

__all__ = ["balanced_weights", "class_weights", "row_weights"]


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (n_present * count_k)`` per class of the class indices ``y``.

    Parameters
    ----------
    y : ndarray of shape (n,)
        Class indices 0..K-1 of the training rows.
    n_classes : int
        K.

    Returns
    -------
    ndarray of shape (K,), float64
        1.0 for a class absent from ``y``.
    """
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def class_weights(class_weight: str | None, y: np.ndarray, n_classes: int) -> np.ndarray | None:
    """The per-class weights a head's ``class_weight`` asks for on the training class indices ``y``.

    Parameters
    ----------
    class_weight : {None, "balanced"}
        The head's parameter (checked by its annotation at fit).
    y : ndarray of shape (n,)
        Class indices 0..K-1 of the rows the head fits on.
    n_classes : int
        K.

    Returns
    -------
    ndarray of shape (K,) or None
        None for ``class_weight=None`` (unweighted).
    """
    return None if class_weight is None else balanced_weights(y, n_classes)


def row_weights(weights: np.ndarray | None, y: np.ndarray) -> np.ndarray | None:
    """Per-row weights ``weights[y]`` of class indices ``y`` (n,), or None when ``weights`` is None."""
    return None if weights is None else weights[np.asarray(y, dtype=np.int64)]
