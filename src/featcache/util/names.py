"""Hints for unknown names: the one "did you mean" rule of every error message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean"]


def closest(value: object, allowed: Iterable[str]) -> str | None:
    """The allowed name closest to ``value`` (difflib, cutoff 0.6), or None."""
    close = difflib.get_close_matches(str(value), [str(name) for name in allowed], n=1)
    return close[0] if close else None


def did_you_mean(value: object, allowed: Iterable[str], *, template: str = " Did you mean {!r}?") -> str:
    """``" Did you mean 'x'?"`` for the closest allowed name, or ``""`` when none is close.

    Parameters
    ----------
    value : object
        The unknown name (converted with ``str``).
    allowed : iterable of str
        The valid names.
    template : str
        Format of the hint, with one ``{!r}`` slot for the name.
    """
    match = closest(value, allowed)
    return template.format(match) if match is not None else ""
