"""Data loading: decode and preprocess images in DataLoader workers.

A bad image never crashes a worker: its row comes back with an error string
(and a zero tensor), so the extractor can report it by id and skip or fail as
configured.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from featcache.extract.manifest import Manifest
from featcache.extract.preprocess import Preprocessor, load_rgb

__all__ = ["ImageDataset", "make_loader", "default_num_workers"]


class ImageDataset(Dataset):
    """Rows of a manifest as ``(row, tensor, error)`` triples.

    Parameters
    ----------
    source : Manifest or sequence of paths
        Images to read; the dataset index is the manifest row (or list position).
    preprocess : Preprocessor
        PIL RGB image -> (3, S, S) tensor.
    """

    def __init__(self, source: Manifest | Sequence[str | os.PathLike], preprocess: Preprocessor) -> None:
        if isinstance(source, Manifest):
            self.paths = [str(source.absolute_path(row)) for row in range(len(source))]
        else:
            self.paths = [str(path) for path in source]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor, str]:
        try:
            tensor = self.preprocess(load_rgb(self.paths[row], self.preprocess.background))
            return row, tensor, ""
        except Exception as error:  # noqa: BLE001 - every decode failure is reported, not raised
            size = self.preprocess.input_size
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")
            # The reason is stored in the feature file: no machine-specific absolute path in it.
            reason = reason.replace(self.paths[row], os.path.basename(self.paths[row]))
            if not os.path.exists(self.paths[row]):
                reason = "missing file"
            return row, torch.zeros(3, size, size), reason


def _collate(items: list[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    rows = torch.tensor([item[0] for item in items], dtype=torch.int64)
    return rows, torch.stack([item[1] for item in items]), [item[2] for item in items]


def default_num_workers() -> int:
    """Decode workers for this machine: leave one core for the forward pass, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def make_loader(dataset: ImageDataset, rows: Sequence[int], batch_size: int, num_workers: int | None = None,
                pin_memory: bool = False, prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader over the given manifest rows, in order.

    Returns batches ``(rows (B,), images (B, 3, S, S), errors list[str])``.
    """
    workers = default_num_workers() if num_workers is None else num_workers
    return DataLoader(
        dataset, batch_size=batch_size, sampler=list(rows), num_workers=workers, collate_fn=_collate,
        pin_memory=pin_memory, prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
    )
