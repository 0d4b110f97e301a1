"""Head parameter types and value rules, declared once in the fields' annotations: read for ``featcache check``
from the source (no head imported) and at fit from the dataclass fields."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from featcache.errors import ParamError
from featcache.heads import HEADS, make_head
from featcache.heads.param_types import check_declared, check_value, param_type
from featcache.heads.registry import HEAD_PATHS, check_head_values, head_params
from featcache.heads.validation import sorted_grid


@pytest.mark.parametrize("name", list(HEAD_PATHS))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_every_shipped_annotation_is_understood_and_its_default_passes(name, task):
    """A new head parameter whose annotation the checker does not understand fails here (it would accept anything)."""
    declared = head_params.__wrapped__(name, task)
    defaults = HEADS[name][task]().get_params(deep=False)
    for key, param in declared.items():
        assert param_type(param.annotation).understood, f"{name}.{key}: {param.annotation!r} is not understood"
        check_value(f"heads.{name}.{key}", defaults[key], param.annotation, param.default)


@pytest.mark.parametrize("name", list(HEAD_PATHS))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_source_annotations_are_the_fields_that_fit_checks(name, task):
    """``featcache check`` reads the same annotation text that :func:`check_declared` reads at fit."""
    fields = {field.name: field.type for field in dataclasses.fields(HEADS[name][task]) if field.init}
    assert {key: param.annotation for key, param in head_params.__wrapped__(name, task).items()} == fields


@pytest.mark.parametrize(("annotation", "value", "expected"), [
    ("Annotated[float, Positive()]", "fast", r"^k: 'fast' is not a float; allowed: a finite number > 0 \(default 0\.1\)"
                                             r"\. Hint: write a finite number > 0 for k"),
    ("Annotated[float, Positive()]", 0, r"^k: 0 is out of range; allowed: a finite number > 0"),
    ("Annotated[int, AtLeast(1)]", True, r"^k: True is not an integer; allowed: an integer >= 1"),
    ("Annotated[int, AtLeast(1)]", 2.0, r"^k: 2\.0 is not an integer"),
    ("Annotated[int, AtLeast(1)]", None, r"^k: null is not allowed; allowed: an integer >= 1"),
    ("Annotated[float, Interval(0, 1, high_closed=True)] | None", 1.5, r"allowed: a number in \(0, 1\] or null"),
    ("Sequence[int]", [512, "a"], r"^k\[1\]: 'a' is not an integer; allowed: an integer\. Hint: write an integer for "
                                  r"each item of k, or leave k out"),
    ("Sequence[int]", 512, r"is not a list of integers"),
    ("Sequence[float] | np.ndarray | None", "0.1", r"is not a list of numbers; allowed: a list of numbers or null"),
    ("str", 3, r"is not a string"),
    ("bool", "yes", r"is not a boolean; allowed: true or false"),
    ("int | float | None", "half", r"is not an integer or a float"),
    ("float", "1e-3", r"YAML reads 1e-3 as a string; write .* 1\.0e-3"),
])
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(annotation, value, expected):
    with pytest.raises(ParamError, match=expected):
        check_value("k", value, annotation, "0.1")


@pytest.mark.parametrize(("annotation", "value"), [
    ("Annotated[float, Positive()]", 3), ("float", 0.5), ("Annotated[int, AtLeast(1)] | None", None),
    ("Sequence[int]", [512, 256]), ("Sequence[int]", []), ("Sequence[float] | np.ndarray | None", [1, 0.5]),
    ("int | float | None", 0.95), ("Annotated[float, Interval(0, 1, low_closed=True)]", 0),
    ("bool", False), ("str", "cuda:0"),
    # not understood: anything goes
    ("dict[str, int]", "x"), ("Literal['a', 'b']", 3), ("Annotated[int, Unknown(1)]", -1), ("MyType", None),
    (None, object()),
])
def test_a_good_value_or_an_annotation_not_understood_passes(annotation, value):
    check_value("k", value, annotation)


@pytest.mark.parametrize(("name", "params", "fit_message"), [
    ("lightgbm", {"learning_rate": -0.1}, r"learning_rate=-0\.1 is invalid; allowed: a finite number > 0\. Hint"),
    ("lightgbm", {"n_estimators": 0}, r"n_estimators=0 is invalid; allowed: an integer >= 1\. Hint"),
    ("lightgbm", {"colsample_bytree": 0}, r"colsample_bytree=0 is invalid; allowed: a number in \(0, 1\]\. Hint"),
    ("lightgbm", {"early_stopping_rounds": 0}, r"early_stopping_rounds=0 is invalid; allowed: an integer >= 1 or None"),
    ("logreg", {"max_iter": -5}, r"max_iter=-5 is invalid; allowed: an integer >= 1"),
    ("logreg", {"validation_fraction": 1.0}, r"validation_fraction=1\.0 is invalid; allowed: a number in \(0, 1\)"),
    ("mlp", {"dropout": 1.0}, r"dropout=1\.0 is invalid; allowed: a number in \[0, 1\)"),
    ("mlp", {"patience": 0}, r"patience=0 is invalid; allowed: an integer >= 1"),
    ("mlp", {"batch_size": 1}, r"batch_size=1 is invalid; allowed: an integer >= 2"),
    ("sgd", {"max_epochs": 0}, r"max_epochs=0 is invalid; allowed: an integer >= 1"),
    ("streaming_mlp", {"chunk_rows": 0}, r"chunk_rows=0 is invalid; allowed: an integer >= 1"),
])
def test_check_and_fit_refuse_the_same_values_from_one_declaration(name, params, fit_message):
    task = "classification"
    key = next(iter(params))
    with pytest.raises(ParamError, match=rf"^heads\.{name}\.{key}: .* is out of range"):
        check_head_values(name, task, params)
    with pytest.raises(ParamError, match=fit_message):
        check_declared(make_head(name, task, params))
    check_declared(make_head(name, task))  # the defaults pass


@pytest.mark.parametrize(("name", "task", "params", "expected"), [
    ("mlp", "classification", {"hidden_sizes": [512, 0]},
     r"^heads\.mlp\.hidden_sizes\[1\]: 0 is out of range; allowed: an integer >= 1\. Hint: write an integer >= 1 for "
     r"each item of heads\.mlp\.hidden_sizes, or leave heads\.mlp\.hidden_sizes out for the default\.$"),
    ("streaming_mlp", "regression", {"hidden_sizes": [-3]}, r"^heads\.streaming_mlp\.hidden_sizes\[0\]: -3 is out of"),
    ("mlp", "classification", {"hidden_sizes": [64, 2.5]}, r"^heads\.mlp\.hidden_sizes\[1\]: 2\.5 is not an integer"),
    ("logreg", "classification", {"pca_components": 0},
     r"^heads\.logreg\.pca_components: 0 is out of range; allowed: an integer >= 1 or a number in \(0, 1\) or null "
     r"\(default null\)\. Hint: write an integer >= 1 or a number in \(0, 1\) or null for heads\.logreg\."),
    ("lightgbm", "regression", {"pca_components": 1.0}, r"^heads\.lightgbm\.pca_components: 1\.0 is out of range"),
    ("mlp", "regression", {"pca_components": -2}, r"^heads\.mlp\.pca_components: -2 is out of range"),
    ("mlp", "classification", {"pca_components": True}, r"^heads\.mlp\.pca_components: True is not an integer or a"),
    ("logreg", "classification", {"Cs": [0.1, -1.0]},
     r"^heads\.logreg\.Cs\[1\]: -1\.0 is out of range; allowed: a finite number > 0\. Hint: write a finite number > 0 "
     r"for each item of heads\.logreg\.Cs"),
    ("logreg", "classification", {"Cs": []},
     r"^heads\.logreg\.Cs: \[\] is empty; allowed: a non-empty list whose items are each a finite number > 0 or null "
     r"\(default null\)\. Hint"),
    ("logreg", "classification", {"Cs": [0.1, "1e-3"]},
     r"^heads\.logreg\.Cs\[1\]: '1e-3' is not a float; allowed: a finite number > 0\. Hint: YAML reads 1e-3 as a"),
    ("logreg", "regression", {"alphas": [0]}, r"^heads\.logreg\.alphas\[0\]: 0 is out of range; allowed: a finite"),
    ("sgd", "regression", {"alphas": [1e-4, float("inf")]}, r"^heads\.sgd\.alphas\[1\]: inf is out of range"),
    ("sgd", "classification", {"alphas": []}, r"^heads\.sgd\.alphas: \[\] is empty"),
    ("mlp", "classification", {"device": "gpu"},
     r"^heads\.mlp\.device: 'gpu' is not allowed; allowed: 'cpu', 'cuda' or 'cuda:N' \(default \"cpu\"\)\. Hint: "
     r"write 'cpu', 'cuda' or 'cuda:N' for heads\.mlp\.device"),
    ("streaming_mlp", "classification", {"device": "cuda:x"}, r"^heads\.streaming_mlp\.device: 'cuda:x' is not allo"),
])
def test_check_applies_the_rules_of_each_union_member_and_list_item(name, task, params, expected):
    """Union members and list items carry their own rules; ``check`` used to test only their types (fit found the
    rest, after the extraction)."""
    with pytest.raises(ParamError, match=expected):
        check_head_values(name, task, params)


@pytest.mark.parametrize(("name", "params"), [
    ("mlp", {"hidden_sizes": []}), ("mlp", {"hidden_sizes": [1]}), ("streaming_mlp", {"hidden_sizes": [1024, 256]}),
    ("logreg", {"pca_components": 1}), ("logreg", {"pca_components": 0.5}), ("lightgbm", {"pca_components": 1e-9}),
    ("mlp", {"pca_components": 0.999}), ("mlp", {"pca_components": None}), ("logreg", {"Cs": [1e-9]}),
    ("logreg", {"Cs": [1, 0.5]}), ("logreg", {"alphas": [1000]}), ("sgd", {"alphas": [1e-5]}),
    ("mlp", {"device": "cpu"}), ("mlp", {"device": "cuda"}), ("streaming_mlp", {"device": "cuda:1"}),
])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_check_accepts_the_boundary_values_fit_accepts(name, params, task):
    if not set(params) <= set(head_params(name, task)):
        pytest.skip(f"{set(params)} is the other twin's")
    check_head_values(name, task, params)
    check_declared(make_head(name, task, params))


#: Values tried on every parameter of every head: each kind of value a params.yaml holds, the rules' bounds.
PROBES = [None, True, False, -1, 0, 1, 2, 3, 0.0, 1e-9, 0.5, 0.999, 1.0, 1.5, float("nan"), float("inf"), "cpu",
          "cuda", "cuda:1", "gpu", "optimal", "0.1", [], [0], [1], [2, 256], [1, 0], [0.5, 1e-9], [0.1, -1.0],
          [1, "a"], [True], {"a": 1}]


def _accepts(call) -> bool:
    try:
        call()
    except ParamError:
        return False
    return True


@pytest.mark.parametrize("name", list(HEAD_PATHS))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_check_accepts_a_value_if_and_only_if_fit_accepts_it(name, task):
    """``featcache check`` and a head's fit (:func:`check_declared`) read one declaration and agree on every value."""
    disagree = []
    for key in head_params(name, task):
        for value in PROBES:
            by_check = _accepts(lambda: check_head_values(name, task, {key: value}))  # noqa: B023
            by_fit = _accepts(lambda: check_declared(make_head(name, task, {key: value})))  # noqa: B023
            if by_check != by_fit:
                disagree.append(f"{key}={value!r}: check {'accepts' if by_check else 'refuses'}, fit the other")
    assert not disagree, "\n".join(disagree)


#: The cases of the hand-written checks that repeated the declared rules (check_pca_components of the
#: heads, as_float_list's range part, the MLP's own hidden_sizes and device checks): the annotation rule is now
#: the only guard of each, at fit as at ``featcache check``.
_REFUSED = {
    "pca_components": [-1, 0, 1.0, 1.5, 2.0, float("nan"), True, "all"],
    "Cs": [[], [0], [0.1, -1.0], [float("nan")], [float("inf")], ["a"], np.array([0.1, -1.0]), np.array([]),
           np.array([[1.0, -1.0]]), np.array([np.nan])],
    "alphas": [[], [0.0], [-5], [1e-5, -1e-3], np.array([0.0]), np.array([])],
    "hidden_sizes": [[0], [64, 0], [-1], [1.5], [True], 512, "512", np.array([512])],
    "device": ["tpu", "gpu", "cuda:x", "CPU", "cuda:", 3],
}
_GUARDED = [(name, task, key) for name in HEAD_PATHS for task in ("classification", "regression")
            for key in _REFUSED if key in head_params(name, task)]


@pytest.mark.parametrize(("name", "task", "key"), _GUARDED, ids=lambda v: str(v))
def test_the_declared_rule_alone_refuses_what_the_removed_checks_refused(name, task, key):
    """A bad grid, ``pca_components``, ``hidden_sizes`` or ``device`` is refused at fit with a ParamError naming the
    parameter, the value, what is allowed and a hint, before any training, and ``featcache check`` refuses it too.
    Deleting the field's annotation rule fails this test (the value reaches sklearn or torch)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 4))
    y = np.arange(40) % 2 if task == "classification" else rng.standard_normal(40)
    for value in _REFUSED[key]:
        with pytest.raises(ParamError, match=rf"^{key}=.+ is invalid.*; allowed: .+\. Hint: .+"):
            make_head(name, task, {key: value}).fit(X, y)
        if not isinstance(value, np.ndarray):  # params.yaml holds no arrays
            with pytest.raises(ParamError, match=rf"^heads\.{name}\.{key}"):
                check_head_values(name, task, {key: value})


@pytest.mark.parametrize(("name", "key", "value", "grid"), [
    ("logreg", "Cs", np.array([10.0, 0.1, 1.0, 0.1]), [0.1, 1.0, 10.0]),
    ("logreg", "Cs", np.array([[1.0], [1e-3]]), [1e-3, 1.0]),
    ("sgd", "alphas", np.array([1e-4, 1e-5]), [1e-5, 1e-4]),
])
def test_an_ndarray_grid_of_positive_numbers_passes_sorted(name, key, value, grid):
    check_declared(make_head(name, "classification", {key: value}))
    assert sorted_grid(value).tolist() == grid


@pytest.mark.parametrize(("params", "message"), [
    ({"hidden_sizes": 512}, r"^hidden_sizes=512 is invalid; allowed: a list whose items are each an integer >= 1\. "
                            r"Hint: pass a list, e\.g\. hidden_sizes=\[512\] \(in params\.yaml: "
                            r"hidden_sizes: \[512\]\)"),
    ({"hidden_sizes": (64, 0)}, r"^hidden_sizes=\(64, 0\) is invalid \(hidden_sizes\[1\]=0 is out of range\); "
                                r"allowed: a list whose items are each an integer >= 1\. Hint: set hidden_sizes"),
    ({"Cs": np.array([0.1, -1.0])}, r"^Cs=array\(\[ 0\.1, -1\. \]\) is invalid \(Cs\[1\]=-1\.0 is out of range\); "
                                    r"allowed: a non-empty list whose items are each a finite number > 0 or None"),
    ({"pca_components": "all"}, r"^pca_components='all' is invalid; allowed: an integer >= 1 or a number in \(0, 1\) "
                                r"or None\. Hint: set pca_components"),
])
def test_fit_messages_name_the_value_what_is_allowed_and_a_hint(params, message):
    name = "mlp" if "hidden_sizes" in params else "logreg"
    with pytest.raises(ParamError, match=message):
        check_declared(make_head(name, "classification", params))
