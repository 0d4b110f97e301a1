"""``featcache cache``: what featcache's cache root holds, and its entries not used for a while removed.

The root (:func:`~featcache.util.cache_dir.cache_root`, ``$FEATCACHE_CACHE_DIR``) keeps ONNX exports and int8
graphs (tens to hundreds of MB each) and small JSON records (timm specs, file hashes, torch's thread counts).
Entries are keyed by featcache's, torch's and timm's versions among others, so an upgrade leaves the old ones
unread for good: nothing else ever removes them. An entry's last use is refreshed at most once a day when it is
read, so ``--prune DAYS`` removes what no command has read for that long; an ONNX export is removed under its
lock (one being written or published now is kept), and a later run that needs a removed entry makes it again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from featcache.util.cache_dir import JSON_FOLDERS, ONNX_FOLDER, CacheEntry, cache_root, json_entries, remove_entry

__all__ = ["CacheFolder", "cache_folders", "format_cache_report", "prune_cache", "prune_summary"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CacheFolder:
    """One folder of the cache root (or the ONNX cache ``extract_run.onnx_cache`` names) and its entries."""

    name: str
    path: Path
    entries: tuple[CacheEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)


def cache_folders(onnx_cache: Path | None = None) -> list[CacheFolder]:
    """The ONNX cache folder (``onnx_cache``, default the root's ``onnx/``) and the root's JSON folders.

    Parameters
    ----------
    onnx_cache : Path, optional
        The ONNX cache folder of ``extract_run.onnx_cache`` when it is not the default.
    """
    from featcache.extract.onnx.cache import export_entries

    onnx = onnx_cache if onnx_cache is not None else cache_root() / ONNX_FOLDER
    folders = [CacheFolder(ONNX_FOLDER, onnx, tuple(export_entries(onnx)))]
    folders += [CacheFolder(name, cache_root() / name, tuple(json_entries(name))) for name in JSON_FOLDERS]
    return folders


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def _age(seconds_since_epoch: float, now: float) -> str:
    days = (now - seconds_since_epoch) / 86400
    return "today" if days < 1 else f"{days:.0f} days ago"


def format_cache_report(folders: list[CacheFolder], now: float | None = None) -> list[str]:
    """Lines: the root, then per folder its entries, bytes, and its least and most recently used entries' age."""
    now = time.time() if now is None else now
    lines = [f"featcache cache root: {cache_root()}",
             f"{'folder':<15} {'entries':>7} {'size':>10}  least / most recently used  path"]
    for folder in folders:
        used = (f"{_age(folder.entries[0].last_used, now)} / {_age(folder.entries[-1].last_used, now)}"
                if folder.entries else "-")
        lines.append(f"{folder.name:<15} {len(folder.entries):>7} {_size(folder.nbytes):>10}  {used:<26}  "
                     f"{folder.path}")
    total = sum(folder.nbytes for folder in folders)
    lines.append(f"{'total':<15} {sum(len(f.entries) for f in folders):>7} {_size(total):>10}")
    return lines


def prune_cache(days: float, onnx_cache: Path | None = None, dry_run: bool = False,
                now: float | None = None) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove the entries not used in the last ``days`` days (0: every entry not in use now).

    Parameters
    ----------
    days : float
        Age of the last use, in days, from which an entry is removed.
    onnx_cache : Path, optional
        As for :func:`cache_folders`.
    dry_run : bool
        Only say what would be removed.
    now : float, optional
        The time ages are counted from (seconds since the epoch); default now.

    Returns
    -------
    removed, kept : list of CacheEntry
        The entries removed (or that would be, with ``dry_run``), and those old enough that were kept because
        they were in use (an ONNX export being written or published) or could not be deleted.
    """
    from featcache.extract.onnx.cache import remove_export_entry

    if days < 0:
        raise ValueError(f"days must be >= 0, got {days!r}")
    cutoff = (time.time() if now is None else now) - days * 86400
    removed: list[CacheEntry] = []
    kept: list[CacheEntry] = []
    for folder in cache_folders(onnx_cache):
        remove = remove_export_entry if folder.name == ONNX_FOLDER else remove_entry
        for entry in folder.entries:
            if entry.last_used > cutoff:
                continue
            if dry_run or remove(entry):
                removed.append(entry)
                logger.info("%s %s (%s)", "Would remove" if dry_run else "Removed", entry.files[0], _size(entry.nbytes))
            else:
                kept.append(entry)
    return removed, kept


def prune_summary(removed: list[CacheEntry], kept: list[CacheEntry], days: float, dry_run: bool) -> str:
    """One line on what :func:`prune_cache` did."""
    verb = "Would remove" if dry_run else "Removed"
    line = (f"{verb} {len(removed)} cache entries ({_size(sum(e.nbytes for e in removed))}) not used in the last "
            f"{days:g} days")
    if kept:
        line += f"; kept {len(kept)} in use or not removable (see the log)"
    return line
