"""The manifest of a set of WebDataset shards, written as the shards are read, in bounded memory.

:func:`from_shards` reads each shard's member list once (:func:`~featcache.extract.inputs.shards.scan_shard`:
tar headers, the small label members, no image decoded) and streams its rows to
a spool file on disk; per row it keeps only a class code and a split code in
memory (5 bytes), so a million samples need no Python object per row. Then the
split is assigned exactly as for a folder (:func:`~featcache.extract.inputs.manifest.assign_splits`,
stratified by class, from ``data.split`` and ``data.seed``), unless the samples
carry one, and the spool is rewritten as ``manifest.csv`` with its
``member,offset,size`` columns, plus ``manifest.classes.json`` and
``manifest.shards.json`` (every shard's path, sha256, size and sample count).

Row ids are ``<shard>/<__key__>`` (``000007/sample0042``), sorted: shards in
name order, keys sorted within a shard. A sample without an image member stays a
row (``member`` empty), reported as a bad image by extract, never dropped. The one
exception is a sample that a truncated shard cut before its label (no label, no
row): it is named in a warning and under ``left_out`` in ``manifest.shards.json``.
"""

from __future__ import annotations

import array
import csv
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from featcache.extract.inputs.manifest import (
    COLUMNS,
    MEMBER_COLUMNS,
    ManifestError,
    classes_path,
    csv_row,
    shards_path,
    split_rank_key,
    splits_from_keys,
)
from featcache.extract.inputs.shards import DEFAULT_IMAGE_KEYS, expand_shards, scan_shard, shard_name
from featcache.extract.inputs.sources import (
    check_listed_classes,
    check_train_classes,
    check_unique_classes,
    warn_case_twins,
)
from featcache.extract.inputs.storage import StorageOptions, is_url
from featcache.store.schema import SPLIT_CODES
from featcache.util.atomic import atomic_path, write_text

__all__ = ["PROGRESS_SECONDS", "ShardedManifest", "from_shards"]

logger = logging.getLogger(__name__)

#: Seconds between two progress lines of a long prepare (the first and last shard, and a shard that ended
#: early, are always logged): a line per shard made 10,000 lines for 10,000 shards.
PROGRESS_SECONDS = 5.0


@dataclass
class ShardedManifest:
    """What :func:`from_shards` wrote (the rows themselves stay on disk).

    Attributes
    ----------
    path : Path
        ``manifest.csv``.
    n_rows : int
        Samples (rows).
    task : str
        ``classification`` or ``regression``.
    classes : list of str
        Class names in label order (empty for regression).
    split_counts : dict of str to int
        Rows per split.
    per_class : dict
        Class name -> split -> rows (classification).
    shards : list of dict
        Per shard: ``path``, ``sha256``, ``size``, ``n_samples``, ``problem`` (``""`` unless it ended early)
        and ``left_out``: the ids of samples that are no rows (the one an early end cut before its label).
    n_without_image : int
        Samples without an image member (rows that extract reports as bad).
    """

    path: Path
    n_rows: int
    task: str
    classes: list[str]
    split_counts: dict[str, int]
    per_class: dict[str, dict[str, int]]
    shards: list[dict]
    n_without_image: int


def _relative(shard: str, out_dir: Path) -> str:
    """A local shard's path relative to the manifest's folder (as a manifest stores paths); URLs unchanged."""
    if is_url(shard):
        return shard
    return Path(os.path.relpath(Path(shard).resolve(), out_dir.resolve())).as_posix()


def _bad(what: str, ids: Sequence[str], count: int, hint: str) -> ManifestError:
    shown = ", ".join(repr(i) for i in ids[:5]) + (f" and {count - 5} more" if count > 5 else "")
    return ManifestError(f"{what}: {shown}. {hint}")


def from_shards(path: str | Sequence[str], out: str | Path, ratios: Mapping[str, float], seed: int,
                task: str = "classification", classes: Sequence[str] | None = None,
                image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS, label_key: str = "cls",
                split_key: str | None = "split", options: StorageOptions | None = None) -> ShardedManifest:
    """Read the shards of ``path`` and write the manifest ``out`` (and its sidecars), streaming.

    Parameters
    ----------
    path : str or sequence of str
        ``data.path``: a folder of ``.tar`` shards, a brace pattern, a shard, a URL, or a list
        (:func:`~featcache.extract.inputs.shards.expand_shards`).
    out : path
        The ``manifest.csv`` to write (atomically).
    ratios, seed
        ``data.split`` and ``data.seed``: the split of samples that carry none.
    task : {"classification", "regression"}
        The label member is a class name, or a number (the target).
    classes : sequence of str, optional
        ``data.classes``: the class list and its order.
    image_keys, label_key, split_key
        ``data.image_keys``, ``data.label_key``, ``data.split_key``.
    options : StorageOptions, optional
        How remote shards are read.

    Raises
    ------
    ManifestError
        Naming the samples without a label, with a non-numeric target or an
        unknown split, labels outside ``data.classes``, or a class without
        training examples. Nothing is written then.
    OSError
        A shard cannot be read at all.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = check_unique_classes(classes)
    try:
        shards = expand_shards(path)
    except ValueError as error:
        raise ManifestError(str(error)) from None
    codes: dict[str, int] = {}
    label_codes, carried, rank_keys = array.array("i"), array.array("b"), array.array("Q")
    n_rows = n_without_image = 0
    shard_records: list[dict] = []
    last_id = ""
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="", dir=out.parent) as spool:
        writer = csv.writer(spool, lineterminator="\n")
        started = logged = time.monotonic()
        for index, shard in enumerate(shards):
            scan = scan_shard(shard, image_keys, label_key, split_key, options)
            name, location = shard_name(shard), _relative(shard, out.parent)
            unlabeled, bad_targets, bad_splits, cut = [], [], [], []
            for sample in scan.samples:
                sample_id = f"{name}/{sample.key}"
                if sample.key == scan.cut and not (sample.label or "").strip():
                    cut.append(sample_id)  # its label was after the shard's early end: it cannot be a row
                    continue
                if sample_id <= last_id:
                    raise ManifestError(f"Sample id {sample_id!r} does not sort after {last_id!r}: shard names "
                                        "overlap (one is a folder prefix of another). Hint: rename the shards.")
                last_id = sample_id
                value = (sample.label or "").strip()
                if not value:
                    unlabeled.append(sample_id)
                elif task == "regression":
                    try:
                        if not math.isfinite(float(value)):
                            raise ValueError(value)
                    except ValueError:
                        bad_targets.append(f"{sample_id} ({value!r})")
                split = (sample.split or "").strip()
                if split and split not in SPLIT_CODES:
                    bad_splits.append(f"{sample_id} ({split!r})")
                if task == "classification":
                    label_codes.append(codes.setdefault(value, len(codes)))
                carried.append(SPLIT_CODES[split] if split in SPLIT_CODES else -1)
                rank_keys.append(split_rank_key(sample_id, seed))
                n_without_image += not sample.image
                writer.writerow([sample_id, location, sample.image, sample.offset, sample.size, value])
            where = f"shard {shard}"
            if unlabeled:
                raise _bad(f"Samples without a label ('{label_key}' member or json field) in {where}", unlabeled,
                           len(unlabeled), "Hint: set data.label_key to the member or json field that holds it.")
            if bad_targets:
                raise _bad(f"Non-numeric or non-finite regression targets in {where}", bad_targets, len(bad_targets),
                           f"Hint: data.label_key ({label_key!r}) must hold a number for data.task: regression.")
            if bad_splits:
                raise _bad(f"Unknown split values in {where} (allowed: {list(SPLIT_CODES)})", bad_splits,
                           len(bad_splits), "Hint: fix them, or set data.split_key to null to ignore them.")
            if scan.duplicates:
                raise _bad(f"Members with the same name in {where} (which one belongs to the sample is ambiguous; "
                           "webdataset itself refuses them or makes two samples of one key)",
                           [f"{name}/{d}" for d in scan.duplicates], len(scan.duplicates),
                           "Hint: rewrite the shard with one member per name (a shard appended to twice, or two "
                           "shards concatenated, repeat their members).")
            n_rows += len(scan.samples) - len(cut)
            shard_records.append({"path": location, "sha256": scan.sha256, "size": scan.size,
                                  "n_samples": len(scan.samples) - len(cut), "problem": scan.problem,
                                  "left_out": cut})
            if scan.problem:  # every sample but the last one read is whole; that one is a row only with its label
                before = f"Shard {shard} ends early ({scan.problem}): its {len(scan.samples) - 1:,} samples before " \
                    "that point are kept"
                if cut:
                    logger.warning("%s; sample %s, which the early end cuts before its label ('%s'), is left out of "
                                   "the manifest (listed under left_out in %s). Hint: download or repair the shard "
                                   "to extract it", before, cut[0], label_key, shards_path(out).name)
                else:
                    logger.warning("%s, and so is sample %s/%s, the last one before the early end (its label came "
                                   "first; if its image is cut short, extract reports it as a bad image)", before,
                                   name, scan.cut)
            now = time.monotonic()
            if index in (0, len(shards) - 1) or scan.problem or now - logged >= PROGRESS_SECONDS:
                logged, left = now, (now - started) / (index + 1) * (len(shards) - index - 1)
                logger.info("prepare: %s of %s shards read, %s samples (shard %s: %s samples%s), ETA %d:%02d",
                            f"{index + 1:,}", f"{len(shards):,}", f"{n_rows:,}", name,
                            f"{len(scan.samples) - len(cut):,}",
                            f", ended early: {scan.problem}" if scan.problem else "", left // 60, left % 60)
        if n_rows == 0:
            raise ManifestError(f"No samples in the shards of {path!r} ({len(shards)} shards). Hint: data.image_keys "
                                f"({list(image_keys)}) must name the image members' extensions.")
        splits = _splits(np.frombuffer(carried, dtype=np.int8), n_rows, split_key)
        labels, names = None, []
        if task == "classification":
            seen = sorted(codes, key=codes.get)  # type: ignore[arg-type]
            if classes is not None:
                check_listed_classes(seen, classes, f"the shards of {path!r}")
            else:
                warn_case_twins(seen, f"the shards of {path!r}")
            names = sorted(seen) if classes is None else list(classes)
            index = np.array([names.index(name) for name in seen], dtype=np.int64)
            labels = index[np.frombuffer(label_codes, dtype=np.int32)]
            if splits is None:
                splits = splits_from_keys(np.frombuffer(rank_keys, dtype=np.uint64), dict(ratios), strata=labels)
            check_train_classes(labels, splits, names)
        elif classes is not None:
            raise ManifestError("data.classes is only for classification; remove it for a regression task.")
        if splits is None:
            splits = splits_from_keys(np.frombuffer(rank_keys, dtype=np.uint64), dict(ratios))
        spool.seek(0)
        _rewrite(spool, out, splits, labels, names, task)
    if task == "classification":
        write_text(classes_path(out), json.dumps({"classes": names}, indent=2, ensure_ascii=False) + "\n")
    else:
        classes_path(out).unlink(missing_ok=True)
    write_text(shards_path(out), json.dumps({"shards": shard_records}, indent=1, ensure_ascii=False) + "\n")
    counts = {name: int((splits == code).sum()) for name, code in SPLIT_CODES.items()}
    per_class = {} if labels is None else {
        name: {split: int(((labels == k) & (splits == code)).sum()) for split, code in SPLIT_CODES.items()}
        for k, name in enumerate(names)}
    if n_without_image:
        logger.warning("%d of %d samples have no image member (%s); extract reports them as bad images",
                       n_without_image, n_rows, "/".join(image_keys))
    return ShardedManifest(out, n_rows, task, names, counts, per_class, shard_records, n_without_image)


def _splits(carried: np.ndarray, n_rows: int, split_key: str | None) -> np.ndarray | None:
    """The splits the samples carry, or None when none does; some but not all is an error."""
    has = carried >= 0
    if not has.any():
        return None
    if not has.all():
        raise ManifestError(f"{int(has.sum())} of {n_rows} samples carry a split ('{split_key}') and "
                            f"{int((~has).sum())} do not. Hint: give every sample one, or set data.split_key: null "
                            "to split by data.split and data.seed.")
    return carried.astype(np.uint8)


def _rewrite(spool, out: Path, splits: np.ndarray, labels: np.ndarray | None, names: list[str], task: str) -> None:
    """Spool rows (id, path, member, offset, size, value) -> ``manifest.csv`` with split and label columns."""
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS + MEMBER_COLUMNS)
        for row, (sample_id, location, member, offset, size, value) in enumerate(csv.reader(spool)):
            label = names[labels[row]] if labels is not None else ""
            target = float(value) if task == "regression" else None
            writer.writerow(csv_row(sample_id, location, int(splits[row]), label, target,
                                    (member, int(offset), int(size))))
