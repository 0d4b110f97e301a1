"""An exclusive, process-wide write lock beside a store's output path.

The lock is an ``fcntl.flock`` on ``<path>.lock``. The kernel drops it when
the holder exits for any reason (``kill -9`` included), so a crashed writer
never blocks the next one. The holder's pid is written into the file so that
a waiting process can say who holds it. The file is unlinked on release, so a
finished extraction leaves nothing beside its output.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

from .errors import StoreLockedError

__all__ = ["FileLock", "LOCK_HINT"]

logger = logging.getLogger(__name__)

#: Hint appended to every :class:`StoreLockedError`.
LOCK_HINT = (
    "another featcache extract is writing this output; wait for it or remove the "
    "stale lock if no such process exists"
)

_POLL_SECONDS = 0.05


class FileLock:
    """Exclusive advisory lock on one file, held until :meth:`release`.

    Parameters
    ----------
    path : path-like
        The lock file, created if missing (e.g. ``features/digits/lite0.h5.lock``).
    timeout : float
        Seconds to wait for a holder to let go; ``0`` fails at once.

    Raises
    ------
    StoreLockedError
        If another open file description holds the lock after ``timeout``.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 0.0) -> None:
        if timeout < 0:
            raise ValueError(f"lock timeout must be >= 0 seconds, got {timeout!r}")
        self.path = Path(path)
        self._fd: int | None = None
        self._acquire(float(timeout))

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def _acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"{self.path} is locked by {self._holder()} "
                        f"(waited {timeout:g} s); {LOCK_HINT}"
                    ) from None
                time.sleep(_POLL_SECONDS)
                continue
            # The previous holder may have unlinked the file between our open()
            # and flock(); then we hold a lock on an orphan inode. Retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
                os.fsync(fd)
            except BaseException:
                # Not ours yet: drop the lock and the fd, or this process keeps both and its next
                # writer is told the output is locked by its own pid.
                self._abandon(fd)
                raise
            self._fd = fd
            logger.debug("acquired lock %s", self.path)
            return

    def _abandon(self, fd: int) -> None:
        """Unlink the lock file, unlock and close ``fd`` after a failed acquire; errors here are swallowed.

        Parameters
        ----------
        fd : int
            The descriptor that holds the flock but never became :attr:`held`.
        """
        for step in (lambda: self.path.unlink(missing_ok=True), lambda: fcntl.flock(fd, fcntl.LOCK_UN),
                     lambda: os.close(fd)):
            try:
                step()
            except OSError:  # the original error is the one worth raising
                pass

    def _holder(self) -> str:
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            text = ""
        return f"pid {text}" if text.isdigit() else "an unknown process (no pid recorded yet)"

    def release(self) -> None:
        """Unlink the lock file and drop the lock; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink while still holding the lock so no waiter can lock the old
            # inode and believe it owns the path (see the inode check above).
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        logger.debug("released lock %s", self.path)

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - depends on GC timing
        try:
            self.release()
        except Exception:  # noqa: BLE001 - a finaliser must not raise; the lock file is stale at worst
            pass
