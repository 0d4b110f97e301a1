"""Test-time augmentation scores only the views that training's augmentation produces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featcache.finetune.trainer import predict


class _Recorder(nn.Module):
    """A linear classifier that is not mirror-invariant and records every batch it scores."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().clone())
        return self.linear(images.flatten(1))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.arange(start, start + 3), torch.rand(3, 3, 8, 8, generator=generator), torch.tensor([0, 1, 2]))
            for start in (0, 3)]


def _is_flip(image: torch.Tensor, batches) -> bool:
    return any(torch.equal(image, torch.flip(images, dims=[3])) for _, images, _ in batches)


def test_without_hflip_tta_never_scores_a_flipped_view():
    torch.manual_seed(0)
    model, batches = _Recorder(), _batches()
    scored = predict(model, batches, "classification", tta=True, channels_last=False, tta_hflip=False)
    assert not any(_is_flip(seen, batches) for seen in model.seen)
    assert len(model.seen) == len(batches)  # one pass: the center crop is the only view
    assert (scored["tta_scores"] == scored["scores"]).all()


def test_with_hflip_tta_averages_the_view_and_its_flip():
    torch.manual_seed(0)
    model, batches = _Recorder(), _batches()
    scored = predict(model, batches, "classification", tta=True, channels_last=False, tta_hflip=True)
    assert sum(_is_flip(seen, batches) for seen in model.seen) == len(batches)
    with torch.no_grad():
        images = torch.cat([images for _, images, _ in batches])
        plain = model.linear(images.flatten(1)).softmax(dim=1)
        flipped = model.linear(torch.flip(images, dims=[3]).flatten(1)).softmax(dim=1)
    assert scored["tta_scores"] == pytest.approx(((plain + flipped) / 2).double().numpy(), abs=1e-6)
    assert not (scored["tta_scores"] == scored["scores"]).all()
