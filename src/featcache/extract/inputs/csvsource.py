"""A CSV manifest (``data.source: csv``) read in bounded memory: the millions-of-URLs case.

:func:`read_csv` parses the CSV once and keeps, per row, only compact arrays (a label code, a split code, a
target, a 64-bit hash of the id and of the path, the split's rank key: about 40 bytes a row); the rows'
strings go to sorted spool files of :data:`SPOOL_ROWS` rows on disk. Repeated ids or paths are found by
sorting the hashes: only when a hash repeats is the CSV read a second time, to compare the strings of the
rows that share it and name the lines of the real duplicates (a hash collision is no error). The manifest is
then written by merging the spool files in id order (:meth:`CsvRows.write`), or built in memory
(:meth:`CsvRows.to_manifest`, what :func:`~featcache.extract.inputs.sources.from_csv` returns).

Row numbers in messages are the CSV's records counted from the header (row 1), skipping records without any
field, as :class:`csv.DictReader` counts them.
"""

from __future__ import annotations

import array
import csv
import heapq
import math
import pickle
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

import numpy as np

from featcache.extract.inputs.manifest import (
    COLUMNS,
    Manifest,
    ManifestError,
    csv_row,
    rebase_path,
    split_rank_key,
    splits_from_keys,
    write_sidecars,
)
from featcache.extract.inputs.sources import (
    check_listed_classes,
    check_train_classes,
    check_unique_classes,
    format_rows,
    warn_case_twins,
    windows_path,
)
from featcache.extract.inputs.storage import is_url
from featcache.store.schema import SPLIT_CODES
from featcache.util.atomic import atomic_path

__all__ = ["CSV_COLUMNS", "SPOOL_ROWS", "CsvManifest", "CsvRows", "key_hash", "read_csv"]

#: The columns a CSV manifest may have; others are ignored (and not kept in memory).
CSV_COLUMNS = ("path", "label", "target", "id", "split")

#: Rows per sorted spool file (the rows' strings held in memory at once).
SPOOL_ROWS = 100_000


#: The 64-bit hash that finds repeated ids and paths (rows with equal hashes are then compared as strings).
key_hash: Callable[[str], int] = hash

#: Rows per pickled block of a spool file (what the merge holds of each spool file at once).
_BLOCK_ROWS = 1024


@dataclass
class CsvManifest:
    """What :meth:`CsvRows.write` wrote (the rows' strings stay on disk); arrays in manifest (id) order.

    Attributes
    ----------
    path : Path
        ``manifest.csv``.
    task : str
        ``classification`` or ``regression``.
    classes : list of str
        Class names in label order (empty for regression).
    splits : numpy.ndarray
        (N,) uint8 split codes.
    labels : numpy.ndarray or None
        (N,) int64 class indices (classification).
    targets : numpy.ndarray or None
        (N,) float64 targets (regression).
    """

    path: Path
    task: str
    classes: list[str]
    splits: np.ndarray
    labels: np.ndarray | None = None
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.splits)

    def split_counts(self) -> dict[str, int]:
        """Rows per split."""
        return {name: int((self.splits == code).sum()) for name, code in SPLIT_CODES.items()}


def _locate(raw_path: str | None, raw_id: str | None, root: Path, base: str) -> tuple[str, str, str, bool]:
    """A row's id (``raw_id``, else its path as written; None: no id column), its path (as it names the file
    here), the key its path is compared by for duplicates, and whether it is a URL."""
    written = (raw_path or "").strip()
    path = windows_path(written, root) if "\\" in written else written
    url = is_url(path)
    return (raw_id or "").strip() or written, path, path if url else posixpath.normpath(posixpath.join(base, path)), url


def _padded(records: Iterator[list[str]], width: int) -> Iterator[list[str | None]]:
    """Records with at least ``width`` fields: a short row's missing fields None (as csv.DictReader gives)."""
    pad: list[str | None] = [None] * width
    for record in records:
        yield record if len(record) >= width else record + pad[len(record):]


def _records(path: Path) -> Iterator[list[str]]:
    """The CSV's header (stripped), then its records with at least one field; decoding errors as ManifestError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            yield [c.strip() for c in next(reader, [])]
            for record in reader:
                if record:
                    yield record
    except UnicodeDecodeError as error:
        raise ManifestError(f"CSV {path} is not UTF-8 text ({error}). Hint: save it as UTF-8.") from None
    except csv.Error as error:
        raise ManifestError(f"CSV {path} cannot be parsed: {error}.") from None


def _repeated(hashes: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose hash another row shares."""
    order = np.argsort(hashes, kind="stable")
    ranked = hashes[order]
    same = ranked[1:] == ranked[:-1]
    mask = np.zeros(len(hashes), dtype=bool)
    mask[order[1:][same]] = True
    mask[order[:-1][same]] = True
    return mask


def _duplicate_error(path: Path, what: str, groups: Mapping[str, list[int]], shown: Mapping[int, str]) -> None:
    """Raise for the groups of rows (CSV row numbers) that share a value, naming the first five by first row."""
    items = sorted((rows for rows in groups.values() if len(rows) > 1), key=lambda rows: rows[0])
    if not items:
        return
    listed = "; ".join(f"{shown[rows[0]]!r} on {format_rows(rows)}" for rows in items[:5])
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    raise ManifestError(
        f"Duplicate {what} in {path}: {listed}{more} (row 1 is the header). "
        "Each image must appear once; remove the repeated rows."
    )


class CsvRows:
    """A checked CSV manifest: per-row arrays in CSV order, the strings in sorted spool files (see the module).

    Use it as a context manager (the spool files are deleted on leaving); built by :func:`read_csv`.
    """

    def __init__(self, path: Path, task: str, classes: list[str], splits: np.ndarray, labels: np.ndarray | None,
                 targets: np.ndarray | None, spool: list[Path], tail: list[tuple[str, str, int]],
                 folder: tempfile.TemporaryDirectory | None) -> None:
        self.path, self.root, self.task, self.classes = path, path.parent, task, classes
        self.splits, self.labels, self.targets = splits, labels, targets
        self._spool, self._tail, self._folder = spool, tail, folder

    def __enter__(self) -> "CsvRows":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the spool files."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __len__(self) -> int:
        return len(self.splits)

    def split_counts(self) -> dict[str, int]:
        """Rows per split."""
        return {name: int((self.splits == code).sum()) for name, code in SPLIT_CODES.items()}

    def sorted_rows(self) -> Iterator[tuple[str, str, int]]:
        """``(id, path, row)`` in id order; ``row`` indexes the arrays (the CSV's order)."""
        handles = [open(file, "rb") for file in self._spool]
        try:
            runs = [_blocks(handle) for handle in handles]
            yield from heapq.merge(*runs, iter(self._tail)) if runs else iter(self._tail)
        finally:
            for handle in handles:
                handle.close()

    def _in_order(self, order: np.ndarray) -> dict[str, np.ndarray | None]:
        return {"splits": self.splits[order],
                "labels": None if self.labels is None else self.labels[order],
                "targets": None if self.targets is None else self.targets[order]}

    def to_manifest(self) -> Manifest:
        """The rows as an in-memory :class:`~featcache.extract.inputs.manifest.Manifest` (paths as written)."""
        ids, paths, order = [], [], array.array("q")
        for row_id, path, row in self.sorted_rows():
            ids.append(row_id)
            paths.append(path)
            order.append(row)
        return Manifest(ids, paths, task=self.task, classes=self.classes, root=self.root,
                        **self._in_order(np.frombuffer(order, dtype=np.int64)))

    def write(self, out: str | Path) -> CsvManifest:
        """Write ``out`` (``manifest.csv``, atomically, paths relative to its folder) and its sidecars, as
        :meth:`Manifest.write <featcache.extract.inputs.manifest.Manifest.write>` writes the same rows."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_sidecars(out, self.task, self.classes)
        folder = out.parent.resolve()
        order = array.array("q")
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(COLUMNS)
            classes, splits, labels, targets = self.classes, self.splits, self.labels, self.targets
            for row_id, path, row in self.sorted_rows():
                order.append(row)
                writer.writerow(csv_row(row_id, rebase_path(path, self.root, folder), int(splits[row]),
                                        "" if labels is None else classes[labels[row]],
                                        None if targets is None else float(targets[row])))
        return CsvManifest(out, self.task, self.classes, **self._in_order(np.frombuffer(order, dtype=np.int64)))


def read_csv(path: str | Path, ratios: Mapping[str, float], seed: int, task: str = "classification",
             classes: Sequence[str] | None = None, spool_dir: str | Path | None = None) -> CsvRows:
    """Read and check a user CSV (see :func:`~featcache.extract.inputs.sources.from_csv` for its columns and
    rules), keeping compact per-row arrays and spooling the strings under ``spool_dir`` (default: the temp dir).

    Returns
    -------
    CsvRows
        The checked rows with their labels and splits; use it in a ``with`` block.

    Raises
    ------
    ManifestError
        As :func:`~featcache.extract.inputs.sources.from_csv`, with the same messages and row numbers.
    """
    path = Path(path)
    classes = check_unique_classes(classes)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.csv")) if path.parent.is_dir() else None
        where = (f"{path.parent} does not exist" if found is None else
                 f"CSV files in {path.parent}: {found}" if found else f"{path.parent} has no .csv file")
        raise ManifestError(f"CSV manifest {str(path)!r} does not exist ({where}). Hint: set data.path to the "
                            "CSV's folder and data.csv to its file name there, in params.yaml.")
    folder = tempfile.TemporaryDirectory(prefix="featcache-csv-", dir=spool_dir)
    try:
        return _read(path, ratios, seed, task, classes, Path(folder.name), folder)
    except BaseException:
        folder.cleanup()
        raise


def _read(path: Path, ratios: Mapping[str, float], seed: int, task: str, classes: list[str] | None,
          spool_dir: Path, folder: tempfile.TemporaryDirectory) -> CsvRows:
    records = _records(path)
    columns = next(records)
    kept = {name: index for index, name in enumerate(columns) if name in CSV_COLUMNS}
    column = "label" if task == "classification" else "target"
    missing = next((needed for needed in ("path", column) if needed not in columns), None)
    if missing is not None:
        for _ in records:  # a decoding error anywhere comes first, as when the whole CSV was read at once
            pass
        other = {"label": ("target", "regression"), "target": ("label", "classification")}.get(missing)
        switch = (f" It has '{other[0]}': for that set data.task: {other[1]}." if other and other[0] in columns
                  else "")
        sep = next((name for sep, name in ((";", "semicolon"), ("\t", "tab")) if len(columns) == 1
                    and sep in columns[0]), None)
        switch += f" Its header looks {sep}-separated: save it comma-separated." if sep else ""
        raise ManifestError(f"CSV {path} has columns {columns}; a {task} manifest needs '{missing}' "
                            f"(allowed columns: path, {column}, id, split). Hint: name the column '{missing}' in "
                            f"the header row.{switch}")
    at_path, at_id, at_split, at_value = kept["path"], kept.get("id"), kept.get("split"), kept[column]
    root = path.parent
    base = root.absolute().as_posix()
    id_hashes, path_hashes, rank_keys = array.array("q"), array.array("q"), array.array("Q")
    label_codes, split_codes, targets = array.array("i"), array.array("b"), array.array("d")
    codes: dict[str, int] = {}
    blank_paths: list[int] = []
    blank_labels: list[int] = []
    bad_splits: dict[str, list[int]] = {}
    escape = bad_target = None
    hash_of, chunk, spool, n, classify = key_hash, [], [], 0, task == "classification"
    for n, record in enumerate(_padded(records, max(kept.values()) + 1), start=2):
        row_id, row_path, key, url = _locate(record[at_path], None if at_id is None else record[at_id], root, base)
        if not row_path:
            blank_paths.append(n)
        elif escape is None and not url and ".." in row_path and not PurePosixPath(row_path).is_absolute() \
                and ".." in PurePosixPath(row_path).parts:
            escape = (row_path, n)
        id_hashes.append(hash_of(row_id))
        path_hashes.append(hash_of(key))
        split = (record[at_split] or "").strip() if at_split is not None else ""
        code = SPLIT_CODES.get(split, -2 if split else -1)
        split_codes.append(code)
        if code < 0:
            if split:
                bad_splits.setdefault(split, []).append(n)
            rank_keys.append(split_rank_key(row_id, seed))
        raw_value = record[at_value]
        value = (raw_value or "").strip()
        if classify:
            if not value:
                blank_labels.append(n)
            label_codes.append(codes.setdefault(value, len(codes)))
        else:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if bad_target is None and not math.isfinite(number):
                bad_target = (raw_value, value, number, n)
            targets.append(number)
        chunk.append((row_id, row_path, n - 2))
        if len(chunk) == SPOOL_ROWS:
            spool.append(_spool(chunk, spool_dir / f"{len(spool):06d}.pickle"))
            chunk = []
    n_rows = n - 1 if n else 0
    chunk.sort()
    if not n_rows:
        raise ManifestError(f"CSV {path} has no rows.")
    if blank_paths:
        raise ManifestError(f"Empty 'path' in {path} on {format_rows(blank_paths)}.")
    if escape is not None:
        raise ManifestError(f"Path {escape[0]!r} in {path} (row {escape[1]}) leaves the manifest's folder ('..'); "
                            "give it absolute or move the CSV up.")
    keys = np.frombuffer(rank_keys, dtype=np.uint64)
    carried = np.frombuffer(split_codes, dtype=np.int8)
    _check_duplicates(path, np.frombuffer(id_hashes, dtype=np.int64), np.frombuffer(path_hashes, dtype=np.int64),
                      at_path, at_id)
    del id_hashes, path_hashes  # (16 bytes a row, no longer needed)
    splits = None
    if (carried != -1).any():  # some row carries a split: then every row must carry a known one
        if not (carried >= 0).all():
            if (carried == -1).any():
                bad_splits[""] = list(np.flatnonzero(carried == -1) + 2)
            bad = sorted(bad_splits)
            lines = sorted(int(line) for name in bad for line in bad_splits[name])
            raise ManifestError(f"Unknown split values {bad} in {path} ({format_rows(lines)}; row 1 is the "
                                f"header); allowed: {list(SPLIT_CODES)}, in every row. Hint: fix those rows, or "
                                "empty the whole split column to split by data.split.")
        splits = carried.astype(np.uint8)
    if task == "regression":
        if classes is not None:
            raise ManifestError("data.classes is only for classification; remove it for a regression task.")
        if bad_target is not None:
            raw, text, number, line = bad_target
            what = "Empty" if not text else "Non-numeric" if math.isnan(number) and text.lower() != "nan" \
                else "Non-finite"
            raise ManifestError(f"{what} target {raw!r} in {path} on row {line} (row 1 is the header); "
                                "allowed: a finite number such as 3.5 or -1e-3 (a dot as the decimal mark). Hint: "
                                "fix or remove that row; for class names set data.task: classification.")
        if splits is None:
            splits = splits_from_keys(keys, dict(ratios))
        return CsvRows(path, task, [], splits, None, np.frombuffer(targets, dtype=np.float64), spool, chunk, folder)
    if blank_labels:
        raise ManifestError(f"Empty label in {path} on {format_rows(blank_labels)}. "
                            "Hint: label every row or remove unlabeled rows.")
    seen = sorted(codes, key=codes.get)  # type: ignore[arg-type]
    coded = np.frombuffer(label_codes, dtype=np.int32)
    if classes is not None:
        rows_of = {name: [int(line) for line in np.flatnonzero(coded == codes[name]) + 2]
                   for name in seen if name not in classes}
        check_listed_classes(seen, classes, f"CSV {path}", rows_of)
    else:
        warn_case_twins(seen, str(root))
    names = sorted(seen) if classes is None else list(classes)
    labels = np.array([names.index(name) for name in seen], dtype=np.int64)[coded]
    if splits is None:
        splits = _stratified_splits(path, keys, labels, ratios, at_path, at_id)
    check_train_classes(labels, splits, names)
    return CsvRows(path, task, names, splits, labels, None, spool, chunk, folder)


def _spool(chunk: list[tuple[str, str, int]], file: Path) -> Path:
    """Write ``chunk`` sorted to ``file``, in pickled blocks of :data:`_BLOCK_ROWS` rows (our own file, read
    back by :func:`_blocks`; any string, newlines and NULs too, comes back as it was)."""
    chunk.sort()
    with open(file, "wb") as handle:
        for start in range(0, len(chunk), _BLOCK_ROWS):
            pickle.dump(chunk[start:start + _BLOCK_ROWS], handle, protocol=pickle.HIGHEST_PROTOCOL)
    return file


def _blocks(handle: BinaryIO) -> Iterator[tuple[str, str, int]]:
    """The rows of a spool file (:func:`_spool`), one block in memory at a time."""
    while True:
        try:
            block = pickle.load(handle)
        except EOFError:
            return
        yield from block


def _candidates(path: Path, mask: np.ndarray, at_path: int, at_id: int | None) -> Iterator[tuple[int, str, str,
                                                                                                 str]]:
    """``(row, id, path, path key)`` of the rows in ``mask`` (CSV order), from a second reading of the CSV."""
    records = _records(path)
    next(records)
    root = path.parent
    base = root.absolute().as_posix()
    for row, record in enumerate(_padded(records, max(at_path, -1 if at_id is None else at_id) + 1)):
        if mask[row]:
            yield (row, *_locate(record[at_path], None if at_id is None else record[at_id], root, base)[:3])


def _check_duplicates(path: Path, id_hashes: np.ndarray, path_hashes: np.ndarray, at_path: int,
                      at_id: int | None) -> None:
    """Repeated ids, then repeated paths, named by their rows; the strings are read again only for the rows
    whose hash repeats."""
    ids, paths = _repeated(id_hashes), _repeated(path_hashes)
    if not (ids.any() or paths.any()):
        return
    by_id: dict[str, list[int]] = {}
    by_path: dict[str, list[int]] = {}
    shown_id: dict[int, str] = {}
    shown_path: dict[int, str] = {}
    for row, row_id, row_path, key in _candidates(path, ids | paths, at_path, at_id):
        if ids[row]:
            by_id.setdefault(row_id, []).append(row + 2)
            shown_id[row + 2] = row_id
        if paths[row]:
            by_path.setdefault(key, []).append(row + 2)
            shown_path[row + 2] = row_path
    _duplicate_error(path, "ids", by_id, shown_id)
    _duplicate_error(path, "paths", by_path, shown_path)


def _stratified_splits(path: Path, keys: np.ndarray, labels: np.ndarray, ratios: Mapping[str, float],
                       at_path: int, at_id: int | None) -> np.ndarray:
    """:func:`~featcache.extract.inputs.manifest.assign_splits` of the rows in id order, from CSV order.

    Rows rank by their key; rows with equal keys (``a.png`` and ``a.jpg``, or a 64-bit collision) rank in id
    order, so their ids are read again (the only strings needed) and those rows put in id order first.
    """
    order = np.argsort(keys, kind="stable")
    tied = _repeated(keys)
    if tied.any():
        ids = {row: row_id for row, row_id, _, _ in _candidates(path, tied, at_path, at_id)}
        ranked = keys[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(order)]):
            if stop - start > 1:
                order[start:stop] = sorted(order[start:stop], key=lambda row: ids[int(row)])
    splits = np.empty(len(keys), dtype=np.uint8)
    splits[order] = splits_from_keys(keys[order], dict(ratios), strata=labels[order])
    return splits
