"""Optimiser, schedule and trainable parts of each fine-tuning mode.

One named parameter group per learning rate (``head``, ``backbone`` or
``backbone.<i>``), a per-step cosine (or constant) schedule per phase, and the
phase plan: ``head`` epochs train the new head only (backbone frozen, in eval
mode), ``full`` epochs train what the mode trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from featcache.extract.zoo.registry import BackboneSpec
from featcache.finetune.config import FinetuneConfig

__all__ = ["make_optimizer", "make_scheduler", "phases", "set_train_mode", "set_trainable", "step_optimizer"]

#: torch's batch-norm layers (what ``freeze_bn`` keeps in eval mode), named without torch's private base class.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

PHASES: tuple[str, ...] = ("head", "full")


def _unit(name: str) -> str:
    """Structural unit of a parameter: ``blocks.3``, ``layer2``, ``features.10``, ``conv_stem``."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _split_groups(named: list[tuple[str, nn.Parameter]], n_groups: int) -> list[list[nn.Parameter]]:
    """Consecutive structural units, cut into ``n_groups`` chunks of (nearly) equal unit count."""
    units: list[str] = []
    for name, _ in named:
        if not units or units[-1] != _unit(name):
            units.append(_unit(name))
    n_groups = max(1, min(n_groups, len(units)))
    bounds = np.linspace(0, len(units), n_groups + 1).round().astype(int)
    group_of = {unit: int(np.searchsorted(bounds, index, side="right") - 1) for index, unit in enumerate(units)}
    groups: list[list[nn.Parameter]] = [[] for _ in range(n_groups)]
    for name, param in named:
        groups[group_of[_unit(name)]].append(param)
    return groups


def _param_groups(model: nn.Module, head_names: Sequence[str], config: FinetuneConfig,
                  phase: str) -> list[dict[str, Any]]:
    head = set(head_names)
    head_params = [p for n, p in model.named_parameters() if n in head]
    backbone = [(n, p) for n, p in model.named_parameters() if n not in head]
    lr = float(config.lr)
    if phase == "head":  # frozen mode, unfreeze warm-up
        return [{"name": "head", "params": head_params, "lr": lr}]
    if config.mode == "scratch":
        return [{"name": "backbone", "params": [p for _, p in backbone], "lr": lr},
                {"name": "head", "params": head_params, "lr": lr}]
    if config.mode == "low_lr":
        return [{"name": "backbone", "params": [p for _, p in backbone], "lr": lr * config.backbone_lr_mult},
                {"name": "head", "params": head_params, "lr": lr}]
    # unfreeze, after warm-up: earliest group at lr * mult, rising geometrically towards the head's lr
    chunks = _split_groups(backbone, config.lr_groups)
    n = len(chunks)
    groups = [{"name": f"backbone.{i}", "params": params, "lr": lr * config.backbone_lr_mult ** ((n - i) / n)}
              for i, params in enumerate(chunks)]
    return groups + [{"name": "head", "params": head_params, "lr": lr}]


def make_optimizer(model: nn.Module, head_names: Sequence[str], config: FinetuneConfig,
                   phase: str = "full") -> torch.optim.Optimizer:
    """The optimizer of one training phase, one named param group per LR.

    Parameters
    ----------
    model : nn.Module
        Model with the new head.
    head_names : sequence of str
        The head's parameter names (from :func:`~featcache.finetune.model.replace_head`).
    config : FinetuneConfig
        ``mode``, ``lr``, ``backbone_lr_mult``, ``lr_groups``, ``optimizer``, ``weight_decay``.
    phase : {"head", "full"}
        ``head``: only the head is trained (``frozen``, ``unfreeze`` warm-up).

    Returns
    -------
    torch.optim.Optimizer
        Groups carry ``name`` (``head``, ``backbone`` or ``backbone.<i>``) and ``lr``.
    """
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is invalid; allowed: 'head', 'full'.")
    groups = _param_groups(model, head_names, config, "head" if config.mode == "frozen" else phase)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay to 0 over ``steps`` (``kind="cosine"``), or a constant LR (``"none"``)."""
    if kind == "none" or steps <= 1:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps)))


def step_optimizer(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler) -> bool:
    """One optimiser step through ``scaler``; the schedule advances only when the optimiser stepped.

    With float16 autocast, :class:`torch.amp.GradScaler` skips the step of a batch whose gradients
    overflowed and lowers its scale (it does so for the first few batches of most runs while it finds its
    scale). Advancing the schedule then would skip learning rates and makes torch warn that
    ``lr_scheduler.step()`` ran before ``optimizer.step()``. A disabled scaler always steps.

    Returns
    -------
    bool
        Whether the optimiser stepped (and the schedule advanced).
    """
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    stepped = scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skipped the step
    if stepped:
        scheduler.step()
    return stepped


def set_trainable(model: nn.Module, head_names: Sequence[str], backbone_trainable: bool) -> None:
    """``requires_grad`` on the head always, on the backbone when ``backbone_trainable``."""
    head = set(head_names)
    for name, param in model.named_parameters():
        param.requires_grad_(backbone_trainable or name in head)


def set_train_mode(model: nn.Module, spec: BackboneSpec, backbone_trainable: bool, freeze_bn: bool = False) -> None:
    """Train mode for what is trained; a frozen backbone stays in eval mode (BatchNorm running stats)."""
    if backbone_trainable:
        model.train()
        if freeze_bn:
            for module in model.modules():
                if isinstance(module, _BATCH_NORMS):
                    module.eval()
    else:
        model.eval()
        model.get_submodule(spec.classifier).train()


def phases(config: FinetuneConfig) -> list[str]:
    """Phase of each epoch: ``head`` (backbone frozen) or ``full``."""
    if config.mode == "frozen":
        return ["head"] * config.epochs
    if config.mode == "unfreeze":
        return ["head"] * config.warmup_epochs + ["full"] * (config.epochs - config.warmup_epochs)
    return ["full"] * config.epochs
