"""The base class of the exceptions a user can cause (bad params, data, weights, files).

Every such exception subclasses :class:`UserError` (besides the built-in class
it has always been, e.g. ``ValueError`` or ``FileNotFoundError``), so the CLI
catches one class, prints one clear message and exits with status 2; anything
else is a bug and keeps its traceback.

This module imports nothing from featcache (and nothing heavy), so any module
may import it and ``featcache check`` stays cheap.
"""

from __future__ import annotations

__all__ = ["ExtractionError", "ParamError", "UserError"]


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback.

    Subclasses: ``ConfigError``, ``ManifestError``, ``UnknownNameError``, ``UnknownHeadError``,
    ``ParamError``, ``WeightsNotFoundError``, ``ExtractionError``, ``StoreError`` (and its
    subclasses), ``OnnxExportError``, ``ParityError``, ``ShardReadError``.
    """


class ParamError(UserError, ValueError):
    """A setting with a wrong type or value (a head's hyper-parameter, a count, a fraction); the message names
    the setting, the value and what is allowed. A ValueError, as scikit-learn expects of a bad parameter."""


class ExtractionError(UserError, RuntimeError):
    """Extraction stopped: ``on_error: fail`` on a bad image, too many bad images, a runner that cannot run
    as configured (e.g. onnxruntime's CUDA provider missing), or a decode worker that died."""
