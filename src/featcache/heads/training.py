"""Torch building blocks shared by the MLP heads (in-memory and streamed).

:func:`build_mlp` (Linear-BatchNorm1d-ReLU-Dropout blocks), :func:`train_epochs`
(AdamW epochs with early stopping on the validation loss, keeping the best
weights; :func:`epoch_scale` stretches its epoch counts on small data), the
thread-count scope and the mini-batch shuffler. torch is imported lazily inside
each function.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from featcache.errors import ParamError
from featcache.util.compute import torch_threads

from .metrics import selection_key

if TYPE_CHECKING:
    import torch

__all__ = ["PREDICT_BATCH", "build_mlp", "epoch_scale", "iter_batches", "predict_batches", "train_epochs"]

log = logging.getLogger(__name__)

PREDICT_BATCH = 8192
"""Rows per forward pass at predict time."""


def build_mlp(n_in: int, hidden_sizes: Sequence[int], n_out: int, dropout: float) -> torch.nn.Sequential:
    """Blocks of Linear-BatchNorm1d-ReLU-Dropout, then a Linear output layer.

    Parameters
    ----------
    n_in : int
        Input features D.
    hidden_sizes : sequence of int
        Width of each hidden block (empty: a linear model).
    n_out : int
        K logits (classification) or 1 (regression).
    dropout : float
        Dropout probability after each block.

    Returns
    -------
    torch.nn.Sequential
        Maps (n, D) float32 to (n, n_out).
    """
    from torch import nn

    layers: list[nn.Module] = []
    width = n_in
    for size in hidden_sizes:
        layers += [nn.Linear(width, int(size)), nn.BatchNorm1d(int(size)), nn.ReLU(), nn.Dropout(dropout)]
        width = int(size)
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def iter_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled mini-batch indices; a final batch of one row is dropped (BatchNorm)."""
    import torch

    perm = torch.randperm(n, generator=generator)
    batches = list(torch.split(perm, batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches.pop()
    return batches


def epoch_scale(steps: int, min_epoch_steps: int) -> int:
    """How many epochs of ``steps`` optimiser steps count as one in ``patience`` and ``max_epochs``.

    Below ``min_epoch_steps`` mini-batches of training rows an epoch is one or a
    few optimiser steps, so a patience and an epoch budget tuned on larger data
    would stop the network after a handful of updates (benchmarks/README.md, "The
    MLP on small data").

    Parameters
    ----------
    steps : int
        Optimiser steps of one epoch (the first epoch's).
    min_epoch_steps : int
        The fewest steps an epoch counts for.

    Returns
    -------
    int
        ``ceil(min_epoch_steps / steps)``, at least 1.
    """
    return max(1, -(-min_epoch_steps // max(steps, 1)))


def train_epochs(
    head: Any,
    module: torch.nn.Module,
    epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    validate: Callable[[torch.nn.Module], tuple[float, float]],
) -> tuple[list[dict[str, float]], int, float]:
    """The MLP training loop: AdamW epochs, early stopping on the validation loss.

    Shared by the in-memory heads and :class:`~featcache.heads.streaming_mlp.StreamingMLPHead`
    (which feeds mini-batches streamed chunk by chunk).

    Parameters
    ----------
    head : MLP head
        Supplies ``lr``, ``weight_decay``, ``max_epochs``, ``patience``,
        ``min_epoch_steps`` and the loss. ``patience`` and ``max_epochs`` count
        epochs of at least ``min_epoch_steps`` optimiser steps: when the first epoch
        makes fewer steps (fewer training rows than ``min_epoch_steps`` mini-batches),
        both are multiplied by ``ceil(min_epoch_steps / steps)`` (:func:`epoch_scale`).
    module : torch.nn.Module
        Trained in place; on return it holds the weights of the best epoch.
    epoch_batches : callable
        ``epoch_batches()`` yields one epoch of ``(x, target)`` mini-batch tensors,
        x of shape (b, D_in), already shuffled.
    validate : callable
        ``validate(module)`` returns ``(val_loss, val_score)``; called in eval mode
        under ``torch.no_grad()``. With the head's ``selection_metric`` set, ``val_score``
        is that metric, and the best epoch (and ``patience``) follow it instead of the loss.

    Returns
    -------
    history : list of dict
        ``epoch``, ``train_loss``, ``val_loss``, ``val_score`` per epoch run.
    best_epoch : int
        1-based epoch of the lowest validation loss (best ``selection_metric``).
    best_loss : float
        The validation loss at ``best_epoch``.
    """
    import torch

    loss_fn = head.loss_function(next(module.parameters()).device)
    optim = torch.optim.AdamW(module.parameters(), lr=head.lr, weight_decay=head.weight_decay)
    history: list[dict[str, float]] = []
    best_key, best_loss, best_epoch, best_state = float("inf"), float("inf"), 0, None
    epoch, scale = 0, 1
    while epoch < head.max_epochs * scale:
        epoch += 1
        module.train()
        total, seen, steps = 0.0, 0, 0
        for xb, tb in epoch_batches():
            optim.zero_grad(set_to_none=True)
            loss = loss_fn(head.output_transform(module(xb)), tb)
            loss.backward()
            optim.step()
            total += loss.item() * xb.shape[0]
            seen += xb.shape[0]
            steps += 1
        if epoch == 1:
            scale = epoch_scale(steps, head.min_epoch_steps)
            if scale > 1:
                log.info("%s: an epoch is %d optimiser step(s), under min_epoch_steps=%d: patience %d and max_epochs "
                         "%d count x%d epochs", type(head).__name__, steps, head.min_epoch_steps, head.patience,
                         head.max_epochs, scale)
        module.eval()
        with torch.no_grad():
            val_loss, val_score = validate(module)
        history.append({
            "epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss, "val_score": val_score,
        })
        metric = head.selection_metric
        key = val_loss if metric is None or not val_loss < float("inf") else selection_key(metric, val_score)
        if key < best_key:
            best_key, best_loss, best_epoch = key, val_loss, epoch
            best_state = copy.deepcopy(module.state_dict())
        elif epoch - best_epoch >= head.patience * scale:
            break
    if best_state is None:
        raise ParamError(
            f"{type(head).__name__} diverged: validation loss is not finite (lr={head.lr}). "
            "Hint: lower lr or check the features for extreme values."
        )
    module.load_state_dict(best_state)
    return history, best_epoch, best_loss


def predict_batches(
    module: torch.nn.Module, X: Any, n_threads: int, output: Callable[[torch.Tensor], torch.Tensor]
) -> Any:
    """Outputs of ``module`` (eval mode) on ``X`` (n, D_in), ``PREDICT_BATCH`` rows at a time.

    Returns
    -------
    ndarray of shape (n, n_out) or (n,), float64
        ``output`` applied to each batch's raw outputs.
    """
    import numpy as np
    import torch

    device = next(module.parameters()).device
    outs = []
    with torch_threads(n_threads), torch.inference_mode():
        for start in range(0, X.shape[0], PREDICT_BATCH):
            batch = torch.as_tensor(X[start:start + PREDICT_BATCH], dtype=torch.float32, device=device)
            outs.append(output(module(batch)).double().cpu().numpy())
    return np.concatenate(outs)
