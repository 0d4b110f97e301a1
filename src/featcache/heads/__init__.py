"""Cheap heads on cached features: logistic regression/ridge, LightGBM, torch MLP.

Out-of-core twins (:mod:`~featcache.heads.out_of_core`) stream numpy or dask
arrays one row chunk at a time: SGD logistic/ridge, a streamed MLP, and LightGBM
on dask.distributed (:func:`fit_lightgbm_dask`).

Every head is a scikit-learn estimator with ``fit(X, y, X_val=None, y_val=None)``:
the validation split is used for model selection only, scaling statistics come from
the training rows only, and ``best_params_`` records what was chosen. Build heads with
:func:`make_head`, score them with :func:`fit_and_evaluate`, persist them without
pickle with :func:`save_head` / :func:`load_head`.
"""

from __future__ import annotations

from .boosting import LightGBMHead, LightGBMRegressorHead
from .evaluate import RunResult, fit_and_evaluate
from .linear import LogisticRegressionHead, RidgeHead
from .metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion_rows,
    log_loss_score,
    metrics_with_ci,
    regression_metrics,
)
from .mlp import MLPHead, MLPRegressorHead
from .out_of_core import (
    StreamingLogisticHead,
    StreamingMLPHead,
    StreamingMLPRegressorHead,
    StreamingRidgeHead,
    fit_lightgbm_dask,
)
from .persistence import load_head, save_head
from .registry import HEADS, head_class, head_names, make_head

__all__ = [
    "HEADS",
    "LightGBMHead",
    "LightGBMRegressorHead",
    "LogisticRegressionHead",
    "MLPHead",
    "MLPRegressorHead",
    "RidgeHead",
    "RunResult",
    "StreamingLogisticHead",
    "StreamingMLPHead",
    "StreamingMLPRegressorHead",
    "StreamingRidgeHead",
    "bootstrap_ci",
    "classification_metrics",
    "confusion_rows",
    "fit_and_evaluate",
    "fit_lightgbm_dask",
    "head_class",
    "head_names",
    "load_head",
    "log_loss_score",
    "make_head",
    "metrics_with_ci",
    "regression_metrics",
    "save_head",
]
