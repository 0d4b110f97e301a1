"""What one extraction did: :class:`ExtractionReport`, its one-line summary for the log and the CLI, and the
bad-image lines of a run (:class:`BadImageLog`).

A run that resumes counts its speed over the rows it extracted itself, and says how many rows came from earlier
runs; a run that found every row already committed (only the final file left to write) says so instead of an
img/s over nothing. The skipped rows are counted by reason in the summary, so a long run logs its first
:data:`BAD_IMAGES_LOGGED` bad images one by one and the rest only with ``featcache -v``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from featcache.extract.inputs.manifest import Manifest
from featcache.store.reader import FeatureStore

__all__ = ["BAD_IMAGES_LOGGED", "BadImageLog", "ExtractionReport", "build_report", "log_resume", "reason_counts"]

logger = logging.getLogger("featcache.extract.engine")

#: Bad images a run logs one by one as warnings; later ones are DEBUG lines (``featcache -v``).
BAD_IMAGES_LOGGED = 20


class BadImageLog:
    """The ``Bad image ...`` lines of one run: the first ``limit`` as warnings, then one note, then DEBUG lines.

    A long extraction with a few percent of bad images would otherwise bury its progress lines; the final
    line counts every skipped row by reason, and the store's ``/errors`` (``FeatureStore.errors()``) lists them.

    Parameters
    ----------
    limit : int, optional
        Warnings before the rest go to DEBUG (default :data:`BAD_IMAGES_LOGGED`).
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = BAD_IMAGES_LOGGED if limit is None else int(limit)
        self.count = 0

    def __call__(self, message: str, *args: Any) -> None:
        """Log one bad image (``logging``-style ``message % args``)."""
        self.count += 1
        if self.count <= self.limit:
            logger.warning(message, *args)
            return
        if self.count == self.limit + 1:
            logger.warning("More than %d bad images: the others are logged only with featcache -v; the final line "
                           "counts them by reason, and the store's /errors (FeatureStore.errors()) lists them all",
                           self.limit)
        logger.debug(message, *args)


def reason_counts(errors: Sequence[tuple[str, str]], most: int = 3) -> str:
    """``"3 truncated or corrupt image, 1 empty file"``: the skipped rows by reason, most frequent first.

    A reason's kind is its text before `` (`` (the details: which error, which file offset); kinds past the
    ``most`` frequent are summed as ``"N other"``.
    """
    kinds = Counter(reason.split(" (", 1)[0] for _, reason in errors).most_common()
    parts = [f"{count} {kind}" for kind, count in kinds[:most]]
    rest = sum(count for _, count in kinds[most:])
    return ", ".join(parts + ([f"{rest} other"] if rest else []))


@dataclass
class ExtractionReport:
    """What one extraction did.

    Attributes
    ----------
    path : Path
        The finalized store.
    n_input, n_written, n_skipped : int
        N manifest rows; rows in the store; bad images left out (of every run, resumed blocks included).
    n_resumed_blocks : int
        Blocks an earlier run had committed.
    n_extracted : int
        Rows this run sent through the backbone; the other ``n_input - n_extracted`` came from earlier runs.
    seconds : float
        Wall time of this run.
    images_per_second : float
        ``n_extracted / seconds``; 0 when this run extracted nothing.
    errors : list of (id, reason)
        The skipped rows, in row order.
    decode_stats : DecodeStats or None
        Where the rows were decoded when JPEGs were decoded on the runner's device.
    up_to_date : bool
        The store was already made from the same inputs and kept as it was (nothing extracted or written).
    """

    path: Path
    n_input: int
    n_written: int
    n_skipped: int
    n_resumed_blocks: int
    n_extracted: int
    seconds: float
    images_per_second: float
    errors: list[tuple[str, str]] = field(default_factory=list)
    decode_stats: Any = None
    up_to_date: bool = False

    def summary(self, note: str = "") -> str:
        """``"1,797 rows written, 5 skipped, 57.5 img/s"``; on a resume also how many rows earlier runs extracted;
        ``"up to date: 1,797 rows, 5 skipped; --force rebuilds it"`` for a store kept as it was.

        Parameters
        ----------
        note : str
            Put before the speed (e.g. ``"12 tasks on dask"``).
        """
        skipped = f" ({reason_counts(self.errors)})" if self.errors else ""
        if self.up_to_date:
            return f"up to date: {self.n_written:,} rows, {self.n_skipped:,} skipped{skipped}; --force rebuilds it"
        head = f"{self.n_written:,} rows written, {self.n_skipped:,} skipped{skipped}" + (f", {note}" if note else "")
        extracted, earlier = self.n_extracted, self.n_input - self.n_extracted
        if extracted == 0:
            return f"{head}; nothing left to extract: all {self.n_input:,} rows from earlier runs"
        speed = f"{head}, {self.images_per_second:.1f} img/s"
        if earlier <= 0:
            return speed
        return f"{speed} over the {extracted:,} rows extracted now ({earlier:,} rows from earlier runs)"


def build_report(path: str | Path, manifest: Manifest, *, n_extracted: int, n_resumed_blocks: int, seconds: float,
                 note: str = "", decode_stats: Any = None, up_to_date: bool = False) -> ExtractionReport:
    """The report of a finished store, its skipped rows counted from the store itself; logs its summary.

    Bad images of blocks committed by an earlier (resumed) run are in the
    store but not in this run's errors, so they are read back from ``path``.

    Parameters
    ----------
    path : path
        The finalized store.
    manifest : Manifest
        Its N input rows.
    n_extracted : int
        Rows this run sent through the backbone (for img/s; the others came from earlier runs).
    n_resumed_blocks : int
        Blocks an earlier run had committed.
    seconds : float
        Wall time of this run.
    note : str
        Added to the log line (e.g. ``"12 tasks on dask"``).
    decode_stats : DecodeStats, optional
        Where a device-decode run decoded its rows.
    up_to_date : bool
        ``path`` was kept as it was, made from the same inputs: the line says so instead of ``Wrote``.
    """
    with FeatureStore(path) as store:
        errors = store.errors()
    n_skipped = len(errors)
    report = ExtractionReport(path=Path(path), n_input=len(manifest), n_written=len(manifest) - n_skipped,
                              n_skipped=n_skipped, n_resumed_blocks=n_resumed_blocks, n_extracted=n_extracted,
                              seconds=seconds,
                              images_per_second=n_extracted / seconds if n_extracted and seconds > 0 else 0.0,
                              errors=errors, decode_stats=decode_stats, up_to_date=up_to_date)
    if up_to_date:
        logger.info("%s is up to date (%s rows, same config and manifest); --force rebuilds it", path,
                    f"{report.n_written:,}")
    else:
        logger.info("Wrote %s: %s", path, report.summary(note))
    return report


def log_resume(out: str | Path, n_resumed_blocks: int, n_blocks: int, n_pending_rows: int, n_input: int) -> None:
    """Log what a resumed run starts from: the blocks and rows earlier runs committed, and the rows left.

    The progress lines that follow count this run's rows only (their total is ``n_pending_rows``, their ETA
    this run's speed), so this line says how that total relates to the store's ``n_input`` rows.
    """
    if n_pending_rows == 0:
        logger.info("Resuming %s: all %d blocks (%s rows) already committed; nothing left to extract, writing the "
                    "final file", out, n_blocks, f"{n_input:,}")
        return
    logger.info("Resuming %s: %d of %d blocks (%s of %s rows) already committed; extracting the other %s rows",
                out, n_resumed_blocks, n_blocks, f"{n_input - n_pending_rows:,}", f"{n_input:,}",
                f"{n_pending_rows:,}")
