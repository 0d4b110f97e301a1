"""Tests of featcache.store.lock: a failed acquire leaves neither the fd nor the flock behind."""

from __future__ import annotations

import os

import pytest

from featcache.store.lock import FileLock


@pytest.mark.parametrize("call", ["write", "fsync", "ftruncate"])
def test_failed_pid_write_releases_the_lock(tmp_path, monkeypatch, call):
    """An OSError while recording the pid: raised, and the next acquire in this process succeeds."""
    path = tmp_path / "x.h5.lock"
    real = getattr(os, call)
    fds_before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    failed: list[int] = []

    def fail_once(fd, *args):
        if not failed:
            failed.append(fd)
            raise OSError(28, "No space left on device")
        return real(fd, *args)

    monkeypatch.setattr(os, call, fail_once)
    with pytest.raises(OSError, match="No space left"):
        FileLock(path)
    monkeypatch.setattr(os, call, real)
    with FileLock(path) as lock:  # not "locked by pid <ours>"
        assert lock.held
        assert path.read_text(encoding="ascii") == f"{os.getpid()}\n"
    assert not path.exists()
    if fds_before is not None:
        assert set(os.listdir("/proc/self/fd")) <= fds_before  # the failed acquire's fd is closed
