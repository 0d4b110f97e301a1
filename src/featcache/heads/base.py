"""The base classes of every head: the scikit-learn estimator contract featcache relies on.

Heads drop into ``Pipeline``, ``GridSearchCV`` and ``clone`` because they
follow scikit-learn's rules: ``__init__`` only stores its parameters;
``fit`` validates, learns attributes ending in ``_`` and returns ``self``.
featcache adds an optional validation split to ``fit`` (model selection on
``X_val``/``y_val``, or on a hold-out of ``X`` without one) and three fitted
attributes every head sets: ``n_features_in_``, ``best_params_`` and
``fit_seconds_``.

The task is a class attribute: a head derives from :class:`ClassifierHead`
(class labels, ``predict_proba``, the ``n_classes`` parameter) or
:class:`RegressorHead` (real targets, standardised for training) and implements
``_fit``. Classifiers follow scikit-learn: with ``n_classes=None``, ``classes_``
is the sorted labels seen in train and val (any labels: ints, strings) and
``_fit`` works on their indices into ``classes_``; with ``n_classes=K`` (the
pipeline: the store's labels are 0..K-1), ``classes_ = arange(K)``, so a class
absent from the training rows still gets a probability column.

Parameters are declared once, as annotated class attributes of a class decorated
with :func:`params_dataclass` (a :func:`dataclasses.dataclass` that writes an
``__init__`` which only stores them, keyword-only). Twins share their parameters
through a common base class; scikit-learn's ``get_params``, ``set_params`` and
``clone`` read the generated ``__init__`` signature like a hand-written one.
A rule in an ``Annotated`` annotation (``Annotated[int, AtLeast(1)]``,
:mod:`~featcache.heads.param_types`) bounds a value: the head checks it at fit,
and ``featcache check`` reads it from the source with the type.

Where the heads depart from scikit-learn, on purpose (everything else passes
``check_estimator``, see ``tests/heads/conftest.py``): ``X_val``/``y_val`` are
``fit`` arguments, so in a ``Pipeline`` (``pipe.fit(X, y, head__X_val=...)``)
they reach the head without the earlier steps' transforms: pass them to a bare
head, or transform them first; ``random_state`` is an int seed or None (a
``RandomState`` is refused: torch and LightGBM take ints, and :func:`~featcache.heads.save_head`
records the parameters as JSON), and the MLP heads read None as 0; ``fit``
takes no ``sample_weight``, and a classifier's ``class_weight`` takes None or
``"balanced"`` but no dict of per-class weights (so scikit-learn's
``check_class_weight_classifiers``, which sets one, is expected to fail).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Annotated, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from .chunks import as_labels, is_dask_array
from .class_weight import class_weights
from .param_types import AtLeast, OneOf
from .splits import Split, prepare_fit
from .validation import encode_labels, expand_columns, record_feature_names, resolve_classes

__all__ = ["ClassifierHead", "HeadBase", "RegressorHead", "params_dataclass"]

log = logging.getLogger(__name__)

params_dataclass = dataclasses.dataclass(eq=False, repr=False, kw_only=True, match_args=False)
params_dataclass.__doc__ = """Class decorator of every head class that declares parameters.

Its annotated class attributes (and those of decorated bases) become the keyword-only
parameters of a generated ``__init__`` that only stores them. scikit-learn's ``__repr__``
is kept (``repr=False``) and heads compare by identity, like every estimator (``eq=False``).
"""


class HeadBase(BaseEstimator):
    """Base of the featcache heads (derive from :class:`ClassifierHead` or :class:`RegressorHead`).

    Attributes
    ----------
    n_features_in_ : int
        Feature dimension D seen by ``fit``.
    best_params_ : dict
        What model selection chose (JSON-ready values).
    fit_seconds_ : float
        Wall time of ``fit``.
    feature_names_in_ : ndarray of shape (D,)
        The column names of a pandas DataFrame ``X`` given to ``fit`` (string names only); ``predict``
        refuses a DataFrame whose columns differ or come in another order. Absent for arrays.
    """

    #: Whether ``y`` holds class labels (classifiers) or real-valued targets.
    _classification = False
    #: The seed ``random_state=None`` stands for in the hold-out split and the folds (see :meth:`_seed`);
    #: None keeps scikit-learn's meaning, fresh randomness on every fit.
    _none_seed: int | None = None

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> HeadBase:
        """Fit on the training rows, selecting the model on the validation rows.

        Parameters
        ----------
        X : array-like or dask array of shape (n_train, D)
            Training features (dask arrays: the streaming heads only).
        y : array-like of shape (n_train,)
            Class labels (classifiers; see :class:`ClassifierHead`) or real targets
            (regressors).
        X_val : array-like or dask array of shape (n_val, D), optional
            Validation features, for model selection only; without them a
            ``validation_fraction`` of the training rows is held out.
        y_val : array-like of shape (n_val,), optional
            Their labels or targets.

        Returns
        -------
        self
        """
        start = time.perf_counter()
        self._fit(X, y, X_val, y_val)
        record_feature_names(self, X)  # after _fit: a fit that fails leaves no fitted attribute
        self.fit_seconds_ = time.perf_counter() - start
        log.info("%s: chose %s in %.2fs", type(self).__name__, self.best_params_, self.fit_seconds_)
        return self

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Validate and learn every fitted attribute except ``fit_seconds_``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _fit(X, y, X_val, y_val).")

    def _seed(self) -> Any:
        """Seed of the hold-out split and the folds: ``random_state``, or ``_none_seed`` when it is None."""
        return self._none_seed if self.random_state is None else self.random_state

    def _split(self, X: Any, y: Any, X_val: Any, y_val: Any, cv_folds: int | None = None) -> Split:
        """:func:`~featcache.heads.splits.prepare_fit` with this head's task, hold-out fraction and :meth:`_seed`."""
        return prepare_fit(
            X, y, X_val, y_val, classification=self._classification, cv_folds=cv_folds,
            validation_fraction=self.validation_fraction, random_state=self._seed(),
        )

    def predict(self, X: Any) -> np.ndarray:
        """(n, D) features -> (n,) class indices or predicted values."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict(X).")


@params_dataclass
class ClassifierHead(ClassifierMixin, HeadBase):
    """A head predicting one of K classes; ``predict`` is the most probable column of ``predict_proba``.

    ``_fit`` always sees class indices 0..K-1 (``y`` and ``y_val`` are encoded by
    :meth:`fit` when ``n_classes`` is None). Heads whose model only knows the
    classes of its training rows set ``train_classes_`` and implement
    ``_seen_proba``; ``predict_proba`` widens its columns to all K classes.

    Parameters
    ----------
    n_classes : int or None
        None: the classes are the sorted distinct labels of ``y`` and ``y_val``
        (ints, integral floats or strings, as in scikit-learn). K: the labels must
        be the class indices 0..K-1 and every class gets a column, present in the
        data or not.
    class_weight : {None, "balanced"}
        None: every training row weighs 1. ``"balanced"``: scikit-learn's meaning, each
        class ``k`` weighs ``n_samples / (n_classes * count_k)`` over the training rows
        the head fits on (:mod:`~featcache.heads.class_weight`), so that a rare class
        counts as much as a frequent one in the training loss (and in a validation
        loss the head early-stops on).
    selection_metric : {None, "accuracy", "balanced_accuracy", "macro_f1", "log_loss"}
        What the head selects on, on the validation rows only (its hyper-parameter
        grid, best epoch or best iteration; log_loss lower is better, the others
        higher); None: each head's own criterion (see its Notes). The pipeline sets it
        from ``train.metric`` unless the head's section does (an early-stopped head keeps
        its loss for accuracy-like metrics: ``featcache.pipeline.params.train.stage_head_params``).

    Attributes
    ----------
    classes_ : ndarray of shape (K,)
        The labels of the ``predict_proba`` columns (``arange(K)`` with ``n_classes=K``).
    train_classes_ : ndarray of shape (n_seen,)
        Indices into ``classes_`` of the classes present in the training rows (heads
        using ``_seen_proba``).
    class_weight_ : ndarray of shape (K,) or None
        The weight of each class in the training loss (None: unweighted).
    """

    n_classes: Annotated[int, AtLeast(2)] | None = None
    class_weight: Annotated[str, OneOf("balanced")] | None = None
    # featcache.heads.metrics.SELECTION_METRICS["classification"] (an annotation holds literals; a test pins them)
    selection_metric: Annotated[str, OneOf("accuracy", "balanced_accuracy", "macro_f1", "log_loss")] | None = None

    _classification = True

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> ClassifierHead:
        """Fit as :meth:`HeadBase.fit`; with ``n_classes=None`` the labels may be of any kind.

        Parameters
        ----------
        X : array-like or dask array of shape (n_train, D)
        y : array-like of shape (n_train,)
            Class labels; with ``n_classes=K``, class indices 0..K-1.
        X_val : array-like or dask array of shape (n_val, D), optional
        y_val : array-like of shape (n_val,), optional
            Labels of the validation rows (a label seen only here still gets a column).

        Returns
        -------
        self
        """
        if self.n_classes is not None or y is None:  # y=None: fit's own validation names the error
            return super().fit(X, y, X_val, y_val)
        labels, (y, y_val) = encode_labels(*(as_labels(a) if is_dask_array(a) else a for a in (y, y_val)))
        super().fit(X, y, X_val, y_val)
        self.classes_ = labels[self.classes_]
        return self

    def _set_targets(self, y_fit: np.ndarray, y_train: np.ndarray, y_val: np.ndarray | None) -> int:
        """Set ``classes_`` (K from ``n_classes`` or the labels of train and val) and ``class_weight_`` (from the
        fitting rows ``y_fit``); return K outputs."""
        self.classes_ = resolve_classes(self.n_classes, y_train, y_val)
        self.class_weight_ = class_weights(self.class_weight, y_fit, self.classes_.size)
        return int(self.classes_.size)

    def _seen_proba(self, X: Any) -> np.ndarray:
        """(n, D) features -> (n, n_seen) probabilities of the ``train_classes_``, float64."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict_proba(X) or _seen_proba(X).")

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities.

        Parameters
        ----------
        X : array-like of shape (n, D)

        Returns
        -------
        ndarray of shape (n, K)
            Columns of classes absent from the training rows are 0.
        """
        return expand_columns(self._seen_proba(X), self.train_classes_, self.classes_.size)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class, shape (n,): values of ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


@params_dataclass
class RegressorHead(RegressorMixin, HeadBase):
    """A head predicting a real target; models that need it train on the standardised target.

    Parameters
    ----------
    selection_metric : {None, "rmse", "mae", "r2"}
        What the head selects on, on the validation rows only (r2 higher is better,
        the others lower); None: each head's own criterion (RMSE or the MSE loss).

    Attributes
    ----------
    y_mean_, y_scale_ : float
        Target standardisation from the training rows (heads using
        :meth:`_fit_target_scale`).
    """

    # featcache.heads.metrics.SELECTION_METRICS["regression"] (an annotation holds literals; a test pins them)
    selection_metric: Annotated[str, OneOf("rmse", "mae", "r2")] | None = None

    def _set_targets(self, y_fit: np.ndarray, y_train: np.ndarray, y_val: np.ndarray | None) -> int:
        """Standardise the target on the fitting rows ``y_fit`` (n_fit,); return 1 output."""
        self._fit_target_scale(y_fit)
        return 1

    def _fit_target_scale(self, y: np.ndarray) -> None:
        """Set ``y_mean_`` and ``y_scale_`` (the std, 1 for a constant target) from training targets (n,)."""
        self.y_mean_ = float(np.mean(y))
        std = float(np.std(y))
        self.y_scale_ = std if std > 0 else 1.0

    def _scale_target(self, y: Any) -> Any:
        """Targets (n,) -> standardised targets (n,) (numpy arrays or torch tensors)."""
        return (y - self.y_mean_) / self.y_scale_

    def _unscale_target(self, values: Any) -> Any:
        """Standardised predictions (n,) -> predictions in target units (n,)."""
        return values * self.y_scale_ + self.y_mean_
