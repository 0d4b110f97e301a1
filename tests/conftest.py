"""Suite-wide settings.

* No test ever downloads weights: ``FEATCACHE_OFFLINE=1`` for the whole session
  (subprocesses inherit it): a test that asks for missing torchvision weights gets
  the offline message instead of a download. The download tests unset it and point
  the URL at a ``file://`` copy.
* The shared helpers (``tests/_support``) are importable under any import mode.
* The suite never writes to the user's cache folder: ``FEATCACHE_CACHE_DIR`` (the
  ONNX export cache; subprocesses inherit it) points at a session folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def pytest_configure(config) -> None:
    os.environ["FEATCACHE_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """Point ``FEATCACHE_CACHE_DIR`` (the ONNX export cache, also in subprocesses) at a session folder."""
    from featcache.extract.onnx.cache import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("featcache-cache")))
        yield os.environ[CACHE_ENV]
