"""The trainer's floor on optimiser steps per epoch (``min_epoch_steps``), on a toy model (no backbone).

A 180-row train split at batch 32 makes 6 steps per epoch: with the shipped frozen recipe (10 epochs,
patience 2) the head stopped after 18 steps at a test RMSE 12x the ridge's on the same features
(benchmarks/README.md, "Fine-tuning on small data").
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from featcache.finetune.config import PARAMS_DEFAULTS, FinetuneConfig
from featcache.finetune.trainer import Trainer


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)
        self.classifier = nn.Linear(4, 2)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(images).mean(dim=(2, 3)))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(n)
    return [(torch.arange(4), torch.rand(4, 3, 4, 4, generator=generator), torch.tensor([0, 1, 0, 1]))
            for _ in range(n)]


def _fit(n_batches: int, **overrides: Any) -> Any:
    torch.manual_seed(0)
    values: dict[str, Any] = {"mode": "frozen", "epochs": 2, "patience": 0, "lr": 1e-9, "n_boot": 0,
                              "progress": False, "channels_last": False, "device": "cpu", "amp": False}
    config = FinetuneConfig(**{**values, **overrides})
    model = _Toy()
    trainer = Trainer(model, SimpleNamespace(classifier="classifier"), ["classifier.weight", "classifier.bias"],
                      config, "classification", torch.device("cpu"), False, 0.0, 1.0)
    # val: the same 4 rows; a zero head and lr 1e-9 keep val accuracy at 0.5, so no epoch after the first improves
    return trainer.fit(_batches(n_batches), _batches(1), None)


def test_short_epochs_are_stretched_to_min_epoch_steps():
    fit = _fit(3, min_epoch_steps=6)  # 3 batches per epoch < 6: epochs x 2
    assert len(fit.history) == 4 and fit.steps == 12


def test_epochs_of_enough_batches_are_unchanged():
    fit = _fit(3, min_epoch_steps=3)
    assert len(fit.history) == 2 and fit.steps == 6
    assert len(_fit(3).history) == 2  # the API's default: no floor


def test_patience_is_stretched_too():
    fit = _fit(3, epochs=10, patience=1, min_epoch_steps=6)  # patience 1 x 2: stops 2 epochs after the best (1)
    assert fit.best_epoch == 1 and len(fit.history) == 3


def test_unfreeze_warmup_is_stretched_with_the_epochs():
    fit = _fit(3, mode="unfreeze", epochs=2, warmup_epochs=1, min_epoch_steps=6)
    assert [row["phase"] for row in fit.history] == ["head", "head", "full", "full"]


def test_min_epoch_steps_is_checked_and_the_pipeline_default_floors_small_splits():
    with pytest.raises(ValueError, match="min_epoch_steps"):
        FinetuneConfig(min_epoch_steps=0)
    assert PARAMS_DEFAULTS["min_epoch_steps"] == 32  # > the 6 batches of 180 rows, <= the digits' 34
