"""The manifest: which images, with which ids, labels or targets, in which split.

``prepare`` writes it as ``manifest.csv`` (columns ``id,path,split,label,target``;
paths relative to the manifest's folder) and every later stage reads it. Ids
are stable and sorted; the split is deterministic given the ratios and seed.

The class list of a classification manifest (its order defines the label
indices, e.g. from ``data.classes``) is written beside it as
``manifest.classes.json`` and read back by :meth:`Manifest.read`.

A manifest of WebDataset shards (``data.source: webdataset``) has three more
columns, ``member,offset,size``: the row's image is the tar member ``member``,
``size`` bytes at byte ``offset`` of the shard ``path``. Its shard list (path,
sha256, size, samples) is written beside it as ``manifest.shards.json`` and is
part of :meth:`Manifest.sha256`. A ``path`` may be a URL (``https://...``,
``s3://...``): it is kept as written, never rebased.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from featcache.errors import UserError
from featcache.extract.inputs.storage import StorageOptions, is_url
from featcache.store.schema import SPLIT_CODES, SPLITS, TASKS
from featcache.util.atomic import write_text

__all__ = ["COLUMNS", "MEMBER_COLUMNS", "Manifest", "ManifestError", "Members", "assign_splits", "classes_path",
           "csv_row", "rebase_path", "shards_path", "split_rank_key", "splits_from_keys", "TASKS",
           "write_sidecars"]

#: Columns of every manifest; a manifest of shards adds :data:`MEMBER_COLUMNS`.
COLUMNS = ("id", "path", "split", "label", "target")

#: Where a shard row's image lies inside the tar ``path``: member name, byte offset, byte size.
MEMBER_COLUMNS = ("member", "offset", "size")


class ManifestError(UserError, ValueError):
    """The inputs cannot form a valid manifest (bad labels, paths, splits)."""


def classes_path(manifest_path: str | Path) -> Path:
    """The class-list file written beside a manifest: ``manifest.csv`` -> ``manifest.classes.json``."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.stem + ".classes.json")


def shards_path(manifest_path: str | Path) -> Path:
    """The shard-list file written beside a manifest of shards: ``manifest.csv`` -> ``manifest.shards.json``."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.stem + ".shards.json")


def rebase_path(path: str, root: Path, folder: Path) -> str:
    """A manifest row's ``path`` (relative to ``root``, or absolute) as written into a manifest in the resolved
    ``folder``: relative to it, symlinks resolved; a URL is kept as written."""
    return path if is_url(path) else Path(os.path.relpath((root / path).resolve(), folder)).as_posix()


def write_sidecars(manifest_path: Path, task: str, classes: Sequence[str], shards: list[dict] | None = None) -> None:
    """Write (or remove) the files beside ``manifest_path``: the shard list (:func:`shards_path`) and a
    classification manifest's class list (:func:`classes_path`); written before the manifest itself, so a
    reader never sees a new manifest with an old class list."""
    if shards is not None:
        write_text(shards_path(manifest_path), json.dumps({"shards": shards}, indent=1, ensure_ascii=False) + "\n")
    else:
        shards_path(manifest_path).unlink(missing_ok=True)
    if task == "classification":
        write_text(classes_path(manifest_path),
                   json.dumps({"classes": list(classes)}, indent=2, ensure_ascii=False) + "\n")
    else:
        classes_path(manifest_path).unlink(missing_ok=True)


def csv_row(sample_id: str, path: str, split: int, label: str = "", target: float | None = None,
            member: tuple[str, int, int] | None = None) -> list[str]:
    """One manifest CSV row (:data:`COLUMNS`, then :data:`MEMBER_COLUMNS` when ``member`` is given)."""
    row = [sample_id, path, SPLITS[split], label, "" if target is None else repr(float(target))]
    if member is not None:
        row += [member[0], str(int(member[1])), str(int(member[2]))]
    return row


@dataclass
class Members:
    """Where each row's image lies inside its shard (``path``).

    Attributes
    ----------
    names : list of str
        (N,) tar member names (``""``: the sample has no image member).
    offsets, sizes : numpy.ndarray
        (N,) int64 byte offset of the member's data in the shard, and its size.
    """

    names: list[str]
    offsets: np.ndarray
    sizes: np.ndarray


@dataclass
class Manifest:
    """Images and their annotations, sorted by id.

    Attributes
    ----------
    ids : list of str
        (N,) stable, unique, sorted ids.
    paths : list of str
        (N,) image paths, relative to ``root`` (or absolute).
    splits : numpy.ndarray
        (N,) uint8 split codes (train=0, val=1, test=2).
    task : str
        ``classification`` or ``regression``.
    labels : numpy.ndarray or None
        (N,) int64 class index into ``classes`` (classification).
    targets : numpy.ndarray or None
        (N,) float64 targets (regression).
    classes : list of str
        Class names in index order (empty for regression).
    root : Path
        Folder the relative paths start from.
    members : Members or None
        Where each row's image lies inside its shard (a manifest of WebDataset shards); None otherwise.
    shards : list of dict or None
        The shard list (path, sha256, size, samples) of a manifest of shards, written beside it as
        ``manifest.shards.json`` and part of :meth:`sha256`; None otherwise.
    storage : StorageOptions
        How URLs among ``paths`` are read (``data.io``: timeout, tries, backoff, fsspec options).
    """

    ids: list[str]
    paths: list[str]
    splits: np.ndarray
    task: str = "classification"
    labels: np.ndarray | None = None
    targets: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    root: Path = Path(".")
    members: Members | None = None
    shards: list[dict] | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.members is not None and not (len(self.members.names) == len(self.members.offsets)
                                             == len(self.members.sizes) == n):
            raise ManifestError("members (name, offset, size) must have one entry per row.")
        if self.task not in TASKS:
            raise ManifestError(f"task {self.task!r} is not one of {TASKS}.")
        if len(set(self.ids)) != n:
            seen: set[str] = set()
            dupes = sorted({i for i in self.ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
            raise ManifestError(f"Duplicate ids in the manifest: {dupes[:5]}. Ids must be unique; "
                                "remove the repeated rows.")
        unsorted = next((row for row in range(1, n) if self.ids[row] < self.ids[row - 1]), None)
        if unsorted is not None:
            raise ManifestError(f"Manifest ids must be sorted (a stable row order): id {self.ids[unsorted]!r} (row "
                                f"{unsorted}) comes after {self.ids[unsorted - 1]!r}. Hint: sort manifest.csv by its "
                                "id column (`featcache prepare` writes it sorted), or Manifest.sorted() in Python.")
        if len(self.paths) != n or len(self.splits) != n:
            raise ManifestError("ids, paths and splits must have the same length.")
        if self.task == "classification" and (self.labels is None or len(self.labels) != n):
            raise ManifestError("A classification manifest needs one label per row.")
        if self.task == "regression" and (self.targets is None or len(self.targets) != n):
            raise ManifestError("A regression manifest needs one target per row.")
        if self.task == "classification" and n and self.classes:
            labels = np.asarray(self.labels)
            if labels.min() < 0 or labels.max() >= len(self.classes):
                raise ManifestError(f"Labels must index the {len(self.classes)} classes {self.classes}; "
                                    f"got values from {int(labels.min())} to {int(labels.max())}.")

    def __len__(self) -> int:
        return len(self.ids)

    def absolute_path(self, row: int) -> Path:
        """Path of row ``row`` on disk (a local path; see :meth:`location` for URLs)."""
        return (self.root / self.paths[row]).resolve()

    def location(self, row: int) -> str:
        """Where row ``row``'s file is: its URL as written, or its absolute local path."""
        path = self.paths[row]
        return path if is_url(path) else str(self.absolute_path(row))

    def describe(self, row: int) -> str:
        """Row ``row``'s source for messages: :meth:`location` (a URL, or the absolute path: the stored path is
        relative to the manifest's folder, not to where the user runs), with ``:member`` for a shard row
        that has an image member."""
        where = self.location(row)
        member = self.members.names[row] if self.members is not None else ""
        return f"{where}:{member}" if member else where

    @classmethod
    def sorted(cls, ids: Sequence[str], paths: Sequence[str], splits: np.ndarray, **kwargs: Any) -> "Manifest":
        """Build a manifest from rows in any order, sorting them by id.

        Parameters
        ----------
        ids, paths : sequence of str
            (N,) row ids and image paths, in any (the same) order.
        splits : array-like
            (N,) split codes of those rows.
        **kwargs
            The other :class:`Manifest` fields (``task``, ``labels``,
            ``targets``, ``classes``, ``root``, ...); ``labels`` and
            ``targets`` are (N,) per row and are reordered with the rows.

        Returns
        -------
        Manifest
            The rows sorted by id.
        """
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        take = np.asarray(order, dtype=np.int64)
        for key in ("labels", "targets"):
            if kwargs.get(key) is not None:
                kwargs[key] = np.asarray(kwargs[key])[take]
        return cls(ids=[ids[i] for i in order], paths=[paths[i] for i in order],
                   splits=np.asarray(splits, dtype=np.uint8)[take], **kwargs)

    # ---------------------------------------------------------------- CSV I/O
    def to_csv_text(self) -> str:
        """The manifest as CSV text (``id,path,split,label,target``)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        members = self.members
        writer.writerow(COLUMNS + (MEMBER_COLUMNS if members is not None else ()))
        for row, sample_id in enumerate(self.ids):
            label = self.classes[self.labels[row]] if self.labels is not None else ""
            target = float(self.targets[row]) if self.targets is not None else None
            member = None if members is None else (members.names[row], members.offsets[row], members.sizes[row])
            writer.writerow(csv_row(sample_id, self.paths[row], int(self.splits[row]), label, target, member))
        return buffer.getvalue()

    def write(self, path: str | Path) -> Path:
        """Write ``manifest.csv`` atomically; paths are stored relative to its folder.

        A classification manifest's class list (in label order) goes to
        :func:`classes_path` beside it, written first, so a reader never
        sees a new manifest with an old class list.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.parent.resolve()
        rebased = [rebase_path(p, self.root, folder) for p in self.paths]
        copy = Manifest(self.ids, rebased, self.splits, self.task, self.labels, self.targets, self.classes,
                        path.parent, self.members)
        write_sidecars(path, self.task, self.classes, self.shards)
        write_text(path, copy.to_csv_text())
        return path

    @classmethod
    def read(cls, path: str | Path, classes: Sequence[str] | None = None,
             storage: StorageOptions | None = None) -> "Manifest":
        """Read a manifest written by :meth:`write` (or by :func:`~featcache.extract.inputs.sharded.from_shards`).

        Parameters
        ----------
        path : path
            The manifest CSV; relative image paths in it start at its folder.
        classes : sequence of str, optional
            Class list (label order). Default: the list written beside the
            manifest (:func:`classes_path`), else the sorted labels.
        storage : StorageOptions, optional
            How the rows' URLs are read (timeouts, tries, fsspec options).
        """
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"Manifest {str(path)!r} does not exist. Hint: run `featcache prepare` first.")
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = sorted({"id", "path", "split", "label", "target"} - set(reader.fieldnames or []))
            rows = list(reader)
        if missing:
            raise ManifestError(f"Manifest {path} lacks the columns {missing}; it is not a featcache manifest. "
                                "Hint: rerun `featcache prepare`.")
        if not rows:
            raise ManifestError(f"Manifest {path} has no rows.")
        task = "regression" if rows[0].get("target") else "classification"
        bad = sorted({r["split"] for r in rows} - set(SPLIT_CODES))
        if bad:
            raise ManifestError(f"Unknown split values {bad} in {path}; allowed: {list(SPLIT_CODES)}.")
        splits = np.array([SPLIT_CODES[r["split"]] for r in rows], dtype=np.uint8)
        ids = [r["id"] for r in rows]
        paths = [r["path"] for r in rows]
        extra: dict = {"storage": storage or StorageOptions()}
        if "member" in rows[0]:
            extra["members"] = Members([r["member"] for r in rows], np.array([int(r["offset"]) for r in rows],
                                       dtype=np.int64), np.array([int(r["size"]) for r in rows], dtype=np.int64))
            if shards_path(path).is_file():
                extra["shards"] = json.loads(shards_path(path).read_text(encoding="utf-8"))["shards"]
        if task == "classification":
            if classes is None and classes_path(path).is_file():
                classes = json.loads(classes_path(path).read_text(encoding="utf-8"))["classes"]
            names = list(classes) if classes is not None else sorted({r["label"] for r in rows})
            index = {name: i for i, name in enumerate(names)}
            unknown = sorted({r["label"] for r in rows} - set(index))
            if unknown:
                raise ManifestError(f"Labels {unknown} in {path} are not in its class list {names}. "
                                    "Hint: rerun `featcache prepare`.")
            labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
            return cls(ids, paths, splits, task, labels=labels, classes=names, root=path.parent, **extra)
        targets = np.array([float(r["target"]) for r in rows], dtype=np.float64)
        return cls(ids, paths, splits, task, targets=targets, root=path.parent, **extra)

    def sha256(self) -> str:
        """Content hash of the manifest (ids, paths, splits, labels, targets).

        The class order is part of it when it is not the sorted label names
        (an explicit ``data.classes`` order changes the label indices), and
        so is the shard list with each shard's sha256 for a manifest of shards.
        """
        text = self.to_csv_text()
        if self.shards is not None:
            text += "shards:" + json.dumps([[s["path"], s["sha256"]] for s in self.shards], ensure_ascii=False)
        if self.task == "classification" and self.labels is not None \
                and list(self.classes) != sorted({self.classes[k] for k in np.unique(self.labels)}):
            text += "classes:" + json.dumps(list(self.classes), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def split_counts(self) -> dict[str, int]:
        """Rows per split."""
        return {name: int((self.splits == code).sum()) for name, code in SPLIT_CODES.items()}


def split_rank_key(row_id: str, seed: int) -> int:
    """The 64-bit rank key of one row in :func:`assign_splits`: a hash of ``seed`` and the row id.

    The id's last extension is left out, so an image keeps its place when re-encoded (``a.png`` ->
    ``a.jpg``) and a WebDataset sample keyed by its file's path without extension ranks as that file does.
    """
    stem = posixpath.splitext(row_id)[0] or row_id
    digest = hashlib.blake2b(f"{seed}\x00{stem}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_splits(ids: Sequence[str], ratios: dict[str, float], seed: int,
                  strata: np.ndarray | None = None) -> np.ndarray:
    """Deterministic (stratified) train/val/test assignment that stays put when images come and go.

    Within each group (class), rows are ranked by a seeded hash of their id (:func:`split_rank_key`), and
    the first ranks go to test, the next to val, the rest to train, in counts as close to the ratios as
    possible (largest remainders). An image's rank depends only on its own id and the seed, so adding or
    removing images moves only the rows at the split boundaries of the classes that changed (at most
    one row per boundary for each image added or removed); every other image keeps its split, and the
    test set of a grown dataset is the old test set plus new images, not a reshuffle.

    Parameters
    ----------
    ids : sequence of str
        (N,) row ids (their order does not matter).
    ratios : dict
        ``{"train": a, "val": b, "test": c}``: fractions >= 0 summing to 1 (``val`` may be 0 or left out).
    seed : int
        Seed of the ranking.
    strata : numpy.ndarray, optional
        (N,) group per row (class labels); each group is split with the same
        ratios so every split keeps the class balance.

    Returns
    -------
    numpy.ndarray
        (N,) uint8 split codes.

    Raises
    ------
    ManifestError
        For ratios with an unknown split name, a negative or non-finite value, or a sum other than 1,
        and for ``strata`` of another length than ``ids``.
    """
    keys = np.fromiter((split_rank_key(row_id, seed) for row_id in ids), dtype=np.uint64, count=len(ids))
    return splits_from_keys(keys, ratios, strata)


def _split_fractions(ratios: Mapping[str, float]) -> np.ndarray:
    """The (train, val, test) fractions of ``ratios`` (a missing split is 0), checked: >= 0, summing to 1."""
    unknown = sorted(str(name) for name in set(ratios) - set(SPLITS))
    try:
        fractions = np.array([ratios.get(name, 0.0) for name in SPLITS], dtype=np.float64)
    except (TypeError, ValueError):
        fractions = np.full(len(SPLITS), np.nan)
    if unknown or not np.all(np.isfinite(fractions)) or np.any(fractions < 0) or abs(fractions.sum() - 1.0) > 1e-6:
        raise ManifestError(
            f"split ratios {dict(ratios)!r} are invalid"
            + (f" (unknown splits {unknown})" if unknown else "")
            + f"; allowed: fractions >= 0 of {list(SPLITS)} that sum to 1 (a missing split is 0), "
            "e.g. {'train': 0.6, 'val': 0.2, 'test': 0.2}."
        )
    return fractions


def splits_from_keys(keys: np.ndarray, ratios: dict[str, float], strata: np.ndarray | None = None) -> np.ndarray:
    """:func:`assign_splits` from the rows' :func:`split_rank_key` values (what a streamed manifest keeps).

    Parameters
    ----------
    keys : numpy.ndarray
        (N,) uint64 rank keys; equal keys (a 64-bit hash collision) rank by row.
    ratios, strata
        As in :func:`assign_splits`.

    Returns
    -------
    numpy.ndarray
        (N,) uint8 split codes.
    """
    n = len(keys)
    fractions = _split_fractions(ratios)
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != (n,):
            raise ManifestError(f"strata has shape {strata.shape}; it must be ({n},) like the ids: one group per row.")
    splits = np.empty(n, dtype=np.uint8)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == g) for g in np.unique(strata)]
    order = [SPLIT_CODES[name] for name in ("test", "val", "train")]  # the lowest ranks are held out
    for members in groups:
        members = members[np.argsort(keys[members], kind="stable")]
        # Largest-remainder rounding keeps every group's counts as close to the ratios as possible.
        exact = fractions * len(members)
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: len(members) - counts.sum()]:
            counts[i] += 1
        bounds = np.cumsum(counts[order])[:-1]
        for code, chunk in zip(order, np.split(members, bounds)):
            splits[chunk] = code
    return splits
