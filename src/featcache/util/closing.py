"""``with obj:`` for objects that own a resource and have a ``close()`` method."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

__all__ = ["Closing"]

_T = TypeVar("_T", bound="Closing")


class Closing:
    """Mixin: ``with obj:`` returns ``obj`` and calls ``obj.close()`` on the way out.

    Subclasses implement :meth:`close`; one that must react to an exception
    leaving the ``with`` block (e.g. log what was left half-done) overrides
    ``_on_error``, which runs before ``close()``. Exceptions are never swallowed.
    """

    def close(self) -> None:
        """Release the resource (idempotent)."""
        raise NotImplementedError(f"{type(self).__name__} must implement close().")

    def _on_error(self, exc_type: type[BaseException]) -> None:
        """Called with the exception's type when the ``with`` block raised; nothing by default."""

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._on_error(exc_type)
        self.close()
