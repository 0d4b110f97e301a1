"""Input sources: an ImageFolder tree, a CSV manifest, or the embedded digits.

Each ``from_*`` function returns a sorted :class:`~featcache.extract.inputs.manifest.Manifest`
with a deterministic split; :func:`build_manifest` dispatches on the source name.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from featcache.extract.inputs.manifest import Manifest, ManifestError, assign_splits
from featcache.extract.inputs.storage import is_url
from featcache.store.schema import SPLIT_CODES

__all__ = ["IMAGE_EXTENSIONS", "SOURCES", "build_manifest", "check_listed_classes", "check_train_classes",
           "check_unique_classes", "format_rows", "from_folder", "from_csv", "warn_case_twins", "windows_path",
           "write_digits"]

logger = logging.getLogger(__name__)

#: What a folder source (and ``featcache predict`` on a folder) reads as images: formats Pillow decodes (AVIF
#: and JPEG 2000 through the codecs its wheels bundle; a Pillow built without one reports such files as bad
#: images). Other files are skipped with a warning that counts them by extension.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".pnm", ".avif", ".jp2", ".j2k")
SOURCES = ("digits", "folder", "csv", "webdataset")


def check_train_classes(labels: np.ndarray, splits: np.ndarray, classes: list[str]) -> None:
    """Every class needs a training example after the split; a warning for a class that has no val or test
    rows where that split is in use (its score would not be measured)."""
    train = splits == SPLIT_CODES["train"]
    missing = [classes[k] for k in range(len(classes)) if not np.any(labels[train] == k)]
    if missing:
        raise ManifestError(
            f"Classes without any training example after the split: {missing}. "
            "Hint: add images for them, lower data.split.val/test, or drop those classes."
        )
    for split in ("val", "test"):
        held = splits == SPLIT_CODES[split]
        absent = [classes[k] for k in range(len(classes)) if not np.any(labels[held] == k)]
        if held.any() and absent:
            logger.warning("Classes without any %s image after the split: %s; their %s scores are not measured. "
                           "Hint: add images for them, or raise data.split.%s.", split, absent, split, split)


def warn_case_twins(names: Iterable[str], where: str) -> None:
    """Warn when labels differ only in letter case (``Cat`` and ``cat``): each is a class of its own.

    Called where the classes come from the data (no ``data.classes``); listing them there keeps them apart
    without the warning.
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        groups.setdefault(name.casefold(), []).append(name)
    twins = [group for group in groups.values() if len(group) > 1]
    if twins:
        logger.warning("Labels in %s that differ only in letter case are separate classes: %s. Hint: spell each "
                       "class one way, or list them all in data.classes to keep them apart.", where,
                       "; ".join(" and ".join(map(repr, group)) for group in twins))


def format_rows(rows: Sequence[int], limit: int = 10) -> str:
    """``[4]`` -> ``"row 4"``, ``[2, 5]`` -> ``"rows 2 and 5"``; long lists are cut."""
    shown = [str(r) for r in rows[:limit]]
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    if len(shown) == 1:
        return f"row {shown[0]}"
    return "rows " + ", ".join(shown[:-1]) + " and " + shown[-1] + more


def check_listed_classes(names: Sequence[str], classes: Sequence[str], where: str,
                         rows_of: Mapping[str, list[int]] | None = None, noun: str = "Labels") -> None:
    """Labels outside the explicit ``data.classes`` list, and listed classes without any image, are errors."""
    present = set(names)
    unknown = sorted(present - set(classes))
    if unknown:
        detail = ""
        if rows_of is not None:
            detail = " (" + "; ".join(f"{name!r} on {format_rows(rows_of[name], 3)}" for name in unknown[:5]) + ")"
        raise ManifestError(
            f"{noun} {unknown} in {where}{detail} are not in data.classes {list(classes)}. "
            "Hint: add them to data.classes, or remove those images/rows."
        )
    empty = [name for name in classes if name not in present]
    if empty:
        raise ManifestError(
            f"Classes {empty} of data.classes {list(classes)} have no images in {where}. "
            "Hint: add images for them or remove them from data.classes."
        )


def _classification(ids: list[str], paths: list[str], names: list[str], splits: np.ndarray | None,
                    ratios: Mapping[str, float], seed: int, root: Path,
                    classes: Sequence[str] | None = None) -> Manifest:
    if classes is None:
        warn_case_twins(names, str(root))
    classes = sorted(set(names)) if classes is None else list(classes)
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[name] for name in names], dtype=np.int64)
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    ids, paths, labels = [ids[i] for i in order], [paths[i] for i in order], labels[order]
    if splits is None:
        splits = assign_splits(ids, dict(ratios), seed, strata=labels)
    else:
        splits = splits[order]
    check_train_classes(labels, splits, classes)
    return Manifest(ids, paths, splits, "classification", labels=labels, classes=classes, root=root)


def check_unique_classes(classes: Sequence[str] | None) -> list[str] | None:
    """``data.classes`` as a list of distinct non-empty names (None stays None)."""
    if classes is None:
        return None
    classes = [str(c) for c in classes]
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes or not classes or any(not c.strip() for c in classes):
        raise ManifestError(f"data.classes must list distinct, non-empty class names; got {classes}.")
    return classes


def from_folder(root: str | Path, ratios: Mapping[str, float], seed: int,
                classes: Sequence[str] | None = None) -> Manifest:
    """Scan an ImageFolder tree: ``root/<class>/<image>``; ids are ``<class>/<file>``.

    Images may lie in subfolders of a class folder (``root/<class>/a/b.jpg``,
    id ``<class>/a/b.jpg``); files with other extensions than
    :data:`IMAGE_EXTENSIONS`, and files directly under ``root``, are skipped
    with a warning. Hidden files and folders (names starting with ``.``, such
    as macOS ``._IMG_0001.jpg`` resource forks) are not images and are skipped.

    Parameters
    ----------
    root : path
        The ImageFolder tree; relative paths in the manifest start here.
    ratios : mapping of str to float
        ``{"train": a, "val": b, "test": c}`` summing to 1: the split of each
        class (see :func:`~featcache.extract.inputs.manifest.assign_splits`).
    seed : int
        Seed of the split (a seeded hash of each id ranks the rows).
    classes : sequence of str, optional
        Explicit class list (``data.classes``); its order defines the label
        indices. A folder with images that is not listed, or a listed class
        without images, is an error. Without it, every non-empty folder is a
        class (sorted) and empty folders are warned about and ignored.

    Returns
    -------
    Manifest
        A classification manifest of the N images, sorted by id.

    Raises
    ------
    ManifestError
        If ``root`` is not a folder or holds no images, for an invalid or
        mismatched ``classes``, or a class without a training image after the split.
    """
    root = Path(root)
    classes = check_unique_classes(classes)
    if not root.is_dir():
        raise ManifestError(f"Image folder {str(root)!r} does not exist. Hint: set data.path in params.yaml.")
    ids, paths, names, empty = [], [], [], []
    skipped: collections.Counter[str] = collections.Counter()
    outside = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        visible = [p for p in class_dir.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)]
        files = sorted(p for p in visible if p.suffix.lower() in IMAGE_EXTENSIONS)
        skipped.update(p.suffix.lower() or "(none)" for p in visible if p.suffix.lower() not in IMAGE_EXTENSIONS)
        if not files:
            empty.append(class_dir.name)
        for file in files:
            relative = file.relative_to(root).as_posix()
            ids.append(relative)
            paths.append(relative)
            names.append(class_dir.name)
    if skipped:
        logger.warning("Skipped %d files in class folders whose extensions are not images (%s); images must end "
                       "in one of %s. Hint: rename or convert them to be included.", sum(skipped.values()),
                       ", ".join(f"{ext}: {n}" for ext, n in sorted(skipped.items())), ", ".join(IMAGE_EXTENSIONS))
    if outside:
        logger.warning("Skipped %d files directly under %s, outside any class folder (e.g. %s): labels come "
                       "from class folders, %s/<class>/<image>.", len(outside), root, sorted(outside)[:3], root)
    if empty and classes is None:
        logger.warning("Ignoring empty class folders (no images with extensions %s): %s", IMAGE_EXTENSIONS, empty)
    if not ids:
        raise ManifestError(f"No images found under {root} (expected {root}/<class>/<image>, each ending in one of "
                            f"{', '.join(IMAGE_EXTENSIONS)}). Hint: check data.path, and the warnings above for the "
                            "files that were skipped.")
    if classes is not None:
        check_listed_classes(names, classes, f"image folder {root}", noun="Class folders (labels)")
    return _classification(ids, paths, names, None, ratios, seed, root, classes)


def windows_path(p: str, root: Path) -> str:
    """A CSV path written on Windows (``images\\cat\\001.jpg``) as the file it names here.

    The forward-slash form is used when it exists under ``root`` and the path as written does not (a
    backslash is a valid file-name character on Linux and macOS, so a file really named so wins); a URL,
    or a path that exists in neither form, is left as written (extraction reports a missing file by name).
    """
    if "\\" not in p or is_url(p) or (root / p).exists():
        return p
    forward = p.replace("\\", "/")
    return forward if (root / forward).exists() else p


def from_csv(path: str | Path, ratios: Mapping[str, float], seed: int, task: str = "classification",
             classes: Sequence[str] | None = None) -> Manifest:
    """Read a user CSV: ``path`` plus ``label`` (classification) or ``target`` (regression).

    Optional columns: ``id`` (default: the path) and ``split`` (train/val/test;
    default: assigned from ``ratios`` and ``seed``). Paths are relative to the
    CSV's folder unless absolute or URLs (``https://...``, ``s3://...``: read
    through fsspec at extraction, see :mod:`featcache.extract.inputs.storage`);
    ``..`` escapes from that folder are rejected. A path with backslashes (a CSV written on Windows) names
    its forward-slash form where only that exists (:func:`windows_path`).
    Every image may appear once: repeated ids or paths (after normalising
    ``./`` and ``//``) are rejected naming the rows. ``classes`` (``data.classes``)
    fixes the class list and its order: other labels, or listed classes
    without rows, are rejected. ``prepare`` writes the manifest without holding its rows in memory
    (:func:`~featcache.extract.inputs.csvsource.read_csv`).
    """
    from featcache.extract.inputs.csvsource import read_csv  # (it imports this module's checks)

    with read_csv(path, ratios, seed, task, classes) as rows:
        return rows.to_manifest()


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
                   task: str = "classification", work_dir: str | Path = "data/prepared",
                   classes: Sequence[str] | None = None) -> Manifest:
    """Build the manifest of any supported source.

    Parameters
    ----------
    source : str
        ``digits`` (embedded default, written under ``work_dir/images``),
        ``folder`` (ImageFolder tree at ``path``) or ``csv`` (manifest at ``path``).
        ``webdataset`` is rejected here: shards are read by
        :func:`~featcache.extract.inputs.sharded.from_shards`.
    path : path or None
        ``data.path``: the folder or the CSV; ignored (may be None) for ``digits``.
    ratios : mapping of str to float
        ``{"train": a, "val": b, "test": c}`` summing to 1; used for rows
        without a split (every row but CSV rows with a ``split`` column).
    seed : int
        Seed of the split assignment.
    task : {"classification", "regression"}
        The CSV's task (``label`` or ``target`` column); folders and
        ``digits`` are always classification.
    work_dir : path
        Where ``digits`` writes its PNG images (``work_dir/images``).
    classes : sequence of str, optional
        Explicit class list and order (``data.classes``).

    Returns
    -------
    Manifest
        Sorted by id, with its splits.

    Raises
    ------
    ManifestError
        For an unknown source, a missing ``path``, or invalid input (see
        :func:`from_folder` and :func:`from_csv`).
    """
    if source == "digits":
        return from_folder(write_digits(Path(work_dir) / "images"), ratios, seed, classes)
    if path is None:
        raise ManifestError(f"data.source {source!r} needs data.path (the {source} location).")
    if source == "folder":
        return from_folder(path, ratios, seed, classes)
    if source == "csv":
        return from_csv(path, ratios, seed, task, classes)
    if source == "webdataset":
        raise ManifestError("A manifest of shards is written as the shards are read: use "
                            "featcache.extract.inputs.sharded.from_shards (or `featcache prepare`).")
    raise ManifestError(f"Unknown data.source {source!r}; allowed: {SOURCES}.")
