"""featcache's cache root on this machine (``$FEATCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/featcache``) and its
small JSON entries.

Each kind of entry has its folder under the root: ONNX exports (``onnx/``,
:mod:`featcache.extract.onnx.cache`), timm backbone specs (``timm-specs/``,
:mod:`featcache.extract.zoo.timm_spec_cache`), file hashes (``file-hashes/``) and
torch's default thread count (``torch-threads/``): :mod:`featcache.util.machine_records`.

A JSON entry holds a ``key`` (everything its value depends on) and the
``value``; it is read back only under exactly that key, so an entry made
under other conditions (versions, a file's stat) is never used. A damaged
entry reads as missing, and one that cannot be written only costs the work
it would have saved: a cache never fails a command.

Entries made under keys that no longer occur (another featcache, torch or
timm version) are never read again, so the root only grows; each entry's
last use is its file's modification time, refreshed at most once a day when
it is read (:func:`mark_used`), and ``featcache cache --prune DAYS`` removes
the entries not used for that long (:func:`json_entries`, and the ONNX
exports' :func:`featcache.extract.onnx.cache.export_entries`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featcache.util.atomic import write_json

__all__ = ["CACHE_ENV", "FILE_HASH_FOLDER", "JSON_FOLDERS", "ONNX_FOLDER", "TIMM_SPEC_FOLDER",
           "TORCH_THREADS_FOLDER", "USE_RESOLUTION", "CacheEntry", "cache_root", "entry_path", "json_entries",
           "mark_used", "read_entry", "remove_entry", "write_entry"]

logger = logging.getLogger(__name__)

#: Environment variable naming featcache's cache root.
CACHE_ENV = "FEATCACHE_CACHE_DIR"

#: The root's folder of ONNX exports (the default ``extract_run.onnx_cache``).
ONNX_FOLDER = "onnx"
#: The root's folder of timm backbone specs.
TIMM_SPEC_FOLDER = "timm-specs"
#: The root's folder of file hashes.
FILE_HASH_FOLDER = "file-hashes"
#: The root's folder of torch's default thread counts.
TORCH_THREADS_FOLDER = "torch-threads"
#: The root's folders of JSON entries (:func:`read_entry`).
JSON_FOLDERS: tuple[str, ...] = (TIMM_SPEC_FOLDER, FILE_HASH_FOLDER, TORCH_THREADS_FOLDER)

#: An entry read is marked as used (its modification time set to now) when its mark is older than this, in seconds:
#: a day, the resolution of ``--prune DAYS``, so that a read writes at most once a day.
USE_RESOLUTION = 86400.0


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One entry of a cache folder: its files, their bytes and its last use.

    Attributes
    ----------
    name : str
        The entry's main file name (``efficientnet_lite0-<key>.onnx``, ``torch-<digest>.json``).
    files : tuple of Path
        Every file of the entry (an ONNX export's graph and sidecar).
    nbytes : int
        Their sizes added.
    last_used : float
        When it was last used (seconds since the epoch): the latest modification time of its files.
    """

    name: str
    files: tuple[Path, ...]
    nbytes: int
    last_used: float

    @classmethod
    def of(cls, files: Sequence[Path]) -> CacheEntry | None:
        """The entry of ``files`` (those that exist; the first names it), or None when none exists."""
        stats = []
        for path in files:
            try:
                stats.append((path, path.stat()))
            except OSError:
                continue
        if not stats:
            return None
        return cls(files[0].name, tuple(path for path, _ in stats), sum(stat.st_size for _, stat in stats),
                   max(stat.st_mtime for _, stat in stats))


def cache_root() -> Path:
    """``$FEATCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/featcache`` (``XDG_CACHE_HOME`` defaults to ``~/.cache``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "featcache"


def entry_path(folder: str, identity: Mapping[str, Any], stem: str) -> Path:
    """``<cache root>/<folder>/<stem>-<16 hex digits of identity's sha256>.json``.

    Parameters
    ----------
    folder : str
        The kind of entry (``timm-specs``).
    identity : mapping
        What names the entry (JSON-serialisable): the whole key for entries that are never replaced, or a part
        of it (a file's path) for one entry replaced whenever the rest of the key changes.
    stem : str
        A readable prefix (the model, the file name); characters other than letters, digits and ``._-`` become
        ``_``.
    """
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
    return cache_root() / folder / f"{readable}-{digest}.json"


def mark_used(path: Path) -> None:
    """Set ``path``'s modification time to now if it is older than :data:`USE_RESOLUTION` (its last use, read by
    ``featcache cache --prune``); a file that cannot be touched (a read-only shared cache) is left alone."""
    try:
        if time.time() - path.stat().st_mtime > USE_RESOLUTION:
            os.utime(path)
    except OSError:
        pass


def read_entry(path: Path, key: Mapping[str, Any]) -> Any | None:
    """The value of the entry at ``path`` if it was written under exactly ``key``, else None (missing, damaged,
    or written under another key). A hit marks the entry used (:func:`mark_used`)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)) or "value" not in entry:
            return None
        mark_used(path)
        return entry["value"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # a damaged entry: the work is done again and the entry replaced
        logger.debug("cache entry %s does not read back (%s: %s)", path, type(error).__name__, error)
        return None


def write_entry(path: Path, key: Mapping[str, Any], value: Any) -> None:
    """Write ``value`` under ``key`` at ``path`` atomically; a cache that cannot be written is logged (debug) and
    left alone. Mappings in ``value`` keep their order."""
    try:
        write_json(path, {"key": dict(key), "value": value}, sort_keys=False)
    except OSError as error:
        logger.debug("cache entry %s not written (%s: %s)", path, type(error).__name__, error)


def json_entries(folder: str) -> list[CacheEntry]:
    """The JSON entries of the cache root's ``folder`` (one of :data:`JSON_FOLDERS`), oldest use first; a partial
    file left by a killed writer (``.<name>.<pid>.partial``) is an entry too."""
    root = cache_root() / folder
    if not root.is_dir():
        return []
    found = (CacheEntry.of([path]) for path in root.iterdir() if path.is_file())
    return sorted((entry for entry in found if entry is not None), key=lambda entry: entry.last_used)


def remove_entry(entry: CacheEntry) -> bool:
    """Delete the files of ``entry``; False when one could not be deleted (it is logged)."""
    removed = True
    for path in entry.files:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            logger.warning("Cache file %s not removed (%s: %s)", path, type(error).__name__, error)
            removed = False
    return removed
