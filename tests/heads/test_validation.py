"""The heads' parameter checks raise ParamError: a ValueError (scikit-learn's contract for a bad parameter)
and a UserError (``featcache train`` reports it in one line, exit status 2)."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import ParamError, UserError
from featcache.heads import RidgeHead, StreamingRidgeHead, make_head
from featcache.heads.param_types import check_declared
from featcache.heads.validation import check_fraction, check_positive


@pytest.mark.parametrize(("check", "message"), [
    (lambda: check_positive("learning_rate", "fast"),
     r"^learning_rate='fast' is invalid; allowed: a finite number > 0\. Hint: set learning_rate in the head's"),
    (lambda: check_positive("reg_lambda", -1.0, allow_zero=True), r"^reg_lambda=-1\.0 is invalid; allowed: a finite"),
    (lambda: check_fraction("subsample", 1.5, closed_right=True), r"^subsample=1\.5 is invalid; allowed: a number"),
    (lambda: check_declared(make_head("logreg", "classification", {"Cs": ["a"]})),
     r"^Cs=\['a'\] is invalid \(Cs\[0\]='a' is not a float\); allowed: a non-empty list whose items are each a"),
])
def test_parameter_checks_raise_a_param_error(check, message):
    with pytest.raises(ParamError, match=message) as err:
        check()
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("lightgbm", {"learning_rate": "fast"}, r"learning_rate='fast' is invalid"),
    ("lightgbm", {"num_leaves": 1}, r"num_leaves=1 is invalid; allowed: an integer >= 2"),
    ("logreg", {"max_iter": 0}, r"max_iter=0 is invalid"),
    ("mlp", {"hidden_sizes": 512}, r"hidden_sizes=512 is invalid.*hidden_sizes: \[512\]"),
    ("mlp", {"pca_components": 0}, r"pca_components=0 is invalid; allowed: an integer >= 1 or a number in \(0, 1\)"),
    ("logreg", {"Cs": np.array([1.0, 0.0])}, r"Cs=array\(\[1\., 0\.\]\) is invalid \(Cs\[1\]=0\.0 is out of range"),
    ("mlp", {"dropout": 1.0}, r"dropout=1\.0 is invalid"),
    ("sgd", {"max_epochs": 0}, r"max_epochs=0 is invalid"),
])
def test_a_head_fit_with_a_bad_parameter_raises_a_param_error(name, params, message):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 4)), np.arange(40) % 2
    with pytest.raises(ParamError, match=message):
        make_head(name, "classification", params).fit(X, y)


def test_an_unknown_parameter_name_is_a_param_error():
    with pytest.raises(ParamError, match=r"unknown parameter 'C' for head 'logreg'"):
        make_head("logreg", "classification", {"C": 1.0})


@pytest.mark.parametrize("where", ["X", "X_val", "predict"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("cls", [RidgeHead, StreamingRidgeHead], ids=lambda c: c.__name__)
def test_non_finite_features_name_the_array_and_say_what_to_do(reg_data, where, bad, cls):
    """sklearn's "Input X contains NaN." named X for bad X_val rows too, and gave no hint."""
    d = {k: v.copy() for k, v in reg_data.items()}
    head = cls()
    if where == "predict":
        head.fit(d["X_train"], d["y_train"])
        d["X_test"][3, 1] = bad
        call, name = (lambda: head.predict(d["X_test"])), "X"
    else:
        d["X_train" if where == "X" else "X_val"][3, 1] = bad
        call, name = (lambda: head.fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])), where
    message = rf"Input {name} contains (NaN|infinity).*Allowed: finite numbers\. Hint: drop"
    with pytest.raises(ValueError, match=message):
        call()


def test_non_finite_val_targets_are_named_y_val(reg_data):
    y_val = reg_data["y_val"].copy()
    y_val[0] = np.nan
    with pytest.raises(ValueError, match=r"Input y_val contains NaN\..*Hint: drop the rows whose label or target"):
        RidgeHead().fit(reg_data["X_train"], reg_data["y_train"], reg_data["X_val"], y_val)


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "mlp", "sgd"])
def test_random_state_must_be_an_int_seed(name, clf_data):
    """A RandomState (scikit-learn takes one) was a raw TypeError in int() for three heads; the heads need an
    int seed (torch, LightGBM, and head.json, which records the params)."""
    head = make_head(name, "classification", random_state=np.random.RandomState(0))
    with pytest.raises(ParamError, match=r"random_state=RandomState.* is invalid; allowed: an integer >= 0 or None"):
        head.fit(clf_data["X_train"], clf_data["y_train"], clf_data["X_val"], clf_data["y_val"])
