"""Suite-wide settings.

* No test ever downloads weights: ``FEATCACHE_OFFLINE=1`` for the whole session
  (subprocesses inherit it): a test that asks for missing torchvision weights gets
  the offline message instead of a download. The download tests unset it and point
  the URL at a ``file://`` copy.
* The shared helpers (``tests/_support``) are importable under any import mode.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def pytest_configure(config) -> None:
    os.environ["FEATCACHE_OFFLINE"] = "1"
