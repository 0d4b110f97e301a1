"""Model-specific preprocessing: resize, crop and normalise a decoded RGB image.

The backbone registry decides the numbers (input size, resize, interpolation,
mean/std); this module applies them, like Chainer's ``prepare``. The torch and
ONNX backends share it: both consume the normalised tensor it produces.
Extreme aspect ratios are cropped without building a huge upsized
intermediate. Decoding files to RGB (the pixel limit, PNG checks, EXIF,
TIFFs) is :mod:`featcache.extract.decode.images`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from PIL import Image

from featcache.extract.decode.images import load_rgb
from featcache.extract.zoo.registry import BackboneSpec
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS, RESIZE_MODES

if TYPE_CHECKING:  # torch is imported on first use (params checks and configs stay cheap); torchvision never
    import torch

__all__ = ["Preprocessor", "MAX_INTERMEDIATE_FACTOR", "preprocess_steps"]

logger = logging.getLogger(__name__)

#: Upsizing a tiny image of extreme aspect ratio (1 x 5000) to the input size would allocate a huge
#: intermediate (224 x 1,120,000 pixels, 750 MB); above this many intermediate pixels per pixel of the
#: crop (aspect ratios beyond about 50:1), only the crop window is resampled (``_resize_crop_window``).
_MAX_INTERMEDIATE_FACTOR = 64
MAX_INTERMEDIATE_FACTOR = _MAX_INTERMEDIATE_FACTOR  # public name (extract.image_probe routes these to the CPU path)

#: Registry interpolation name -> Pillow filter (torchvision's mapping of its InterpolationMode for PIL images).
_PIL_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@functools.lru_cache(maxsize=64)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...],
                       device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (C, 1, 1) float32 mean and std on ``device``, made once per device and kept.

    Built per batch, each would be a blocking host-to-device copy, which
    synchronises the forward's CUDA stream: the loop could not queue the next
    forward before the previous one ends. Nothing writes to them.
    """
    import torch

    def constant(values: tuple[float, ...]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)

    return constant(mean), constant(std)


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
    background : tuple of int
        RGB colour behind transparent pixels (:func:`~featcache.extract.decode.images.to_rgb`).
    max_image_pixels : int or None
        Decompression-bomb limit (width x height) applied when decoding; None disables it. It changes
        no pixel, so it is not part of :meth:`config`.
    """

    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "crop"
    background: tuple[int, int, int] = (255, 255, 255)
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_spec(cls, spec: BackboneSpec, resize_mode: str = "crop", input_size: int | None = None,
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> "Preprocessor":
        """Build the preprocessor of a registry entry (optionally at another input size).

        ``max_image_pixels`` is the decompression-bomb limit that
        :class:`~featcache.extract.decode.loaders.ImageDataset` applies when decoding (None disables
        it); it does not change any pixel, so it is not part of :meth:`config`.
        """
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}.")
        _check_max_image_pixels(max_image_pixels)
        size = input_size or spec.input_size
        resize = round(spec.resize_size * size / spec.input_size)
        return cls(size, resize, spec.interpolation, tuple(spec.mean), tuple(spec.std), resize_mode,
                   max_image_pixels=max_image_pixels)

    def load(self, path: str | Path | bytes) -> Image.Image:
        """Decode ``path`` (or an image's bytes) to RGB with this preprocessor's background and pixel limit."""
        return load_rgb(path, self.background, self.max_image_pixels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one RGB image: :meth:`pixels` then :meth:`normalize_batch`.

        Returns
        -------
        torch.Tensor
            float32 tensor of shape (3, input_size, input_size).
        """
        return self.normalize_batch(self.pixels(image))

    def normalize_batch(self, images: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """uint8 pixels -> the normalised float32 input, ``(x / 255 - mean) / std``, on their device.

        The loaders hand over uint8 crops (a quarter of float32's bytes); the
        engine normalises them where the model runs. The arithmetic is exactly
        torchvision's ``ToTensor`` + ``Normalize`` (bitwise equal on CPU), for
        torch tensors and, without importing torch, for numpy arrays.

        Parameters
        ----------
        images : torch.Tensor or numpy.ndarray
            uint8 (B, 3, S, S) or (3, S, S); a tensor on any device.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            float32, same shape, type and device.
        """
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TypeError(f"normalize_batch takes uint8 pixels (from Preprocessor.pixels or a loader), got "
                                f"{images.dtype}. Hint: a float array is probably normalised already.")
            # The same float32 operations in the same order as the torch branch: bitwise equal results.
            mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
            out = images.astype(np.float32)
            out /= np.float32(255.0)
            out -= mean
            out /= std
            return out
        import torch

        if images.dtype != torch.uint8:
            raise TypeError(f"normalize_batch takes uint8 pixels (from Preprocessor.pixels or a loader), got "
                            f"{images.dtype}. Hint: a float tensor is probably normalised already.")
        # torchvision's Normalize, op for op (sub_ then div_ by per-channel float32 tensors), without importing it
        mean, std = _channel_constants(tuple(self.mean), tuple(self.std), str(images.device))
        return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Resize and crop (or squash) one RGB image to the uint8 tensor a loader hands over.

        Returns
        -------
        torch.Tensor
            uint8 tensor of shape (3, input_size, input_size); :meth:`normalize_batch` makes it the input.
        """
        import torch

        return torch.from_numpy(self.pixels_array(image))

    def pixels_array(self, image: Image.Image) -> np.ndarray:
        """:meth:`pixels` as a numpy array, without importing torch.

        Returns
        -------
        numpy.ndarray
            uint8 array of shape (3, input_size, input_size), C-contiguous.
        """
        # torchvision's resize / center_crop / pil_to_tensor on PIL images, step for step (the same Pillow
        # calls, tested equal), without importing torchvision (seconds of start-up in every loader worker)
        size = self.input_size
        if self.resize_mode == "squash":
            image = image.resize((size, size), self._resample)
        else:
            target = size if min(image.size) < size else self.resize_size
            width, height = image.size
            short, long = min(width, height), max(width, height)
            new_long = int(target * long / short)  # torchvision's rule for the longer side
            if target * new_long > _MAX_INTERMEDIATE_FACTOR * size * size:
                image = self._resize_crop_window(image, target, new_long)
            else:
                new_w, new_h = (target, new_long) if width <= height else (new_long, target)
                image = image.resize((new_w, new_h), self._resample)
                top = int(round((new_h - size) / 2.0))  # torchvision's center_crop offsets
                left = int(round((new_w - size) / 2.0))
                image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image).reshape(image.size[1], image.size[0], len(image.getbands()))
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    @property
    def _resample(self) -> int:
        """Pillow's resampling filter of :attr:`interpolation`."""
        return _PIL_RESAMPLE[self.interpolation]

    def _resize_crop_window(self, image: Image.Image, target: int, new_long: int) -> Image.Image:
        """Resize the shorter side to ``target`` then center-crop, resampling only the crop window.

        For an extreme aspect ratio (a 1 x 5000 strip upsized to 224 would be
        224 x 1,120,000 pixels) the full intermediate is never built. The two
        separable passes run in Pillow's order (horizontal, then vertical),
        each restricted to the crop window with ``resize(box=...)``, which maps
        output pixels to the same source positions and filter supports as the
        full resize: the result equals resize-then-crop up to floating-point
        rounding of those positions (at most a grey level or two).
        """
        width, height = image.size
        new_w, new_h = (target, new_long) if width <= height else (new_long, target)
        size = self.input_size
        top = round((new_h - size) / 2.0)  # torchvision's center_crop offsets
        left = round((new_w - size) / 2.0)
        scale_x, scale_y = width / new_w, height / new_h
        resample = self._resample
        columns = image.resize((size, height), resample, box=(left * scale_x, 0, (left + size) * scale_x, height))
        return columns.resize((size, size), resample, box=(0, top * scale_y, size, (top + size) * scale_y))

    def config(self) -> dict[str, object]:
        """JSON-serialisable description, stored with the features."""
        return {
            "input_size": self.input_size, "resize_size": self.resize_size,
            "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
            "resize_mode": self.resize_mode, "background": list(self.background),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any],
                    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> "Preprocessor":
        """The inverse of :meth:`config`: the preprocessor a store's ``config["preprocess"]`` describes.

        Parameters
        ----------
        config : mapping
            What :meth:`config` returned (read back from JSON: lists for the tuples).
        max_image_pixels : int or None
            The decompression-bomb limit, which :meth:`config` leaves out: the store's
            ``config["extract"]["max_image_pixels"]`` when recorded (None disables it), else the default.
        """
        _check_max_image_pixels(max_image_pixels)
        return cls(int(config["input_size"]), int(config["resize_size"]), str(config["interpolation"]),
                   tuple(config["mean"]), tuple(config["std"]), str(config.get("resize_mode", "crop")),
                   tuple(config.get("background", (255, 255, 255))), max_image_pixels=max_image_pixels)


def _check_max_image_pixels(max_image_pixels: int | None) -> None:
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be >= 1 or None, got {max_image_pixels!r}.")


def preprocess_steps(resize_mode: str) -> list[str]:
    """How :class:`~featcache.extract.decode.preprocess.Preprocessor` makes the input, in words (for other languages).

    The rule for images smaller than the input matters: a shorter side below ``input_size`` goes to
    ``input_size``, not to ``resize_size``, so nothing of a tiny image (8x8 digits, 28x28 MNIST) is cropped away.

    Parameters
    ----------
    resize_mode : {"crop", "squash"}

    Returns
    -------
    list of str
        The steps in order; the words in backquotes are keys of the description's ``preprocess``.
    """
    if resize_mode == "squash":
        geometry = ["resize to `input_size` x `input_size` with `interpolation` (Pillow's filter of that name)"]
    else:
        geometry = ["resize so that the shorter side is `resize_size`, or `input_size` when the image's shorter side "
                    "is below `input_size` (nothing of a small image is cropped away), and the longer side is "
                    "int(target * long / short), with `interpolation` (Pillow's filter of that name)",
                    "center crop `input_size` x `input_size`: top = round((height - input_size) / 2), "
                    "left = round((width - input_size) / 2)"]
    return ["decode to RGB, transparent pixels over `background`", *geometry,
            "x / 255, then (x - mean) / std per channel, float32, channels first (3, input_size, input_size)"]
