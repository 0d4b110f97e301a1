"""Cheap heads on cached features: logistic regression/ridge, LightGBM, torch MLP, weighted k-NN.

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

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it; imported on first use (PEP 562), so
#: ``import featcache.heads`` loads no head module, and a head loads only its own library.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["LightGBMHead", "LightGBMRegressorHead"], "boosting"),
    **dict.fromkeys(["RunResult", "fit_and_evaluate"], "evaluate"),
    **dict.fromkeys(["KNNHead", "KNNRegressorHead"], "knn"),
    **dict.fromkeys(["LogisticRegressionHead", "RidgeHead"], "linear"),
    **dict.fromkeys(["bootstrap_ci", "metrics_with_ci"], "bootstrap"),
    **dict.fromkeys(["classification_metrics", "confusion_rows", "log_loss_score", "prediction_rows",
                     "regression_metrics"], "metrics"),
    **dict.fromkeys(["MLPHead", "MLPRegressorHead"], "mlp"),
    **dict.fromkeys(["StreamingLogisticHead", "StreamingMLPHead", "StreamingMLPRegressorHead", "StreamingRidgeHead",
                     "fit_lightgbm_dask"], "out_of_core"),
    **dict.fromkeys(["load_head", "save_head"], "persistence"),
    **dict.fromkeys(["HEADS", "head_class", "head_names", "make_head"], "registry"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
