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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featcache.util.atomic import write_json

__all__ = ["CACHE_ENV", "cache_root", "entry_path", "read_entry", "write_entry"]

logger = logging.getLogger(__name__)

#: Environment variable naming featcache's cache root.
CACHE_ENV = "FEATCACHE_CACHE_DIR"


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


def read_entry(path: Path, key: Mapping[str, Any]) -> Any | None:
    """The value of the entry at ``path`` if it was written under exactly ``key``, else None (missing, damaged,
    or written under another key)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)) or "value" not in entry:
            return None
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
