"""Shared synthetic data and checks for the heads tests (small, separable, fast)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone, is_classifier
from sklearn.datasets import make_classification, make_regression
from sklearn.exceptions import NotFittedError

Splits = dict[str, np.ndarray]


def _split(X: np.ndarray, y: np.ndarray) -> Splits:
    n = X.shape[0]
    a, b = int(0.6 * n), int(0.8 * n)
    return {
        "X_train": X[:a], "y_train": y[:a],
        "X_val": X[a:b], "y_val": y[a:b],
        "X_test": X[b:], "y_test": y[b:],
    }


@pytest.fixture(scope="session")
def clf_data() -> Splits:
    """600 x 32, 5 well-separated classes; 360 train / 120 val / 120 test."""
    X, y = make_classification(
        n_samples=600, n_features=32, n_informative=16, n_redundant=4, n_classes=5,
        n_clusters_per_class=1, class_sep=2.0, random_state=0,
    )
    return _split(X, y)


@pytest.fixture(scope="session")
def reg_data() -> Splits:
    """600 x 32, 4 informative features, low noise."""
    X, y = make_regression(n_samples=600, n_features=32, n_informative=4, noise=5.0, random_state=0)
    return _split(X, y)


@pytest.fixture(scope="session")
def missing_class_data(clf_data: Splits) -> Splits:
    """clf_data without class 4 in train and val (K = 6 given explicitly by the tests)."""
    out = dict(clf_data)
    for part in ("train", "val"):
        keep = clf_data[f"y_{part}"] != 4
        out[f"X_{part}"] = clf_data[f"X_{part}"][keep]
        out[f"y_{part}"] = clf_data[f"y_{part}"][keep]
    keep = clf_data["y_test"] != 4
    out["X_test"], out["y_test"] = clf_data["X_test"][keep], clf_data["y_test"][keep]
    return out


def check_contract(head: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> None:
    """The scikit-learn estimator contract the pipeline relies on."""
    params = head.get_params()
    # __init__ only stores params; clone rebuilds an equal, unfitted estimator
    twin = clone(head)
    assert twin.get_params().keys() == params.keys()
    for key, value in params.items():
        assert twin.get_params()[key] is value or twin.get_params()[key] == value
    assert not any(k.endswith("_") and not k.startswith("_") for k in vars(head))
    # set_params round trip
    key = "random_state"
    twin.set_params(**{key: 123})
    assert twin.get_params()[key] == 123
    twin.set_params(**{key: params[key]})
    assert twin.get_params() == params
    # NotFittedError before fit
    with pytest.raises(NotFittedError):
        head.predict(X)
    # fit returns self and sets the documented attributes
    assert head.fit(X, y, X_val, y_val) is head
    assert head.n_features_in_ == X.shape[1]
    assert isinstance(head.best_params_, dict) and head.best_params_
    assert head.fit_seconds_ > 0
    # params untouched by fit
    assert head.get_params() == params
    # clone of a fitted head is unfitted
    with pytest.raises(NotFittedError):
        clone(head).predict(X)


@pytest.fixture(scope="session")
def contract() -> Callable[..., None]:
    return check_contract


def run_sklearn_checks(head: Any) -> None:
    """scikit-learn's own estimator checks, all of them (string class labels included), none expected to fail.

    Plus ``check_dataframe_column_names_consistency``, which scikit-learn runs on its own estimators only:
    a head fitted on a DataFrame records ``feature_names_in_`` and refuses reordered columns at predict.
    But one: a classifier's ``class_weight`` takes None or ``"balanced"``, not scikit-learn's dict of
    per-class weights (``params.yaml`` names no labels), so ``check_class_weight_classifiers``, which
    scikit-learn runs on any estimator with a ``class_weight`` parameter and which sets a dict, must fail
    on exactly that refusal.
    """
    from sklearn.utils.estimator_checks import check_dataframe_column_names_consistency, check_estimator

    dict_weights = {"check_class_weight_classifiers": "class_weight takes None or 'balanced', not a dict"}
    expected = dict_weights if "class_weight" in head.get_params() else None
    results = check_estimator(head, on_fail=None, expected_failed_checks=expected)
    failed = [(r["check_name"], repr(r["exception"])[:300]) for r in results if r["status"] == "failed"]
    assert not failed, failed
    for r in results:
        if expected and r["check_name"] in expected:
            assert r["status"] == "xfail" and "is invalid; allowed: 'balanced' or None" in str(r["exception"]), r
    check_dataframe_column_names_consistency(type(head).__name__, head)
    if is_classifier(head):
        assert {r["check_name"]: r["status"] for r in results}["check_classifiers_classes"] == "passed"


@pytest.fixture(scope="session")
def sklearn_checks() -> Callable[[Any], None]:
    return run_sklearn_checks
