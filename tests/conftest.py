"""Suite-wide settings: no test ever downloads weights.

``FEATCACHE_OFFLINE=1`` for the whole session (subprocesses inherit it): a test
that asks for missing torchvision weights gets the offline message instead of
a download. The download tests unset it and point the URL at a ``file://`` copy.
"""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    os.environ["FEATCACHE_OFFLINE"] = "1"
