"""pca_components on all six in-memory heads; cv_folds on the linear heads."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler

from featcache.heads import LogisticRegressionHead, RidgeHead, fit_and_evaluate, load_head, make_head, save_head

FAST = {
    "logreg": {},
    "lightgbm": {"n_estimators": 100, "learning_rate": 0.1, "early_stopping_rounds": 10, "n_jobs": 1},
    "mlp": {"hidden_sizes": (32,), "batch_size": 128, "max_epochs": 15, "patience": 3, "n_threads": 1},
}
HEADS = [(name, task) for name in FAST for task in ("classification", "regression")]


def _data(task, clf_data, reg_data):
    return clf_data if task == "classification" else reg_data


def _train_only_pca(X, n_components):
    return PCA(n_components=n_components, random_state=0).fit(StandardScaler().fit_transform(X))


# ----------------------------------------------------------------------------- PCA
@pytest.mark.parametrize("name, task", HEADS)
@pytest.mark.parametrize("n_components", [8, 0.8], ids=["int", "variance"])
def test_pca_statistics_come_from_train_rows_only(name, task, n_components, clf_data, reg_data):
    d = _data(task, clf_data, reg_data)
    head = make_head(name, task, FAST[name], pca_components=n_components)
    head.fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    expected = _train_only_pca(d["X_train"], n_components)
    assert head.pca_.n_components_ == expected.n_components_
    if n_components == 8:
        assert head.pca_.n_components_ == 8
    else:  # the smallest number of components explaining >= 80 % of the variance
        assert 1 < head.pca_.n_components_ < d["X_train"].shape[1]
        assert head.pca_.explained_variance_ratio_.sum() >= 0.8
    assert head.pca_.n_samples_ == d["X_train"].shape[0]
    np.testing.assert_allclose(head.scaler_.mean_, d["X_train"].mean(axis=0))
    np.testing.assert_allclose(head.pca_.explained_variance_, expected.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(head.pca_.components_), np.abs(expected.components_), atol=1e-6)
    # and not those of train + val (so the check above can tell the two apart)
    leaked = _train_only_pca(np.vstack([d["X_train"], d["X_val"]]), head.pca_.n_components_)
    assert not np.allclose(head.pca_.explained_variance_, leaked.explained_variance_, rtol=1e-3)


@pytest.mark.parametrize("name, task", HEADS)
def test_pca_round_trip_without_pickle(name, task, clf_data, reg_data, tmp_path):
    d = _data(task, clf_data, reg_data)
    head = make_head(name, task, FAST[name], pca_components=6)
    head.fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    out = save_head(head, tmp_path / "head")
    with np.load(out / "arrays.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["pca_components"], head.pca_.components_)
        np.testing.assert_array_equal(npz["pca_mean"], head.pca_.mean_)
    loaded = load_head(out)
    assert loaded.pca_.n_components_ == 6 and loaded.pca_components == 6
    np.testing.assert_array_equal(loaded.predict(d["X_test"]), head.predict(d["X_test"]))
    if task == "classification":
        np.testing.assert_array_equal(loaded.predict_proba(d["X_test"]), head.predict_proba(d["X_test"]))


def test_predictions_go_through_scaler_then_pca(clf_data):
    d = clf_data
    head = LogisticRegressionHead(pca_components=10).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    assert head.estimator_.coef_.shape == (5, 10)
    manual = head.estimator_.predict_proba(head.pca_.transform(head.scaler_.transform(d["X_test"])))
    np.testing.assert_allclose(head.predict_proba(d["X_test"]), manual)


def test_pca_without_val_uses_all_training_rows_for_the_final_model(clf_data):
    X, y = clf_data["X_train"], clf_data["y_train"]
    head = LogisticRegressionHead(pca_components=0.9).fit(X, y)
    assert head.pca_.n_samples_ == X.shape[0]
    lgbm = make_head("lightgbm", "classification", FAST["lightgbm"], pca_components=0.9).fit(X, y)
    assert lgbm.pca_.n_samples_ == int(round(0.8 * X.shape[0]))  # early-stopping hold-out excluded


@pytest.mark.parametrize("name", list(FAST))
def test_shuffled_test_labels_change_nothing_chosen_with_pca(name, clf_data):
    d = clf_data
    runs = []
    for y_test in (d["y_test"], np.random.default_rng(0).permutation(d["y_test"])):
        head = make_head(name, "classification", FAST[name], pca_components=8)
        result = fit_and_evaluate(head, "classification", d["X_train"], d["y_train"], d["X_val"], d["y_val"],
                                  d["X_test"], y_test, n_boot=0)
        runs.append((head, result))
    (a, ra), (b, rb) = runs
    assert ra.best_params == rb.best_params
    np.testing.assert_array_equal(a.pca_.components_, b.pca_.components_)
    np.testing.assert_array_equal(ra.scores, rb.scores)
    assert ra.metrics["accuracy"] != rb.metrics["accuracy"]


@pytest.mark.parametrize("value", [0, -1, 1.0, 1.5, True, "all"])
def test_invalid_pca_components_names_value_and_allowed(value, clf_data):
    message = rf"pca_components={value!r} is invalid; allowed: an integer >= 1 or a number in \(0, 1\) or None\. Hint"
    with pytest.raises(ValueError, match=message):
        LogisticRegressionHead(pca_components=value).fit(clf_data["X_train"], clf_data["y_train"])


def test_too_many_pca_components(clf_data):
    with pytest.raises(ValueError, match=r"pca_components=33 exceeds min\(n_rows, n_features\)=32.*Hint"):
        make_head("mlp", "classification", FAST["mlp"], pca_components=33).fit(
            clf_data["X_train"], clf_data["y_train"], clf_data["X_val"], clf_data["y_val"]
        )


def test_contract_with_pca_and_cv(contract, clf_data):
    d = clf_data
    contract(LogisticRegressionHead(pca_components=8, cv_folds=3), d["X_train"], d["y_train"], None, None)


# ----------------------------------------------------------------------------- k-fold CV
def test_logreg_cv_mean_fold_score_chooses_C(clf_data):
    X, y = clf_data["X_train"], clf_data["y_train"]
    Cs = [1e-3, 1e-2, 1e-1, 1.0]
    head = LogisticRegressionHead(Cs=Cs, refine=False, cv_folds=3).fit(X, y)
    # recompute the mean fold accuracy independently: scaler per fold, fitted on its fit rows, whose range
    # clips the selection rows
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0).split(X, y)
    acc = np.zeros(len(Cs))
    for fit_idx, sel_idx in folds:
        scaler = StandardScaler().fit(X[fit_idx])
        for i, C in enumerate(Cs):
            model = LogisticRegression(C=C, max_iter=1000).fit(scaler.transform(X[fit_idx]), y[fit_idx])
            X_sel = np.clip(X[sel_idx], X[fit_idx].min(axis=0), X[fit_idx].max(axis=0))
            acc[i] += np.mean(model.predict(scaler.transform(X_sel)) == y[sel_idx]) / 3
    got = [r["val_accuracy"] for r in head.search_results_]
    np.testing.assert_allclose(got, acc, atol=1e-9)
    assert all(r["cv_folds"] == 3 for r in head.search_results_)
    best = min(head.search_results_, key=lambda r: (-r["val_accuracy"], r["val_log_loss"], r["C"]))
    assert head.best_params_ == {"C": best["C"]}
    # then refit on all of train
    assert head.scaler_.n_samples_seen_ == X.shape[0]
    assert np.mean(head.predict(clf_data["X_test"]) == clf_data["y_test"]) >= 0.8


def test_ridge_cv_mean_fold_rmse_chooses_alpha(reg_data):
    X, y = reg_data["X_train"], reg_data["y_train"]
    alphas = [0.1, 10.0, 1000.0]
    head = RidgeHead(alphas=alphas, refine=False, cv_folds=4).fit(X, y)
    rmse = np.zeros(len(alphas))
    for fit_idx, sel_idx in KFold(n_splits=4, shuffle=True, random_state=0).split(X):
        scaler = StandardScaler().fit(X[fit_idx])
        for i, alpha in enumerate(alphas):
            model = Ridge(alpha=alpha).fit(scaler.transform(X[fit_idx]), y[fit_idx])
            pred = model.predict(scaler.transform(np.clip(X[sel_idx], X[fit_idx].min(axis=0), X[fit_idx].max(axis=0))))
            rmse[i] += np.sqrt(np.mean((pred - y[sel_idx]) ** 2)) / 4
    np.testing.assert_allclose([r["val_rmse"] for r in head.search_results_], rmse, rtol=1e-9)
    assert head.best_params_ == {"alpha": alphas[int(np.argmin(rmse))]}
    assert head.scaler_.n_samples_seen_ == X.shape[0]


def test_cv_with_pca_fits_pca_per_fold(clf_data):
    X, y = clf_data["X_train"], clf_data["y_train"]
    head = LogisticRegressionHead(Cs=[0.1, 1.0], refine=False, cv_folds=3, pca_components=5).fit(X, y)
    assert len(head.search_results_) == 2 and head.pca_.n_samples_ == X.shape[0]


def test_cv_differs_from_holdout_and_is_ignored_with_val(clf_data):
    d = clf_data
    plain = LogisticRegressionHead(refine=False).fit(d["X_train"], d["y_train"])
    cv = LogisticRegressionHead(refine=False, cv_folds=5).fit(d["X_train"], d["y_train"])
    assert [r["val_accuracy"] for r in cv.search_results_] != [r["val_accuracy"] for r in plain.search_results_]
    with_val = LogisticRegressionHead(refine=False, cv_folds=5).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    reference = LogisticRegressionHead(refine=False).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    assert with_val.search_results_ == reference.search_results_


def test_cv_is_deterministic_and_seeded(reg_data):
    X, y = reg_data["X_train"], reg_data["y_train"]
    a, b = (RidgeHead(cv_folds=3).fit(X, y) for _ in range(2))
    assert a.search_results_ == b.search_results_
    assert RidgeHead(cv_folds=3, random_state=1).fit(X, y).search_results_ != a.search_results_


@pytest.mark.parametrize(
    "cv_folds, message",
    [
        (1, r"cv_folds=1 is invalid; allowed: an integer >= 2 or None"),
        (2.5, r"cv_folds=2\.5 is invalid; allowed: an integer >= 2"),
        (400, r"cv_folds=400 is larger than the 360 training rows; allowed: 2\.\.360\. Hint"),
        (100, r"cannot build cv_folds=100 stratified folds: .*class counts .*Hint: lower cv_folds"),
    ],
)
def test_invalid_cv_folds(cv_folds, message, clf_data):
    with pytest.raises(ValueError, match=message):
        LogisticRegressionHead(cv_folds=cv_folds).fit(clf_data["X_train"], clf_data["y_train"])
