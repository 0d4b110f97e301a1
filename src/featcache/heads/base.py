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

from collections.abc import Mapping
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

    def _store_init_params(self, values: Mapping[str, Any]) -> None:
        """Store each ``__init__`` argument as the attribute of the same name, and nothing else.

        scikit-learn's rule (``get_params`` and ``clone`` read the parameters back
        by name); call it first thing as ``self._store_init_params(locals())``.
        """
        for name, value in values.items():
            if name not in ("self", "__class__"):
                setattr(self, name, value)

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> HeadBase:
        """Fit on the training rows, selecting the model on the validation rows.

        Parameters
        ----------
        X : array-like or dask array of shape (n_train, D)
            Training features.
        y : array-like of shape (n_train,)
            Integer class indices 0..K-1 (classifiers) or real targets (regressors).
        X_val : array-like of shape (n_val, D), optional
            Validation features, for model selection only; without them a
            ``validation_fraction`` of the training rows is held out.
        y_val : array-like of shape (n_val,), optional
            Their labels or targets.

        Returns
        -------
        self
        """
        raise NotImplementedError(f"{type(self).__name__} must implement fit(X, y, X_val=None, y_val=None).")

    def predict(self, X: Any) -> np.ndarray:
        """(n, D) features -> (n,) class indices or predicted values."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict(X).")
