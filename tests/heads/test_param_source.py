"""Reading a head's parameter names from source: explicit ``__init__``, dataclass fields, bases, re-exports."""

from __future__ import annotations

import textwrap

import pytest

from featcache.heads.param_source import ParamSource, SourceUnresolved, init_param_names, init_params


def _write(folder, **modules: str) -> None:
    for name, text in modules.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text), encoding="utf-8")


def test_an_inherited_init_through_a_same_module_base_an_imported_base_and_a_re_export(tmp_path):
    _write(tmp_path,
           base="class Base:\n    def __init__(self, alpha=1, *, beta=2):\n        pass\n",
           twin="""
               from sklearn.base import ClassifierMixin
               from .base import Base
               class Mixin:
                   pass
               class Middle(Base):
                   pass
               class Child(ClassifierMixin, Mixin, Middle):
                   pass
               """,
           reexport="from .twin import Child\n")
    assert init_param_names(tmp_path, ".reexport:Child") == ("alpha", "beta")
    assert init_param_names(tmp_path, ".twin:Mixin") == ()


def test_dataclass_fields_from_decorated_bases_only(tmp_path):
    _write(tmp_path,
           base="""
               import dataclasses
               from typing import ClassVar
               head_params = dataclasses.dataclass(kw_only=True)
               class Plain:
                   not_a_field: int = 0
               @head_params
               class Family(Plain):
                   lr: float = 0.1
                   _task: ClassVar[str] = "x"
                   cache: dict = dataclasses.field(default_factory=dict, init=False)
               @head_params
               class Classifier:
                   n_classes: int | None = None
               """,
           heads="""
               from dataclasses import dataclass
               from .base import Classifier, Family, head_params
               @head_params
               class Head(Classifier, Family):
                   epochs: int = 5
                   lr: float = 0.2
               @dataclass
               class Other(Family):
                   pass
               """)
    assert init_param_names(tmp_path, ".heads:Head") == ("epochs", "lr", "n_classes")
    assert init_param_names(tmp_path, ".heads:Other") == ("lr",)


@pytest.mark.parametrize("source", [
    "class Head:\n    def __init__(self, **kwargs):\n        pass\n",
    "class Head(make_base()):\n    pass\n",
])
def test_what_it_cannot_follow_is_said(tmp_path, source):
    _write(tmp_path, heads=source)
    with pytest.raises(SourceUnresolved):
        init_param_names(tmp_path, ".heads:Head")


def test_a_missing_class_or_module_is_said(tmp_path):
    _write(tmp_path, heads="class Head:\n    pass\n")
    for path in (".heads:Missing", ".nomodule:Head", "featcache.heads:Head"):
        with pytest.raises(SourceUnresolved):
            init_param_names(tmp_path, path)


def test_annotations_and_defaults_are_read_as_written(tmp_path):
    _write(tmp_path,
           base="""
               import dataclasses
               from typing import Annotated
               params = dataclasses.dataclass(kw_only=True)
               @params
               class Base:
                   lr: Annotated[float, Positive()] = 0.1
                   sizes: Sequence[int] = dataclasses.field(default=(8,))
                   grid: list = dataclasses.field(default_factory=list)
               """,
           heads="""
               from .base import Base, params
               @params
               class Head(Base):
                   lr: float | None = None
               class Explicit:
                   def __init__(self, a: int, b: str = "x", *, c=None):
                       pass
               """)
    found = init_params(tmp_path, ".heads:Head")
    assert list(found) == ["grid", "lr", "sizes"]
    assert found["lr"] == ParamSource("lr", "float | None", "None")  # the subclass's declaration
    assert found["sizes"] == ParamSource("sizes", "Sequence[int]", "(8,)")
    assert found["grid"] == ParamSource("grid", "list", None)
    assert list(init_params(tmp_path, ".heads:Explicit").values()) == [
        ParamSource("a", "int", None), ParamSource("b", "str", "'x'"), ParamSource("c", None, "None")]
