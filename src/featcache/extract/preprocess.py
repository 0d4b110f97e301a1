"""Model-specific preprocessing: decode any image to RGB, resize, crop, normalise.

The backbone registry decides the numbers (input size, resize, interpolation,
mean/std); this module applies them, like Chainer's ``prepare``. The torch and
ONNX backends share it: both consume the normalised tensor it produces.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from featcache.extract.registry import BackboneSpec

__all__ = ["Preprocessor", "load_rgb", "to_rgb", "RESIZE_MODES"]

#: ``crop``: resize the shorter side then center-crop; ``squash``: resize to the square input.
RESIZE_MODES = ("crop", "squash")

_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Palette, grayscale, CMYK and YCbCr images are converted; images with
    alpha (RGBA, LA, PA, palette with transparency) are composited on
    ``background``; 16-bit and 32-bit integer images are scaled from their
    full range, float images from [0, 1] (or their own range if larger).

    Parameters
    ----------
    image : PIL.Image.Image
        Decoded image of any mode.
    background : tuple of int
        RGB colour behind transparent pixels.

    Returns
    -------
    PIL.Image.Image
        An image in mode ``RGB``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if mode == "F":
            top = max(1.0, float(np.nanmax(array)) if array.size else 1.0)
        elif mode.startswith("I;16"):
            top = 65535.0
        else:
            top = max(255.0, float(array.max()) if array.size else 255.0)
        array = np.clip(np.nan_to_num(array) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode an image file, apply its EXIF orientation and convert it to RGB.

    Raises
    ------
    OSError, ValueError, PIL.Image.DecompressionBombError
        For unreadable, truncated or oversized images (the caller reports them).
    """
    with warnings.catch_warnings():
        # A decompression-bomb *warning* becomes an error: an oversized image is reported, not decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image, background)


@dataclass(frozen=True)
class Preprocessor:
    """Turn an RGB PIL image into the normalised tensor a backbone expects.

    Images whose shorter side is below the input size (8x8 digits, 28x28
    MNIST) are upsized so the shorter side equals the input size and then
    center-cropped, so no content of a tiny image is cropped away; larger
    images are resized to ``resize_size`` and center-cropped (``crop``), or
    squashed to the square input (``squash``).

    Attributes
    ----------
    input_size, resize_size : int
        Crop side and resize target of the shorter side.
    interpolation : str
        ``bilinear``, ``bicubic`` or ``nearest``.
    mean, std : tuple of float
        Per-channel normalisation.
    resize_mode : str
        One of :data:`RESIZE_MODES`.
    """

    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "crop"
    background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def from_spec(cls, spec: BackboneSpec, resize_mode: str = "crop", input_size: int | None = None) -> "Preprocessor":
        """Build the preprocessor of a registry entry (optionally at another input size)."""
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}.")
        size = input_size or spec.input_size
        resize = round(spec.resize_size * size / spec.input_size)
        return cls(size, resize, spec.interpolation, tuple(spec.mean), tuple(spec.std), resize_mode)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one RGB image.

        Returns
        -------
        torch.Tensor
            float32 tensor of shape (3, input_size, input_size).
        """
        interpolation = _INTERPOLATIONS[self.interpolation]
        if self.resize_mode == "squash":
            image = TF.resize(image, [self.input_size, self.input_size], interpolation=interpolation)
        else:
            target = self.input_size if min(image.size) < self.input_size else self.resize_size
            image = TF.resize(image, target, interpolation=interpolation)
            image = TF.center_crop(image, [self.input_size, self.input_size])
        tensor = TF.pil_to_tensor(image).to(torch.float32).div_(255.0)
        return TF.normalize(tensor, self.mean, self.std)

    def config(self) -> dict[str, object]:
        """JSON-serialisable description, stored with the features."""
        return {
            "input_size": self.input_size, "resize_size": self.resize_size,
            "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
            "resize_mode": self.resize_mode, "background": list(self.background),
        }
