"""A head parameter's type and value rule, declared once in its field's annotation and read without importing it.

A head declares a parameter as an annotated field of its ``params_dataclass``
(:mod:`~featcache.heads.base`): the annotation is its type, and a rule in
``typing.Annotated`` bounds its value, e.g. ``learning_rate: Annotated[float,
Positive()] = 0.1`` or ``early_stopping_rounds: Annotated[int, AtLeast(1)] | None
= 20``. Each alternative of a union has its own rules (``Annotated[int, AtLeast(1)]
| Annotated[float, Interval(0, 1)] | None``), and a list's items theirs
(``Sequence[Annotated[int, AtLeast(1)]]``; ``Annotated[Sequence[...], MinLength(1)]``
bounds its length). A value is checked against the alternatives it is (an integer
against an ``int`` alternative where there is one, else a ``float`` one; a list against
the ``Sequence`` one, item by item; a numpy array, where an ``np.ndarray`` alternative
stands beside a ``Sequence`` one, as that list of its items, raveled). Two readers use that one declaration, both from
the annotation's text (the head modules use ``from __future__ import annotations``),
never evaluating it, and both through :func:`find_problem`, so they accept the same values:

- ``featcache check`` (:func:`check_value`): the text read by
  :mod:`~featcache.heads.param_source` from the head's source, against a
  ``params.yaml`` value: its type (an ``int`` is a YAML integer, not a boolean; a
  ``float`` takes integers; ``Sequence[int]`` a list; null only where ``None`` is
  written), then its rule. An annotation it does not understand accepts any value.
- a head's fit (:func:`check_declared`): its dataclass fields, with the messages of
  :func:`~featcache.util.checks.check_int` and :func:`~featcache.util.checks.check_number`
  for a single bounded number.

This module imports nothing heavy (no numpy, scikit-learn, lightgbm or torch).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import numbers
import re
from dataclasses import dataclass
from typing import Any

from featcache.errors import ParamError
from featcache.util.checks import check_int, check_number, number_phrase
from featcache.util.names import did_you_mean

__all__ = ["PARAM_HINT", "AtLeast", "Interval", "Matches", "MinLength", "NonNegative", "OneOf", "ParamType",
           "Positive", "Problem", "Rule", "check_declared", "check_value", "find_problem", "param_type"]

#: The hint of a head's parameter error at fit (``{name}`` is the parameter).
PARAM_HINT = "Hint: set {name} in the head's params."


class Rule:
    """A bound on a parameter's value, written in its ``Annotated[...]`` annotation."""

    #: What a refused value "is" in a message.
    refusal = "is out of range"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (already of the annotated type) is allowed."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is allowed, e.g. ``"an integer >= 1"``."""
        raise NotImplementedError

    def check(self, name: str, value: Any, allow_none: bool) -> None:
        """Raise ParamError (a ValueError) naming ``name`` unless ``value`` is allowed (fit-time message)."""
        if not self.accepts(value) and not (value is None and allow_none):
            close = did_you_mean(value, getattr(self, "choices", ()))
            raise ParamError(f"{name}={value!r} is invalid; allowed: {self.describe()}"
                             f"{' or None' if allow_none else ''}.{close} {PARAM_HINT.format(name=name)}")


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


@dataclass(frozen=True)
class Matches(Rule):
    """A string that the regular expression ``pattern`` matches whole; ``description`` says what that is."""

    pattern: str
    description: str

    refusal = "is not allowed"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.pattern, value) is not None

    def describe(self) -> str:
        return self.description


@dataclass(frozen=True, init=False)
class OneOf(Rule):
    """One of the strings ``choices`` (``Annotated[str, OneOf("balanced")]``); a close miss is named in messages."""

    choices: tuple[str, ...]

    refusal = "is not allowed"

    def __init__(self, *choices: str) -> None:
        object.__setattr__(self, "choices", tuple(choices))

    def accepts(self, value: Any) -> bool:
        return value in self.choices

    def describe(self) -> str:
        quoted = [repr(choice) for choice in self.choices]
        return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


def _close_choice(spec: ParamType, value: Any) -> str:
    """`` Did you mean 'balanced'?`` for a string close to a choice of the spec's :class:`OneOf` rules, else ``""``."""
    choices = [choice for kind in spec.kinds for rule in kind.rules for choice in getattr(rule, "choices", ())]
    return did_you_mean(value, choices) if isinstance(value, str) and choices else ""


@dataclass(frozen=True)
class MinLength(Rule):
    """A list of at least ``minimum`` items (on a ``Sequence[...]``: ``Annotated[Sequence[float], MinLength(1)]``)."""

    minimum: int

    @property
    def refusal(self) -> str:  # type: ignore[override]
        return "is empty" if self.minimum == 1 else "has too few items"

    def accepts(self, value: Any) -> bool:
        return len(_items(value)) >= self.minimum

    def describe(self) -> str:
        return "non-empty" if self.minimum == 1 else f"of at least {self.minimum} items"


#: Rule markers by the name an annotation calls them with.
_RULES: dict[str, Any] = {"AtLeast": AtLeast, "Interval": Interval, "Positive": Positive,
                          "NonNegative": NonNegative, "Matches": Matches, "OneOf": OneOf, "MinLength": MinLength}

#: Scalar type name -> (noun of "is not ...", what it allows without a rule, plural of "a list of ...").
_SCALARS: dict[str, tuple[str, str, str]] = {
    "int": ("an integer", "an integer", "integers"), "float": ("a float", "a number", "numbers"),
    "str": ("a string", "a string", "strings"), "bool": ("a boolean", "true or false", "booleans"),
}
_SEQUENCES = frozenset({"Sequence", "list", "List", "tuple", "Tuple"})


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_array(value: Any) -> bool:
    """Whether ``value`` is an np.ndarray (the Python API's; numpy not imported)."""
    return type(value).__name__ == "ndarray" and type(value).__module__ == "numpy"


def _items(value: Any) -> Any:
    """The items of a list value: a list or tuple as it is, an ndarray's raveled (as Python numbers)."""
    return value.ravel().tolist() if _is_array(value) else value


_MATCHES = {
    "int": _is_int, "float": _is_number, "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, (list, tuple)),
    # np.ndarray, the Python API's; a params.yaml list matches its Sequence alternative
    "array": _is_array,
}


@dataclass(frozen=True)
class _Kind:
    """One alternative of an annotation: a type name (a key of ``_MATCHES``), its rules, and a list's item kind."""

    name: str
    rules: tuple[Rule, ...] = ()
    item: _Kind | None = None

    def noun(self) -> str:
        """``"an integer"``, ``"a list of integers"`` (empty for an ndarray: not writable in YAML)."""
        if self.item is not None:
            return f"a list of {_SCALARS[self.item.name][2]}"
        return _SCALARS.get(self.name, ("", "", ""))[0]

    def allowed(self) -> str:
        if self.item is None:
            return " and ".join(rule.describe() for rule in self.rules) or _SCALARS.get(self.name, ("", "", ""))[1]
        sizes = " ".join(rule.describe() for rule in self.rules)
        head = f"a {sizes} list" if sizes.startswith("non") else f"a list {sizes}".rstrip()
        if self.item.rules:
            return f"{head} whose items are each {self.item.allowed()}"
        return f"{head} of {_SCALARS[self.item.name][2]}"

    def matches(self, value: Any) -> bool:
        return _MATCHES[self.name](value)


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

    def allowed(self, none: str = "null") -> str:
        """What is allowed, e.g. ``"a number in (0, 1] or null"`` (``none``: the word for None)."""
        parts = [kind.allowed() for kind in self.kinds if kind.allowed()] + ([none] if self.none else [])
        return " or ".join(parts)


@dataclass(frozen=True)
class Problem:
    """Why a value is refused (:func:`find_problem`).

    Attributes
    ----------
    where : str
        ``""`` for the value itself, ``"[i]"`` for a list's item ``i``.
    value : object
        The refused value (the item, for an item).
    reason : str
        ``"is not an integer"``, ``"is out of range"``, ``"is not allowed"`` (null)...
    allowed : str
        What is allowed there (null written ``null``).
    """

    where: str
    value: Any
    reason: str
    allowed: str


def find_problem(spec: ParamType, value: Any) -> Problem | None:
    """Why ``spec`` refuses ``value``, or None where it is allowed (any value, when ``spec`` is not understood).

    The value is checked against the alternatives it is (:func:`_matching`); it passes
    if one of them accepts it, and each item of a list passes its item rules.
    """
    if not spec.understood or (value is None and spec.none):
        return None
    if value is None:
        return Problem("", value, "is not allowed", spec.allowed())
    matching = _matching(spec.kinds, value)
    if not matching:
        nouns = " or ".join(dict.fromkeys(kind.noun() for kind in spec.kinds if kind.noun()))
        return Problem("", value, f"is not {nouns}", spec.allowed())
    problems = [_kind_problem(spec, kind, value) for kind in matching]
    return None if None in problems else problems[0]


def _matching(kinds: tuple[_Kind, ...], value: Any) -> list[_Kind]:
    """The alternatives ``value`` is: an integer is a ``float`` only where no ``int`` alternative is written, and
    an ndarray is the list beside its ``np.ndarray`` alternative where there is one (``Sequence[float] | np.ndarray``:
    its items have the list's rules)."""
    found = [kind for kind in kinds if kind.matches(value)]
    if _is_int(value) and any(kind.name == "int" for kind in found):
        found = [kind for kind in found if kind.name != "float"]
    lists = [kind for kind in kinds if kind.item is not None]
    if lists and any(kind.name == "array" for kind in found):
        found = lists
    return found


def _kind_problem(spec: ParamType, kind: _Kind, value: Any) -> Problem | None:
    refused = next((rule for rule in kind.rules if not rule.accepts(value)), None)
    if refused is not None:
        return Problem("", value, refused.refusal, spec.allowed())
    if kind.item is None:
        return None
    for index, item in enumerate(_items(value)):
        if not kind.item.matches(item):
            return Problem(f"[{index}]", item, f"is not {kind.item.noun()}", kind.item.allowed())
        refused = next((rule for rule in kind.item.rules if not rule.accepts(item)), None)
        if refused is not None:
            return Problem(f"[{index}]", item, refused.refusal, kind.item.allowed())
    return None


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
    if name in _SCALARS:
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
            kinds = _alternatives(items[0])
            if any(isinstance(rule, MinLength) for rule in rules) and any(
                    kind is None or kind.item is None for kind in kinds):
                raise _Unknown(ast.unparse(node))  # a length bound on something other than a list
            return [None if kind is None else dataclasses.replace(kind, rules=kind.rules + rules) for kind in kinds]
        if outer in _SEQUENCES:
            inner = _alternatives(items[0])
            if len(inner) == 1 and inner[0] is not None and inner[0].name in _SCALARS:
                return [_Kind("list", item=inner[0])]
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
    """Check a ``params.yaml`` value against a parameter's annotation text: its type, then its rules.

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
        ``"<key>: 'fast' is not a float; allowed: a number > 0 (default 0.1). Hint: ..."``; a list's item is
        named by its index: ``"heads.mlp.hidden_sizes[1]: 0 is out of range; allowed: an integer >= 1. Hint: ..."``.
    """
    spec = param_type(annotation)
    problem = find_problem(spec, value)
    if problem is None:
        return
    if problem.where:
        allowed = f"allowed: {problem.allowed}"
        hint = f"Hint: write {problem.allowed} for each item of {key}, or leave {key} out for the default."
    else:
        allowed = f"allowed: {spec.allowed()}{_default_text(default)}"
        hint = f"Hint: write {spec.allowed()} for {key}, or leave it out for the default."
    bad = problem.value
    numbers_here = [kind.item for kind in spec.kinds if kind.item is not None] if problem.where else spec.kinds
    if isinstance(bad, str) and problem.reason.startswith("is not") and _is_float_text(bad) and any(
            kind.name == "float" for kind in numbers_here):
        hint = (f"Hint: YAML reads {bad} as a string; write the number with a dot and a signed exponent "
                f"(e.g. 1.0e-3) or in full (0.001).")
    shown = "null" if bad is None else repr(bad)
    raise ParamError(f"{key}{problem.where}: {shown} {problem.reason}; {allowed}.{_close_choice(spec, bad)} {hint}")


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_declared(head: Any) -> None:
    """Check a head's parameters against their dataclass fields' annotations (at fit), as ``featcache check`` does.

    Parameters
    ----------
    head : dataclass instance
        A head; each field with an understood annotation is checked (None passes where the annotation allows it).

    Raises
    ------
    ParamError
        The first value refused, with the message of :func:`~featcache.util.checks.check_int` or
        :func:`~featcache.util.checks.check_number` for a single bounded number, else
        ``"<name>=<value> is invalid[ (<name>[i]=<item>)]; allowed: ... Hint: ..."`` (the hint shows the value
        as a list where a list of it is allowed: ``hidden_sizes=512``).
    """
    for field in dataclasses.fields(head):
        if not field.init or not isinstance(field.type, str):
            continue
        spec = param_type(field.type)
        value = getattr(head, field.name)
        problem = find_problem(spec, value)
        if problem is None:
            continue
        if len(spec.kinds) == 1 and spec.kinds[0].item is None:
            for rule in spec.kinds[0].rules:  # the messages of check_int and check_number
                rule.check(field.name, value, spec.none)
        item = f" ({field.name}{problem.where}={problem.value!r} {problem.reason})" if problem.where else ""
        hint = PARAM_HINT.format(name=field.name)
        if not problem.where and value is not None and find_problem(spec, [value]) is None:
            hint = f"Hint: pass a list, e.g. {field.name}=[{value!r}] (in params.yaml: {field.name}: [{value!r}])."
        raise ParamError(f"{field.name}={value!r} is invalid{item}; allowed: {spec.allowed(none='None')}."
                         f"{_close_choice(spec, value)} {hint}")
