"""Atomic file writes: a file is either absent, the old one, or complete under its name.

Every writer goes through :func:`atomic_path`: the content is written to a
temporary sibling (``.<name>.<pid>.partial``, same folder so the rename never
crosses file systems) and moved onto the target with :func:`os.replace`. A
process killed half-way leaves at most the temporary file, never a truncated
target; a failed write removes the temporary file and re-raises.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_bytes", "write_csv", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    Parameters
    ----------
    path : path-like
        The final file. Its parent folders are created.

    Yields
    ------
    Path
        Where to write the content (e.g. ``torch.save(state, tmp)``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (newlines kept as given); returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], payload: Any, *, indent: int | None = 2,
               sort_keys: bool = True) -> Path:
    """Write ``payload`` as JSON (strict: NaN and infinity are refused) plus a final newline, atomically."""
    return write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]) -> Path:
    """Write dict rows as CSV with a header (``\\n`` line ends), atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(fieldnames), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)
