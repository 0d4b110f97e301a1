"""LogisticRegressionHead / RidgeHead: accuracy, contract, selection, leakage, classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featcache.heads import LogisticRegressionHead, RidgeHead
from featcache.heads.linear import DEFAULT_CS, log_grid_search


def _accuracy(head, data) -> float:
    return float(np.mean(head.predict(data["X_test"]) == data["y_test"]))


def _r2(head, data) -> float:
    y, pred = data["y_test"], head.predict(data["X_test"])
    return 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)


def test_logreg_beats_chance(clf_data):
    head = LogisticRegressionHead().fit(clf_data["X_train"], clf_data["y_train"], clf_data["X_val"], clf_data["y_val"])
    assert _accuracy(head, clf_data) >= 0.8  # chance 0.2
    proba = head.predict_proba(clf_data["X_test"])
    assert proba.shape == (clf_data["X_test"].shape[0], 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(head.classes_, np.arange(5))
    json.dumps(head.best_params_)
    json.dumps(head.search_results_)


def test_ridge_beats_chance(reg_data):
    head = RidgeHead().fit(reg_data["X_train"], reg_data["y_train"], reg_data["X_val"], reg_data["y_val"])
    assert _r2(head, reg_data) >= 0.8
    assert head.predict(reg_data["X_test"]).shape == (reg_data["X_test"].shape[0],)
    assert set(head.best_params_) == {"alpha"}
    json.dumps(head.search_results_)


@pytest.mark.parametrize("cls, data", [(LogisticRegressionHead, "clf_data"), (RidgeHead, "reg_data")])
def test_sklearn_contract(cls, data, contract, request):
    d = request.getfixturevalue(data)
    contract(cls(), d["X_train"], d["y_train"], d["X_val"], d["y_val"])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("head", [LogisticRegressionHead(Cs=[0.1, 1.0]), RidgeHead()], ids=type)
def test_sklearn_estimator_checks(head, sklearn_checks):
    sklearn_checks(head)


def test_coarse_then_refine_grid(clf_data):
    head = LogisticRegressionHead(refine_points=5).fit(
        clf_data["X_train"], clf_data["y_train"], clf_data["X_val"], clf_data["y_val"]
    )
    stages = [r["stage"] for r in head.search_results_]
    assert stages.count("coarse") == 9
    refined = [r["C"] for r in head.search_results_ if r["stage"] == "refine"]
    assert refined, "refinement evaluated no new point"
    best_coarse = min(
        (r for r in head.search_results_ if r["stage"] == "coarse"),
        key=lambda r: (-r["val_accuracy"], r["val_log_loss"], r["C"]),
    )["C"]
    # refined points lie strictly between the coarse neighbours of the best coarse C
    assert all(best_coarse / 10 < c < best_coarse * 10 for c in refined)
    # the chosen C is the best of all evaluations under the documented order
    best = min(head.search_results_, key=lambda r: (-r["val_accuracy"], r["val_log_loss"], r["C"]))
    assert head.best_params_ == {"C": best["C"]}
    no_refine = LogisticRegressionHead(refine=False).fit(
        clf_data["X_train"], clf_data["y_train"], clf_data["X_val"], clf_data["y_val"]
    )
    assert len(no_refine.search_results_) == 9
    assert no_refine.best_params_["C"] in DEFAULT_CS


def test_log_grid_search_tie_break_and_edges():
    grid = np.array([0.1, 1.0, 10.0])

    def evaluate(values, stage):
        # flat accuracy and loss: the smallest C must win the tie
        return [{"C": float(v), "stage": stage, "acc": 1.0, "loss": 0.5} for v in values]

    best, results = log_grid_search(grid, evaluate, lambda r: (-r["acc"], r["loss"], r["C"]), "C", True, 3)
    assert best == 0.1
    # best at the lower edge: the fine grid spans [0.1, 1], only its midpoint is new
    assert [r["C"] for r in results if r["stage"] == "refine"] == pytest.approx([10 ** -0.5])


def _nuisance_data(n: int = 600, seed: int = 0):
    """4 classes; the class signal hides under a shared nuisance u: x_a = s + 5u, x_b = u.

    Heavy L2 shrinks towards the class-mean direction (x_a alone, swamped by u);
    only a weakly regularised model learns x_a - 5 x_b and separates the classes.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    centers = np.array([[0, 0], [0, 3], [3, 0], [3, 3]], dtype=float)
    s = centers[y] + 0.3 * rng.standard_normal((n, 2))
    u = rng.standard_normal((n, 2))
    X = np.hstack([s + 5 * u, u, rng.standard_normal((n, 28))])
    return X, y


def test_search_avoids_heavy_regularisation():
    X, y = _nuisance_data()
    head = LogisticRegressionHead().fit(X[:360], y[:360], X[360:480], y[360:480])
    by_c = {r["C"]: r for r in head.search_results_}
    assert by_c[1e-4]["val_accuracy"] < 0.6  # heavy regularisation is clearly wrong here
    assert head.best_params_["C"] >= 0.1
    assert np.mean(head.predict(X[480:]) == y[480:]) >= 0.9


def test_ridge_search_avoids_heavy_regularisation(reg_data):
    head = RidgeHead().fit(reg_data["X_train"], reg_data["y_train"], reg_data["X_val"], reg_data["y_val"])
    by_alpha = {r["alpha"]: r["val_rmse"] for r in head.search_results_}
    assert head.best_params_["alpha"] <= 10
    assert min(by_alpha.values()) < 0.2 * by_alpha[1e5]


def test_scaler_uses_train_rows_only(clf_data):
    X, y = clf_data["X_train"], clf_data["y_train"]
    head = LogisticRegressionHead().fit(X, y, clf_data["X_val"], clf_data["y_val"])
    np.testing.assert_allclose(head.scaler_.mean_, X.mean(axis=0))
    np.testing.assert_allclose(head.scaler_.scale_, X.std(axis=0))
    assert head.scaler_.n_samples_seen_ == X.shape[0]


def test_refit_on_trainval_scales_on_trainval(reg_data):
    head = RidgeHead(refit_on_trainval=True).fit(
        reg_data["X_train"], reg_data["y_train"], reg_data["X_val"], reg_data["y_val"]
    )
    X_tv = np.vstack([reg_data["X_train"], reg_data["X_val"]])
    np.testing.assert_allclose(head.scaler_.mean_, X_tv.mean(axis=0))


def test_holdout_when_no_val_then_refit_on_full_train(clf_data):
    X, y = clf_data["X_train"], clf_data["y_train"]
    head = LogisticRegressionHead(validation_fraction=0.25).fit(X, y)
    np.testing.assert_allclose(head.scaler_.mean_, X.mean(axis=0))  # final model: full train
    assert _accuracy(head, clf_data) >= 0.8
    again = LogisticRegressionHead(validation_fraction=0.25).fit(X, y)
    assert again.search_results_ == head.search_results_
    other = LogisticRegressionHead(validation_fraction=0.25, random_state=1).fit(X, y)
    assert other.search_results_ != head.search_results_  # the seed picks the hold-out


def test_n_classes_gives_k_columns_when_a_class_is_absent(missing_class_data):
    d = missing_class_data
    head = LogisticRegressionHead(n_classes=6).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    proba = head.predict_proba(d["X_test"])
    assert proba.shape == (d["X_test"].shape[0], 6)
    np.testing.assert_array_equal(proba[:, 4:], 0.0)
    np.testing.assert_array_equal(head.classes_, np.arange(6))
    np.testing.assert_array_equal(head.train_classes_, np.arange(4))
    inferred = LogisticRegressionHead().fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    assert inferred.classes_.size == 4


def test_label_above_n_classes_is_rejected(clf_data):
    with pytest.raises(ValueError, match=r"label 4 found but n_classes=3; allowed labels: 0\.\.2"):
        LogisticRegressionHead(n_classes=3).fit(clf_data["X_train"], clf_data["y_train"])


def test_deterministic(clf_data):
    fit = lambda: LogisticRegressionHead().fit(  # noqa: E731
        clf_data["X_train"], clf_data["y_train"], clf_data["X_val"], clf_data["y_val"]
    )
    a, b = fit(), fit()
    np.testing.assert_array_equal(a.predict_proba(clf_data["X_test"]), b.predict_proba(clf_data["X_test"]))
    assert a.search_results_ == b.search_results_


@pytest.mark.parametrize(
    "params, message",
    [
        ({"Cs": [1.0, -1.0]}, r"Cs=\[1\.0, -1\.0\] is invalid \(Cs\[1\]=-1\.0 is out of range\); allowed: a non-empty "
                              r"list whose items are each a finite number > 0"),
        ({"refine_points": 1}, r"refine_points=1 is invalid; allowed: an integer >= 2"),
        ({"validation_fraction": 1.5}, r"validation_fraction=1\.5 is invalid; allowed: a number in \(0, 1\)"),
    ],
)
def test_invalid_params_name_value_and_allowed(clf_data, params, message):
    with pytest.raises(ValueError, match=message):
        LogisticRegressionHead(**params).fit(clf_data["X_train"], clf_data["y_train"])


def test_bad_labels_and_feature_mismatch(clf_data):
    X, y = clf_data["X_train"], clf_data["y_train"]
    # with n_classes=K the labels are class indices 0..K-1 (n_classes=None takes any labels, -1 and strings too)
    with pytest.raises(ValueError, match=r"label -1; allowed: class indices >= 0.*Hint"):
        LogisticRegressionHead(n_classes=5).fit(X, np.where(y == 0, -1, y))
    with pytest.raises(ValueError, match=r"y_val contains the label -1"):
        LogisticRegressionHead(n_classes=5).fit(X, y, clf_data["X_val"], np.full(len(clf_data["X_val"]), -1))
    with pytest.raises(ValueError, match=r"Unknown label type: y has dtype <U3; allowed with n_classes=K: integer "
                                         r"class indices 0..K-1. Hint: leave n_classes=None"):
        LogisticRegressionHead(n_classes=5).fit(X, np.array(["cat", "dog"] * (len(y) // 2)))
    with pytest.raises(ValueError, match=r"Unknown label type: continuous \(the label 0.5\).*Hint: use a regression"):
        LogisticRegressionHead().fit(X, y + 0.5)
    with pytest.raises(ValueError, match="X_val and y_val must be given together"):
        LogisticRegressionHead().fit(X, y, X_val=clf_data["X_val"])
    head = LogisticRegressionHead(Cs=[1.0], refine=False).fit(X, y)
    with pytest.raises(ValueError, match="X has 31 features, but LogisticRegressionHead is expecting 32 features"):
        head.predict(X[:, :31])


def test_every_grid_point_is_really_fitted_even_after_a_warm_start():
    """A warm start that already meets tol must not stand in for the larger C (0 lbfgs iterations)."""
    from sklearn.datasets import make_classification

    from featcache.heads import LogisticRegressionHead

    # Wide, separable training rows (like CNN features of a small set): large C barely moves the optimum.
    X, y = make_classification(n_samples=500, n_features=300, n_informative=30, n_classes=4, random_state=0)
    Cs = [1.0, 10.0, 100.0, 1000.0, 10000.0]
    head = LogisticRegressionHead(Cs=Cs, refine=False).fit(X[:300], y[:300], X[300:], y[300:])
    assert all(row["n_iter"] > 0 for row in head.search_results_), head.search_results_
    losses = [row["val_log_loss"] for row in head.search_results_]
    assert len(set(np.round(losses, 10))) == len(Cs)
