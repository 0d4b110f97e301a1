"""Files for tests: md5 of a file and small image folders (written without featcache)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

__all__ = ["COLOUR_CLASSES", "md5", "write_brightness_folder", "write_colour_folder", "write_image_folder"]

#: Class folders of :func:`write_colour_folder`, each dominated by its colour channel.
COLOUR_CLASSES = ("red", "green", "blue")


def md5(path: str | Path) -> str:
    """Hex md5 of a file's bytes."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_image_folder(root: Path, classes=("ant", "bee", "cat"), per_class: int = 6, size: int = 20,
                       seed: int = 0) -> list[str]:
    """``root/<class>/<i>.png`` with random colours; returns the ids ``class/file`` sorted."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ids = []
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
            ids.append(f"{name}/{index:03d}.png")
    return sorted(ids)


def write_colour_folder(root: Path, per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """Write ``root/<class>/<i>.png`` for :data:`COLOUR_CLASSES`: noisy images dominated by the class colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for channel, name in enumerate(COLOUR_CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 90, size=(size, size, 3))
            pixels[..., channel] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index:03d}.png")
    return root


def write_brightness_folder(root: Path, n: int, scale: float = 1.0, decimals: int = 4,
                            csv: str = "targets.csv") -> Path:
    """Write ``n`` noisy grey images ``root/img<i>.png`` and ``root/<csv>`` (path,target) whose target is each
    image's brightness in [0.05, 0.95] times ``scale``, written with ``decimals`` decimals: a regression set."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["path,target"]
    for index in range(n):
        brightness = rng.uniform(0.05, 0.95)
        pixels = np.clip(brightness * 255 + rng.normal(0, 8, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{index:02d}.png")
        lines.append(f"img{index:02d}.png,{brightness * scale:.{decimals}f}")
    (root / csv).write_text("\n".join(lines) + "\n")
    return root
