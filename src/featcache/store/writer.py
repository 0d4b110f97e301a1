"""Crash-safe, resumable, deterministic writer of one HDF5 feature store.

Usage::

    with StoreWriter(out, ids=ids, splits=splits, classes=classes, labels=labels,
                     targets=None, layers=specs, attrs=attrs) as writer:
        for b in writer.pending_blocks():
            rows = writer.block_range(b)
            ...                                   # decode + run the backbone
            writer.commit_block(b, kept_rows, {"pool": feats}, errors=[(id_, why)])
        writer.finalize()                         # -> out, atomically

Files beside ``out`` while a writer runs:

* ``out.lock`` - exclusive ``flock`` with the holder's pid (removed on close);
* ``out.parts/<config_sha256[:16]>/block-NNNNNN.h5`` - committed blocks
  (see :mod:`featcache.store.blocks`); removed by :meth:`StoreWriter.finalize`;
* ``out.partial`` - the HDF5 file being assembled, renamed onto ``out``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from featcache.util.closing import Closing

from . import blocks as _blocks
from .assemble import write_store
from .errors import StoreError
from .lock import FileLock
from .schema import DEFAULT_BLOCK_ROWS, DEFAULT_FEATURE_DTYPE, FORMAT, LayerSpec, canonical_json, sha256_text
from .validate import (
    check_attrs,
    check_ids,
    check_layers,
    check_options,
    check_row_arrays,
    format_blocks,
)

__all__ = ["StoreWriter", "parts_root"]

logger = logging.getLogger(__name__)


def parts_root(path: str | Path) -> Path:
    """The folder that holds a store's committed blocks while it is written.

    Parameters
    ----------
    path : path
        The store's final ``.h5`` path.

    Returns
    -------
    Path
        ``X.h5`` -> ``X.h5.parts`` (one subfolder per config, named by its sha256's first 16 digits).
    """
    path = Path(path)
    return path.with_name(f"{path.name}.parts")


class StoreWriter(Closing):
    """Write one feature store block by block; see the module docstring.

    Parameters
    ----------
    path : path-like
        Final output, e.g. ``features/digits/efficientnet_lite0.h5``.
    ids : sequence of str, (N,)
        Unique stable ids in row order (sorted by the caller).
    splits : ndarray of uint8, (N,)
        Split codes (:data:`~featcache.store.schema.SPLIT_CODES`).
    classes : sequence of str, (K,)
        Class names in index order; empty for regression.
    labels : ndarray of int64, (N,), or None
        Class index per row, -1 for none; None stores -1 everywhere.
    targets : ndarray of float64, (N,), or None
        Regression target per row; None stores NaN everywhere.
    layers : sequence of LayerSpec
        Layers to store, in the order they are listed in ``/features``.
    attrs : mapping
        Root attributes; must contain ``config`` (canonical JSON) and
        ``config_sha256`` (its :func:`~featcache.store.schema.sha256_text`).
    dtype : {"float16", "float32"}
        Storage dtype of the features.
    block_rows : int
        Rows per committed block (and per HDF5 chunk, at most).
    compression : {"gzip", "lzf", None}
        Filter of the feature datasets. gzip (level 1, with shuffle) is the
        default because it is byte-deterministic; h5py's LZF is not.
    lock_timeout : float
        Seconds to wait for another writer of the same path.

    Attributes
    ----------
    ids : list of str, (N,)
        The ids, row order.
    n_rows, n_blocks : int
        N and ``ceil(N / block_rows)``.
    config_sha256 : str
        From ``attrs``; names the parts directory.
    parts_dir, partial_path, lock_path : Path
        Working files beside ``path`` (see the module docstring).

    Raises
    ------
    StoreError
        On invalid inputs.
    StoreLockedError
        If another process writes the same path.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ids: Sequence[str],
        splits: np.ndarray,
        classes: Sequence[str],
        labels: np.ndarray | None,
        targets: np.ndarray | None,
        layers: Sequence[LayerSpec],
        attrs: Mapping[str, Any],
        dtype: str = DEFAULT_FEATURE_DTYPE,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        compression: str | None = "gzip",
        lock_timeout: float = 0.0,
    ) -> None:
        self.path = Path(path)
        check_options(dtype=dtype, block_rows=block_rows, compression=compression)
        self.ids: list[str] = check_ids(ids)
        self.classes = [str(c) for c in classes]
        self.splits, self.labels, self.targets = check_row_arrays(
            self.ids, splits, labels, targets, self.classes
        )
        self.layers: tuple[LayerSpec, ...] = check_layers(layers)
        self.attrs = check_attrs(attrs)
        self.config_sha256: str = self.attrs["config_sha256"]
        self.dtype = np.dtype(dtype)
        self.block_rows = int(block_rows)
        self.compression = compression
        self.n_rows = len(self.ids)
        self.n_blocks: int = math.ceil(self.n_rows / self.block_rows)
        self.fingerprint = self._fingerprint()

        name = self.path.name
        self.parts_root = parts_root(self.path)
        self.parts_dir = self.parts_root / self.config_sha256[:16]
        self.partial_path = self.path.with_name(f"{name}.partial")
        self.lock_path = self.path.with_name(f"{name}.lock")

        self._committer = _blocks.BlockCommitter(
            parts_dir=self.parts_dir.absolute(), fingerprint=self.fingerprint, n_rows=self.n_rows,
            block_rows=self.block_rows, layers=self.layers, ids=tuple(self.ids), dtype=self.dtype.name,
            compression=compression,
        )

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock: FileLock | None = FileLock(self.lock_path, timeout=lock_timeout)
        self._finalized = False
        try:
            self._committed: set[int] = self._scan_parts()
        except BaseException:
            self.close()
            raise
        logger.info(
            "store writer %s: %s rows in %s blocks, %s already committed",
            self.path, f"{self.n_rows:,}", f"{self.n_blocks:,}", f"{len(self._committed):,}",
        )

    # ------------------------------------------------------------------ setup
    def _fingerprint(self) -> str:
        """Hash of everything that decides a block file's content and geometry."""
        h = hashlib.sha256()
        for id_ in self.ids:
            h.update(id_.encode("utf-8"))
            h.update(b"\0")
        meta = {
            "format": FORMAT,
            "config_sha256": self.config_sha256,
            "ids_sha256": h.hexdigest(),
            "n_rows": self.n_rows,
            "block_rows": self.block_rows,
            "dtype": self.dtype.name,
            "layers": [[s.alias, s.dim] for s in self.layers],
        }
        return sha256_text(canonical_json(meta))

    def _scan_parts(self) -> set[int]:
        """Drop other configs' parts and leftovers; return the committed blocks."""
        if self.parts_root.is_dir():
            for child in sorted(self.parts_root.iterdir()):
                if child.name != self.parts_dir.name:
                    logger.info(
                        "discarding parts of another config at %s (this config is %s)",
                        child, self.config_sha256[:16],
                    )
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        if self.partial_path.exists():
            logger.info("removing leftover %s of an interrupted finalize", self.partial_path)
            self.partial_path.unlink()
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        committed: set[int] = set()
        for child in sorted(self.parts_dir.iterdir()):
            block = _blocks.parse_block_name(child.name)
            if block is None:
                logger.debug("removing stray file %s", child)
                child.unlink(missing_ok=True)  # a late writer may rename or remove its temporary file
                continue
            if block >= self.n_blocks or self._committer.check_block_file(block) is not None:
                logger.warning(
                    "discarding block file %s: it does not belong to these inputs", child
                )
                child.unlink()
                continue
            committed.add(block)
        return committed

    # ------------------------------------------------------------------ blocks
    def block_range(self, block: int) -> range:
        """Rows ``[block * block_rows, min((block + 1) * block_rows, N))``."""
        return self._committer.block_range(block)

    def pending_blocks(self) -> list[int]:
        """Blocks not yet committed for this config, ascending."""
        return [b for b in range(self.n_blocks) if b not in self._committed]

    def _check_open(self) -> None:
        if self._finalized or self._lock is None:
            raise StoreError(
                f"writer for {self.path} is closed; create a new StoreWriter to resume"
            )

    def commit_block(
        self,
        block: int,
        kept_rows: np.ndarray,
        features: Mapping[str, np.ndarray],
        errors: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Commit one block atomically.

        Parameters
        ----------
        block : int
            Block index in ``range(n_blocks)``.
        kept_rows : ndarray of int64, (M,)
            Absolute rows of this block that were extracted.
        features : mapping of alias to ndarray, each (M, D)
            Features of the kept rows, in ``kept_rows`` order, for every layer.
        errors : sequence of (id, reason), (E,)
            The block's skipped rows; ``M + E`` equals the block size.

        Raises
        ------
        StoreError
            If rows, ids, aliases or shapes are inconsistent.
        """
        self._check_open()
        self._committer.commit_block(block, kept_rows, features, errors)
        self._committed.add(block)

    def block_committer(self) -> _blocks.BlockCommitter:
        """A picklable committer of this store's blocks, for another process (e.g. a dask worker).

        It writes the same block files as :meth:`commit_block`, into
        :attr:`parts_dir` (an absolute path: the other process must see that
        folder under the same path). It takes no lock and cannot finalize:
        this writer keeps the lock, and counts each block a committer wrote
        with :meth:`adopt_block`.

        Returns
        -------
        featcache.store.blocks.BlockCommitter
        """
        self._check_open()
        return self._committer

    def adopt_block(self, block: int) -> None:
        """Count a block file written by a :meth:`block_committer` elsewhere as committed.

        Parameters
        ----------
        block : int
            Block index in ``range(n_blocks)``.

        Raises
        ------
        StoreError
            If the block file is missing, unreadable, or belongs to other
            inputs (another config, other ids or another geometry).
        """
        self._check_open()
        problem = self._committer.check_block_file(block)
        if problem is not None:
            raise StoreError(
                f"block {block} of {self.path} cannot be adopted: its file "
                f"{self._committer.block_path(block)} is {problem}. Hint: the process that committed it must "
                "write into the same parts folder (same absolute path, same config and inputs)."
            )
        self._committed.add(block)

    def committed_errors(self) -> list[tuple[str, str]]:
        """(id, reason) of every skipped row in the committed blocks, in row order.

        Lets a caller judge the bad rows (e.g. refuse a store that is mostly
        errors) before :meth:`finalize` writes anything.
        """
        self._check_open()
        errors: list[tuple[str, str]] = []
        for block in sorted(self._committed):
            part = _blocks.read_block(self._committer.block_path(block), ("error_rows", "error_reasons"))
            errors.extend((self.ids[r], str(why)) for r, why in zip(part["error_rows"], part["error_reasons"]))
        return errors

    def blocks_with_errors(self, reason: Callable[[str], bool]) -> list[int]:
        """Committed blocks with a skipped row whose reason satisfies ``reason``, ascending."""
        self._check_open()
        return [block for block in sorted(self._committed) if any(
            reason(str(why)) for why in _blocks.read_block(self._committer.block_path(block),
                                                          ("error_reasons",))["error_reasons"])]

    def committed_mtimes(self) -> dict[int, int]:
        """When each committed block was committed: its file's modification time in ns, by block.

        A block file is written once (atomically) and never changed, so that time is after its rows' inputs
        were read: an input file modified later makes the block stale.
        """
        self._check_open()
        return {block: self._committer.block_path(block).stat().st_mtime_ns for block in sorted(self._committed)}

    def discard_block(self, block: int) -> None:
        """Delete a committed block's file: the block is pending again (e.g. to retry rows a server failed)."""
        self._check_open()
        self._committer.block_path(block).unlink(missing_ok=True)
        self._committed.discard(block)

    # ------------------------------------------------------------------ final
    def finalize(self, *, raw_chunks: bool = True) -> Path:
        """Assemble the final HDF5 file from all blocks and rename it into place.

        Parameters
        ----------
        raw_chunks : bool
            Copy each block chunk that is a whole chunk of the store as its
            stored (compressed) bytes (default); False compresses every chunk
            again (the same bytes, slower: see :mod:`featcache.store.assemble`).

        Returns
        -------
        Path
            The output path.

        Raises
        ------
        StoreError
            If blocks are missing, or writing fails (a previous output is left
            intact, the partial file removed and committed blocks kept).
        """
        self._check_open()
        missing = self.pending_blocks()
        if missing:
            raise StoreError(
                f"cannot finalize {self.path}: {len(missing)} of {self.n_blocks} blocks are "
                f"not committed ({format_blocks(missing)}). Hint: commit them "
                "(writer.pending_blocks() lists them) before finalize()."
            )
        block_paths = [self.parts_dir / _blocks.block_name(b) for b in range(self.n_blocks)]
        kept_mask = np.zeros(self.n_rows, dtype=bool)
        errors: list[tuple[str, str]] = []
        for bp in block_paths:
            part = _blocks.read_block(bp, ("kept_rows", "error_rows", "error_reasons"))
            kept_mask[part["kept_rows"]] = True
            errors.extend(
                (self.ids[r], str(why)) for r, why in zip(part["error_rows"], part["error_reasons"])
            )
        kept_idx = np.flatnonzero(kept_mask)

        def sources(i: int):
            return _blocks.iter_block_features(block_paths, i)

        root = dict(self.attrs)
        root.update(
            format=FORMAT,
            n_rows=int(kept_idx.size),
            n_input=self.n_rows,
            n_skipped=len(errors),
            complete=True,
        )
        try:
            write_store(
                self.partial_path,
                ids=[self.ids[r] for r in kept_idx],
                labels=self.labels[kept_idx],
                targets=self.targets[kept_idx],
                splits=self.splits[kept_idx],
                classes=self.classes,
                errors=errors,
                layers=self.layers,
                feature_sources=sources,
                dtype=self.dtype.name,
                block_rows=self.block_rows,
                compression=self.compression,
                root_attrs=root,
                raw_chunks=raw_chunks,
            )
            os.replace(self.partial_path, self.path)
        except BaseException as exc:
            self.partial_path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreError(
                    f"writing {self.partial_path} failed ({exc}); the previous {self.path.name} "
                    f"(if any) is untouched and committed blocks are kept in {self.parts_dir}. "
                    "Hint: free disk space or fix permissions, then rerun to finalize."
                ) from exc
            raise
        _blocks.fsync_dir(self.path.parent)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        try:
            self.parts_root.rmdir()
        except OSError:
            pass
        # DEBUG: the caller's summary (``Wrote ...`` of the extraction) is the run's final line.
        logger.debug(
            "wrote %s: %s rows (%s of %s inputs skipped), layers %s",
            self.path, f"{kept_idx.size:,}", f"{len(errors):,}", f"{self.n_rows:,}", [s.alias for s in self.layers],
        )
        self._finalized = True
        self.close()
        return self.path

    def close(self) -> None:
        """Release the lock; committed blocks stay for a later resume."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _on_error(self, exc_type: type[BaseException]) -> None:
        """The ``with`` block raised: say how far the writer got (``close()`` follows)."""
        if not self._finalized:
            logger.warning(
                "store writer %s stopped by %s; %d of %d blocks committed, rerun to resume",
                self.path, exc_type.__name__, len(self._committed), self.n_blocks,
            )
