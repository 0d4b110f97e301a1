"""glibc allocator tuning for CPU extraction.

With glibc's defaults every activation tensor larger than the dynamic mmap
threshold is ``mmap``-ed and ``munmap``-ed again on every forward pass; the
kernel then zeroes fresh pages each time, which shows up as a large share of
*system* time on CPU inference. Telling glibc to serve large blocks from the
heap (``M_MMAP_MAX=0``) and to keep freed memory (``M_TRIM_THRESHOLD``) lets
the same buffers be reused across batches. It is process-wide, applied once
at the start of an extraction, inherited by forked DataLoader workers, and
switched off with ``FEATCACHE_MALLOC_TUNING=0`` (or ``extract_run.malloc_tuning``).
The measured effect is in ``benchmarks/README.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["tune_malloc", "MALLOC_ENV_SWITCH"]

logger = logging.getLogger(__name__)

#: Environment variable that disables the tuning when set to ``0``.
MALLOC_ENV_SWITCH = "FEATCACHE_MALLOC_TUNING"

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def tune_malloc(enabled: bool = True, trim_threshold: int = 1 << 30) -> bool:
    """Keep large allocations on glibc's heap and stop returning them to the OS.

    Parameters
    ----------
    enabled : bool
        False leaves the allocator alone (so does ``FEATCACHE_MALLOC_TUNING=0``).
    trim_threshold : int
        Bytes of free memory at the top of the heap kept before trimming.

    Returns
    -------
    bool
        True if the settings are in effect (glibc on Linux), else False.
    """
    global _applied
    if _applied:
        return True
    if not enabled or os.environ.get(MALLOC_ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    _applied = ok
    logger.debug("glibc malloc tuning %s", "applied" if ok else "rejected")
    return ok
