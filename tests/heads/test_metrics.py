"""Metrics against hand-computed values and scikit-learn; bootstrap CIs."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from featcache.errors import ParamError
from featcache.heads import (
    bootstrap_ci,
    classification_metrics,
    confusion_rows,
    metrics_with_ci,
    prediction_rows,
    regression_metrics,
)

# 4 rows, K = 3; predictions argmax: 0, 1, 1, 2 ; truth: 0, 1, 2, 2
Y = np.array([0, 1, 2, 2])
P = np.array([
    [0.7, 0.2, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.5, 0.3],
    [0.1, 0.1, 0.8],
])


def test_classification_by_hand():
    m = classification_metrics(Y, P, 3)
    assert m["accuracy"] == pytest.approx(3 / 4)
    # recalls: class0 1/1, class1 1/1, class2 1/2
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["per_class_recall"] == pytest.approx([1.0, 1.0, 0.5])
    # F1: class0 1, class1 2*1/(1+2)=2/3, class2 2*1/(2+1)=2/3
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.3, 0.8])))
    assert m["n_test"] == 4
    assert "top5_accuracy" not in m
    json.dumps(m)


def test_classification_matches_sklearn():
    rng = np.random.default_rng(0)
    K = 8
    proba = rng.dirichlet(np.ones(K), size=300)
    y = rng.integers(0, K, 300)
    y[y == 7] = 6  # class 7 absent from y_true
    m = classification_metrics(y, proba, K)
    pred = proba.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba, labels=range(K)))
    assert m["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, proba, k=5, labels=range(K)))
    with pytest.warns(UserWarning):  # sklearn warns about the predicted-only class 7
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["per_class_recall"][7] is None
    recall = skm.recall_score(y, pred, labels=range(7), average=None, zero_division=0)
    assert m["per_class_recall"][:7] == pytest.approx(recall.tolist())


def test_log_loss_is_clipped():
    m = classification_metrics([1], [[1.0, 0.0]], 2)
    assert m["log_loss"] == pytest.approx(-np.log(1e-15))


def test_regression_by_hand():
    m = regression_metrics([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 2.0])
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 0 + 1 + 4) / 4))
    assert m["mae"] == pytest.approx(3 / 4)
    assert m["r2"] == pytest.approx(1 - 5 / 5)
    assert m["n_test"] == 4
    assert regression_metrics([2.0, 2.0], [2.0, 2.0])["r2"] == 1.0  # sklearn force_finite
    rng = np.random.default_rng(1)
    y, pred = rng.normal(size=50), rng.normal(size=50)
    assert regression_metrics(y, pred)["r2"] == pytest.approx(skm.r2_score(y, pred))


def test_bootstrap_ci_contains_point_and_is_deterministic():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    proba = rng.dirichlet(np.ones(5), size=400)
    proba[np.arange(400)[:300], y[:300]] += 2.0  # about 80 % accuracy
    proba /= proba.sum(axis=1, keepdims=True)
    point = classification_metrics(y, proba, 5)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss"):
        lo, hi = bootstrap_ci(name, y, proba)
        assert lo < point[name] < hi, name
        assert bootstrap_ci(name, y, proba) == (lo, hi)
    assert bootstrap_ci("accuracy", y, proba, seed=1) != bootstrap_ci("accuracy", y, proba, seed=0)
    lo90, hi90 = bootstrap_ci("accuracy", y, proba, alpha=0.1)
    lo95, hi95 = bootstrap_ci("accuracy", y, proba)
    assert lo95 <= lo90 and hi90 <= hi95


def test_bootstrap_is_fast():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    proba = rng.dirichlet(np.ones(5), size=400)
    start = time.perf_counter()
    bootstrap_ci("accuracy", y, proba, n_boot=1000)
    assert time.perf_counter() - start < 0.5


def test_bootstrap_vectorised_matches_callable():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    proba = rng.dirichlet(np.ones(3), size=60)
    fast = bootstrap_ci("macro_f1", y, proba, n_boot=50)
    slow = bootstrap_ci(
        lambda t, s: skm.f1_score(t, s.argmax(axis=1), average="macro", zero_division=0), y, proba, n_boot=50
    )
    assert fast == pytest.approx(slow)


def test_metrics_with_ci_shares_resamples_with_bootstrap_ci():
    rng = np.random.default_rng(3)
    y = rng.normal(size=200)
    pred = y + 0.3 * rng.normal(size=200)
    m = metrics_with_ci("regression", y, pred, None, n_boot=200, seed=5)
    assert set(m["ci"]) == {"rmse", "mae", "r2"}
    for name, (lo, hi) in m["ci"].items():
        assert lo <= m[name] <= hi
        assert (lo, hi) == bootstrap_ci(name, y, pred, n_boot=200, seed=5)
    json.dumps(m)
    assert metrics_with_ci("regression", y, pred, n_boot=0)["ci"] == {}


def test_metrics_with_ci_classification_keys():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 6, 100)
    proba = rng.dirichlet(np.ones(6), size=100)
    m = metrics_with_ci("classification", y, proba, 6, n_boot=100)
    assert set(m["ci"]) == {"accuracy", "balanced_accuracy", "macro_f1", "log_loss", "top5_accuracy"}
    assert all(isinstance(v, list) and len(v) == 2 for v in m["ci"].values())


def test_errors_name_bad_value_and_allowed():
    with pytest.raises(ValueError, match=r"unknown task 'segmentation'; allowed: classification, regression"):
        metrics_with_ci("segmentation", Y, P, 3)
    with pytest.raises(ValueError, match=r"proba has 3 columns but n_classes=4"):
        classification_metrics(Y, P, 4)
    with pytest.raises(ValueError, match=r"y_true holds labels 0\.\.3; allowed: 0\.\.2"):
        classification_metrics([0, 1, 2, 3], P, 3)
    top5 = r"unknown metric 'top5_accuracy'; allowed: accuracy.*Hint: top5_accuracy needs K > 5"
    with pytest.raises(ValueError, match=top5):
        bootstrap_ci("top5_accuracy", Y, P)
    with pytest.raises(ValueError, match=r"unknown metric 'f1'"):
        bootstrap_ci("f1", Y, P)


@pytest.mark.parametrize("alpha", [1.5, -0.1, 0.0, 1.0, float("nan")])
def test_alpha_outside_0_1_is_rejected_by_both(alpha):
    # metrics_with_ci used to give lo > hi for alpha=1.5 and numpy's percentile error for alpha=-0.1
    msg = r"alpha=.* is invalid; allowed: a number in \(0, 1\), e\.g\. 0\.05\..*Hint"
    with pytest.raises(ValueError, match=msg):
        metrics_with_ci("classification", Y, P, 3, n_boot=20, alpha=alpha)
    with pytest.raises(ValueError, match=msg):
        metrics_with_ci("regression", [1.0, 2.0, 3.0], [1.0, 2.5, 2.0], n_boot=20, alpha=alpha)
    with pytest.raises(ValueError, match=msg):
        bootstrap_ci("accuracy", Y, P, n_boot=20, alpha=alpha)


@pytest.mark.parametrize("labels, shown", [([0, 1.7], "1.7"), ([0.0, float("nan")], "nan"), (["a", "b"], "'a'")])
def test_non_integer_labels_are_rejected(labels, shown):
    # 1.7 used to be truncated to 1 (accuracy 1.0), NaN cast to a huge negative index
    proba = [[0.9, 0.1], [0.1, 0.9]]
    msg = rf"y_true holds the label {shown}.*allowed: integer class indices 0\.\.1\. Hint"
    for call in (lambda: classification_metrics(labels, proba, 2),
                 lambda: metrics_with_ci("classification", labels, proba, 2, n_boot=10)):
        with pytest.raises(ValueError, match=msg):
            call()
    # integer-valued floats are class indices
    assert classification_metrics([0.0, 1.0], proba, 2)["accuracy"] == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_probabilities_are_rejected(bad):
    # a NaN row used to argmax to class 0 and count as correct
    proba = [[0.9, 0.1], [bad, bad], [0.2, 0.8]]
    msg = r"proba holds non-finite values in 1 rows, e.g. row 1: .*allowed: finite probabilities\. Hint"
    with pytest.raises(ValueError, match=msg):
        classification_metrics([0, 0, 1], proba, 2)
    with pytest.raises(ValueError, match=msg):
        bootstrap_ci("accuracy", [0, 0, 1], proba, n_boot=10)


def test_confusion_rows():
    rows = confusion_rows([0, 1, 2], [0, 2, 2], ["cat", "dog", "owl"])
    assert rows == [
        {"actual": "cat", "predicted": "cat"},
        {"actual": "dog", "predicted": "owl"},
        {"actual": "owl", "predicted": "owl"},
    ]
    with pytest.raises(ValueError, match=r"label 3 has no name; allowed: 0\.\.2"):
        confusion_rows([0, 3], [0, 1], ["cat", "dog", "owl"])


def test_prediction_rows_follow_the_task():
    """The one row builder of the train and finetune stages' predictions CSV: names, or plain floats."""
    assert prediction_rows("classification", [0, 1], [1, 1], ["cat", "dog"]) == confusion_rows([0, 1], [1, 1],
                                                                                                ["cat", "dog"])
    rows = prediction_rows("regression", np.array([1.5, -2.0]), np.array([1.25, -1.0], dtype=np.float32))
    assert rows == [{"actual": 1.5, "predicted": 1.25}, {"actual": -2.0, "predicted": -1.0}]
    assert all(type(value) is float for row in rows for value in row.values())  # CSV-ready, no numpy scalars
    with pytest.raises(ValueError, match=r"y_true has 2 rows but y_pred has 1"):
        prediction_rows("regression", [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"unknown task 'ranking'; allowed: classification, regression"):
        prediction_rows("ranking", [1.0], [1.0])


def test_resampling_settings_are_keyword_only_and_checked():
    """bootstrap_ci and metrics_with_ci order (n_boot, alpha, seed) differently: positional use would swap them."""
    y, proba = np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    with pytest.raises(TypeError):
        bootstrap_ci("accuracy", y, proba, 100, 0.1, 3)
    with pytest.raises(TypeError):
        metrics_with_ci("classification", y, proba, 2, 100, 3, 0.1)
    for bad in (2.5, "100", True):
        with pytest.raises(ParamError, match="n_boot=.* is invalid; allowed: an integer"):
            bootstrap_ci("accuracy", y, proba, n_boot=bad)
        with pytest.raises(ParamError, match="n_boot=.* is invalid; allowed: an integer"):
            metrics_with_ci("classification", y, proba, 2, n_boot=bad)


def test_the_point_scores_and_the_bootstrap_are_two_modules_behind_the_same_exports():
    """metrics.py (point scores, prediction rows) and bootstrap.py (resampling, CIs, per-row arrays) share no name;
    ``featcache.heads`` exports the same names as before the split."""
    import featcache.heads as heads
    from featcache.heads import bootstrap, metrics

    assert not set(bootstrap.__all__) & set(metrics.__all__)
    assert heads.metrics_with_ci is bootstrap.metrics_with_ci and heads.bootstrap_ci is bootstrap.bootstrap_ci
    for name in ("classification_metrics", "confusion_rows", "log_loss_score", "prediction_rows",
                 "regression_metrics"):
        assert getattr(heads, name) is getattr(metrics, name)
