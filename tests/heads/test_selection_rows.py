"""Which rows each step of a head reads: selection on the validation rows, probability columns by class, CI on test.

Written as a mutation audit: each test fails on a broken head that the other heads tests let through
(selection scored on the training rows, the columns of the classes seen packed to the left, intervals
bootstrapped on other rows than the test rows).
"""

from __future__ import annotations

import numpy as np
import pytest

from featcache.heads import fit_and_evaluate, make_head
from featcache.heads.bootstrap import metrics_with_ci

FAST = {
    "lightgbm": {"n_estimators": 200, "learning_rate": 0.1, "early_stopping_rounds": 20, "n_jobs": 1},
    "mlp": {"hidden_sizes": (64,), "batch_size": 128, "max_epochs": 30, "patience": 5, "n_threads": 1},
}


def _shuffled_val(d: dict[str, np.ndarray]) -> np.ndarray:
    """Validation labels that no model of the training rows can predict."""
    return np.random.default_rng(0).permutation(d["y_val"])


def test_logreg_scores_each_c_on_the_validation_rows(clf_data):
    d = clf_data
    head = make_head("logreg", "classification").fit(d["X_train"], d["y_train"], d["X_val"], _shuffled_val(d))
    assert max(r["val_accuracy"] for r in head.search_results_) < 0.5  # chance is 0.2; the train rows give ~1


def test_ridge_scores_each_alpha_on_the_validation_rows(reg_data):
    d = reg_data
    head = make_head("logreg", "regression").fit(d["X_train"], d["y_train"], d["X_val"], _shuffled_val(d))
    assert min(r["val_rmse"] for r in head.search_results_) > 0.8 * d["y_val"].std()


@pytest.mark.parametrize(("name", "key"), [("lightgbm", "n_estimators"), ("mlp", "epochs")])
def test_early_stopping_watches_the_validation_rows(clf_data, name, key):
    """Unlearnable validation labels stop at once; the training loss would keep improving to the end."""
    d = clf_data
    real = make_head(name, "classification", FAST[name]).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    head = make_head(name, "classification", FAST[name]).fit(d["X_train"], d["y_train"], d["X_val"],
                                                             _shuffled_val(d))
    assert head.best_params_[key] <= 3 < real.best_params_[key]


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "mlp"])
def test_a_class_absent_from_training_keeps_its_own_column(clf_data, name):
    """Class 1 of 0..4 has no training or validation row: column 1 gets (almost) nothing, the others keep their class.

    logreg and lightgbm fit the classes seen and place their columns (column 1 is exactly 0); the MLP has K outputs.
    """
    d = clf_data
    keep = {part: d[f"y_{part}"] != 1 for part in ("train", "val", "test")}
    X, y = {p: d[f"X_{p}"][m] for p, m in keep.items()}, {p: d[f"y_{p}"][m] for p, m in keep.items()}
    head = make_head(name, "classification", {**FAST.get(name, {}), "n_classes": 5})
    head.fit(X["train"], y["train"], X["val"], y["val"])
    proba = head.predict_proba(X["test"])
    assert proba[:, 1].max() < 0.2 and (proba[:, 1].max() == 0.0 or name == "mlp")
    np.testing.assert_array_equal(head.predict(X["test"]), proba.argmax(axis=1))
    assert np.mean(proba.argmax(axis=1) == y["test"]) >= 0.6  # ~0.8 to 0.95; chance 0.25, shifted columns ~0


def test_confidence_intervals_resample_the_test_rows(clf_data):
    d = clf_data
    result = fit_and_evaluate(make_head("logreg", "classification", Cs=[1.0], refine=False), "classification",
                              d["X_train"], d["y_train"], d["X_val"], d["y_val"], d["X_test"], d["y_test"],
                              n_boot=50, seed=3)
    want = metrics_with_ci("classification", d["y_test"], result.scores, 5, n_boot=50, seed=3)
    assert result.metrics["ci"] == want["ci"]
    assert result.metrics["accuracy"] == want["accuracy"]
