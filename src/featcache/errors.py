"""The base class of the exceptions a user can cause (bad params, data, weights, files).

Every such exception subclasses :class:`UserError` (besides the built-in class
it has always been, e.g. ``ValueError`` or ``FileNotFoundError``), so the CLI
catches one class, prints one clear message and exits with status 2; anything
else is a bug and keeps its traceback.

This module imports nothing from featcache (and nothing heavy), so any module
may import it and ``featcache check`` stays cheap.
"""

from __future__ import annotations

__all__ = ["SAVED_HEAD_HINT", "ExtractionError", "ParamError", "SavedHeadError", "SavedHeadNotFoundError", "UserError"]


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback.

    Each module defines its own subclasses (``ManifestError``, ``StoreError``, ``PairingError``...); the whole
    list is in docs/ARCHITECTURE.md, which ``tests/test_design_guide.py`` checks against the code.
    """


class ParamError(UserError, ValueError):
    """A setting with a wrong type or value (a head's hyper-parameter, a count, a fraction); the message names
    the setting, the value and what is allowed. A ValueError, as scikit-learn expects of a bad parameter."""


class ExtractionError(UserError, RuntimeError):
    """Extraction stopped: ``on_error: fail`` on a bad image, too many bad images, a runner that cannot run
    as configured (e.g. onnxruntime's CUDA provider missing), or a decode worker that died."""


#: How to get a complete saved head back: the train stage writes the head and its ``featcache-run.json``.
SAVED_HEAD_HINT = ("Hint: rerun `dvc repro train` (or `dvc repro -f train@<item>` for this head), or "
                   "`featcache train ... --model-dir DIR`, to save the head again.")


class SavedHeadError(UserError, ValueError):
    """A saved head's folder (``featcache predict --model``, ``featcache.heads.load_head``) that cannot be used:
    a file truncated or unreadable, or written by another featcache version (old format or key names). The
    message names the folder, the file and the fix (:data:`SAVED_HEAD_HINT`)."""


class SavedHeadNotFoundError(SavedHeadError, FileNotFoundError):
    """A saved head's folder that does not exist, or lacks a file it must hold (the weights file, ``head.json``,
    ``featcache-run.json``); also a FileNotFoundError."""
