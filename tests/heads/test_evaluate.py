"""fit_and_evaluate: result shape, timings, no test leakage, K handling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featcache.heads import RunResult, fit_and_evaluate, make_head
from featcache.heads.metrics import classification_metrics, regression_metrics

FAST = {
    "logreg": {},
    "lightgbm": {"n_estimators": 200, "learning_rate": 0.1, "early_stopping_rounds": 20, "n_jobs": 1},
    "mlp": {"hidden_sizes": (64,), "batch_size": 128, "max_epochs": 30, "patience": 5, "n_threads": 1},
}


def _run(name, task, d, n_boot=200, **kwargs):
    head = make_head(name, task, FAST[name])
    return head, fit_and_evaluate(
        head, task, d["X_train"], d["y_train"], d["X_val"], d["y_val"], d["X_test"], d["y_test"],
        n_boot=n_boot, **kwargs,
    )


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "mlp"])
def test_classification_result(name, clf_data):
    head, result = _run(name, "classification", clf_data)
    assert isinstance(result, RunResult)
    n_test = clf_data["X_test"].shape[0]
    assert result.scores.shape == (n_test, 5) and result.predictions.shape == (n_test,)
    m = result.metrics
    assert m["accuracy"] >= 0.8
    assert m["n_features"] == 32 and m["n_train"] == 360 and m["n_val"] == 120 and m["n_test"] == n_test
    assert m["fit_seconds"] > 0 and m["predict_seconds"] >= 0
    assert m["best_params"] == result.best_params == head.best_params_
    assert set(m["ci"]) == {"accuracy", "balanced_accuracy", "macro_f1", "log_loss"}
    lo, hi = m["ci"]["accuracy"]
    assert lo <= m["accuracy"] <= hi
    json.dumps(m)


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "mlp"])
def test_regression_result(name, reg_data):
    _, result = _run(name, "regression", reg_data)
    assert result.predictions.shape == result.scores.shape == (reg_data["X_test"].shape[0],)
    assert result.metrics["r2"] >= 0.8
    assert set(result.metrics["ci"]) == {"rmse", "mae", "r2"}
    json.dumps(result.metrics)


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "mlp"])
def test_test_labels_do_not_influence_selection(name, clf_data):
    """Shuffled test labels: same chosen hyper-parameters and same predictions."""
    _, a = _run(name, "classification", clf_data, n_boot=0)
    shuffled = dict(clf_data, y_test=np.random.default_rng(0).permutation(clf_data["y_test"]))
    _, b = _run(name, "classification", shuffled, n_boot=0)
    assert a.best_params == b.best_params
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.metrics["accuracy"] != b.metrics["accuracy"]


def test_scaler_statistics_are_train_only(clf_data):
    head, _ = _run("logreg", "classification", clf_data, n_boot=0)
    np.testing.assert_allclose(head.scaler_.mean_, clf_data["X_train"].mean(axis=0))
    np.testing.assert_allclose(head.scaler_.var_, clf_data["X_train"].var(axis=0))


def test_n_classes_reaches_the_head(missing_class_data):
    head, result = _run("logreg", "classification", missing_class_data, n_boot=50, n_classes=6)
    assert head.n_classes == 6
    assert result.scores.shape[1] == 6
    assert result.metrics["per_class_recall"][4] is None and result.metrics["per_class_recall"][5] is None
    assert "top5_accuracy" in result.metrics


def test_conflicting_n_classes_and_task_mismatch(clf_data):
    d = clf_data
    args = (d["X_train"], d["y_train"], d["X_val"], d["y_val"], d["X_test"], d["y_test"])
    with pytest.raises(ValueError, match="n_classes=5 but the head has n_classes=7"):
        fit_and_evaluate(make_head("logreg", "classification", n_classes=7), "classification", *args, n_classes=5)
    with pytest.raises(ValueError, match=r"task='regression' but LogisticRegressionHead is a classifier"):
        fit_and_evaluate(make_head("logreg", "classification"), "regression", *args)
    with pytest.raises(ValueError, match=r"unknown task 'cls'; allowed: classification, regression"):
        fit_and_evaluate(make_head("logreg", "classification"), "cls", *args)


def test_no_val_split_holds_out_from_train(clf_data):
    d = clf_data
    head = make_head("logreg", "classification")
    result = fit_and_evaluate(head, "classification", d["X_train"], d["y_train"], None, None,
                              d["X_test"], d["y_test"], n_boot=0)
    assert result.metrics["n_val"] == 0 and result.metrics["accuracy"] >= 0.8


def _scalars(metrics):
    return {name: value for name, value in metrics.items() if isinstance(value, float)}


@pytest.mark.parametrize("name", ["logreg", "lightgbm"])
def test_val_scores_are_the_metric_functions_on_the_val_predictions(name, clf_data, reg_data):
    """``metrics["val"]``: the fitted head's val predictions scored by metrics.py, the test scores' metric set."""
    head, result = _run(name, "classification", clf_data, n_boot=50)
    val = result.metrics["val"]
    expected = _scalars(classification_metrics(clf_data["y_val"], head.predict_proba(clf_data["X_val"]), 5))
    assert val == expected and set(val) == set(result.metrics["ci"])
    assert val["accuracy"] != result.metrics["accuracy"]  # val rows, not test rows
    head, result = _run(name, "regression", reg_data, n_boot=0)
    assert result.metrics["val"] == _scalars(regression_metrics(reg_data["y_val"], head.predict(reg_data["X_val"])))
    assert set(result.metrics["val"]) == {"rmse", "mae", "r2"}
    json.dumps(result.metrics)


def test_val_scores_of_labels_other_than_0_to_k(clf_data):
    """Labels 10, 20, ...: the val rows are scored on the head's probability columns, as the test rows."""
    d = {key: value * 10 + 10 if key.startswith("y_") else value for key, value in clf_data.items()}
    head, result = _run("logreg", "classification", d, n_boot=0)
    proba = head.predict_proba(d["X_val"])
    assert result.metrics["val"] == _scalars(classification_metrics(d["y_val"] // 10 - 1, proba, 5))


def test_no_val_scores_without_val_rows_or_when_refit_on_them(clf_data):
    d = clf_data
    result = fit_and_evaluate(make_head("logreg", "classification"), "classification", d["X_train"], d["y_train"],
                              None, None, d["X_test"], d["y_test"], n_boot=0)
    assert "val" in result.metrics and result.metrics["val"] is None  # its selection rows came out of train
    head = make_head("logreg", "classification", {"refit_on_trainval": True})
    result = fit_and_evaluate(head, "classification", *(d[k] for k in ("X_train", "y_train", "X_val", "y_val",
                                                                       "X_test", "y_test")), n_boot=0)
    assert "val" in result.metrics and result.metrics["val"] is None  # fitted on val: not held out


def test_no_test_rows_or_a_constant_target_is_refused_before_any_fit(clf_data, reg_data):
    d = clf_data
    head = make_head("logreg", "classification")
    with pytest.raises(ValueError, match=r"no test rows \(rows per split: .*'test': 0\}\).*Hint: pass at least one"):
        fit_and_evaluate(head, "classification", d["X_train"], d["y_train"], d["X_val"], d["y_val"],
                         d["X_test"][:0], d["y_test"][:0], n_boot=0)
    assert not hasattr(head, "classes_")  # refused before fit, not after
    r = reg_data
    with pytest.raises(ValueError, match="same regression target 2.5"):
        fit_and_evaluate(make_head("logreg", "regression"), "regression", r["X_train"],
                         np.full(len(r["y_train"]), 2.5), r["X_val"], r["y_val"], r["X_test"], r["y_test"], n_boot=0)
