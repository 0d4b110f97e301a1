"""Fine-tuning data: manifest rows through :class:`~featcache.extract.decode.loaders.ImageDataset`.

Images are decoded, resized and cropped exactly as for extraction (the same
:class:`~featcache.extract.decode.preprocess.Preprocessor`: resize rule, aspect-ratio
guard; uint8 pixels from the loader, normalised per batch with
:meth:`~featcache.extract.decode.preprocess.Preprocessor.normalize_batch`). Training
adds augmentation on top of that test-time view (:class:`TrainTransform`: a
random-resized crop of the view, resized back to the input side, and an
optional horizontal flip), so there is one resize rule in the code base.

An image that cannot be decoded is reported, never silently dropped: its id
and the reason (:func:`~featcache.extract.decode.loaders.describe_error`, as stored in a
feature file's ``/errors``) land in :class:`BadImages`, which the fine-tune
result and the stage's metrics carry. Only decode errors become reasons: a bug
in preprocessing (:class:`~featcache.extract.decode.loaders.ImageDataset`) or in the
augmentation (the collate step) raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, SubsetRandomSampler, default_collate
from torchvision import transforms as T

from featcache.extract.decode.loaders import ImageDataset, make_loader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest

__all__ = ["AugmentingCollate", "BadImages", "ReadableBatches", "TrainTransform", "eval_batches", "train_batches"]

logger = logging.getLogger(__name__)


class TrainTransform:
    """Augment a test-time view: a random-resized crop of it (back to its side) and an optional flip.

    Applied to the uint8 (3, S, S) views that
    :meth:`~featcache.extract.decode.preprocess.Preprocessor.pixels` makes, in the
    loader's collate step (:class:`AugmentingCollate`), so decoding stays exactly
    as in extraction and an augmentation bug raises instead of passing as a bad image.

    Parameters
    ----------
    pre : Preprocessor
        The test-time preprocessor (its ``input_size`` and ``interpolation``).
    random_crop : bool
        Random-resized crop with area fraction in ``scale`` (else the view as is).
    scale : tuple of float
        Area range of the crop, relative to the view.
    hflip : bool
        Flip horizontally with probability 0.5.
    """

    def __init__(self, pre: Preprocessor, random_crop: bool, scale: tuple[float, float], hflip: bool) -> None:
        self.crop = (T.RandomResizedCrop(pre.input_size, scale=scale, antialias=True,
                                         interpolation=T.InterpolationMode(pre.interpolation))
                     if random_crop else None)
        self.hflip = hflip

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        """uint8 (3, S, S) view -> uint8 (3, S, S) augmented view."""
        if self.crop is not None:
            view = self.crop(view)
        if self.hflip and torch.rand(()) < 0.5:
            view = torch.flip(view, dims=[2])
        return view


class AugmentingCollate:
    """Collate ``(row, view, reason)`` items, augmenting the views of readable rows (picklable)."""

    def __init__(self, augment: TrainTransform) -> None:
        self.augment = augment

    def __call__(self, items: list[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        rows, views, reasons = default_collate(items)
        return rows, torch.stack([view if reason else self.augment(view)
                                  for view, reason in zip(views, reasons, strict=True)]), reasons


class BadImages:
    """Manifest rows that could not be decoded: row -> reason, first reason kept.

    Attributes
    ----------
    reasons : dict of int to str
        Manifest row -> one-line reason.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.ids = manifest.ids
        self.reasons: dict[int, str] = {}

    def add(self, row: int, reason: str) -> None:
        """Record one unreadable row (once; logged the first time)."""
        if row not in self.reasons:
            self.reasons[row] = reason
            logger.warning("Skipping unreadable image %s: %s", self.ids[row], reason)

    def __len__(self) -> int:
        return len(self.reasons)

    def as_list(self) -> list[dict[str, str]]:
        """``[{"id": ..., "reason": ...}, ...]`` sorted by id (JSON-ready)."""
        return [{"id": str(self.ids[row]), "reason": reason}
                for row, reason in sorted(self.reasons.items(), key=lambda item: str(self.ids[item[0]]))]


class ReadableBatches:
    """Batches ``(rows (B,), images (B, 3, S, S) float32, targets (B,))`` of the readable rows of a loader.

    Rows whose image failed to decode are dropped from the batch and recorded
    in ``bad``; a batch with no readable row is skipped. The uint8 pixels are
    normalised with ``pre`` (as the extraction engine does).
    """

    def __init__(self, loader: DataLoader, targets: np.ndarray, bad: BadImages, pre: Preprocessor) -> None:
        self.loader, self.targets, self.bad, self.pre = loader, targets, bad, pre

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for rows, images, reasons in self.loader:
            ok = [not reason for reason in reasons]
            for row, reason in zip(rows.tolist(), reasons, strict=True):
                if reason:
                    self.bad.add(row, reason)
            if not any(ok):
                continue
            keep = torch.tensor(ok)
            rows = rows[keep]
            yield rows, self.pre.normalize_batch(images[keep]), torch.as_tensor(self.targets[rows.numpy()])


def train_batches(manifest: Manifest, rows: np.ndarray, targets: np.ndarray, pre: Preprocessor,
                  augment: TrainTransform, bad: BadImages, batch_size: int, workers: int,
                  seed: int) -> ReadableBatches:
    """Shuffled training batches of ``rows`` (manifest row indices): ``pre``'s view, then ``augment``.

    A last batch of one row would break BatchNorm in train mode, so it is
    dropped (only then).
    """
    lonely = len(rows) > batch_size and len(rows) % batch_size == 1
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(ImageDataset(manifest, pre), batch_size=batch_size, num_workers=workers,
                        sampler=SubsetRandomSampler([int(r) for r in rows], generator=generator),
                        collate_fn=AugmentingCollate(augment), drop_last=lonely, persistent_workers=False)
    return ReadableBatches(loader, targets, bad, pre)


def eval_batches(manifest: Manifest, rows: np.ndarray, targets: np.ndarray, pre: Preprocessor, bad: BadImages,
                 batch_size: int, workers: int) -> ReadableBatches:
    """Batches of ``rows`` in order, preprocessed as at test time (no augmentation)."""
    loader = make_loader(ImageDataset(manifest, pre), [int(r) for r in rows], batch_size, workers)
    return ReadableBatches(loader, targets, bad, pre)
