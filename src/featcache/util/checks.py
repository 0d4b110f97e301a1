"""The one integer-setting check of every error message: the name, the bad value, what is allowed.

Imports only :mod:`featcache.errors` (a leaf) of featcache, for :class:`~featcache.errors.ParamError`.
"""

from __future__ import annotations

import numbers
from typing import Any

from featcache.errors import ParamError

__all__ = ["check_int"]


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
