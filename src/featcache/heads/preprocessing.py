"""Feature preprocessing of the heads: StandardScaler then optional PCA, fitted on training rows only."""

from __future__ import annotations

import logging
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from featcache.errors import ParamError

if TYPE_CHECKING:
    from .chunks import RowChunks

log = logging.getLogger(__name__)

__all__ = [
    "check_pca_components",
    "fit_preprocess",
    "apply_preprocess",
    "fit_scaler_streaming",
]


def check_pca_components(value: Any) -> None:
    """Raise ParamError (a ValueError) unless ``value`` is None, an int >= 1 or a float in (0, 1)."""
    if value is None:
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) and 0 < value < 1:
        return
    raise ParamError(
        f"pca_components={value!r} is invalid; allowed: None (no reduction), an integer >= 1 "
        "(number of components) or a float in (0, 1) (fraction of explained variance to keep). "
        "Hint: e.g. pca_components=256 or pca_components=0.95."
    )


def fit_preprocess(
    X: np.ndarray, pca_components: int | float | None, random_state: int | None
) -> tuple[StandardScaler, PCA | None, np.ndarray]:
    """Fit a StandardScaler, then optionally a PCA on the scaled rows of ``X``.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        The rows the statistics may come from (training rows only).
    pca_components : None, int or float
        See :func:`check_pca_components`.
    random_state : int or None
        Seed of the PCA solver (randomized SVD when sklearn picks it).

    Returns
    -------
    scaler : StandardScaler
    pca : PCA or None
    X_t : ndarray of shape (n, D) or (n, n_components)
        ``X`` transformed by both.
    """
    check_pca_components(pca_components)
    scaler = StandardScaler().fit(X)
    X_t = scaler.transform(X)
    if pca_components is None:
        return scaler, None, X_t
    top = min(X.shape)
    if isinstance(pca_components, numbers.Integral) and pca_components > top:
        raise ValueError(
            f"pca_components={pca_components} exceeds min(n_rows, n_features)={top} of the "
            f"training rows ({X.shape[0]} x {X.shape[1]}); allowed: 1..{top} or a float in (0, 1). "
            "Hint: lower pca_components or use a variance fraction such as 0.95."
        )
    pca = PCA(n_components=pca_components, random_state=random_state)
    X_t = pca.fit_transform(X_t)
    log.debug("PCA: %d -> %d components", X.shape[1], pca.n_components_)
    return scaler, pca, X_t


def apply_preprocess(X: np.ndarray, scaler: StandardScaler | None, pca: PCA | None) -> np.ndarray:
    """Apply a fitted scaler (if any), then a fitted PCA (if any), to ``X`` (n, D)."""
    if scaler is not None:
        X = scaler.transform(X)
    if pca is not None:
        X = pca.transform(X)
    return X


def fit_scaler_streaming(chunks: RowChunks) -> StandardScaler:
    """StandardScaler fitted in one pass over ``chunks`` with ``partial_fit``."""
    if chunks.n_rows < 1:
        raise ValueError(f"{chunks.name} has no rows to fit a scaler on; allowed: >= 1 row.")
    scaler = StandardScaler()
    for Xc, _ in chunks:
        scaler.partial_fit(Xc)
    return scaler
