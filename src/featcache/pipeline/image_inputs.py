"""The images a command or call is given: files, folders searched for images, glob patterns, URLs.

``featcache predict --images`` and :func:`featcache.pipeline.arrays.extract_features` take their images this way.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Sequence

from featcache.extract.inputs.sources import IMAGE_EXTENSIONS
from featcache.extract.inputs.storage import is_url

__all__ = ["image_paths"]

logger = logging.getLogger(__name__)


def _visible(path: Path, folder: Path) -> bool:
    """Whether ``path`` (inside ``folder``) is no hidden file and in no hidden folder (``.DS_Store``,
    macOS ``._x.jpg`` resource forks, ``.git/``), as the manifest's folder scan decides."""
    return not any(part.startswith(".") for part in path.relative_to(folder).parts)


def _expand(item: str | Path) -> list[Path]:
    """An existing path as given, else the files a glob pattern (``'dir/*.jpg'``, ``**`` too) matches."""
    path = Path(item)
    if path.exists() or not glob.has_magic(str(item)):
        return [path]
    return [Path(match) for match in sorted(glob.glob(str(item), recursive=True))]


#: How many skipped files the warning of :func:`image_paths` names.
_SKIPPED_SHOWN = 3


def image_paths(inputs: Sequence[str | Path], error: type[Exception] = ValueError) -> list[str]:
    """The images that ``inputs`` name, in order: files as given; folders searched recursively for
    :data:`~featcache.extract.inputs.sources.IMAGE_EXTENSIONS` (hidden files and folders skipped silently, other
    files with one warning, as ``prepare`` does); a quoted glob pattern expanded here (a shell that did not expand
    it); URLs as given (read as the pipeline reads a CSV's URLs).

    Parameters
    ----------
    inputs : sequence of str or Path
        Image files, folders of images, glob patterns (``'new_images/*.jpg'``, ``**`` too) or URLs
        (``https://...``, ``s3://...``).
    error : exception class
        What a missing path, or inputs with no image, raise (the caller's user error).

    Returns
    -------
    list of str
        The local paths (as found: relative when given relative) and the URLs.
    """
    urls = {str(item) for item in inputs if is_url(item)}
    expanded = {str(item): [item] if str(item) in urls else _expand(item) for item in inputs}
    missing = [item for item, found in expanded.items()
               if item not in urls and (not found or not Path(found[0]).exists())]
    if missing:
        raise error(f"No such file or folder: {missing} (a glob pattern matched nothing). Hint: give image "
                    "files, folders of images, or a pattern such as 'new_images/*.jpg'.")
    paths: list[str] = []
    skipped: list[Path] = []
    for item in (path for found in expanded.values() for path in found):
        if str(item) in urls:
            paths.append(str(item))
        elif item.is_dir():
            visible = sorted(p for p in item.rglob("*") if p.is_file() and _visible(p, item))
            paths.extend(str(p) for p in visible if p.suffix.lower() in IMAGE_EXTENSIONS)
            skipped.extend(p for p in visible if p.suffix.lower() not in IMAGE_EXTENSIONS)
        elif item.is_file():
            paths.append(str(item))  # named (or matched by a pattern): scored, or an error row if it is no image
    if skipped:
        logger.warning("Skipped %d file%s in the folders given whose extensions are not images (%s%s); images "
                       "must end in one of %s. Hint: rename or convert them to be scored, or name a file itself "
                       "to get its row (with the error if it cannot be read).", len(skipped),
                       "s" if len(skipped) != 1 else "", ", ".join(map(str, skipped[:_SKIPPED_SHOWN])),
                       ", ..." if len(skipped) > _SKIPPED_SHOWN else "", ", ".join(IMAGE_EXTENSIONS))
    if not paths:
        raise error(f"No images found in {list(map(str, inputs))} (extensions {IMAGE_EXTENSIONS}; hidden "
                    "files skipped). Hint: give image files, or folders that contain them.")
    return paths
