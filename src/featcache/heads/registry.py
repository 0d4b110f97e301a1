"""Head registry: one table from (head name, task) to estimator class.

The pipeline builds heads only through :func:`make_head`, so a typo in
``params.yaml`` fails early with the allowed names and a close-match hint.
The table holds import paths: a head's module (and its library: scikit-learn,
lightgbm, torch) is imported only when that head is built.

Checking a ``params.yaml`` section needs only the head's parameter names, and
the one place they are written is the estimator's ``__init__`` signature (what
scikit-learn's ``get_params`` reads): a hand-written ``__init__`` or the fields
of a ``params_dataclass`` (:mod:`featcache.heads.base`). :func:`head_params`
reads them from the module's source with :mod:`ast` (following base classes
defined in the same module or imported from a sibling module), so ``featcache check`` and
every stage validate all heads in milliseconds without importing
scikit-learn; anything the source reader cannot resolve falls back to
importing the class.
"""

from __future__ import annotations

import ast
import functools
import importlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.store.schema import TASKS
from featcache.util.names import did_you_mean

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

__all__ = ["HEADS", "HEAD_PATHS", "LABELS", "TASKS", "check_head_params", "head_class", "head_label", "head_names",
           "head_params", "make_head", "task_params"]

log = logging.getLogger(__name__)


#: Head name -> task -> ``"module:Class"`` (module relative to this package).
HEAD_PATHS: dict[str, dict[str, str]] = {
    "logreg": {"classification": ".linear:LogisticRegressionHead", "regression": ".linear:RidgeHead"},
    "lightgbm": {"classification": ".boosting:LightGBMHead", "regression": ".boosting:LightGBMRegressorHead"},
    "mlp": {"classification": ".mlp:MLPHead", "regression": ".mlp:MLPRegressorHead"},
    # out-of-core twins: fit/predict stream numpy or dask arrays one row chunk at a time
    "sgd": {"classification": ".out_of_core:StreamingLogisticHead", "regression": ".out_of_core:StreamingRidgeHead"},
    "streaming_mlp": {"classification": ".out_of_core:StreamingMLPHead",
                      "regression": ".out_of_core:StreamingMLPRegressorHead"},
}


#: What a head is called where its twin for a task is a different model (the report's name for it).
LABELS: dict[tuple[str, str], str] = {("logreg", "regression"): "ridge"}


def _load(path: str) -> type[BaseEstimator]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module, __package__), name)


class _HeadTable(Mapping[str, dict[str, "type[BaseEstimator]"]]):
    """:data:`HEAD_PATHS` with classes for values, each imported when looked up."""

    def __getitem__(self, name: str) -> dict[str, type[BaseEstimator]]:
        return {task: _load(path) for task, path in HEAD_PATHS[name].items()}

    def __iter__(self) -> Iterator[str]:
        return iter(HEAD_PATHS)

    def __len__(self) -> int:
        return len(HEAD_PATHS)


#: Head name -> task -> estimator class (read-only mapping; looking a head up imports its module).
HEADS: Mapping[str, dict[str, type[BaseEstimator]]] = _HeadTable()


class _SourceUnresolved(Exception):
    """The source reader met something it does not follow (``**kwargs``, a dynamic base); import instead."""


def _module_tree(module: str) -> ast.Module:
    """The parsed source of a sibling module (``.linear`` -> ``linear.py`` beside this file)."""
    path = Path(__file__).with_name(module.lstrip(".") + ".py")
    if not module.startswith(".") or "." in module[1:] or not path.is_file():
        raise _SourceUnresolved(module)
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


#: The class decorator that declares a head's parameters as fields (:data:`featcache.heads.base.params_dataclass`).
_PARAMS_DECORATOR = "params_dataclass"


def _resolve_class(module: str, name: str, depth: int) -> tuple[str, ast.ClassDef, list[tuple[str, str]]]:
    """``(module, class node, resolvable bases)`` of class ``name``, following ``from .sibling import`` re-exports.

    A base is resolvable when it is a class of the same module or one imported
    ``from .sibling import Base``; any other base (scikit-learn's mixins,
    ``BaseEstimator``) declares no head parameters and is left out.
    """
    if depth > 8:
        raise _SourceUnresolved(f"{module}:{name}")
    tree = _module_tree(module)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    imported = {alias.asname or alias.name: node.module for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module for alias in node.names}
    if name not in classes:
        if name in imported:  # re-exported from a sibling module
            return _resolve_class("." + imported[name], name, depth + 1)
        raise _SourceUnresolved(f"{module}:{name}")
    bases = []
    for base in classes[name].bases:
        if isinstance(base, ast.Name) and base.id in classes:
            bases.append((module, base.id))
        elif isinstance(base, ast.Name) and base.id in imported:
            bases.append(("." + imported[base.id], base.id))
    return module, classes[name], bases


def _declares_fields(cls: ast.ClassDef) -> bool:
    """Whether ``cls`` is decorated with ``params_dataclass`` (any other decorator is not followed)."""
    names = [d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in cls.decorator_list]
    if any(name != _PARAMS_DECORATOR for name in names):
        raise _SourceUnresolved(f"{cls.name} has a decorator the source reader does not follow")
    return bool(names)


def _own_fields(cls: ast.ClassDef) -> list[str]:
    """Names of the fields ``cls`` declares itself (annotated class attributes, ``ClassVar`` excepted)."""
    names = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" in ast.unparse(node.annotation):
                continue
            if isinstance(node.value, ast.Call):  # dataclasses.field(...): init=False and friends
                raise _SourceUnresolved(f"{cls.name}.{node.target.id} is declared with a call")
            names.append(node.target.id)
    return names


def _dataclass_fields(module: str, name: str, depth: int) -> list[str]:
    """The fields a ``params_dataclass`` ``__init__`` of class ``name`` takes: its own and those of every class above it."""
    module, cls, bases = _resolve_class(module, name, depth)
    names: list[str] = []
    for base_module, base in reversed(bases):  # dataclasses collect fields from the base classes in reverse MRO
        names += [field for field in _dataclass_fields(base_module, base, depth + 1) if field not in names]
    if _declares_fields(cls):
        names += [field for field in _own_fields(cls) if field not in names]
    return names


def _source_init_params(module: str, name: str, depth: int = 0) -> tuple[str, ...] | None:
    """``__init__`` parameter names of class ``name`` in ``module``, read from source; None if it has none.

    Looks at the class's own ``__init__``; for a class decorated with
    ``params_dataclass``, at the fields declared by it and the classes above it;
    otherwise at its bases in order (see :func:`_resolve_class`).
    """
    module, cls, bases = _resolve_class(module, name, depth)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            args = node.args
            if args.vararg is not None or args.kwarg is not None:
                raise _SourceUnresolved(f"{module}:{name}.__init__ takes *args/**kwargs")
            return tuple(arg.arg for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs][1:])
    if _declares_fields(cls):
        return tuple(_dataclass_fields(module, name, depth))
    for base_module, base in bases:
        found = _source_init_params(base_module, base, depth + 1)
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=None)
def head_params(name: str, task: str) -> tuple[str, ...]:
    """The constructor parameter names of the head registered for ``(name, task)``, without importing it.

    Read from the estimator's ``__init__`` signature in its module's source
    (the names ``get_params()`` returns); falls back to importing the class
    where the source cannot be followed.

    Raises
    ------
    ValueError
        For an unknown head or task (as :func:`head_class`).
    """
    path = _registered_path(name, task)
    module, _, cls_name = path.partition(":")
    try:
        found = _source_init_params(module, cls_name)
        return tuple(sorted(found or ()))
    except (_SourceUnresolved, OSError, SyntaxError) as why:
        log.debug("head_params(%s, %s): importing %s (%s)", name, task, path, why)
        return tuple(sorted(_load(path)().get_params(deep=False)))


def check_head_params(name: str, task: str, params: Mapping[str, Any] | None) -> None:
    """Fail on a key that the ``(name, task)`` head does not take, without importing the head.

    Raises
    ------
    ValueError
        Naming the unknown key, the head, the allowed keys and the closest match.
    """
    allowed = head_params(name, task)
    for key in dict(params or {}):
        if key not in allowed:
            raise ValueError(
                f"unknown parameter {key!r} for head {name!r} ({HEAD_PATHS[name][task].partition(':')[2]}, "
                f"{task}); allowed: {', '.join(allowed)}.{did_you_mean(str(key), list(allowed))}"
            )


def head_names() -> list[str]:
    """Registered head names, in table order."""
    return list(HEAD_PATHS)


def head_class(name: str, task: str) -> type[BaseEstimator]:
    """The estimator class registered for ``(name, task)``.

    Raises
    ------
    ValueError
        Naming the unknown head or task and the allowed values.
    """
    return _load(_registered_path(name, task))


def _registered_path(name: str, task: str) -> str:
    """The ``module:Class`` of ``(name, task)``; ValueError naming the allowed heads or tasks."""
    if name not in HEAD_PATHS:
        raise ValueError(
            f"unknown head {name!r}; allowed: {', '.join(HEAD_PATHS)}.{did_you_mean(str(name), list(HEAD_PATHS))}"
        )
    if task not in HEAD_PATHS[name]:
        raise ValueError(
            f"unknown task {task!r} for head {name!r}; allowed: {', '.join(HEAD_PATHS[name])}."
            f"{did_you_mean(str(task), list(HEAD_PATHS[name]))}"
        )
    return HEAD_PATHS[name][task]


def make_head(
    name: str, task: str, params: Mapping[str, Any] | None = None, **overrides: Any
) -> BaseEstimator:
    """Build an unfitted head.

    Parameters
    ----------
    name : str
        One of :func:`head_names` (``"logreg"``, ``"lightgbm"``, ``"mlp"``, and the
        out-of-core ``"sgd"``, ``"streaming_mlp"``).
    task : {"classification", "regression"}
    params : mapping, optional
        Constructor parameters (e.g. a ``params.yaml`` section).
    **overrides
        Parameters that take precedence over ``params``.

    Returns
    -------
    sklearn.base.BaseEstimator

    Raises
    ------
    ValueError
        For an unknown head, task or parameter; the message names the bad value, the
        allowed values and the closest match.
    """
    merged = {**dict(params or {}), **overrides}
    check_head_params(name, task, merged)
    cls = head_class(name, task)
    log.debug("make_head(%s, %s): %s", name, task, merged)
    return cls(**merged)


def head_label(name: str, task: str) -> str:
    """The head's name for ``task`` as a reader knows it: ``logreg`` is ``ridge`` for regression."""
    return LABELS.get((name, task), name)


def task_params(name: str, task: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a head's ``params.yaml`` section that its twin for ``task`` takes.

    One section serves both tasks (``heads.logreg`` configures the logistic
    regression and its ridge twin), so a key that only the *other* task's twin
    takes (``max_iter`` under regression) is left out. Any other key is kept, so
    :func:`make_head` still rejects a key that neither twin takes.

    Returns
    -------
    dict
        The parameters to pass to :func:`make_head`.
    """
    params = dict(params or {})
    if name not in HEAD_PATHS or task not in HEAD_PATHS[name]:
        return params  # make_head names the unknown head or task
    own = set(head_params(name, task))
    others = {key for other in HEAD_PATHS[name] if other != task for key in head_params(name, other)}
    dropped = sorted(key for key in params if key not in own and key in others)
    if dropped:
        log.debug("heads.%s: %s apply to the other task only; not used for %s", name, dropped, task)
    return {key: value for key, value in params.items() if key not in dropped}
