"""The optimiser step under a gradient scaler: the schedule follows the steps actually taken."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from featcache.finetune.optim import make_scheduler, step_optimizer


def _setup(enabled: bool) -> tuple[nn.Linear, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR,
                                  torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer, "cosine", steps=10)
    # GradScaler("cpu") keeps the CUDA scaler's logic (skip on overflow, back off its scale) on the CPU device.
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, enabled=enabled)


def _backward(model: nn.Linear, scaler: torch.amp.GradScaler, overflow: bool) -> None:
    loss = model(torch.ones(4, 3)).sum() * (float("inf") if overflow else 1.0)
    scaler.scale(loss).backward()


def test_an_overflowed_step_skips_the_optimizer_and_the_schedule_without_a_warning():
    model, optimizer, scheduler, scaler = _setup(enabled=True)
    weight = model.weight.detach().clone()
    _backward(model, scaler, overflow=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when the schedule steps before the optimiser
        assert step_optimizer(scaler, optimizer, scheduler) is False
    assert scheduler.last_epoch == 0 and scaler.get_scale() == 8.0
    torch.testing.assert_close(model.weight.detach(), weight)


@pytest.mark.parametrize("enabled", [True, False])
def test_a_finite_step_moves_the_weights_and_the_schedule(enabled: bool):
    model, optimizer, scheduler, scaler = _setup(enabled)
    weight = model.weight.detach().clone()
    optimizer.zero_grad()
    _backward(model, scaler, overflow=False)
    assert step_optimizer(scaler, optimizer, scheduler) is True
    assert scheduler.last_epoch == 1
    assert not torch.equal(model.weight.detach(), weight)
    assert scheduler.get_last_lr()[0] < 0.1
