"""A head parameter's type and value rule, declared once in its field's annotation and read without importing it.

A head declares a parameter as an annotated field of its ``params_dataclass``
(:mod:`~featcache.heads.base`): the annotation is its type, and a rule in
``typing.Annotated`` bounds its value, e.g. ``learning_rate: Annotated[float,
Positive()] = 0.1`` or ``early_stopping_rounds: Annotated[int, AtLeast(1)] | None
= 20``. Two readers use that one declaration, both from the annotation's text
(the head modules use ``from __future__ import annotations``), never evaluating it:

- ``featcache check`` (:func:`check_value`): the text read by
  :mod:`~featcache.heads.param_source` from the head's source, against a
  ``params.yaml`` value: its type (an ``int`` is a YAML integer, not a boolean; a
  ``float`` takes integers; ``Sequence[int]`` a list; null only where ``None`` is
  written), then its rule. An annotation it does not understand accepts any value.
- a head's fit (:func:`check_declared`): the rules of its dataclass fields, with the
  messages of :func:`~featcache.util.checks.check_int` and
  :func:`~featcache.util.checks.check_number`.

This module imports nothing heavy (no numpy, scikit-learn, lightgbm or torch).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import numbers
from dataclasses import dataclass
from typing import Any

from featcache.errors import ParamError
from featcache.util.checks import check_int, check_number, number_phrase

__all__ = ["PARAM_HINT", "AtLeast", "Interval", "NonNegative", "ParamType", "Positive", "Rule",
           "check_declared", "check_value", "param_type"]

#: The hint of a head's parameter error at fit (``{name}`` is the parameter).
PARAM_HINT = "Hint: set {name} in the head's params."


class Rule:
    """A bound on a parameter's value, written in its ``Annotated[...]`` annotation."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (already of the annotated type) is allowed."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is allowed, e.g. ``"an integer >= 1"``."""
        raise NotImplementedError

    def check(self, name: str, value: Any, allow_none: bool) -> None:
        """Raise ParamError (a ValueError) naming ``name`` unless ``value`` is allowed (fit-time message)."""
        raise NotImplementedError


@dataclass(frozen=True)
class AtLeast(Rule):
    """An integer >= ``minimum``."""

    minimum: int

    def accepts(self, value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= self.minimum

    def describe(self) -> str:
        return f"an integer >= {self.minimum}"

    def check(self, name: str, value: Any, allow_none: bool) -> None:
        check_int(name, value, self.minimum, allow_none=allow_none, hint=PARAM_HINT)


@dataclass(frozen=True)
class Interval(Rule):
    """A finite number between ``low`` and ``high`` (None: unbounded), each bound excluded unless closed."""

    low: float
    high: float | None = None
    low_closed: bool = False
    high_closed: bool = False

    def accepts(self, value: Any) -> bool:
        try:
            self.check("value", value, False)
        except ParamError:
            return False
        return True

    def describe(self) -> str:
        return number_phrase(self.low, self.high, self.low_closed, self.high_closed)

    def check(self, name: str, value: Any, allow_none: bool) -> None:
        check_number(name, value, self.low, self.high, low_closed=self.low_closed, high_closed=self.high_closed,
                     hint=PARAM_HINT)


def Positive() -> Interval:  # noqa: N802 (reads as a marker: Annotated[float, Positive()])
    """A finite number > 0."""
    return Interval(0)


def NonNegative() -> Interval:  # noqa: N802
    """A finite number >= 0."""
    return Interval(0, low_closed=True)


#: Rule markers by the name an annotation calls them with.
_RULES: dict[str, Any] = {"AtLeast": AtLeast, "Interval": Interval, "Positive": Positive,
                          "NonNegative": NonNegative}

#: Type name -> (noun of "is not ...", what it allows without a rule).
_KINDS: dict[str, tuple[str, str]] = {
    "int": ("an integer", "an integer"), "float": ("a float", "a number"), "str": ("a string", "a string"),
    "bool": ("a boolean", "true or false"), "list[int]": ("a list of integers", "a list of integers"),
    "list[float]": ("a list of numbers", "a list of numbers"),
}
_SEQUENCES = frozenset({"Sequence", "list", "List", "tuple", "Tuple"})


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


_MATCHES = {
    "int": _is_int, "float": _is_number, "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
    "list[int]": lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) for x in v),
    "list[float]": lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) for x in v),
    "array": lambda v: False,  # np.ndarray: the Python API's; a params.yaml list matches its Sequence alternative
}


@dataclass(frozen=True)
class _Kind:
    """One alternative of an annotation: a type name (a key of ``_MATCHES``) and the rules on it."""

    name: str
    rules: tuple[Rule, ...] = ()

    def allowed(self) -> str:
        return " and ".join(rule.describe() for rule in self.rules) or _KINDS.get(self.name, ("", ""))[1]


@dataclass(frozen=True)
class ParamType:
    """What a parameter's annotation allows.

    Attributes
    ----------
    kinds : tuple
        The alternatives other than None (type name and rules).
    none : bool
        Whether None (YAML ``null``) is allowed.
    understood : bool
        False when some part of the annotation is not understood; then any value is accepted.
    """

    kinds: tuple[_Kind, ...] = ()
    none: bool = False
    understood: bool = True

    def allowed(self) -> str:
        """What is allowed, e.g. ``"a number in (0, 1] or null"``."""
        parts = [kind.allowed() for kind in self.kinds if kind.allowed()] + (["null"] if self.none else [])
        return " or ".join(parts)


class _Unknown(Exception):
    """Part of an annotation this reader does not understand."""


def _name(node: ast.expr) -> str | None:
    """``Name`` -> its id, ``a.b.Name`` -> ``Name``."""
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _rule(node: ast.expr) -> Rule:
    """A rule marker ``AtLeast(1)``, ``Interval(0, 1, high_closed=True)``, literal arguments only."""
    if not isinstance(node, ast.Call) or _name(node.func) not in _RULES:
        raise _Unknown(ast.unparse(node))
    try:
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
        return _RULES[_name(node.func)](*args, **kwargs)
    except (ValueError, TypeError) as error:
        raise _Unknown(ast.unparse(node)) from error


def _alternatives(node: ast.expr) -> list[_Kind | None]:
    """The alternatives of an annotation; None stands for ``None``."""
    if isinstance(node, ast.Constant) and node.value is None:
        return [None]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _alternatives(node.left) + _alternatives(node.right)
    name = _name(node)
    if name in ("int", "float", "str", "bool"):
        return [_Kind(name)]
    if name == "ndarray":
        return [_Kind("array")]
    if isinstance(node, ast.Subscript):
        outer = _name(node.value)
        items = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if outer == "Optional":
            return _alternatives(items[0]) + [None]
        if outer == "Union":
            return [kind for item in items for kind in _alternatives(item)]
        if outer == "Annotated":
            rules = tuple(_rule(item) for item in items[1:])
            return [None if kind is None else _Kind(kind.name, kind.rules + rules)
                    for kind in _alternatives(items[0])]
        if outer in _SEQUENCES:
            inner = _alternatives(items[0])
            if len(inner) == 1 and inner[0] is not None and inner[0].name in ("int", "float") \
                    and not inner[0].rules:
                return [_Kind(f"list[{inner[0].name}]")]
    raise _Unknown(ast.unparse(node))


@functools.lru_cache(maxsize=None)
def param_type(annotation: str | None) -> ParamType:
    """What the annotation text ``annotation`` allows (not understood: any value; None: no annotation).

    Parameters
    ----------
    annotation : str or None
        The annotation's source text, e.g. ``"Annotated[int, AtLeast(1)] | None"``.

    Returns
    -------
    ParamType
    """
    try:
        found = _alternatives(ast.parse(annotation or "", mode="eval").body)
    except (SyntaxError, _Unknown):
        return ParamType(understood=False)
    return ParamType(tuple(kind for kind in found if kind is not None), None in found)


def _default_text(default: str | None) -> str:
    """`` (default 0.1)`` in YAML words, or nothing for a default that is not a literal."""
    try:
        return f" (default {json.dumps(ast.literal_eval(default or ''))})"
    except (ValueError, TypeError, SyntaxError):
        return ""


def check_value(key: str, value: Any, annotation: str | None, default: str | None = None) -> None:
    """Check a ``params.yaml`` value against a parameter's annotation text: its type, then its rule.

    Parameters
    ----------
    key : str
        The value's place, e.g. ``"heads.lightgbm.learning_rate"``.
    value : object
        The parsed YAML value.
    annotation : str or None
        The parameter's annotation text; one not understood accepts any value.
    default : str or None
        The default's source text, shown when it is a literal.

    Raises
    ------
    ParamError
        ``"<key>: 'fast' is not a float; allowed: a number > 0 (default 0.1). Hint: ..."``.
    """
    spec = param_type(annotation)
    if not spec.understood or (value is None and spec.none):
        return
    allowed = f"allowed: {spec.allowed()}{_default_text(default)}"
    hint = f"Hint: write {spec.allowed()} for {key}, or leave it out for the default."
    if value is None:
        raise ParamError(f"{key}: null is not allowed; {allowed}. {hint}")
    matching = [kind for kind in spec.kinds if _MATCHES[kind.name](value)]
    if not matching:
        nouns = " or ".join(dict.fromkeys(_KINDS[kind.name][0] for kind in spec.kinds if kind.name in _KINDS))
        if isinstance(value, str) and any(kind.name == "float" for kind in spec.kinds) and _is_float_text(value):
            hint = (f"Hint: YAML reads {value} as a string; write the number with a dot and a signed exponent "
                    f"(e.g. 1.0e-3) or in full (0.001).")
        raise ParamError(f"{key}: {value!r} is not {nouns}; {allowed}. {hint}")
    if not any(all(rule.accepts(value) for rule in kind.rules) for kind in matching):
        raise ParamError(f"{key}: {value!r} is out of range; {allowed}. {hint}")


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_declared(head: Any) -> None:
    """Check a head's parameters against the rules in its dataclass fields' annotations (at fit).

    Parameters
    ----------
    head : dataclass instance
        A head; each field annotated with a rule is checked (None passes where the annotation allows it).

    Raises
    ------
    ParamError
        The first value a rule refuses, with the message of :func:`~featcache.util.checks.check_int` or
        :func:`~featcache.util.checks.check_number`.
    """
    for field in dataclasses.fields(head):
        if not field.init or not isinstance(field.type, str):
            continue
        spec = param_type(field.type)
        value = getattr(head, field.name)
        if value is None and spec.none:
            continue
        for kind in spec.kinds:
            for rule in kind.rules:
                rule.check(field.name, value, spec.none)
