"""Input sources: an ImageFolder tree, a CSV manifest, or the embedded digits.

Each ``from_*`` function returns a sorted :class:`~featcache.extract.manifest.Manifest`
with a deterministic split; :func:`build_manifest` dispatches on the source name.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path, PurePosixPath
from typing import Mapping

import numpy as np

from featcache.extract.manifest import Manifest, ManifestError, assign_splits
from featcache.store.schema import SPLIT_CODES

__all__ = ["IMAGE_EXTENSIONS", "SOURCES", "build_manifest", "from_folder", "from_csv", "write_digits"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SOURCES = ("digits", "folder", "csv")


def _check_classes(labels: np.ndarray, splits: np.ndarray, classes: list[str]) -> None:
    train = splits == SPLIT_CODES["train"]
    missing = [classes[k] for k in range(len(classes)) if not np.any(labels[train] == k)]
    if missing:
        raise ManifestError(
            f"Classes without any training example after the split: {missing}. "
            "Hint: add images for them, lower data.split.val/test, or drop those classes."
        )


def _classification(ids: list[str], paths: list[str], names: list[str], splits: np.ndarray | None,
                    ratios: Mapping[str, float], seed: int, root: Path) -> Manifest:
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[name] for name in names], dtype=np.int64)
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    ids, paths, labels = [ids[i] for i in order], [paths[i] for i in order], labels[order]
    if splits is None:
        splits = assign_splits(len(ids), dict(ratios), seed, strata=labels)
    else:
        splits = splits[order]
    _check_classes(labels, splits, classes)
    return Manifest(ids, paths, splits, "classification", labels=labels, classes=classes, root=root)


def from_folder(root: str | Path, ratios: Mapping[str, float], seed: int) -> Manifest:
    """Scan an ImageFolder tree: ``root/<class>/<image>``; ids are ``<class>/<file>``."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"Image folder {str(root)!r} does not exist. Hint: set data.path in params.yaml.")
    ids, paths, names, empty = [], [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            empty.append(class_dir.name)
        for file in files:
            relative = file.relative_to(root).as_posix()
            ids.append(relative)
            paths.append(relative)
            names.append(class_dir.name)
    if empty:
        logger.warning("Ignoring empty class folders (no images with extensions %s): %s", IMAGE_EXTENSIONS, empty)
    if not ids:
        raise ManifestError(f"No images found under {root} (expected {root}/<class>/<image>).")
    return _classification(ids, paths, names, None, ratios, seed, root)


def from_csv(path: str | Path, ratios: Mapping[str, float], seed: int, task: str = "classification") -> Manifest:
    """Read a user CSV: ``path`` plus ``label`` (classification) or ``target`` (regression).

    Optional columns: ``id`` (default: the path) and ``split`` (train/val/test;
    default: assigned from ``ratios`` and ``seed``). Paths are relative to the
    CSV's folder unless absolute; ``..`` escapes from that folder are rejected.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"CSV manifest {str(path)!r} does not exist. Hint: set data.path in params.yaml.")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = list(reader)
    column = "label" if task == "classification" else "target"
    for needed in ("path", column):
        if needed not in columns:
            raise ManifestError(f"CSV {path} has columns {columns}; a {task} manifest needs '{needed}'.")
    if not rows:
        raise ManifestError(f"CSV {path} has no rows.")
    paths = [r["path"].strip() for r in rows]
    for p in paths:
        if not PurePosixPath(p).is_absolute() and ".." in PurePosixPath(p).parts:
            raise ManifestError(f"Path {p!r} in {path} leaves the manifest's folder ('..'); give it absolute.")
    ids = [(r.get("id") or r["path"]).strip() for r in rows]
    splits = None
    if "split" in columns and any(r["split"] for r in rows):
        bad = sorted({r["split"] for r in rows} - set(SPLIT_CODES))
        if bad:
            raise ManifestError(f"Unknown split values {bad} in {path}; allowed: {list(SPLIT_CODES)}.")
        splits = np.array([SPLIT_CODES[r["split"]] for r in rows], dtype=np.uint8)
    if task == "classification":
        return _classification(ids, paths, [r["label"].strip() for r in rows], splits, ratios, seed, path.parent)
    try:
        targets = np.array([float(r["target"]) for r in rows], dtype=np.float64)
    except ValueError as error:
        raise ManifestError(f"Non-numeric target in {path}: {error}.") from None
    if splits is None:
        splits = assign_splits(len(ids), dict(ratios), seed)
    return Manifest.sorted(ids, paths, splits, task="regression", targets=targets, root=path.parent)


def write_digits(out_dir: str | Path) -> Path:
    """Write scikit-learn's 1,797 8x8 digits as PNG files ``out_dir/<digit>/<index>.png``.

    The images ship inside scikit-learn, so this needs no network. Pixel
    values 0..16 are scaled to 0..255 (white ink on black, as in the data).

    Returns
    -------
    Path
        ``out_dir``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        target = out_dir / str(int(label)) / f"{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(target, optimize=False)
    logger.info("Wrote %d digit images to %s", len(digits.images), out_dir)
    return out_dir


def build_manifest(source: str, path: str | Path | None, ratios: Mapping[str, float], seed: int,
                   task: str = "classification", work_dir: str | Path = "data/prepared") -> Manifest:
    """Build the manifest of any supported source.

    Parameters
    ----------
    source : str
        ``digits`` (embedded default, written under ``work_dir/images``),
        ``folder`` (ImageFolder tree at ``path``) or ``csv`` (manifest at ``path``).
    """
    if source == "digits":
        return from_folder(write_digits(Path(work_dir) / "images"), ratios, seed)
    if path is None:
        raise ManifestError(f"data.source {source!r} needs data.path (the {source} location).")
    if source == "folder":
        return from_folder(path, ratios, seed)
    if source == "csv":
        return from_csv(path, ratios, seed, task)
    raise ManifestError(f"Unknown data.source {source!r}; allowed: {SOURCES}.")
