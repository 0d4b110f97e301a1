"""The base class of every head: the scikit-learn estimator contract featcache relies on.

Heads drop into ``Pipeline``, ``GridSearchCV`` and ``clone`` because they
follow scikit-learn's rules: ``__init__`` only stores its parameters;
``fit`` validates, learns attributes ending in ``_`` and returns ``self``.
featcache adds an optional validation split to ``fit`` (model selection on
``X_val``/``y_val``, or on a hold-out of ``X`` without one) and three fitted
attributes every head sets: ``n_features_in_``, ``best_params_`` and
``fit_seconds_``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

__all__ = ["HeadBase"]


class HeadBase(BaseEstimator):
    """Base of the featcache heads (mix in ``ClassifierMixin`` or ``RegressorMixin`` first).

    Attributes
    ----------
    n_features_in_ : int
        Feature dimension D seen by ``fit``.
    best_params_ : dict
        What model selection chose (JSON-ready values).
    fit_seconds_ : float
        Wall time of ``fit``.
    """

    #: Whether ``y`` holds class indices 0..K-1 (classifiers) or real-valued targets.
    _classification: bool = False

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> HeadBase:
        """Fit on (X (n_train, D), y (n_train,)), selecting on (X_val (n_val, D), y_val (n_val,)); returns self."""
        raise NotImplementedError(f"{type(self).__name__} must implement fit(X, y, X_val=None, y_val=None).")

    def predict(self, X: Any) -> np.ndarray:
        """(n, D) features -> (n,) class indices or predicted values."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict(X).")
