"""``classes_`` follows scikit-learn: the labels seen (n_classes=None) or 0..K-1 (n_classes=K)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV

from featcache.heads import (
    KNNHead,
    LightGBMHead,
    LogisticRegressionHead,
    MLPHead,
    StreamingLogisticHead,
    StreamingMLPHead,
    fit_and_evaluate,
    load_head,
    save_head,
)
from featcache.heads.knn import PROBA_FLOOR

MLP = {"hidden_sizes": (32,), "batch_size": 64, "max_epochs": 30, "patience": 5, "n_threads": 1}
HEADS = [
    LogisticRegressionHead(Cs=[1.0], refine=False),
    LightGBMHead(n_estimators=30, n_jobs=1),
    MLPHead(**MLP),
    StreamingLogisticHead(max_epochs=5),
    StreamingMLPHead(**MLP),
    KNNHead(ks=(5, 20)),
]
ids = [type(h).__name__ for h in HEADS]


@pytest.fixture(scope="module")
def three() -> dict[str, np.ndarray]:
    """3 well-separated classes 0..2; 300 train / 100 val / 100 test."""
    X, y = make_classification(n_samples=500, n_features=12, n_informative=6, n_classes=3,
                               n_clusters_per_class=1, class_sep=2.5, random_state=0)
    return {"X_train": X[:300], "y_train": y[:300], "X_val": X[300:400], "y_val": y[300:400],
            "X_test": X[400:], "y_test": y[400:]}


def _fit(head, d, names):
    """Fit a fresh clone of ``head`` on ``d`` with the labels ``names[y]``."""
    from sklearn.base import clone

    return clone(head).fit(d["X_train"], names[d["y_train"]], d["X_val"], names[d["y_val"]])


@pytest.mark.parametrize("names", [np.array([3, 7, 9]), np.array(["cat", "dog", "eel"]), np.array([0, 20000, 5])],
                         ids=["3-7-9", "strings", "0-20000"])
@pytest.mark.parametrize("head", HEADS, ids=ids)
def test_classes_are_the_labels_seen(head, names, three):
    # classes_ used to be arange(max label + 1) (10 columns for {3, 7, 9}, 20001 for {0, 20000});
    # string labels were refused
    fitted = _fit(head, three, names)
    expected = np.unique(names)
    np.testing.assert_array_equal(fitted.classes_, expected)
    proba = fitted.predict_proba(three["X_test"])
    assert proba.shape == (100, 3) and proba.dtype == np.float64
    y_test = names[three["y_test"]]
    pred = fitted.predict(three["X_test"])
    assert set(pred) <= set(expected)
    np.testing.assert_array_equal(pred, expected[proba.argmax(axis=1)])
    assert np.mean(pred == y_test) >= 0.8
    # scikit-learn's probability metrics read the columns in classes_ order
    assert skm.log_loss(y_test, proba, labels=fitted.classes_) < 0.7
    assert skm.roc_auc_score(y_test, proba, multi_class="ovr", labels=fitted.classes_) > 0.9


@pytest.mark.parametrize("head", HEADS, ids=ids)
def test_a_label_seen_only_in_val_gets_a_column(head, three):
    names = np.array(["a", "b", "c"])
    d = dict(three)
    keep = three["y_train"] != 2  # class "c" only in val
    d["X_train"], d["y_train"] = three["X_train"][keep], three["y_train"][keep]
    fitted = _fit(head, d, names)
    np.testing.assert_array_equal(fitted.classes_, names)
    assert fitted.predict_proba(three["X_test"]).shape == (100, 3)
    if hasattr(fitted, "train_classes_"):  # indices into classes_ of the classes the model was trained on
        np.testing.assert_array_equal(fitted.train_classes_, [0, 1])
        # 0, but k-NN's smoothed votes (featcache.heads.knn.PROBA_FLOOR), which give no class exactly 0
        floor = 0.0 if not isinstance(fitted, KNNHead) else PROBA_FLOOR / (1 + 3 * PROBA_FLOOR)
        np.testing.assert_allclose(fitted.predict_proba(three["X_test"])[:, 2], floor, rtol=1e-12, atol=0)


@pytest.mark.parametrize("head", HEADS, ids=ids)
def test_n_classes_keeps_class_indices(head, three):
    # the pipeline's path: classes_ = arange(K), a class absent from the data still gets a column
    fitted = _fit(head.set_params(n_classes=5), three, np.arange(3))
    head.set_params(n_classes=None)
    np.testing.assert_array_equal(fitted.classes_, np.arange(5))
    assert fitted.predict_proba(three["X_test"]).shape == (100, 5)
    with pytest.raises(ValueError, match="Unknown label type: y has dtype <U3; allowed with n_classes=K"):
        _fit(fitted.set_params(n_classes=5), three, np.array(["cat", "dog", "eel"]))


@pytest.mark.parametrize("head", [HEADS[0], HEADS[1], HEADS[2], HEADS[5]], ids=[*ids[:3], ids[5]])
def test_string_classes_survive_save_and_load(head, three, tmp_path):
    fitted = _fit(head, three, np.array(["cat", "dog", "eel"]))
    loaded = load_head(save_head(fitted, tmp_path / "head"))
    np.testing.assert_array_equal(loaded.classes_, fitted.classes_)
    np.testing.assert_array_equal(loaded.predict(three["X_test"]), fitted.predict(three["X_test"]))


def test_grid_search_neg_log_loss_on_labels_3_7_9(three):
    y = np.array([3, 7, 9])[three["y_train"]]
    search = GridSearchCV(LogisticRegressionHead(refine=False), {"Cs": [[0.1], [1.0]]}, scoring="neg_log_loss", cv=3)
    search.fit(three["X_train"], y)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    np.testing.assert_array_equal(search.best_estimator_.classes_, [3, 7, 9])


def test_fit_and_evaluate_scores_labels_against_their_columns(three):
    names = np.array([3, 7, 9])
    d = {k: names[v] if k.startswith("y") else v for k, v in three.items()}
    result = fit_and_evaluate(LogisticRegressionHead(Cs=[1.0], refine=False), "classification", d["X_train"],
                              d["y_train"], d["X_val"], d["y_val"], d["X_test"], d["y_test"], n_boot=10)
    assert result.scores.shape == (100, 3)
    assert result.metrics["accuracy"] == pytest.approx(np.mean(result.predictions == d["y_test"]))
    assert result.metrics["log_loss"] == pytest.approx(skm.log_loss(d["y_test"], result.scores), rel=1e-6)
