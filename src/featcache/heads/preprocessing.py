"""Feature preprocessing of the heads: a range-clipped StandardScaler then optional PCA, fitted on training rows only.

The scaler (:class:`ClippedScaler`) clips each feature to the range it saw when
fitted before standardising it. CNN activations after a ReLU often have channels
that are almost dead on the training rows (zero on all but a few): their standard
deviation is tiny, and a validation or test image on which such a channel fires
becomes a standardised value of thousands (5,431 on the digits' EfficientNet-Lite0
``pool`` features, against at most 33 on the training rows), which dominates a
linear or MLP head's output for that image. Clipping to the training range leaves
every training row unchanged and bounds what the head never saw. Measured on the
digits (``benchmarks/README.md``, "Heads"): on ``pool`` the test log loss of
logistic regression fell from 0.264 to 0.227 and the MLP's from 0.356 to 0.211;
on ``block6`` (no near-dead channels) nothing changed.
"""

from __future__ import annotations

import logging
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_array
from sklearn.utils.validation import FLOAT_DTYPES

if TYPE_CHECKING:
    from .chunks import RowChunks

log = logging.getLogger(__name__)

__all__ = [
    "ClippedScaler",
    "fit_preprocess",
    "apply_preprocess",
    "fit_scaler_streaming",
]


class ClippedScaler(StandardScaler):
    """A StandardScaler that first clips each feature to the range of the rows it was fitted on.

    Fitting (``fit`` or repeated ``partial_fit``) records ``data_min_`` and ``data_max_``
    beside StandardScaler's statistics; ``transform`` clips each column of ``X`` to
    ``[data_min_, data_max_]`` (in ``X``'s dtype, so the bounds are exact and a fitted
    row is returned exactly as StandardScaler returns it) and then standardises.

    Attributes
    ----------
    data_min_, data_max_ : ndarray of shape (D,)
        Per-feature minimum and maximum of the fitted rows (float64; NaNs ignored).
    """

    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> ClippedScaler:
        """Update the statistics and the per-feature range with the rows of ``X`` (n, D)."""
        first = not hasattr(self, "n_samples_seen_")
        super().partial_fit(X, y, sample_weight)
        rows = check_array(X, dtype=FLOAT_DTYPES, ensure_all_finite="allow-nan")
        low = np.nanmin(rows, axis=0).astype(np.float64)
        high = np.nanmax(rows, axis=0).astype(np.float64)
        if first:
            self.data_min_, self.data_max_ = low, high
        else:
            self.data_min_ = np.fmin(self.data_min_, low)
            self.data_max_ = np.fmax(self.data_max_, high)
        return self

    def transform(self, X: Any, copy: bool | None = None) -> np.ndarray:
        """``X`` (n, D) clipped to the fitted range, then standardised; returns (n, D)."""
        rows = check_array(X, dtype=FLOAT_DTYPES, ensure_all_finite="allow-nan")
        if rows.ndim != 2 or rows.shape[1] != self.data_min_.shape[0]:
            return super().transform(X, copy)  # StandardScaler's error names the mismatch
        clipped = np.clip(rows, self.data_min_.astype(rows.dtype), self.data_max_.astype(rows.dtype))
        return super().transform(clipped, copy=False)


def fit_preprocess(
    X: np.ndarray, pca_components: int | float | None, random_state: int | None
) -> tuple[ClippedScaler, PCA | None, np.ndarray]:
    """Fit a :class:`ClippedScaler`, then optionally a PCA on the scaled rows of ``X``.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        The rows the statistics may come from (training rows only).
    pca_components : None, int >= 1 or float in (0, 1)
        Components to keep, or the fraction of explained variance to keep (None: no PCA); already
        checked by the head (:func:`~featcache.heads.param_types.check_declared`).
    random_state : int or None
        Seed of the PCA solver (randomized SVD when sklearn picks it).

    Returns
    -------
    scaler : ClippedScaler
    pca : PCA or None
    X_t : ndarray of shape (n, D) or (n, n_components)
        ``X`` transformed by both.
    """
    scaler = ClippedScaler().fit(X)
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


def fit_scaler_streaming(chunks: RowChunks) -> ClippedScaler:
    """:class:`ClippedScaler` fitted in one pass over ``chunks`` with ``partial_fit``."""
    if chunks.n_rows < 1:
        raise ValueError(f"{chunks.name} has no rows to fit a scaler on; allowed: >= 1 row.")
    scaler = ClippedScaler()
    for Xc, _ in chunks:
        scaler.partial_fit(Xc)
    return scaler
