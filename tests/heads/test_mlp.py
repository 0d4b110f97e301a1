"""Torch MLP heads: accuracy, early stopping, BatchNorm edge case, seeding, threads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featcache.heads import MLPHead, MLPRegressorHead, StreamingMLPHead, StreamingMLPRegressorHead
from featcache.heads.training import epoch_scale, iter_batches

FAST = {"hidden_sizes": (64,), "batch_size": 128, "max_epochs": 40, "patience": 5, "n_threads": 1}


def _fit(cls, d, **params):
    return cls(**{**FAST, **params}).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])


def test_classifier_beats_chance(clf_data):
    head = _fit(MLPHead, clf_data)
    assert np.mean(head.predict(clf_data["X_test"]) == clf_data["y_test"]) >= 0.8
    proba = head.predict_proba(clf_data["X_test"])
    assert proba.shape == (clf_data["X_test"].shape[0], 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(head.predict(clf_data["X_test"]), proba.argmax(axis=1))


def test_regressor_beats_chance_in_original_units(reg_data):
    head = _fit(MLPRegressorHead, reg_data, max_epochs=100, patience=10)
    y, pred = reg_data["y_test"], head.predict(reg_data["X_test"])
    assert 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2) >= 0.8
    assert head.y_mean_ == pytest.approx(reg_data["y_train"].mean())
    assert head.y_scale_ == pytest.approx(reg_data["y_train"].std())


def test_architecture_and_fitted_state(clf_data):
    head = _fit(MLPHead, clf_data, hidden_sizes=(32, 16), dropout=0.1)
    kinds = [type(m).__name__ for m in head.module_]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert head.module_[-1].out_features == 5
    assert not head.module_.training
    assert [h["epoch"] for h in head.history_] == list(range(1, len(head.history_) + 1))
    assert set(head.history_[0]) == {"epoch", "train_loss", "val_loss", "val_score"}
    best = min(head.history_, key=lambda h: h["val_loss"])
    assert head.best_epoch_ == best["epoch"]
    assert head.best_params_ == {"epochs": head.best_epoch_}
    json.dumps(head.history_)
    # early stopping: stopped patience epochs after the best one, or ran out of epochs; 360 rows are 3 batches
    # of 128, fewer than min_epoch_steps (4): both count double
    assert epoch_scale(3, head.min_epoch_steps) == 2
    assert len(head.history_) in (head.best_epoch_ + 2 * FAST["patience"], 2 * FAST["max_epochs"])


def test_best_state_is_kept(clf_data):
    head = _fit(MLPHead, clf_data, max_epochs=60, patience=3, lr=3e-2)
    X = torch.as_tensor(head.scaler_.transform(clf_data["X_val"]), dtype=torch.float32)
    with torch.no_grad():
        val_loss = torch.nn.functional.cross_entropy(head.module_(X), torch.as_tensor(clf_data["y_val"]))
    assert float(val_loss) == pytest.approx(head.history_[head.best_epoch_ - 1]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("cls, data", [(MLPHead, "clf_data"), (MLPRegressorHead, "reg_data")])
def test_sklearn_contract(cls, data, contract, request):
    d = request.getfixturevalue(data)
    contract(cls(**{**FAST, "max_epochs": 5}), d["X_train"], d["y_train"], d["X_val"], d["y_val"])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("cls", [MLPHead, MLPRegressorHead])
def test_sklearn_estimator_checks(cls, sklearn_checks):
    # tiny datasets: the pre-tuning training budget (defaults are sized for 10k+ rows)
    sklearn_checks(cls(hidden_sizes=(16,), batch_size=128, max_epochs=100, patience=10, n_threads=1))


def test_last_batch_of_one_is_dropped():
    g = torch.Generator().manual_seed(0)
    sizes = [b.numel() for b in iter_batches(257, 128, g)]
    assert sizes == [128, 128]
    assert [b.numel() for b in iter_batches(258, 128, g)] == [128, 128, 2]


def test_train_size_with_remainder_one_fits(clf_data):
    X, y = clf_data["X_train"][:129], clf_data["y_train"][:129]  # 129 = 128 + 1
    head = MLPHead(**{**FAST, "max_epochs": 3, "min_epoch_steps": 1}).fit(X, y, clf_data["X_val"], clf_data["y_val"])
    assert len(head.history_) == 3


def test_deterministic_and_leaves_global_state_alone(clf_data):
    before_threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = _fit(MLPHead, clf_data, n_threads=1)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched by fit
    assert torch.get_num_threads() == before_threads
    b = _fit(MLPHead, clf_data, n_threads=1)
    np.testing.assert_array_equal(a.predict_proba(clf_data["X_test"]), b.predict_proba(clf_data["X_test"]))
    assert a.history_ == b.history_
    c = _fit(MLPHead, clf_data, random_state=1)
    assert c.history_ != a.history_


def test_n_classes_gives_k_columns_when_a_class_is_absent(missing_class_data):
    d = missing_class_data
    head = _fit(MLPHead, d, n_classes=6)
    proba = head.predict_proba(d["X_test"])
    assert proba.shape == (d["X_test"].shape[0], 6)
    assert proba[:, 4:].max() < 0.05  # never-seen classes get little mass


def test_scaler_uses_train_rows_only(reg_data):
    head = _fit(MLPRegressorHead, reg_data, max_epochs=2)
    np.testing.assert_allclose(head.scaler_.mean_, reg_data["X_train"].mean(axis=0))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"hidden_sizes": (64, 0)}, r"hidden_sizes=\(64, 0\) is invalid \(hidden_sizes\[1\]=0 is out of range\); "
                                    r"allowed: a list whose items are each an integer >= 1"),
        ({"hidden_sizes": 512}, r"hidden_sizes=512 is invalid; allowed: .*e\.g\. hidden_sizes=\[512\]"),
        ({"dropout": 1.0}, r"dropout=1\.0 is invalid; allowed: a number in \[0, 1\)"),
        ({"dropout": False}, r"dropout=False is invalid; allowed: a number in \[0, 1\)"),  # YAML 'no' is False
        ({"device": "tpu"}, r"device='tpu' is invalid; allowed: 'cpu', 'cuda'"),
        ({"min_epoch_steps": 0}, r"min_epoch_steps=0 is invalid; allowed: an integer >= 1"),
    ],
)
def test_invalid_params(clf_data, params, message):
    with pytest.raises(ValueError, match=message):
        MLPHead(**{**FAST, **params}).fit(clf_data["X_train"], clf_data["y_train"])


@pytest.mark.parametrize("cls, data", [(MLPHead, "clf_data"), (MLPRegressorHead, "reg_data")])
def test_random_state_none_means_0_for_the_holdout_too(cls, data, request):
    # the docstring says None means 0; the hold-out split (no X_val) used to be drawn at random
    d = request.getfixturevalue(data)
    params = {**FAST, "max_epochs": 3, "random_state": None, "pca_components": 8}
    a, b = (cls(**params).fit(d["X_train"], d["y_train"]) for _ in range(2))
    assert a.history_ == b.history_
    np.testing.assert_array_equal(a.predict(d["X_test"]), b.predict(d["X_test"]))
    seeded = cls(**{**params, "random_state": 0}).fit(d["X_train"], d["y_train"])
    assert seeded.history_ == a.history_


@pytest.mark.parametrize("cls, data", [(MLPHead, "clf_data"), (MLPRegressorHead, "reg_data")])
def test_one_training_row_is_a_clear_error(cls, data, request):
    # MLPRegressorHead raised torch's "Expected more than 1 value per channel when training"
    d = request.getfixturevalue(data)
    msg = rf"{cls.__name__} got 1 training row \(n_samples=1\); allowed: >= 2 .*Hint: pass more training rows"
    with pytest.raises(ValueError, match=msg):
        cls(**FAST).fit(d["X_train"][:1], d["y_train"][:1], d["X_val"], d["y_val"])


def test_epoch_scale():
    assert [epoch_scale(steps, 4) for steps in (1, 2, 3, 4, 5, 50)] == [4, 2, 2, 1, 1, 1]
    assert epoch_scale(1, 1) == 1
    assert epoch_scale(0, 4) == 4  # an epoch without a step (cannot happen: >= 2 rows) counts as one step


SMALL = {"hidden_sizes": (16,), "max_epochs": 6, "patience": 2, "n_threads": 1}
"""Below batch_size (256) training rows: one optimiser step an epoch."""


@pytest.mark.parametrize("cls, data", [(MLPHead, "clf_data"), (MLPRegressorHead, "reg_data"),
                                       (StreamingMLPHead, "clf_data"), (StreamingMLPRegressorHead, "reg_data")])
def test_small_data_trains_min_epoch_steps_per_counted_epoch(cls, data, request):
    # 60 rows, batch 256: an epoch is one step, so patience 2 and max_epochs 6 counted plain epochs (2 and 6
    # steps); they count epochs of at least min_epoch_steps (4) steps: 8 epochs of patience, at most 24
    d = request.getfixturevalue(data)
    X, y, X_val, y_val = d["X_train"][:60], d["y_train"][:60], d["X_val"], d["y_val"]
    head = cls(**SMALL).fit(X, y, X_val, y_val)
    assert len(head.history_) in (head.best_epoch_ + 4 * 2, 4 * 6)
    assert len(head.history_) > 6
    assert head.best_epoch_ == min(head.history_, key=lambda h: h["val_loss"])["epoch"]
    again = cls(**SMALL).fit(X, y, X_val, y_val)  # deterministic
    assert again.history_ == head.history_
    np.testing.assert_array_equal(again.predict(d["X_test"]), head.predict(d["X_test"]))
    plain = cls(**SMALL, min_epoch_steps=1).fit(X, y, X_val, y_val)  # plain epochs: the loop before the rule
    assert len(plain.history_) in (plain.best_epoch_ + 2, 6)
    assert plain.history_ == head.history_[:len(plain.history_)]  # same run, stopped sooner


def test_the_log_says_when_epochs_count_several_times(clf_data, caplog):
    """Else "best epoch 20 of 28 run" under max_epochs: 6 reads as a bug."""
    X, y = clf_data["X_train"], clf_data["y_train"]
    with caplog.at_level("INFO", logger="featcache.heads.training"):
        MLPHead(**SMALL).fit(X[:60], y[:60], clf_data["X_val"], clf_data["y_val"])
        MLPHead(**{**SMALL, "batch_size": 16}).fit(X[:64], y[:64], clf_data["X_val"], clf_data["y_val"])
    lines = [record.getMessage() for record in caplog.records if record.name == "featcache.heads.training"]
    assert lines == ["MLPHead: an epoch is 1 optimiser step(s), under min_epoch_steps=4: patience 2 and max_epochs 6 "
                     "count x4 epochs"]


def test_epochs_of_min_epoch_steps_or_more_are_unchanged(clf_data):
    # 360 rows in batches of 64 are 6 steps an epoch: min_epoch_steps 4 (the default) changes nothing
    params = {**FAST, "batch_size": 64, "max_epochs": 30, "patience": 3}
    a, b = _fit(MLPHead, clf_data, **params), _fit(MLPHead, clf_data, **params, min_epoch_steps=1)
    assert a.history_ == b.history_
    np.testing.assert_array_equal(a.predict_proba(clf_data["X_test"]), b.predict_proba(clf_data["X_test"]))
