"""The weighted k-NN heads (``knn``): cosine votes ``exp(cos / T)``, k chosen on val, bounded-memory blocks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from featcache.errors import ParamError
from featcache.heads import KNNHead, KNNRegressorHead, load_head, make_head, save_head
from featcache.heads.knn import DEFAULT_K, PROBA_FLOOR, l2_normalise
from featcache.heads.metrics import log_loss_score

#: Three training rows and a query (cosines 1, 0 and 1/sqrt(2) to the query).
THREE = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
QUERY = np.array([[2.0, 0.0]])


def _smoothed(p: np.ndarray) -> np.ndarray:
    return (p + PROBA_FLOOR) / (1 + p.size * PROBA_FLOOR)


def test_the_votes_weigh_exp_cosine_over_t():
    head = KNNHead(ks=[3], temperature=0.5).fit(THREE, [0, 1, 1])
    w = np.exp(np.array([1.0, 0.0, 1 / np.sqrt(2)]) / 0.5)
    expected = _smoothed(np.array([w[0], w[1] + w[2]]) / w.sum())
    np.testing.assert_allclose(head.predict_proba(QUERY)[0], expected, rtol=1e-6)
    assert head.predict(QUERY)[0] == 0  # 7.39 against 1 + 4.11
    # a high temperature tends to the plain majority vote
    assert KNNHead(ks=[3], temperature=100.0).fit(THREE, [0, 1, 1]).predict(QUERY)[0] == 1


def test_the_regressor_predicts_the_weighted_mean_of_the_neighbours():
    head = KNNRegressorHead(ks=[3], temperature=0.5).fit(THREE, [1.0, 2.0, 4.0])
    w = np.exp(np.array([1.0, 0.0, 1 / np.sqrt(2)]) / 0.5)
    assert head.predict(QUERY)[0] == pytest.approx((w @ [1.0, 2.0, 4.0]) / w.sum(), rel=1e-6)
    # k=1: the nearest row's target
    assert KNNRegressorHead(ks=[1]).fit(THREE, [1.0, 2.0, 4.0]).predict(QUERY)[0] == 1.0
    # a tiny temperature does not overflow: the nearest neighbour takes all the weight
    assert KNNRegressorHead(ks=[3], temperature=1e-4).fit(THREE, [1.0, 2.0, 4.0]).predict(QUERY)[0] == 1.0


def test_balanced_class_weight_flips_a_minority_vote():
    """4 class-0 rows, 1 class-1 row; the 3 nearest of the query are the class-1 row and two class-0 rows, voting
    nearly alike (T large): 2 against 1 unweighted; balanced, class 0 weighs 5/8 and class 1 5/2."""
    X = np.array([[1.0, 0.0], [0.9, 0.5], [0.9, -0.5], [-1.0, 0.2], [-1.0, -0.2]])
    y = np.array([1, 0, 0, 0, 0])
    query = np.array([[1.0, 0.0]])
    plain = KNNHead(ks=[3], temperature=1e3).fit(X, y)
    balanced = KNNHead(ks=[3], temperature=1e3, class_weight="balanced").fit(X, y)
    assert plain.predict(query)[0] == 0 and balanced.predict(query)[0] == 1
    np.testing.assert_allclose(balanced.class_weight_, [5 / 8, 5 / 2])
    np.testing.assert_allclose(balanced.predict_proba(query)[0], _smoothed(np.array([1.25, 2.5]) / 3.75), rtol=1e-3)


@pytest.fixture(scope="module")
def noisy_clusters() -> tuple[np.ndarray, ...]:
    """Two well-separated directions, 25% of the training labels flipped, clean val: k=1 copies the noise."""
    rng = np.random.default_rng(0)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        centres = np.where(y[:, None] == 0, [5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0])
        return centres + rng.standard_normal((n, 4)), y

    X, y = rows(400)
    flip = rng.random(400) < 0.25
    X_val, y_val = rows(200)
    return X, np.where(flip, 1 - y, y), X_val, y_val


def test_k_is_chosen_on_the_validation_rows(noisy_clusters):
    head = KNNHead(ks=[1, 3, 25, 1000]).fit(*noisy_clusters)
    results = {r["k"]: r for r in head.search_results_}
    assert sorted(results) == [1, 3, 25, 400]  # 1000 clipped to the 400 training rows
    assert results[1]["val_accuracy"] < 0.85 and results[25]["val_accuracy"] > 0.95
    best = max(r["val_accuracy"] for r in head.search_results_)
    assert head.best_params_ == {"k": min(k for k, r in results.items() if r["val_accuracy"] == best)}
    assert head.best_params_["k"] >= 25
    # selection_metric: the chosen k has the best val value of that metric
    by_ll = KNNHead(ks=[1, 3, 25, 1000], selection_metric="log_loss").fit(*noisy_clusters)
    chosen = next(r for r in by_ll.search_results_ if r["k"] == by_ll.best_params_["k"])
    assert chosen["val_log_loss"] == min(r["val_log_loss"] for r in by_ll.search_results_)


def test_ties_go_to_the_smaller_k():
    head = KNNHead(ks=[2, 1]).fit(THREE, [0, 1, 1], QUERY, [0])
    rows = {r["k"]: r for r in head.search_results_}
    assert rows[1]["val_accuracy"] == rows[2]["val_accuracy"] == 1.0
    assert head.best_params_ == {"k": 1 if rows[1]["val_log_loss"] <= rows[2]["val_log_loss"] else 2}
    # equal scores: the smaller k
    same = KNNHead(ks=[1, 2], temperature=1e-4).fit(THREE, [0, 1, 1], QUERY, [0])
    assert same.search_results_[0]["val_log_loss"] == same.search_results_[1]["val_log_loss"]
    assert same.best_params_ == {"k": 1}


def test_without_validation_rows_the_default_k_is_used_and_logged(noisy_clusters, caplog):
    X, y = noisy_clusters[:2]
    with caplog.at_level(logging.INFO, logger="featcache.heads.knn"):
        head = KNNHead().fit(X, y)
    assert head.best_params_ == {"k": DEFAULT_K} and head.search_results_ == []
    assert "no validation rows, so k=20" in caplog.text
    assert KNNHead().fit(X[:7], y[:7]).best_params_ == {"k": 7}  # clipped
    assert KNNHead(ks=[3]).fit(X, y).best_params_ == {"k": 3}  # the single k of the grid


def test_blocks_of_queries_give_the_one_block_result(noisy_clusters):
    X, y, X_val, y_val = noisy_clusters
    whole = KNNHead(ks=[1, 5, 25], batch_size=10_000).fit(X, y, X_val, y_val)
    for batch_size in (1, 7):
        blocks = clone(whole).set_params(batch_size=batch_size).fit(X, y, X_val, y_val)
        # float32 BLAS may round a row's dot products differently in another block shape: equal up to that
        assert blocks.best_params_ == whole.best_params_
        assert blocks.search_results_ == [pytest.approx(r, rel=1e-6) for r in whole.search_results_]
        np.testing.assert_array_equal(blocks.predict(X_val), whole.predict(X_val))
        np.testing.assert_allclose(blocks.predict_proba(X_val), whole.predict_proba(X_val), rtol=1e-6)
    reg = KNNRegressorHead(ks=[5], batch_size=10_000).fit(X, y.astype(float))
    np.testing.assert_allclose(reg.set_params(batch_size=3).predict(X_val), reg.set_params(batch_size=10_000)
                               .predict(X_val), rtol=1e-6)


def test_probabilities_are_smoothed_and_cover_every_class(noisy_clusters):
    X, y, X_val, y_val = noisy_clusters
    head = KNNHead(ks=[1], n_classes=3).fit(X, y)
    proba = head.predict_proba(X_val)
    assert proba.shape == (200, 3) and proba.dtype == np.float64
    assert np.all(proba > 0) and np.allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba[:, 2], PROBA_FLOOR / (1 + 3 * PROBA_FLOOR))  # no training row of class 2
    assert np.isfinite(log_loss_score(1 - head.predict(X_val), proba))  # every prediction wrong: still finite
    assert log_loss_score(1 - head.predict(X_val), proba) < -np.log(PROBA_FLOOR) + 1e-3


def test_rows_are_l2_normalised_and_a_zero_row_stays_zero():
    X = np.array([[3.0, 4.0], [0.0, 0.0], [1e300, 1e300]])
    out = l2_normalise(X)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
    head = KNNHead(ks=[1]).fit(THREE * 10, [0, 1, 1])
    np.testing.assert_array_equal(head.train_rows_, l2_normalise(THREE))
    assert head.predict(np.zeros((1, 2))).shape == (1,)  # a zero query: all cosines 0, still a prediction


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_save_and_load_give_identical_predictions(task, noisy_clusters, tmp_path):
    X, y, X_val, y_val = noisy_clusters
    names = np.array(["cat", "dog"])
    if task == "classification":
        head = make_head("knn", task, {"class_weight": "balanced", "ks": (1, 9)}).fit(X, names[y], X_val, names[y_val])
    else:
        head = make_head("knn", task, {"ks": (1, 9)}).fit(X, y + X[:, 0], X_val, y_val + X_val[:, 0])
    loaded = load_head(save_head(head, tmp_path / "knn"))
    with np.load(tmp_path / "knn" / "arrays.npz", allow_pickle=False) as npz:
        assert npz["train_rows_"].dtype == np.float32 and npz["train_rows_"].shape == (400, 4)
    assert loaded.get_params() == head.get_params() and loaded.ks == (1, 9)
    assert loaded.best_params_ == head.best_params_ and loaded.search_results_ == head.search_results_
    np.testing.assert_array_equal(loaded.predict(X_val), head.predict(X_val))
    if task == "classification":
        np.testing.assert_array_equal(loaded.predict_proba(X_val), head.predict_proba(X_val))
        np.testing.assert_array_equal(loaded.classes_, names)
        np.testing.assert_array_equal(loaded.class_weight_, head.class_weight_)


@pytest.mark.parametrize(("params", "message"), [
    ({"temperature": 0}, r"^temperature=0 is invalid"),
    ({"ks": [0, 3]}, r"^ks=\[0, 3\] is invalid"),
    ({"ks": []}, r"^ks=\[\] is invalid"),
    ({"batch_size": 0}, r"^batch_size=0 is invalid"),
])
def test_bad_parameters_are_refused_at_fit(params, message):
    with pytest.raises(ParamError, match=message):
        KNNHead(**params).fit(THREE, [0, 1, 1])


def test_not_fitted_before_fit_and_params_untouched():
    head = KNNHead()
    with pytest.raises(NotFittedError):
        head.predict(THREE)
    params = head.get_params()
    head.fit(THREE, [0, 1, 1])
    assert head.get_params() == params and head.n_features_in_ == 2 and head.fit_seconds_ > 0
    with pytest.raises(ValueError, match="X has 3 features, but KNNHead is expecting 2"):
        head.predict(np.ones((1, 3)))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("head", [KNNHead(), KNNRegressorHead()], ids=type)
def test_sklearn_estimator_checks(head, sklearn_checks):
    sklearn_checks(head)
