"""A head's parameter names, annotations and defaults read from its module's source, without importing it.

Checking a ``params.yaml`` section needs the names a head's constructor takes and
their annotations (types and value rules, :mod:`~featcache.heads.param_types`),
and the one place they are written is the class itself: an explicit
``__init__`` signature, or the fields of a class decorated with
:func:`dataclasses.dataclass` (directly, or through a name bound to
``dataclasses.dataclass(...)`` in its module or a sibling), which is what
scikit-learn's ``get_params`` reads back. :func:`init_params` reads them
with :mod:`ast`, following base classes defined in the same module or imported
from a sibling module (``from .base import HeadBase``) and re-exports, so
``featcache check`` and every stage validate all heads in milliseconds without
importing scikit-learn, lightgbm or torch. It raises :class:`SourceUnresolved`
on anything it does not follow (``**kwargs``, a computed base), and the
registry then imports the class instead.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ParamSource", "SourceUnresolved", "init_param_names", "init_params"]

#: Deepest chain of bases and re-exports followed.
_MAX_DEPTH = 12


class SourceUnresolved(Exception):
    """The source reader met something it does not follow; import the class instead."""


@dataclass(frozen=True)
class ParamSource:
    """One constructor parameter as written in the source.

    Attributes
    ----------
    name : str
    annotation : str or None
        The annotation's source text (``"Annotated[float, Positive()]"``), None where there is none.
    default : str or None
        The default's source text (``"0.1"``), None where there is none.
    """

    name: str
    annotation: str | None = None
    default: str | None = None


def _text(node: ast.expr | None) -> str | None:
    return None if node is None else ast.unparse(node)


@dataclass(frozen=True)
class _Module:
    """A parsed sibling module: its classes, its ``from .x import`` names and its dataclass decorators."""

    folder: Path
    module: str
    classes: dict[str, ast.ClassDef]
    imported: dict[str, str]  # local name -> sibling module (``from .x import Name``)
    decorators: frozenset[str]  # names bound here to ``dataclasses.dataclass(...)``


@dataclass(frozen=True)
class _ClassSource:
    """A class definition and the module that defines it."""

    where: _Module
    node: ast.ClassDef

    @property
    def module(self) -> str:
        return self.where.module


def _calls_dataclass(value: ast.expr | None) -> bool:
    """``dataclass(...)`` or ``dataclasses.dataclass(...)``."""
    func = value.func if isinstance(value, ast.Call) else None
    return (isinstance(func, ast.Name) and func.id == "dataclass") or (
        isinstance(func, ast.Attribute) and func.attr == "dataclass")


@functools.lru_cache(maxsize=64)
def _tree(path: str, mtime_ns: int) -> ast.Module:
    """A module's parsed source, read once per version of the file (names and annotations share it)."""
    with open(path, encoding="utf-8") as handle:
        return ast.parse(handle.read(), filename=path)


def _parse(folder: Path, module: str, depth: int) -> _Module:
    path = folder / (module.lstrip(".") + ".py")
    if depth > _MAX_DEPTH or not module.startswith(".") or "." in module[1:] or not path.is_file():
        raise SourceUnresolved(module)
    tree = _tree(str(path), path.stat().st_mtime_ns)
    decorators = {target.id for node in tree.body if isinstance(node, ast.Assign) and _calls_dataclass(node.value)
                  for target in node.targets if isinstance(target, ast.Name)}
    return _Module(folder, module, {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)},
                   {alias.asname or alias.name: node.module for node in tree.body
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module for alias in node.names},
                   frozenset(decorators))


def _find_class(folder: Path, module: str, name: str, depth: int) -> _ClassSource:
    """The definition of ``name`` in sibling ``module`` (``.linear``), following ``from .x import name``."""
    where = _parse(folder, module, depth)
    if name in where.classes:
        return _ClassSource(where, where.classes[name])
    if name in where.imported:  # a re-export
        return _find_class(folder, "." + where.imported[name], name, depth + 1)
    raise SourceUnresolved(f"{module}:{name}")


def _is_dataclass_decorator(where: _Module, name: str, depth: int) -> bool:
    """Whether ``name`` (in ``where``) is ``dataclass``, or bound to ``dataclasses.dataclass(...)`` there or in a
    sibling."""
    if name == "dataclass" or name in where.decorators:
        return True
    if name in where.imported:
        return _is_dataclass_decorator(_parse(where.folder, "." + where.imported[name], depth + 1), name, depth + 1)
    return False


def _bases(source: _ClassSource, depth: int) -> list[_ClassSource]:
    """The bases defined in this package, in order; external ones (scikit-learn's mixins) define no parameters."""
    found = []
    where = source.where
    for base in source.node.bases:
        if not isinstance(base, ast.Name):
            if isinstance(base, ast.Attribute):
                continue  # e.g. ``sklearn.base.BaseEstimator``
            raise SourceUnresolved(f"{source.module}:{source.node.name} has a computed base")
        if base.id in where.classes:
            found.append(_ClassSource(where, where.classes[base.id]))
        elif base.id in where.imported:
            found.append(_find_class(where.folder, "." + where.imported[base.id], base.id, depth + 1))
    return found


def _is_dataclass(source: _ClassSource, depth: int) -> bool:
    for decorator in source.node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "dataclass":
            return True
        if isinstance(target, ast.Name) and _is_dataclass_decorator(source.where, target.id, depth):
            return True
    return False


def _own_fields(node: ast.ClassDef) -> list[ParamSource]:
    """Annotated class attributes that become ``__init__`` parameters (not ClassVar, not ``field(init=False)``)."""
    names = []
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(statement.annotation):
            continue
        value = statement.value
        if isinstance(value, ast.Call) and any(keyword.arg == "init" and isinstance(keyword.value, ast.Constant)
                                               and keyword.value.value is False for keyword in value.keywords):
            continue
        default = value
        if isinstance(value, ast.Call) and _calls_dataclass_field(value):
            default = next((keyword.value for keyword in value.keywords if keyword.arg == "default"), None)
        names.append(ParamSource(statement.target.id, _text(statement.annotation), _text(default)))
    return names


def _calls_dataclass_field(value: ast.Call) -> bool:
    """``field(...)`` or ``dataclasses.field(...)``."""
    func = value.func
    return (isinstance(func, ast.Name) and func.id == "field") or (
        isinstance(func, ast.Attribute) and func.attr == "field")


def _fields(source: _ClassSource, depth: int) -> list[ParamSource]:
    """A dataclass's fields: those of its dataclass bases (last base first, as dataclasses do), then its own."""
    names: list[ParamSource] = []
    for base in reversed(_bases(source, depth)):
        if _is_dataclass(base, depth + 1):
            names += _fields(base, depth + 1)
    return names + _own_fields(source.node)


def _params(source: _ClassSource, depth: int) -> list[ParamSource] | None:
    for statement in source.node.body:
        if isinstance(statement, ast.FunctionDef) and statement.name == "__init__":
            args = statement.args
            if args.vararg is not None or args.kwarg is not None:
                raise SourceUnresolved(f"{source.module}:{source.node.name}.__init__ takes *args/**kwargs")
            positional = [*args.posonlyargs, *args.args]
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            found = [ParamSource(arg.arg, _text(arg.annotation), _text(default))
                     for arg, default in [*zip(positional, defaults), *zip(args.kwonlyargs, args.kw_defaults)]]
            return found[1:]  # self
    if _is_dataclass(source, depth):
        return _fields(source, depth)
    for base in _bases(source, depth):  # an inherited __init__: the first base that has one
        found = _params(base, depth + 1)
        if found is not None:
            return found
    return None


def init_params(folder: str | Path, path: str) -> dict[str, ParamSource]:
    """The ``__init__`` parameters of the class at ``path`` (``".module:Class"``) in ``folder``, by name.

    Parameters
    ----------
    folder : path-like
        The package folder holding the module.
    path : str
        ``".module:Class"``, a module of that folder and a class it defines or re-exports.

    Returns
    -------
    dict of str to ParamSource
        In sorted name order; a field redeclared by a subclass is the subclass's (as in dataclasses).

    Raises
    ------
    SourceUnresolved
        When the source cannot be followed (the caller imports the class instead).
    """
    module, _, name = path.partition(":")
    found = {param.name: param for param in _params(_find_class(Path(folder), module, name, 0), 0) or ()}
    return dict(sorted(found.items()))


def init_param_names(folder: str | Path, path: str) -> tuple[str, ...]:
    """The sorted ``__init__`` parameter names of the class at ``path`` (``".module:Class"``) in ``folder``.

    Parameters
    ----------
    folder : path-like
        The package folder holding the module.
    path : str
        ``".module:Class"``, a module of that folder and a class it defines or re-exports.

    Returns
    -------
    tuple of str
        Sorted names, as ``sorted(cls().get_params(deep=False))``; empty for a class without parameters.

    Raises
    ------
    SourceUnresolved
        When the source cannot be followed (the caller imports the class instead).
    """
    return tuple(init_params(folder, path))
