"""The heads inside scikit-learn's own tools: Pipeline, cross_val_score and GridSearchCV, on a DataFrame."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featcache.heads import LightGBMRegressorHead, LogisticRegressionHead, MLPHead, RidgeHead

pd = pytest.importorskip("pandas")


def _frame(X: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])


@pytest.mark.parametrize("head", [RidgeHead(refine=False), LightGBMRegressorHead(n_estimators=20, n_jobs=1)],
                         ids=lambda h: type(h).__name__)
def test_regressors_in_a_pipeline_under_cross_val_score(head, reg_data):
    scores = cross_val_score(make_pipeline(StandardScaler(), head), _frame(reg_data["X_train"]),
                             pd.Series(reg_data["y_train"]), cv=3, scoring="r2")
    assert scores.shape == (3,) and np.all(scores > 0.5)


def test_grid_search_over_a_pipelines_head_keeps_the_column_names(clf_data):
    X, y = _frame(clf_data["X_train"]), clf_data["y_train"]
    pipe = make_pipeline(StandardScaler(), MLPHead(hidden_sizes=(16,), max_epochs=5, n_threads=1))
    search = GridSearchCV(pipe, {"mlphead__dropout": [0.0, 0.3]}, cv=2).fit(X, y)
    assert search.best_params_["mlphead__dropout"] in (0.0, 0.3)
    assert search.predict_proba(_frame(clf_data["X_test"])).shape == (len(clf_data["X_test"]), 5)
    assert list(search.best_estimator_.feature_names_in_) == list(X.columns)


def test_a_dataframe_with_reordered_columns_is_refused_not_mispredicted(clf_data):
    X = _frame(clf_data["X_train"])
    head = LogisticRegressionHead(Cs=[1.0], refine=False).fit(X, clf_data["y_train"])
    assert list(head.feature_names_in_) == list(X.columns)
    with pytest.raises(ValueError, match="Feature names must be in the same order as they were in fit"):
        head.predict(X[X.columns[::-1]])
