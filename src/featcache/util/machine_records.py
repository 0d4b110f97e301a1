"""What this machine records in featcache's cache root so that an up-to-date check does no work it did before:
a file's sha256 while its stat holds, torch's default thread count.

Both are read by an extraction that finds its store up to date (the weights file's sha256, the thread count a
torch-on-CPU store records), so that it answers without hashing a checkpoint of hundreds of MB or importing torch
(``benchmarks/bench_uptodate.py``). The entries are :mod:`featcache.util.cache_dir`'s: read back only under the
exact key they were made under, and a cache that cannot be written only costs the work.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from featcache.util.cache_dir import FILE_HASH_FOLDER, TORCH_THREADS_FOLDER, entry_path, read_entry, write_entry
from featcache.util.compute import torch_version
from featcache.util.hashing import file_sha256

__all__ = ["HASH_FOLDER", "RACY_SECONDS", "THREADS_FOLDER", "TORCH_THREAD_ENV", "cached_file_sha256",
           "remember_torch_threads", "torch_default_threads", "torch_threads_entry"]

#: The cache root's folder of file hashes (:func:`cached_file_sha256`).
HASH_FOLDER = FILE_HASH_FOLDER

#: A file modified less than this long before it is hashed is not recorded (git's "racy" case: a rewrite within the
#: file system's timestamp resolution could keep its size and modification time).
RACY_SECONDS = 2.0

#: The cache root's folder of torch's default thread counts (:func:`torch_default_threads`).
THREADS_FOLDER = TORCH_THREADS_FOLDER

#: Environment variables torch reads its default intra-op thread count from.
TORCH_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def torch_threads_entry() -> tuple[Path, dict[str, Any]]:
    """The cache entry of torch's default thread count in this process's environment, and its key (torch's
    version, the host name, the CPU count, the affinity mask's size and :data:`TORCH_THREAD_ENV`)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    key = {"torch": torch_version(), "host": platform.node(), "cpus": os.cpu_count() or 0, "affinity": affinity,
           **{name: os.environ.get(name, "") for name in TORCH_THREAD_ENV}}
    return entry_path(THREADS_FOLDER, key, "torch"), key


def remember_torch_threads(threads: int) -> None:
    """Record ``threads`` as torch's default count in this environment: the count a fresh torch took here when the
    record said otherwise (a record is never left wrong, or every up-to-date check would rebuild)."""
    entry, key = torch_threads_entry()
    write_entry(entry, key, int(threads))


def torch_default_threads() -> int:
    """torch's intra-op thread count in this process, without importing torch when this machine recorded it.

    An imported torch answers (``torch.get_num_threads()``, whatever was set). Otherwise the count is the one a
    fresh torch takes here, which depends only on torch's version, :data:`TORCH_THREAD_ENV` and the machine's
    CPUs: it is read from the cache root (:mod:`featcache.util.cache_dir`, keyed by those, the host name and the
    affinity mask's size: :func:`torch_threads_entry`), or torch is imported (about 2 s) and its count recorded
    there (:func:`remember_torch_threads`, which also corrects a record found wrong once torch runs). An up-to-date
    check of a torch-on-CPU store, which records the count, so runs no torch.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    entry, key = torch_threads_entry()
    known = read_entry(entry, key)
    if isinstance(known, int) and known > 0:
        return known
    import torch

    threads = int(torch.get_num_threads())
    remember_torch_threads(threads)
    return threads


def _stat_key(path: Path) -> dict[str, int | str]:
    status = path.stat()
    return {"path": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
            "ctime_ns": status.st_ctime_ns, "inode": status.st_ino, "device": status.st_dev}


def cached_file_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`file_sha256`, read from the cache root when the file's stat is the one it was hashed with.

    As git's index and DVC's state do, a file is taken as unchanged while its resolved path, size, modification
    and change times (``st_ctime`` cannot be set back by ``touch``), inode and device are; the hash is then read
    from ``<cache root>/file-hashes/`` (:mod:`featcache.util.cache_dir`) instead of reading the file (a 2.5 GB
    ViT-H checkpoint: seconds at every up-to-date check). A file is recorded only when its stat did not change
    while it was hashed and it was last modified at least :data:`RACY_SECONDS` before, so that no later rewrite can
    keep its stat.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    resolved = Path(path).resolve()
    key = _stat_key(resolved)
    entry = entry_path(HASH_FOLDER, {"path": key["path"]}, resolved.name)
    known = read_entry(entry, key)
    if isinstance(known, str):
        return known
    sha256 = file_sha256(resolved)
    settled = time.time_ns() - int(key["mtime_ns"]) >= RACY_SECONDS * 1e9
    if settled and _stat_key(resolved) == key:
        write_entry(entry, key, sha256)
    return sha256
