"""``class_weight="balanced"`` on every classification head: scikit-learn's weights over the training rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_class_weight

from _support.imbalanced import gaussians
from featcache.errors import ParamError
from featcache.heads import make_head
from featcache.heads.class_weight import balanced_weights, weighted_selection_metric
from featcache.heads.metrics import log_loss_score
from featcache.pipeline.params.train import check_heads_sections

#: Small, fast settings of each classification head.
SETTINGS = {
    "logreg": {},
    "lightgbm": {"n_jobs": 1},
    "mlp": {"n_threads": 1, "hidden_sizes": [16]},
    "sgd": {},
    "streaming_mlp": {"n_threads": 1, "hidden_sizes": [16]},
    # under class_weight it chooses k on val balanced accuracy by default (test_knn_chooses_k_on_balanced_...)
    "knn": {},
}


@pytest.fixture(scope="module")
def imbalanced() -> dict[str, np.ndarray]:
    """90/10 train and val, a balanced test set."""
    rng = np.random.default_rng(0)
    (X_tr, y_tr), (X_va, y_va), (X_te, y_te) = (gaussians(rng, *n) for n in ((450, 50), (180, 20), (300, 300)))
    return {"X_train": X_tr, "y_train": y_tr, "X_val": X_va, "y_val": y_va, "X_test": X_te, "y_test": y_te}


def _fit(name: str, data: dict[str, np.ndarray], **params) -> object:
    head = make_head(name, "classification", {**SETTINGS[name], **params})
    return head.fit(data["X_train"], data["y_train"], data["X_val"], data["y_val"])


@pytest.mark.parametrize("name", list(SETTINGS))
def test_balanced_weights_raise_balanced_accuracy(name, imbalanced):
    scores = {}
    for class_weight in (None, "balanced"):
        head = _fit(name, imbalanced, class_weight=class_weight)
        scores[class_weight] = balanced_accuracy_score(imbalanced["y_test"], head.predict(imbalanced["X_test"]))
    assert scores["balanced"] > scores[None] + 0.03, scores
    # the weights are scikit-learn's "balanced" ones over the training rows
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=imbalanced["y_train"])
    np.testing.assert_allclose(head.class_weight_, expected)


def test_unweighted_heads_record_no_weights(clf_data):
    for name in SETTINGS:
        head = make_head(name, "classification", {**SETTINGS[name], "max_epochs": 2} if "mlp" in name else
                         SETTINGS[name])
        head.fit(clf_data["X_train"], clf_data["y_train"], clf_data["X_val"], clf_data["y_val"])
        assert head.class_weight_ is None and head.get_params()["class_weight"] is None


def test_knn_chooses_k_on_balanced_accuracy_under_class_weight(imbalanced):
    """On plain val accuracy of a 90/10 val split the weighted k-NN picks k=1, where the weights change no vote
    (test balanced accuracy 0.727; k=10, chosen on balanced accuracy: 0.822): under class_weight its default
    criterion is balanced accuracy; a selection_metric (train.metric) still overrides it."""
    default = _fit("knn", imbalanced, class_weight="balanced")
    explicit = _fit("knn", imbalanced, class_weight="balanced", selection_metric="balanced_accuracy")
    on_accuracy = _fit("knn", imbalanced, class_weight="balanced", selection_metric="accuracy")
    assert default.best_params_ == explicit.best_params_ == {"k": 10}
    assert default.search_results_ == explicit.search_results_  # val_balanced_accuracy recorded per k
    assert on_accuracy.best_params_ == {"k": 1}
    score = {name: balanced_accuracy_score(imbalanced["y_test"], head.predict(imbalanced["X_test"]))
             for name, head in (("default", default), ("accuracy", on_accuracy))}
    assert score["default"] > score["accuracy"] + 0.05, score
    # unweighted, the default stays plain accuracy (then log loss)
    plain = _fit("knn", imbalanced)
    assert "val_balanced_accuracy" not in plain.search_results_[0]
    assert plain.best_params_ == _fit("knn", imbalanced, selection_metric="accuracy").best_params_


def test_weighted_selection_metric_follows_the_class_weights_unless_a_metric_is_set():
    assert weighted_selection_metric(None, "balanced") == "balanced_accuracy"
    assert weighted_selection_metric(None, None) is None
    assert weighted_selection_metric("log_loss", "balanced") == "log_loss"
    assert weighted_selection_metric("accuracy", None) == "accuracy"


def test_logreg_is_sklearns_balanced_logistic_regression_at_the_chosen_c(imbalanced):
    head = _fit("logreg", imbalanced, class_weight="balanced")
    X = head.scaler_.transform(imbalanced["X_train"])
    ref = LogisticRegression(C=head.best_params_["C"], class_weight="balanced", max_iter=1000)
    ref.fit(X, imbalanced["y_train"])
    X_test = head.scaler_.transform(imbalanced["X_test"])
    np.testing.assert_allclose(head.predict_proba(imbalanced["X_test"]), ref.predict_proba(X_test), atol=1e-5)


def test_balanced_weights_count_the_present_classes():
    y = np.array([0, 0, 0, 2])  # class 1 absent: weight 1, the others scikit-learn's over the present two
    np.testing.assert_allclose(balanced_weights(y, 3), [4 / 6, 1.0, 4 / 2])
    sklearn = compute_class_weight("balanced", classes=np.array([0, 2]), y=y)
    np.testing.assert_allclose(balanced_weights(y, 3)[[0, 2]], sklearn)


@pytest.mark.parametrize("twins", [("mlp", "streaming_mlp"), ("logreg", "sgd")])
def test_streaming_twin_weighs_as_its_in_memory_twin(twins, imbalanced):
    in_memory, streamed = (_fit(name, imbalanced, class_weight="balanced") for name in twins)
    np.testing.assert_allclose(streamed.class_weight_, in_memory.class_weight_)
    # without X_val both count the classes of the rows left after the same stratified hold-out
    no_val = {**imbalanced, "X_val": None, "y_val": None}
    in_memory, streamed = (_fit(name, no_val, class_weight="balanced") for name in twins)
    np.testing.assert_allclose(streamed.class_weight_, in_memory.class_weight_)


@pytest.mark.parametrize("name", ["mlp", "streaming_mlp"])
def test_mlp_validation_loss_is_weighted_the_same_way(name, imbalanced):
    head = _fit(name, imbalanced, class_weight="balanced")
    proba = head.predict_proba(imbalanced["X_val"])
    w = head.class_weight_[imbalanced["y_val"]]
    p_true = proba[np.arange(w.size), imbalanced["y_val"]]
    weighted = float(np.sum(-w * np.log(p_true)) / w.sum())
    best = head.history_[head.best_epoch_ - 1]["val_loss"]
    assert best == pytest.approx(weighted, rel=1e-4)
    assert best != pytest.approx(log_loss_score(imbalanced["y_val"], proba), rel=1e-3)
    loss = head.loss_function(torch.device("cpu"))
    np.testing.assert_allclose(loss.weight.numpy(), head.class_weight_.astype(np.float32))


def test_lightgbm_early_stops_on_the_weighted_validation_loss(imbalanced, monkeypatch):
    import lightgbm

    seen = {}
    fit = lightgbm.LGBMClassifier.fit

    def spy(self, X, y, **kwargs):
        seen.update(kwargs)
        return fit(self, X, y, **kwargs)

    monkeypatch.setattr(lightgbm.LGBMClassifier, "fit", spy)
    head = _fit("lightgbm", imbalanced, class_weight="balanced")
    np.testing.assert_allclose(seen["sample_weight"], head.class_weight_[imbalanced["y_train"]])
    np.testing.assert_allclose(seen["eval_sample_weight"][0], head.class_weight_[imbalanced["y_val"]])


def test_lightgbm_dask_weighs_rows_and_curve(imbalanced):
    import distributed

    from featcache.heads import fit_lightgbm_dask

    params = {"n_estimators": 30, "early_stopping_rounds": 5, "class_weight": "balanced"}
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        heads = {cw: fit_lightgbm_dask(client, imbalanced["X_train"], imbalanced["y_train"], imbalanced["X_val"],
                                       imbalanced["y_val"], **{**params, "class_weight": cw})
                 for cw in (None, "balanced")}
    head = heads["balanced"]
    np.testing.assert_allclose(head.class_weight_, compute_class_weight("balanced", classes=np.array([0, 1]),
                                                                         y=imbalanced["y_train"]))
    proba = head.predict_proba(imbalanced["X_val"])
    w = head.class_weight_[imbalanced["y_val"]]
    weighted = np.sum(-w * np.log(proba[np.arange(w.size), imbalanced["y_val"]])) / w.sum()
    assert head.val_curve_[head.best_iteration_ - 1] == pytest.approx(weighted, rel=1e-6)
    scores = {cw: balanced_accuracy_score(imbalanced["y_test"], h.predict(imbalanced["X_test"]))
              for cw, h in heads.items()}
    assert scores["balanced"] > scores[None], scores


def test_check_names_the_close_match_of_a_misspelt_class_weight():
    for task in ("classification", "regression"):  # the section is shared: a bad value fails under either task
        with pytest.raises(ParamError, match=r"^heads\.logreg\.class_weight: 'balnced' is not allowed; allowed: "
                                             r"'balanced' or null \(default null\)\. Did you mean 'balanced'\?"):
            check_heads_sections({"logreg": {"class_weight": "balnced"}}, task)
    check_heads_sections({name: {"class_weight": "balanced"} for name in SETTINGS}, "classification")
    check_heads_sections({name: {"class_weight": None} for name in SETTINGS}, "regression")
    with pytest.raises(ParamError, match=r"class_weight='balnced' is invalid; allowed: 'balanced' or None\. "
                                         r"Did you mean 'balanced'\?"):
        _fit("mlp", {"X_train": np.zeros((4, 2)), "y_train": np.array([0, 1, 0, 1]), "X_val": None, "y_val": None},
             class_weight="balnced")


def test_regression_twins_do_not_take_class_weight():
    for name in SETTINGS:
        with pytest.raises(ValueError, match="unknown parameter 'class_weight'"):
            make_head(name, "regression", {"class_weight": "balanced"})
