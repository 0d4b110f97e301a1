"""Head parameter types and value rules, declared once in the fields' annotations: read for ``featcache check``
from the source (no head imported) and at fit from the dataclass fields."""

from __future__ import annotations

import dataclasses

import pytest

from featcache.errors import ParamError
from featcache.heads import HEADS, make_head
from featcache.heads.param_types import check_declared, check_value, param_type
from featcache.heads.registry import HEAD_PATHS, check_head_values, head_params


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
    ("Sequence[int]", [512, "a"], r"is not a list of integers"),
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
