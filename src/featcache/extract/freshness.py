"""Input files changed after a store (or a committed block) was written: the ``make`` rule of extraction.

The manifest names each image by its path (its sha256 hashes the paths, not the files' bytes), so an image fixed
or replaced in place under the same path leaves it unchanged. As ``make`` does, a local input file whose
modification time is newer than what was made from it makes that stale:

* a finished store: its file's own modification time is its completion time. The store is assembled as
  ``out.partial`` and renamed onto ``out`` (a rename keeps the mtime), so that time is its last write; reading it
  (read-only) does not change it, and nothing is stored in the file (its bytes stay the same on every clone).
  A copy that does not keep mtimes (``cp`` without ``-p``, a checkout) makes the store look newer than it is:
  an edit before the copy is then not seen, as with ``make``;
* a committed block of an unfinished run (``out.h5.parts/``): its file's modification time, per block. A block
  one of whose rows' files is newer is extracted again on resume (:func:`reopen_changed_blocks`): the other
  blocks hold features of the files as they are.

Which files: each distinct local path of the manifest (an image, or a WebDataset shard: a shard's rows all name
it), ``file://`` URLs included; a symlink counts with the newer of its own time and its target's (re-pointing it
is a change). Not checked: other URLs and remote fsspec paths (a request each: said once in the log), and missing
files (never newer: a store kept after its images were deleted stays usable). A file changed while the run reads
it, or within the filesystem's timestamp granularity of the store's completion, is not seen either.

Cost: one ``lstat`` per distinct file, on the calling thread: :func:`input_times` of 100,000 files in one folder
tree took 0.4-0.6 s on the shared 2-core VM's ext4 (warm cache; the ``lstat`` calls alone 0.17-0.5 s, with the
load); a pool of 8 threads took 4-6x longer (the GIL), so there is none.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import numpy as np

from featcache.extract.inputs.storage import is_url, url_protocol

if TYPE_CHECKING:
    from featcache.extract.inputs.manifest import Manifest
    from featcache.store.writer import StoreWriter

__all__ = ["NAMED", "UNCHECKED", "InputTimes", "input_times", "named_files", "reopen_changed_blocks"]

logger = logging.getLogger(__name__)

#: How many changed files a log line names.
NAMED = 3

#: The mtime of a file that is not checked (a URL) or missing: older than anything.
UNCHECKED = -1


@dataclass(frozen=True)
class InputTimes:
    """The modification times of a manifest's distinct input files.

    Attributes
    ----------
    files : list of str
        (F,) each distinct local file (an absolute or manifest-relative path joined onto the manifest's root).
    mtime_ns : ndarray of int64, (F,)
        Its modification time in ns (:data:`UNCHECKED` for a missing file).
    row_file : ndarray of int64, (N,)
        Each row's index into ``files``; -1 for a row read from a URL.
    n_urls : int
        Distinct URLs (other than ``file://``), not checked.
    """

    files: list[str]
    mtime_ns: np.ndarray
    row_file: np.ndarray
    n_urls: int

    @property
    def n_missing(self) -> int:
        """Distinct local files that do not exist (not checked)."""
        return int(np.count_nonzero(self.mtime_ns == UNCHECKED))

    def row_mtime_ns(self) -> np.ndarray:
        """(N,) int64: each row's file's mtime, :data:`UNCHECKED` for a URL row or a missing file."""
        times = np.append(self.mtime_ns, np.int64(UNCHECKED))  # row_file -1 picks the last entry
        return times[self.row_file]

    def newer_than(self, mtime_ns: int) -> list[str]:
        """The files modified after ``mtime_ns``, in manifest order."""
        return [self.files[i] for i in np.flatnonzero(self.mtime_ns > mtime_ns).tolist()]

    def not_checked(self) -> str:
        """``"2 URL inputs, 1 missing file"``-like note of what was not checked, ``""`` when all were."""
        parts = [f"{self.n_urls:,} URL inputs (a request each)"] if self.n_urls else []
        if self.n_missing:
            parts.append(f"{self.n_missing:,} missing files")
        return ", ".join(parts)


def _mtime_ns(path: str) -> int:
    """``path``'s mtime (a symlink: the newer of its own and its target's); :data:`UNCHECKED` if missing."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            return max(info.st_mtime_ns, os.stat(path).st_mtime_ns)
    except OSError:
        return UNCHECKED
    return info.st_mtime_ns


def _local_file(path: str, root: str) -> str | None:
    """The local file of a manifest path: joined onto ``root``; a ``file://`` URL's path; None for other URLs."""
    if not is_url(path):
        return os.path.join(root, path)
    if url_protocol(path) == "file":
        return unquote(urlparse(path).path)
    return None


def input_times(manifest: Manifest) -> InputTimes:
    """Stat each distinct local file of ``manifest`` once (see the module docstring).

    Parameters
    ----------
    manifest : Manifest
        Its ``paths`` (relative to its ``root``, absolute, or URLs).

    Returns
    -------
    InputTimes
    """
    root = str(manifest.root)
    index: dict[str, int] = {}
    row_file = np.fromiter((index.setdefault(path, len(index)) for path in manifest.paths), dtype=np.int64,
                           count=len(manifest.paths))
    files, where, n_urls = [], np.full(len(index), -1, dtype=np.int64), 0
    for i, path in enumerate(index):
        local = _local_file(path, root)
        if local is None:
            n_urls += 1
            continue
        where[i] = len(files)
        files.append(local)
    mtimes = np.fromiter((_mtime_ns(path) for path in files), dtype=np.int64, count=len(files))
    return InputTimes(files=files, mtime_ns=mtimes, row_file=where[row_file], n_urls=n_urls)


def named_files(files: list[str]) -> str:
    """``"a.png, b.png, c.png (and 4 more)"``: the first :data:`NAMED` of ``files`` for a log line (``..`` folded,
    for reading only: a file is stat'ed at the path as joined)."""
    more = f" (and {len(files) - NAMED:,} more)" if len(files) > NAMED else ""
    return ", ".join(os.path.normpath(path) for path in files[:NAMED]) + more


def reopen_changed_blocks(writer: StoreWriter, manifest: Manifest) -> list[int]:
    """Make committed blocks pending again when a row of theirs names a file modified after the block's commit.

    A killed run resumed after an image was fixed in place would otherwise keep that image's old features
    (a finished store is checked the same way by :func:`~featcache.pipeline.extract.up_to_date_report`).
    Only those blocks are extracted again: the others hold the features of the files as they are now.
    Call before ``writer.pending_blocks()``; the inputs are stat'ed only when blocks are committed.

    Returns
    -------
    list of int
        The reopened blocks, ascending.
    """
    committed = writer.committed_mtimes()
    if not committed:
        return []
    times = input_times(manifest)
    row_mtime = times.row_mtime_ns()
    reopened, changed = [], set()
    for block, block_mtime in sorted(committed.items()):
        rows = slice(writer.block_range(block).start, writer.block_range(block).stop)
        newer = row_mtime[rows] > block_mtime
        if newer.any():
            reopened.append(block)
            changed.update(times.row_file[rows][newer].tolist())
    for block in reopened:
        writer.discard_block(block)
    if reopened:
        logger.info("Extracting %d committed blocks of %s again: %d of their input files were modified after "
                    "they were committed: %s", len(reopened), writer.path, len(changed),
                    named_files([times.files[i] for i in sorted(changed)]))
    return reopened
