"""``prepare`` stage: images -> ``manifest.csv`` with stable ids, labels and splits."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.extract.inputs.csvsource import CsvManifest, CsvRows, read_csv
from featcache.extract.inputs.manifest import Manifest, ManifestError
from featcache.extract.inputs.sharded import ShardedManifest, from_shards
from featcache.extract.inputs.sources import from_folder
from featcache.extract.inputs.storage import StorageOptions
from featcache.heads.trainable import check_trainable_rows
from featcache.pipeline.params.base import StageParams, as_sections, load_sections
from featcache.pipeline.params.data import DataParams
from featcache.store.schema import SPLIT_CODES

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PrepareSections", "load_prepare_sections", "prepare"]

logger = logging.getLogger(__name__)


class PrepareSections(StageParams):
    """The one section the prepare stage reads: ``data``."""

    data: DataParams = DataParams()


def load_prepare_sections(path: str | Path = "params.yaml") -> PrepareSections:
    """Read and validate the ``data`` section of ``path``."""
    return load_sections(PrepareSections, path)


def prepare(params: Any, out_dir: str | Path) -> Manifest | CsvManifest | ShardedManifest:
    """Build the manifest from ``params.data`` (:class:`PrepareSections` or the whole params) and write
    ``out_dir/manifest.csv``.

    Also writes ``out_dir/manifest.classes.json`` (the class list in label
    order, see ``data.classes``) and ``out_dir/summary.json`` (rows per split
    and per class). Every check (paths, duplicates, labels, classes, a class
    without training examples) runs before anything is written.

    For ``data.source: webdataset`` the manifest is written as the shards are
    read, in bounded memory, and a :class:`ShardedManifest` (counts, no rows)
    is returned; the shard list with each shard's sha256 goes to
    ``manifest.shards.json``. A CSV's manifest is written from spooled rows, in
    bounded memory too: a :class:`CsvManifest` (splits, labels or targets; no
    strings) is returned.

    Parameters
    ----------
    params : PrepareSections, Params, path or mapping
        Validated params (``data`` is used), or a params file's path or a parsed mapping (validated here).
    out_dir : path
        The folder written (created if needed).

    Returns
    -------
    Manifest, CsvManifest or ShardedManifest
        The rows written (a CSV: their splits, labels, targets; WebDataset shards: their counts only).

    Raises
    ------
    ManifestError
        Naming the offending path, rows, labels or class; a train or test split without rows
        (a tiny dataset, or a CSV split column without ``test`` rows); a regression train split
        whose targets are all equal.
    """
    data = as_sections(params, PrepareSections).data
    ratios = data.split.model_dump()
    out_dir = Path(out_dir)
    if data.source == "webdataset":
        sharded = from_shards(data.path, out_dir / "manifest.csv", ratios, data.seed, data.task, data.classes,
                              data.image_keys, data.label_key, data.split_key, StorageOptions(**data.io.model_dump()))
        summary = {"n_rows": sharded.n_rows, "task": sharded.task, "splits": sharded.split_counts,
                   "classes": sharded.classes, "n_shards": len(sharded.shards),
                   "n_without_image": sharded.n_without_image,
                   "shards_ended_early": [s["path"] for s in sharded.shards if s["problem"]],
                   "left_out": [sample for s in sharded.shards for sample in s["left_out"]]}
        _check_rows(data, sharded.split_counts, None, sharded.n_rows)  # (targets: streamed, not kept)
        if sharded.task == "classification":
            _check_two_classes(sharded.classes)
            summary["per_class"] = sharded.per_class
        _write_summary(out_dir, summary)
        logger.info("Prepared %d rows from %d shards: %s", sharded.n_rows, len(sharded.shards), sharded.split_counts)
        return sharded
    if data.source == "csv":
        spool = next(folder for folder in (out_dir, *out_dir.absolute().parents) if folder.is_dir())  # (an error
        # leaves no out_dir behind)
        with read_csv(Path(data.path) / data.csv, ratios, data.seed, data.task, data.classes, spool) as rows:
            _check_manifest(data, rows)
            manifest: Manifest | CsvManifest = rows.write(out_dir / "manifest.csv")
    else:
        manifest = from_folder(data.path, ratios, data.seed, classes=data.classes)
        _check_manifest(data, manifest)
        manifest.write(out_dir / "manifest.csv")
    summary = {"n_rows": len(manifest), "task": manifest.task, "splits": manifest.split_counts(),
               "classes": manifest.classes}
    if manifest.task == "classification":
        summary["per_class"] = {
            name: {split: int(((manifest.labels == k) & (manifest.splits == code)).sum())
                   for split, code in SPLIT_CODES.items()}
            for k, name in enumerate(manifest.classes)}
    _write_summary(out_dir, summary)
    logger.info("Prepared %d rows from %s %s: %s", len(manifest), data.source, data.path, summary["splits"])
    return manifest


def _check_manifest(data: DataParams, manifest: Manifest | CsvRows) -> None:
    """The checks before a folder's or a CSV's manifest is written: two classes, train and test rows."""
    if manifest.task == "classification":
        _check_two_classes(manifest.classes)
    train = manifest.targets[manifest.splits == SPLIT_CODES["train"]] if manifest.task == "regression" else None
    _check_rows(data, manifest.split_counts(), train, len(manifest))


def _check_rows(data: DataParams, counts: dict[str, int], train_targets: np.ndarray | None, n_rows: int) -> None:
    """The heads need train and test rows, and varied regression targets: else refused naming the fix."""
    ratios = ", ".join(f"{name}: {value:g}" for name, value in data.split.model_dump().items())
    column = {"csv": "the CSV's split column",
              "webdataset": f"the shards' {data.split_key!r} field" if data.split_key else None}.get(data.source)
    hint = (f"add images or raise data.split.{{split}} (data.split {{{{{ratios}}}}} of {n_rows} rows left it "
            "empty)" + (f"; where {column} assigns the splits, give some rows the split '{{split}}'" if column
                         else "") + ".")
    check_trainable_rows(counts, train_targets, f"The {data.source} data at {data.path}", hint,
                         "check the target column (one value in every row: the wrong column?), or give train "
                         "more rows (more images, a larger data.split.train).", ManifestError)


def _check_two_classes(classes: list[str]) -> None:
    """The pipeline trains classifiers: one class would pass extraction and fail every head."""
    if len(classes) < 2:
        raise ManifestError(
            f"A classification dataset needs at least 2 classes to train heads; found {len(classes)}: {classes}. "
            "Hint: put each class's images in its own folder (data.path/<class>/<image>) or give them distinct "
            "labels; for numeric targets set data.task: regression.")


def _write_summary(out_dir: Path, summary: dict) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
