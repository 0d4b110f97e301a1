"""Fixtures of the store tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # _support importable by tests under any import mode
    sys.path.insert(0, str(TESTS))

import featcache  # noqa: E402
from _support.files import md5  # noqa: E402

SRC = Path(featcache.__file__).resolve().parent.parent


@pytest.fixture
def file_md5():
    """md5 hex digest of a file's bytes."""
    return md5


@pytest.fixture
def spawn():
    """Start ``python -c code`` with featcache and the synth helpers importable."""
    procs: list[subprocess.Popen] = []

    def _spawn(code: str, *args: str) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:  # only the processes this fixture started
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reap it and close its pipes
