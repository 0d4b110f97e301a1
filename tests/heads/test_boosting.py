"""LightGBM heads: accuracy, early stopping, determinism, classes, contract."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from featcache.heads import LightGBMHead, LightGBMRegressorHead

# n_jobs=1: OpenMP spin-waits make 2 threads far slower when the 2 cores are shared
FAST = {"n_estimators": 300, "learning_rate": 0.1, "early_stopping_rounds": 20, "n_jobs": 1}


def _fit(cls, d, **params):
    return cls(**{**FAST, **params}).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])


def test_classifier_beats_chance_and_early_stops(clf_data):
    head = _fit(LightGBMHead, clf_data)
    assert np.mean(head.predict(clf_data["X_test"]) == clf_data["y_test"]) >= 0.8
    proba = head.predict_proba(clf_data["X_test"])
    assert proba.shape == (clf_data["X_test"].shape[0], 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert 1 <= head.best_iteration_ < FAST["n_estimators"]
    assert head.best_params_ == {"n_estimators": head.best_iteration_}
    assert head.scaler_ is None
    json.dumps(head.best_params_)


def test_regressor_beats_chance(reg_data):
    head = _fit(LightGBMRegressorHead, reg_data, n_estimators=1000)
    y, pred = reg_data["y_test"], head.predict(reg_data["X_test"])
    assert 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2) >= 0.8
    assert pred.shape == y.shape and pred.dtype == np.float64


def test_model_is_kept_at_best_iteration(clf_data):
    head = _fit(LightGBMHead, clf_data)
    assert head.best_iteration_ < FAST["n_estimators"]
    # the stored booster is truncated at the best round, and predictions use it
    assert head.booster_.current_iteration() == head.best_iteration_
    raw = head.booster_.predict(clf_data["X_test"], num_iteration=head.best_iteration_)
    np.testing.assert_allclose(head.predict_proba(clf_data["X_test"]), raw)


def test_no_early_stopping_trains_all_rounds(reg_data):
    head = _fit(LightGBMRegressorHead, reg_data, n_estimators=40, early_stopping_rounds=None)
    assert head.best_iteration_ == 40


@pytest.mark.parametrize("cls, data", [(LightGBMHead, "clf_data"), (LightGBMRegressorHead, "reg_data")])
def test_sklearn_contract(cls, data, contract, request):
    d = request.getfixturevalue(data)
    contract(cls(**FAST), d["X_train"], d["y_train"], d["X_val"], d["y_val"])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("cls", [LightGBMHead, LightGBMRegressorHead])
def test_sklearn_estimator_checks(cls, sklearn_checks):
    sklearn_checks(cls(n_estimators=20, n_jobs=1))


def test_deterministic(clf_data):
    a = _fit(LightGBMHead, clf_data, subsample=0.8, colsample_bytree=0.5)
    b = _fit(LightGBMHead, clf_data, subsample=0.8, colsample_bytree=0.5)
    np.testing.assert_array_equal(a.predict_proba(clf_data["X_test"]), b.predict_proba(clf_data["X_test"]))
    assert a.best_iteration_ == b.best_iteration_


def test_holdout_when_no_val(clf_data):
    head = LightGBMHead(**FAST).fit(clf_data["X_train"], clf_data["y_train"])
    assert np.mean(head.predict(clf_data["X_test"]) == clf_data["y_test"]) >= 0.8


def test_n_classes_gives_k_columns_when_a_class_is_absent(missing_class_data):
    d = missing_class_data
    head = _fit(LightGBMHead, d, n_classes=6)
    proba = head.predict_proba(d["X_test"])
    assert proba.shape == (d["X_test"].shape[0], 6)
    np.testing.assert_array_equal(proba[:, 4:], 0.0)
    np.testing.assert_array_equal(head.train_classes_, np.arange(4))


def test_val_rows_of_unseen_classes_are_left_out_of_early_stopping(clf_data, caplog):
    keep = clf_data["y_train"] != 4
    with caplog.at_level(logging.WARNING, logger="featcache.heads.boosting"):
        head = LightGBMHead(**FAST).fit(
            clf_data["X_train"][keep], clf_data["y_train"][keep], clf_data["X_val"], clf_data["y_val"]
        )
    assert "unseen in training" in caplog.text
    assert head.classes_.size == 5  # class 4 of val still counts towards K
    np.testing.assert_array_equal(head.predict_proba(clf_data["X_test"])[:, 4], 0.0)


@pytest.mark.parametrize("seen", [(0, 2, 3, 4), (1, 3)], ids=["multiclass", "binary"])
def test_early_stopping_scores_train_classes_that_are_not_0_to_k(clf_data, seen):
    """Training classes 0, 2, 3, 4 (class 1 absent) must boost like the same rows labelled 0..3.

    LightGBM 4.7 label-encodes ``eval_set`` but not ``eval_X``/``eval_y``: raw class indices scored
    the validation rows against the wrong columns and early stopping stopped at the first tree.
    """
    d = {k: v[np.isin(clf_data["y" + k[1:]], seen)] for k, v in clf_data.items()}
    codes = {k: np.searchsorted(seen, v) if k.startswith("y") else v for k, v in d.items()}
    head = _fit(LightGBMHead, d, n_classes=5)
    twin = _fit(LightGBMHead, codes, n_classes=len(seen))
    assert head.best_params_ == twin.best_params_ and twin.best_params_["n_estimators"] > 5
    np.testing.assert_allclose(head.predict_proba(d["X_test"])[:, list(seen)], twin.predict_proba(d["X_test"]))


def test_binary_problem_gives_two_columns(clf_data):
    keep_tr, keep_va = clf_data["y_train"] < 2, clf_data["y_val"] < 2
    head = LightGBMHead(**FAST).fit(
        clf_data["X_train"][keep_tr], clf_data["y_train"][keep_tr],
        clf_data["X_val"][keep_va], clf_data["y_val"][keep_va],
    )
    proba = head.predict_proba(clf_data["X_test"])
    assert proba.shape == (clf_data["X_test"].shape[0], 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_invalid_param_names_value(clf_data):
    with pytest.raises(ValueError, match=r"colsample_bytree=0 is invalid; allowed: a number in \(0, 1\]"):
        LightGBMHead(colsample_bytree=0).fit(clf_data["X_train"], clf_data["y_train"])


def test_auto_colsample_keeps_about_200_columns_per_tree(clf_data):
    head = LightGBMHead()
    assert head.colsample_bytree is None
    assert head._colsample(32) == 1.0 and head._colsample(1000) == pytest.approx(0.2)
    assert head._colsample(2048) == pytest.approx(0.1) and head._colsample(100_000) == pytest.approx(0.1)
    assert LightGBMHead(colsample_bytree=0.3)._colsample(2048) == 0.3
    fitted = _fit(LightGBMHead, clf_data)
    assert fitted.booster_.params["colsample_bytree"] == 1.0  # 32 features: all of them
    reduced = _fit(LightGBMHead, clf_data, pca_components=8)
    assert reduced.booster_.num_feature() == 8
