"""Moved to ``tests/_support/synth_store.py`` (re-exported while other branches still import it; delete after merge)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _support.synth_store import *  # noqa: E402,F401,F403
from _support.synth_store import __all__  # noqa: E402,F401
