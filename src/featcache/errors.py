"""The exceptions a user can cause (bad params, data, weights, files).

The CLI prints these as one clear message and exits with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from featcache.extract.engine import ExtractionError
from featcache.extract.manifest import ManifestError
from featcache.extract.onnx_runner import OnnxExportError
from featcache.extract.parity import ParityError
from featcache.extract.registry import UnknownNameError
from featcache.extract.weights import WeightsNotFoundError
from featcache.pipeline.config import ConfigError
from featcache.store.errors import StoreError

__all__ = ["USER_ERRORS"]

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, ManifestError, UnknownNameError, WeightsNotFoundError, ExtractionError, StoreError,
    OnnxExportError, ParityError,
)
