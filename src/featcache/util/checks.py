"""The integer and number setting checks of every error message: the name, the bad value, what is allowed.

Imports only :mod:`featcache.errors` (a leaf) of featcache, for :class:`~featcache.errors.ParamError`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from featcache.errors import ParamError

__all__ = ["check_int", "check_number", "number_phrase"]


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, *, allow_none: bool = False,
              hint: str = "") -> None:
    """Raise ParamError (a ValueError) unless ``value`` is an integer in ``[minimum, maximum]`` (or None where allowed).

    Parameters
    ----------
    name : str
        The setting's name in the message.
    value : object
        The value to check; ``bool`` is not an integer here.
    minimum : int
        Smallest allowed value.
    maximum : int, optional
        Largest allowed value (default: no upper bound).
    allow_none : bool
        Whether None is allowed too.
    hint : str
        Appended to the message; ``{name}`` in it is replaced by ``name``.

    Raises
    ------
    ParamError
        A :class:`~featcache.errors.UserError` and a ValueError:
        ``"<name>=<value> is invalid; allowed: an integer >= <minimum>[ and <= <maximum>][ or None].[ <hint>]"``.

    Examples
    --------
    >>> check_int("epochs", 0, 1)
    Traceback (most recent call last):
    ...
    featcache.errors.ParamError: epochs=0 is invalid; allowed: an integer >= 1.
    """
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        bound = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        allowed = bound + (" or None" if allow_none else "")
        extra = f" {hint.format(name=name)}" if hint else ""
        raise ParamError(f"{name}={value!r} is invalid; allowed: {allowed}.{extra}")


def check_number(name: str, value: Any, low: float, high: float | None = None, *, low_closed: bool = False,
                 high_closed: bool = False, hint: str = "") -> None:
    """Raise ParamError (a ValueError) unless ``value`` is a finite real number in an interval.

    Parameters
    ----------
    name : str
        The setting's name in the message.
    value : object
        The value to check; ``bool`` is not a number here.
    low : float
        Lower bound, excluded unless ``low_closed``.
    high : float, optional
        Upper bound, excluded unless ``high_closed`` (default: none).
    low_closed, high_closed : bool
        Whether the bounds are allowed values.
    hint : str
        Appended to the message; ``{name}`` in it is replaced by ``name``.

    Raises
    ------
    ParamError
        ``"<name>=<value> is invalid; allowed: a finite number > <low>."`` (``>=`` when ``low_closed``) without
        ``high``, else ``"... allowed: a number in (<low>, <high>]."`` (brackets as the bounds are closed).

    Examples
    --------
    >>> check_number("dropout", 1.0, 0, 1, low_closed=True)
    Traceback (most recent call last):
    ...
    featcache.errors.ParamError: dropout=1.0 is invalid; allowed: a number in [0, 1).
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_closed else value > low)
    ok = ok and (high is None or (value <= high if high_closed else value < high))
    if not ok:
        extra = f" {hint.format(name=name)}" if hint else ""
        raise ParamError(f"{name}={value!r} is invalid; allowed: {number_phrase(low, high, low_closed, high_closed)}."
                         f"{extra}")


def number_phrase(low: float, high: float | None, low_closed: bool = False, high_closed: bool = False) -> str:
    """``"a finite number > 0"``, ``"a number in (0, 1]"``: what :func:`check_number` allows."""
    if high is None:
        return f"a finite number {'>=' if low_closed else '>'} {low:g}"
    return f"a number in {'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
