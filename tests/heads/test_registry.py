"""Head registry: table, construction, errors with allowed values and hints."""

from __future__ import annotations

import pytest
from sklearn.base import is_classifier, is_regressor

from featcache.errors import UserError
from featcache.heads import (
    HEADS,
    KNNHead,
    KNNRegressorHead,
    LightGBMHead,
    LogisticRegressionHead,
    MLPRegressorHead,
    RidgeHead,
    StreamingLogisticHead,
    StreamingMLPHead,
    StreamingMLPRegressorHead,
    StreamingRidgeHead,
    head_names,
    make_head,
    registry,
)
from featcache.heads.registry import (
    DEFAULT_HEADS,
    HEAD_PATHS,
    REGISTRY,
    STORAGES,
    STREAMING_HEADS,
    UnknownHeadError,
    check_head_params,
    check_head_values,
    head_param_names,
    head_storage,
)


def test_table_shape():
    assert head_names() == ["logreg", "lightgbm", "mlp", "sgd", "streaming_mlp", "knn"]
    assert HEADS["logreg"] == {"classification": LogisticRegressionHead, "regression": RidgeHead}
    assert HEADS["sgd"] == {"classification": StreamingLogisticHead, "regression": StreamingRidgeHead}
    assert HEADS["streaming_mlp"] == {"classification": StreamingMLPHead, "regression": StreamingMLPRegressorHead}
    assert HEADS["knn"] == {"classification": KNNHead, "regression": KNNRegressorHead}
    for tasks in HEADS.values():
        assert set(tasks) == {"classification", "regression"}
        assert is_classifier(tasks["classification"]())
        assert is_regressor(tasks["regression"]())


def test_the_tables_derived_from_the_registry():
    assert HEAD_PATHS == {name: dict(entry.paths) for name, entry in REGISTRY.items()}
    assert STREAMING_HEADS == ("sgd", "streaming_mlp")
    assert DEFAULT_HEADS == ("logreg", "lightgbm", "mlp") and set(DEFAULT_HEADS) <= set(head_names())
    assert {entry.storage for entry in REGISTRY.values()} == set(STORAGES)
    assert [head_storage(name) for name in head_names()] == ["linear", "lightgbm", "torch", "linear", "torch",
                                                              "neighbours"]
    assert not REGISTRY["knn"].streaming and not REGISTRY["knn"].early_stopped and "knn" not in DEFAULT_HEADS
    with pytest.raises(ValueError, match=r"unknown head 'lgbm'; allowed: logreg, lightgbm, mlp, sgd, streaming_mlp, "
                                         r"knn"):
        head_storage("lgbm")


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "mlp", "sgd", "streaming_mlp", "knn"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_make_head_builds_registered_class_with_defaults(name, task):
    head = make_head(name, task)
    assert type(head) is HEADS[name][task]
    assert head.get_params() == HEADS[name][task]().get_params()


def test_params_and_overrides():
    head = make_head("lightgbm", "classification", {"num_leaves": 15, "n_jobs": 1}, n_jobs=2)
    assert isinstance(head, LightGBMHead)
    assert head.num_leaves == 15 and head.n_jobs == 2
    mlp = make_head("mlp", "regression", {"hidden_sizes": [128, 32]})
    assert isinstance(mlp, MLPRegressorHead) and list(mlp.hidden_sizes) == [128, 32]


def test_unknown_head_names_value_and_allowed():
    allowed = r"allowed: logreg, lightgbm, mlp, sgd, streaming_mlp, knn\."
    with pytest.raises(ValueError, match=r"unknown head 'logistic'; " + allowed):
        make_head("logistic", "classification")
    with pytest.raises(ValueError, match=r"Did you mean 'lightgbm'\?"):
        make_head("lightgmb", "classification")


@pytest.mark.parametrize("call", [lambda: make_head("lgbm", "classification"), lambda: head_storage("lgbm"),
                                  lambda: make_head("mlp", "classify")])
def test_unknown_heads_and_tasks_are_user_errors_and_value_errors(call):
    with pytest.raises(UnknownHeadError) as err:
        call()
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_unknown_task_names_value_and_allowed():
    message = r"unknown task 'classify' for head 'mlp'; allowed: classification, regression"
    with pytest.raises(ValueError, match=message):
        make_head("mlp", "classify")


def test_unknown_param_names_it_the_head_allowed_and_hint():
    with pytest.raises(ValueError) as err:
        make_head("logreg", "classification", {"C": 1.0})
    msg = str(err.value)
    assert "unknown parameter 'C'" in msg and "LogisticRegressionHead" in msg
    assert "allowed: Cs, class_weight, cv_folds, max_iter," in msg
    assert "Did you mean 'Cs'?" in msg
    with pytest.raises(ValueError, match=r"unknown parameter 'n_classes' for head 'logreg' \(RidgeHead, regression\)"):
        make_head("logreg", "regression", n_classes=3)
    with pytest.raises(ValueError, match=r"Did you mean 'learning_rate'\?"):
        make_head("lightgbm", "regression", learning_rat=0.1)


@pytest.mark.parametrize("name", list(HEAD_PATHS))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_head_param_names_read_from_source_are_what_get_params_returns(name, task):
    assert head_param_names.__wrapped__(name, task) == tuple(sorted(HEADS[name][task]().get_params(deep=False)))


def test_head_param_names_import_the_class_when_the_source_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "__file__", str(tmp_path / "registry.py"))  # no head module sources there
    assert head_param_names.__wrapped__("logreg", "classification") == tuple(
        sorted(LogisticRegressionHead().get_params(deep=False)))


def test_check_head_params_names_the_bad_key_without_importing_the_head():
    with pytest.raises(ValueError, match=r"unknown parameter 'max_itr' for head 'logreg'.*max_iter"):
        check_head_params("logreg", "classification", {"max_itr": 5})
    check_head_params("logreg", "classification", {"max_iter": 5})


@pytest.mark.parametrize(("name", "params", "message"), [
    ("lightgbm", {"learning_rate": "fast"}, "heads.lightgbm.learning_rate: 'fast' is not a float; allowed: a finite "
                                            "number > 0 (default 0.1). Hint: "),
    ("logreg", {"max_iter": -5}, "heads.logreg.max_iter: -5 is out of range; allowed: an integer >= 1 (default 1000)."),
    ("mlp", {"n_threads": None}, "heads.mlp.n_threads: null is not allowed; allowed: an integer >= 1 (default 2)."),
    ("mlp", {"hidden_sizes": 512}, "heads.mlp.hidden_sizes: 512 is not a list of integers; allowed: a list whose "
                                   "items are each an integer >= 1 (default [256])."),
])
def test_check_head_values_names_the_key_the_value_and_what_is_allowed(name, params, message):
    with pytest.raises(ValueError) as info:
        check_head_values(name, "classification", params)
    assert isinstance(info.value, UserError) and str(info.value).startswith(message), str(info.value)
    check_head_values("lightgbm", "classification", {"colsample_bytree": None, "learning_rate": 1, "max_itr": "x"})


#: Parameters whose default differs between the twins of a head (the SGD schedule).
TWIN_DEFAULTS = {"sgd": {"learning_rate": ("optimal", "invscaling")}}


@pytest.mark.parametrize("name", ["lightgbm", "mlp", "sgd", "streaming_mlp", "knn"])
def test_twins_share_parameters_except_n_classes(name):
    clf = HEADS[name]["classification"]().get_params()
    reg = HEADS[name]["regression"]().get_params()
    for only_classifiers in ("n_classes", "class_weight"):
        assert clf.pop(only_classifiers) is None and only_classifiers not in reg
    assert clf.keys() == reg.keys()
    differ = {key: (clf[key], reg[key]) for key in clf if clf[key] != reg[key]}
    assert differ == TWIN_DEFAULTS.get(name, {})


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "mlp", "sgd", "streaming_mlp", "knn"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_parameters_are_keyword_only(name, task):
    import inspect

    cls = HEADS[name][task]
    kinds = {p.kind for p in inspect.signature(cls).parameters.values()}
    assert kinds == {inspect.Parameter.KEYWORD_ONLY}
    with pytest.raises(TypeError, match="positional"):
        cls(0.5)
