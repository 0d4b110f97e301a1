"""Suite-wide fixtures: the suite never writes to the user's cache folder."""

from __future__ import annotations

import os

import pytest

from featcache.extract.onnx_cache import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """Point ``FEATCACHE_CACHE_DIR`` (the ONNX export cache, also in subprocesses) at a session folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("featcache-cache")))
        yield os.environ[CACHE_ENV]
