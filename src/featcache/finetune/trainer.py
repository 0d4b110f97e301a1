"""The training loop: phases, per-phase optimizer and schedule, validation, early stopping, best state.

Batches are ``(rows (B,), images (B, 3, S, S), targets (B,))`` of readable
rows (:class:`~featcache.finetune.data.ReadableBatches`). Classification uses
cross-entropy (weighted per class with ``class_weight="balanced"``:
:func:`~featcache.heads.class_weight.balanced_weights`); regression an MSE on targets standardised with
the train split's mean and std (outputs are de-standardised when scored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from featcache.extract.inputs.manifest import ManifestError
from featcache.extract.zoo.registry import BackboneSpec
from featcache.finetune.config import DEFAULT_SELECTION, FinetuneConfig
from featcache.finetune.optim import (
    make_optimizer,
    make_scheduler,
    phases,
    set_train_mode,
    set_trainable,
    step_optimizer,
)
from featcache.heads.metrics import SELECTION_METRICS, metric_value, selection_key
from featcache.heads.training import epoch_scale

__all__ = ["Fit", "Trainer", "autocast", "predict"]

logger = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA when ``amp``; a no-op elsewhere.

    Parameters
    ----------
    device : torch.device
        Where the forward runs.
    amp : bool
        Mixed precision requested (``FinetuneConfig.amp``).

    Returns
    -------
    contextlib.AbstractContextManager
        ``torch.autocast`` (fp16) or a ``nullcontext``.
    """
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _outputs(model: nn.Module, images: torch.Tensor, task: str) -> torch.Tensor:
    out = model(images).float()
    return out[:, 0] if task == "regression" else out


@torch.no_grad()
def predict(model: nn.Module, batches: Batches, task: str, device: torch.device | str = "cpu",
            tta: bool = False, amp: bool = False, channels_last: bool = True,
            target_mean: float = 0.0, target_std: float = 1.0, *, tta_hflip: bool = False,
            class_weight: torch.Tensor | None = None) -> dict[str, Any]:
    """Score every batch (the model is put in eval mode).

    Parameters
    ----------
    model : nn.Module
        Fine-tuned model.
    batches : iterable
        Batches ``(rows (B,), images (B, 3, S, S), targets (B,))``.
    task : {"classification", "regression"}
        Classification: the model's (B, K) logits become softmax
        probabilities; regression: its first output column (B,) is the
        standardised prediction.
    device : torch.device or str
        Where the model is (the images are moved there).
    tta : bool
        Also return test-time-augmented scores: the mean over the views that
        training's augmentation produces (see ``tta_hflip``).
    amp : bool
        fp16 autocast on CUDA (:func:`autocast`); ignored elsewhere.
    channels_last : bool
        Move the images to the device in channels-last memory format (as the
        model was trained).
    target_mean, target_std : float
        Regression outputs are de-standardised with these.
    tta_hflip : bool
        Whether training flipped images horizontally (``FinetuneConfig.hflip``):
        then the TTA views are the image and its flip; else the image alone, so
        ``tta_scores`` equal ``scores`` (no second pass; a model never trained on
        mirrored images is not scored on them).
    class_weight : torch.Tensor, optional
        Classification: (K,) per-class weights of the cross-entropy ``loss`` (the
        weighted mean, as ``nn.CrossEntropyLoss(weight=...)`` takes it); None: unweighted.

    Returns
    -------
    dict
        ``rows`` (n,), ``y_true`` (n,), ``scores`` ((n, K) probabilities or
        (n,) predictions), ``tta_scores`` (same or None), ``loss`` (mean
        cross-entropy, weighted with ``class_weight``, or MSE in standardised
        units), ``seconds`` (plain pass only).

    Raises
    ------
    ValueError
        If ``batches`` yields no rows (no readable image).
    """
    device = torch.device(device)
    model.eval()
    weight = None if class_weight is None else class_weight.to(device=device, dtype=torch.float32)
    rows, y_true, scores, tta_scores, losses, seconds, total_weight = [], [], [], [], [], 0.0, 0.0

    def convert(out: torch.Tensor) -> torch.Tensor:
        return out.softmax(dim=1) if task == "classification" else out * target_std + target_mean

    for row, images, target in batches:
        images = _to_device(images, device, channels_last)
        start = time.perf_counter()
        with autocast(device, amp):
            out = _outputs(model, images, task)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        target = target.to(device)
        if task == "classification":
            losses.append(F.cross_entropy(out, target.long(), weight=weight, reduction="sum").item())
            if weight is not None:
                total_weight += float(weight[target.long()].sum())
        else:
            losses.append(F.mse_loss(out, (target.float() - target_mean) / target_std, reduction="sum").item())
        scores.append(convert(out).cpu())
        if tta and tta_hflip:
            with autocast(device, amp):
                flipped = _outputs(model, torch.flip(images, dims=[3]), task)
            tta_scores.append(((convert(out) + convert(flipped)) / 2).cpu())
        elif tta:  # one view: the plain prediction
            tta_scores.append(scores[-1])
        rows.append(row)
        y_true.append(target.cpu())
    if not rows:
        raise ManifestError("No readable image in this split; nothing to score. Hint: the 'Skipping unreadable "
                            "image' warnings above name each image and why.")
    n = sum(len(r) for r in rows)
    return {
        "rows": torch.cat(rows).numpy(), "y_true": torch.cat(y_true).numpy(),
        "scores": torch.cat(scores).double().numpy(),
        "tta_scores": torch.cat(tta_scores).double().numpy() if tta else None,
        "loss": float(sum(losses) / (n if weight is None else total_weight)), "seconds": seconds,
    }


def _val_metric(task: str, scored: dict[str, Any], name: str) -> float:
    """The val score that picks the best epoch: ``name``, ``"loss"`` (:func:`predict`'s) or a SELECTION_METRICS one."""
    if name == "loss":
        return float(scored["loss"])
    return metric_value(task, name, scored["y_true"], scored["scores"])


def _val_scores(task: str, scored: dict[str, Any]) -> dict[str, float]:
    """Every :data:`SELECTION_METRICS` point score of the val rows (the run record's ``val``, as the heads')."""
    return {name: metric_value(task, name, scored["y_true"], scored["scores"]) for name in SELECTION_METRICS[task]}


def _better(value: float, best: float | None, name: str) -> bool:
    if best is None:
        return True
    return (value < best) if name == "loss" else selection_key(name, value) < selection_key(name, best)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclass
class Fit:
    """What the training loop hands back.

    Attributes
    ----------
    history : list of dict
        One row per epoch run: ``epoch``, ``phase``, ``steps``, ``lr`` (group -> LR),
        ``train_loss``, ``metric`` (``val_<name>``: ``val_loss`` by default), ``val_loss``, ``val_metric``,
        ``val_scores`` (every SELECTION_METRICS score of the val rows), ``seconds``.
    step_losses : list of float
        Training loss of every optimizer step, in order.
    best_epoch : int
        1-based epoch whose weights the model was left with.
    steps : int
        Optimizer steps taken.
    seconds : float
        Wall time of the loop (training and validation).
    """

    history: list[dict[str, Any]]
    step_losses: list[float]
    best_epoch: int
    steps: int
    seconds: float


class Trainer:
    """The epoch loop of one run; :meth:`fit` leaves the model with the best epoch's weights.

    Parameters
    ----------
    model : nn.Module
        The model to train, already on ``device``.
    spec : BackboneSpec
        Its registry entry (its ``classifier`` module stays in train mode
        while the backbone is frozen).
    head_names : sequence of str
        Parameter names of the new head (trained in every phase).
    config : FinetuneConfig
        Epochs, phases, optimizer, schedule, patience, ``max_train_steps``, ...
    task : {"classification", "regression"}
        Cross-entropy on class indices, or MSE on standardised targets.
    device : torch.device
        Where the batches are moved.
    use_amp : bool
        fp16 autocast and gradient scaling on CUDA.
    target_mean, target_std : float
        Regression: the train split's target mean and std (the loss's standardisation).
    class_weight : torch.Tensor, optional
        Classification: (K,) per-class weights of the training cross-entropy and of
        the val loss (:func:`~featcache.heads.class_weight.balanced_weights`); None: unweighted.

    Attributes
    ----------
    criterion : nn.Module
        The training loss: ``nn.CrossEntropyLoss(weight=class_weight)`` or ``nn.MSELoss()``.
    selection : str
        What picks the best epoch: ``config.selection_metric``, or
        :data:`~featcache.finetune.config.DEFAULT_SELECTION` (``"loss"``: :func:`predict`'s val loss).

    Raises
    ------
    ValueError
        If ``class_weight`` is given for regression.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, head_names: Sequence[str], config: FinetuneConfig,
                 task: str, device: torch.device, use_amp: bool, target_mean: float, target_std: float,
                 class_weight: torch.Tensor | None = None) -> None:
        if class_weight is not None and task != "classification":
            raise ValueError(f"class_weight is for classification; task is {task!r}. Hint: pass class_weight=None.")
        self.model, self.spec, self.head_names, self.config = model, spec, list(head_names), config
        self.task, self.device, self.use_amp = task, device, use_amp
        self.target_mean, self.target_std = target_mean, target_std
        self.class_weight = None if class_weight is None else class_weight.to(device=device, dtype=torch.float32)
        self.criterion: nn.Module = (nn.CrossEntropyLoss(weight=self.class_weight) if task == "classification"
                                     else nn.MSELoss())
        selection = config.selection_metric
        if selection is not None and selection not in SELECTION_METRICS[task]:
            raise ValueError(f"selection_metric={selection!r} is not a {task} metric; allowed: "
                             f"{', '.join(SELECTION_METRICS[task])} or None. Hint: pick one of them.")
        self.selection = selection or DEFAULT_SELECTION[task]
        self.metric_name = f"val_{self.selection}"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.step = 0
        self.step_losses: list[float] = []
        self.last_val = float("nan")

    def _loss(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.use_amp):
            out = _outputs(self.model, images, self.task)
        if self.task == "classification":
            return self.criterion(out, target.long())
        return self.criterion(out, (target.float() - self.target_mean) / self.target_std)

    def _done(self) -> bool:
        return self.config.max_train_steps is not None and self.step >= self.config.max_train_steps

    def _epoch(self, batches: Batches, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR, bar: tqdm, epoch: int) -> list[float]:
        losses: list[float] = []
        for _, images, target in batches:
            loss = self._loss(_to_device(images, self.device, self.config.channels_last), target.to(self.device))
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            step_optimizer(self.scaler, optimizer, scheduler)
            self.step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.config.mode}: training loss is {value} at step {self.step}. "
                                         "Hint: lower lr, or set amp: false.")
            losses.append(value)
            self.step_losses.append(value)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.4f}",
                            **{self.metric_name: f"{self.last_val:.4f}"})
            if self._done():
                break
        return losses

    def _start_phase(self, phase: str, plan: list[str], steps_per_epoch: int
                     ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        set_trainable(self.model, self.head_names, phase == "full")
        optimizer = make_optimizer(self.model, self.head_names, self.config, phase)
        steps = steps_per_epoch * plan.count(phase)
        if self.config.max_train_steps is not None:
            steps = min(steps, max(1, self.config.max_train_steps - self.step))
        logger.info("%s: phase %r, %d epoch(s), groups %s", self.config.mode, phase, plan.count(phase),
                    {g["name"]: f"{g['lr']:.2e}" for g in optimizer.param_groups})
        return optimizer, make_scheduler(optimizer, self.config.schedule, steps)

    def _validate(self, val_batches: Batches | None, row: dict[str, Any], best: float | None) -> bool:
        """Score val into ``row``; True when it is the best so far (always, without a val split)."""
        if val_batches is None:
            return True
        scored = predict(self.model, val_batches, self.task, self.device, amp=self.use_amp,
                         channels_last=self.config.channels_last, target_mean=self.target_mean,
                         target_std=self.target_std, class_weight=self.class_weight)
        self.last_val = _val_metric(self.task, scored, self.selection)
        row.update(val_loss=scored["loss"], val_metric=self.last_val, val_scores=_val_scores(self.task, scored))
        return _better(self.last_val, best, self.selection)

    def _scaled(self, batches: int) -> FinetuneConfig:
        """The config with its epoch counts stretched when an epoch has fewer than ``min_epoch_steps`` batches."""
        scale = epoch_scale(batches, self.config.min_epoch_steps)
        if scale == 1:
            return self.config
        logger.info("%s: %d batch(es) per epoch < min_epoch_steps=%d: epochs, warmup_epochs and patience x %d",
                    self.config.mode, batches, self.config.min_epoch_steps, scale)
        return dataclasses.replace(self.config, epochs=self.config.epochs * scale,
                                   warmup_epochs=self.config.warmup_epochs * scale,
                                   patience=self.config.patience * scale)

    def fit(self, train_batches: Batches, val_batches: Batches | None,
            on_epoch_end: Callable[[dict[str, Any], nn.Module], None] | None) -> Fit:
        """Train, validate every epoch, stop early on val; the model ends with the best epoch's weights.

        Parameters
        ----------
        train_batches : iterable
            Re-iterable batches ``(rows (B,), images (B, 3, S, S), targets (B,))``
            with a ``len`` (batches per epoch).
        val_batches : iterable or None
            The same for the validation split; None keeps the last epoch
            (every epoch counts as the best so far) and never stops early.
        on_epoch_end : callable, optional
            ``on_epoch_end(history_row, model)`` after each epoch.

        Returns
        -------
        Fit

        Raises
        ------
        ValueError
            If an epoch had no readable training image.
        FloatingPointError
            If the training loss is not finite.
        """
        config = self._scaled(len(train_batches))  # type: ignore[arg-type]
        plan = phases(config)
        history: list[dict[str, Any]] = []
        best_metric: float | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch, since_best, phase = 0, 0, ""
        start = time.perf_counter()
        total = len(train_batches) * config.epochs  # type: ignore[arg-type]
        bar = tqdm(total=min(total, config.max_train_steps or total), disable=not config.progress,
                   desc=f"finetune {config.mode}", unit="step", leave=False)
        for epoch, epoch_phase in enumerate(plan, start=1):
            if epoch_phase != phase:
                phase, since_best = epoch_phase, 0
                optimizer, scheduler = self._start_phase(phase, plan, len(train_batches))  # type: ignore[arg-type]
            set_train_mode(self.model, self.spec, phase == "full", config.freeze_bn)
            epoch_start = time.perf_counter()
            lrs = {group["name"]: float(group["lr"]) for group in optimizer.param_groups}
            losses = self._epoch(train_batches, optimizer, scheduler, bar, epoch)
            if not losses and not self._done():
                raise ManifestError(f"{config.mode}: epoch {epoch} had no readable training image (every train "
                                    "image failed to decode). Hint: the 'Skipping unreadable image' warnings above "
                                    "name each image and why.")
            row: dict[str, Any] = {"epoch": epoch, "phase": phase, "steps": len(losses), "lr": lrs,
                                   "train_loss": float(np.mean(losses)) if losses else None,
                                   "metric": self.metric_name, "val_loss": None, "val_metric": None,
                                   "val_scores": None}
            improved = self._validate(val_batches, row, best_metric)
            row["seconds"] = time.perf_counter() - epoch_start
            history.append(row)
            if improved:
                best_metric, best_epoch, since_best = row["val_metric"], epoch, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            else:
                since_best += 1
            logger.info("%s epoch %d/%d (%s): train loss %s, %s %s, %.1fs", config.mode, epoch, config.epochs,
                        phase, _fmt(row["train_loss"]), self.metric_name, _fmt(row["val_metric"]), row["seconds"])
            if on_epoch_end is not None:
                on_epoch_end(row, self.model)
            if self._done():
                break
            # Early stopping applies to the final phase only (a warm-up phase always runs to its end).
            if config.patience and since_best >= config.patience and phase == plan[-1]:
                logger.info("%s: early stop after epoch %d (best %d)", config.mode, epoch, best_epoch)
                break
        bar.close()
        assert best_state is not None
        self.model.load_state_dict(best_state)
        return Fit(history, self.step_losses, best_epoch, self.step, time.perf_counter() - start)
