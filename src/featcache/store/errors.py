"""Exceptions raised by the HDF5 feature store.

Every message names the offending value, what is allowed, and a hint on how
to fix it, so that a pipeline log line is enough to act on.
"""

from __future__ import annotations

from featcache.errors import UserError

__all__ = ["StoreError", "StaleStoreError", "StoreLockedError", "StoreNotFoundError"]


class StoreError(UserError):
    """A feature store is missing, malformed, or was written inconsistently."""


class StaleStoreError(StoreError):
    """A complete store was extracted with parameters other than the current ones."""


class StoreLockedError(StoreError):
    """Another process holds the write lock of the same output path."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The store file does not exist; catchable as StoreError or FileNotFoundError."""
