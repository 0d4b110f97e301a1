"""End-to-end fine-tuning: the baseline that cached-feature heads must beat or approach.

A registered backbone gets a new linear output layer (K classes, or 1 output for
regression) and is trained on the manifest's train split, with model selection
(early stopping) on its val split and scores on its test split: the same rows,
split and metrics (:func:`featcache.heads.metrics.metrics_with_ci`) as the heads
trained on cached features, so both land in one report.

Modes (the seed recipes):

``frozen``
    Backbone frozen (``requires_grad=False`` and eval mode, so BatchNorm keeps
    its running statistics), only the new head is trained. Chainer's
    ``disable_update()``.
``low_lr``
    Everything is trained; the backbone's learning rate is
    ``backbone_lr_mult`` x the head's (Chainer / Gluon fine-tuning).
``unfreeze``
    ``warmup_epochs`` with the backbone frozen (head only), then everything is
    unfrozen with discriminative learning rates: the backbone is cut into
    ``lr_groups`` consecutive groups whose rates rise geometrically from
    ``backbone_lr_mult`` x lr (earliest layers) to lr (the head) (fast.ai
    ``fine_tune``).
``scratch``
    Same architecture, random initialisation, everything trained at lr.

Weights are copied with :func:`load_weights_with_report` (the Chainer
``copy_model`` lesson): a tensor is copied only when its name and shape match,
and everything that is not copied is listed, so a 1000-class head that meets a
10-class model is reported and left freshly initialised, never half-loaded.

Checkpoints are plain state dicts (``torch.load(..., weights_only=True)``).
:func:`export_backbone` writes the fine-tuned backbone in the registry's own
architecture (original classifier shape) so that
``load_backbone(name, weights=path)`` and therefore the extract stage accept
it; :func:`export_onnx` writes the fine-tuned classifier as ONNX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from featcache.extract.manifest import Manifest
from featcache.extract.preprocess import RESIZE_MODES, Preprocessor, load_rgb
from featcache.extract.registry import BackboneSpec, get_backbone
from featcache.extract.weights import load_backbone
from featcache.heads.metrics import metrics_with_ci
from featcache.store.schema import SPLIT_CODES

__all__ = [
    "MODES",
    "FinetuneConfig",
    "FinetuneResult",
    "WeightCopyReport",
    "build_model",
    "export_backbone",
    "export_onnx",
    "finetune",
    "head_module_name",
    "load_checkpoint",
    "load_weights_with_report",
    "make_optimizer",
    "predict",
    "replace_head",
]

logger = logging.getLogger(__name__)

#: Fine-tuning recipes, see the module docstring.
MODES: tuple[str, ...] = ("frozen", "low_lr", "unfreeze", "scratch")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
SCHEDULES: tuple[str, ...] = ("cosine", "none")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Checkpoint file names written by :func:`finetune` into ``out_dir``.
CHECKPOINT_NAME, META_NAME, REPORT_NAME, HISTORY_NAME = "model.pt", "model.json", "weight_report.json", "history.json"


# ============================================================================ config
@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run.

    Attributes
    ----------
    mode : str
        One of :data:`MODES`.
    epochs : int
        Total epochs (for ``unfreeze`` the warm-up epochs are included).
    batch_size : int
        Training mini-batch size (evaluation uses twice this).
    lr : float
        Learning rate of the new head (and of everything in ``scratch``).
    backbone_lr_mult : float
        Backbone LR = ``backbone_lr_mult`` x ``lr`` in ``low_lr``; the earliest
        backbone group's multiplier in ``unfreeze``.
    warmup_epochs : int
        ``unfreeze`` only: epochs with the backbone frozen before unfreezing.
    lr_groups : int
        ``unfreeze`` only: number of consecutive backbone groups with their own LR.
    optimizer : {"adamw", "sgd"}
        AdamW, or SGD with Nesterov momentum ``momentum``.
    momentum : float
        SGD momentum.
    weight_decay : float
        Decoupled (AdamW) or L2 (SGD) weight decay, on every trained tensor.
    schedule : {"cosine", "none"}
        Per-step cosine decay to 0 over each phase, or a constant LR.
    patience : int
        Stop after this many epochs without a better val metric; 0 never stops early.
    random_resized_crop : bool
        Train-time ``RandomResizedCrop`` (after the same resize as at test time).
    crop_scale : tuple of float
        Area range of the random crop.
    hflip : bool
        Train-time random horizontal flip (off for mirror-sensitive data such as digits).
    freeze_bn : bool
        Keep BatchNorm layers in eval mode while the backbone trains (running
        statistics fixed, affine parameters still learnt): steadier with small
        batches or data far from ImageNet.
    input_size : int or None
        Network input side; None keeps the registry's (e.g. 224). Smaller inputs
        fit CPU budgets (64-128 for tiny images).
    resize_mode : {"crop", "squash"}
        As in :class:`~featcache.extract.preprocess.Preprocessor`.
    amp : bool
        Mixed precision (``torch.autocast`` fp16 + ``GradScaler``); CUDA only, ignored on CPU.
    tta : bool
        Also score the test split with test-time augmentation (the mean of the
        center crop's and its horizontal flip's outputs), reported as ``tta_*``.
    channels_last : bool
        NHWC memory format (faster convolutions on CPU and GPU).
    seed : int
        Seeds head initialisation, shuffling and augmentation.
    num_workers : int
        DataLoader decode workers (0: decode in the training process).
    num_threads : int or None
        torch intra-op threads during the run (restored afterwards); None leaves torch's setting.
    device : {"auto", "cpu", "cuda"}
        ``auto`` picks CUDA when available.
    max_train_steps : int or None
        Stop after this many optimizer steps (tests, smoke runs).
    n_boot : int
        Bootstrap resamples of the test-metric confidence intervals.
    progress : bool
        Show a tqdm bar with the running loss and the last val metric.
    """

    mode: str = "low_lr"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    warmup_epochs: int = 1
    lr_groups: int = 3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.01
    schedule: str = "cosine"
    patience: int = 3
    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    freeze_bn: bool = False
    input_size: int | None = None
    resize_mode: str = "crop"
    amp: bool = True
    tta: bool = True
    channels_last: bool = True
    seed: int = 0
    num_workers: int = 0
    num_threads: int | None = None
    device: str = "auto"
    max_train_steps: int | None = None
    n_boot: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        choices = {"mode": MODES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "device": DEVICES,
                   "resize_mode": RESIZE_MODES}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{name}={value!r} is invalid.{hint} Allowed: {', '.join(allowed)}.")
        _int("epochs", self.epochs, 1)
        _int("batch_size", self.batch_size, 1)
        _int("warmup_epochs", self.warmup_epochs, 0)
        _int("lr_groups", self.lr_groups, 1)
        _int("patience", self.patience, 0)
        _int("num_workers", self.num_workers, 0)
        _int("n_boot", self.n_boot, 0)
        _int("seed", self.seed, 0)
        if self.input_size is not None:
            _int("input_size", self.input_size, 16)
        if self.num_threads is not None:
            _int("num_threads", self.num_threads, 1)
        if self.max_train_steps is not None:
            _int("max_train_steps", self.max_train_steps, 1)
        for name in ("lr", "backbone_lr_mult"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is invalid; allowed: a positive number.")
        for name in ("weight_decay", "momentum"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is invalid; allowed: a number >= 0.")
        low, high = self.crop_scale if len(self.crop_scale) == 2 else (0.0, -1.0)
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale={self.crop_scale!r} is invalid; allowed: (low, high) with "
                             "0 < low <= high <= 1, e.g. (0.5, 1.0).")
        if self.mode == "unfreeze" and self.warmup_epochs >= self.epochs:
            raise ValueError(f"unfreeze needs warmup_epochs < epochs (got warmup_epochs={self.warmup_epochs}, "
                             f"epochs={self.epochs}); otherwise the backbone is never unfrozen. "
                             "Hint: use mode 'frozen' for head-only training.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """Build a config from a mapping, naming any unknown key and a close match."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in allowed]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, allowed, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"Unknown fine-tuning setting(s): {', '.join(hints)}. Allowed: {', '.join(allowed)}.")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        out = dataclasses.asdict(self)
        out["crop_scale"] = list(self.crop_scale)
        return out


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {minimum}.")


# ============================================================================ heads and weights
def head_module_name(spec: BackboneSpec) -> str:
    """Module path of a backbone's classifier (timm ``classifier``, torchvision ``fc`` / ``classifier.6``).

    Read from the registry: the last flat, pre-activation alias (``logits``,
    ``fc6``, ``fc8``, ``loss3_fc``) is the output layer.
    """
    outputs = [alias.node for alias in spec.layers.values() if alias.kind == "flat" and not alias.post_relu]
    if not outputs:
        raise ValueError(f"Backbone {spec.name!r} has no output-layer alias in the registry.")
    return outputs[-1]


def replace_head(model: nn.Module, spec: BackboneSpec, n_outputs: int) -> tuple[nn.Module, list[str]]:
    """Swap the classifier for a new, freshly initialised ``nn.Linear`` with ``n_outputs`` outputs.

    Parameters
    ----------
    model : nn.Module
        A registry architecture (changed in place).
    spec : BackboneSpec
        Its registry entry.
    n_outputs : int
        K classes, or 1 for regression.

    Returns
    -------
    model : nn.Module
        The same object, with the new head.
    head_param_names : list of str
        Names of the new head's parameters (``["fc.weight", "fc.bias"]``).
    """
    _int("n_outputs", n_outputs, 1)
    name = head_module_name(spec)
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{spec.name}: expected nn.Linear at {name!r}, found {type(old).__name__}.")
    new = nn.Linear(old.in_features, n_outputs, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if hasattr(model, "num_classes"):
        model.num_classes = n_outputs  # timm bookkeeping
    return model, [f"{name}.{param}" for param, _ in new.named_parameters()]


@dataclass
class WeightCopyReport:
    """What :func:`load_weights_with_report` copied and what it left alone.

    Attributes
    ----------
    copied : list of str
        Model tensors overwritten from the source (name and shape matched).
    skipped_shape_mismatch : dict
        name -> ``{"source": shape, "model": shape}``; the model keeps its own tensor.
    skipped_module_mismatch : list of str
        Tensors whose name and shape match but whose module has a mismatched
        sibling (e.g. a head with the same width but another class count): the
        whole module keeps its initialisation, so nothing is half-loaded.
    skipped_name_missing : list of str
        Source tensors with no tensor of that name in the model.
    missing_in_source : list of str
        Model tensors the source lacks (kept as initialised).
    source : str
        Where the weights came from (a weights id).
    """

    copied: list[str] = field(default_factory=list)
    skipped_shape_mismatch: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    skipped_module_mismatch: list[str] = field(default_factory=list)
    skipped_name_missing: list[str] = field(default_factory=list)
    missing_in_source: list[str] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (with counts)."""
        out = dataclasses.asdict(self)
        out["counts"] = {key: len(value) for key, value in out.items() if isinstance(value, (list, dict))}
        return out

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return _write_json(Path(path), self.to_dict())

    @property
    def not_copied(self) -> list[str]:
        """Every model tensor that kept its initialisation."""
        return sorted([*self.skipped_shape_mismatch, *self.skipped_module_mismatch, *self.missing_in_source])

    def __str__(self) -> str:
        summary = (f"Weight copy from {self.source or 'state dict'}: {len(self.copied)} tensors copied, "
                   f"{len(self.skipped_shape_mismatch)} shape-mismatched, "
                   f"{len(self.skipped_module_mismatch)} skipped with a mismatched module, "
                   f"{len(self.skipped_name_missing)} not in the model, "
                   f"{len(self.missing_in_source)} not in the source.")
        lines = [summary]
        for name, shapes in self.skipped_shape_mismatch.items():
            lines.append(f"  shape mismatch (kept new): {name}: source {tuple(shapes['source'])} "
                         f"-> model {tuple(shapes['model'])}")
        for title, names in (("module mismatch (kept new)", self.skipped_module_mismatch),
                             ("not in the model", self.skipped_name_missing),
                             ("not in the source (kept new)", self.missing_in_source)):
            shown = ", ".join(names[:8]) + (f", ... (+{len(names) - 8})" if len(names) > 8 else "")
            if names:
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)


def load_weights_with_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                             source: str = "") -> WeightCopyReport:
    """Copy every source tensor whose name and shape match a model tensor; report the rest.

    A module (the prefix before the last ``.``) is copied all or nothing: if any
    of its tensors has a shape mismatch, none of them is copied, so a layer is
    never half-loaded (Chainer's ``copy_model`` lesson).

    Parameters
    ----------
    model : nn.Module
        Target, changed in place (parameters and buffers).
    state_dict : mapping of str to torch.Tensor
        Source tensors (e.g. a pretrained 1000-class backbone's state dict).
    source : str
        Description stored in the report.

    Returns
    -------
    WeightCopyReport
    """
    target = model.state_dict()
    report = WeightCopyReport(source=source)
    bad_modules = set()
    for name, tensor in target.items():
        if name in state_dict and tuple(state_dict[name].shape) != tuple(tensor.shape):
            report.skipped_shape_mismatch[name] = {"source": list(state_dict[name].shape),
                                                   "model": list(tensor.shape)}
            bad_modules.add(name.rpartition(".")[0])
    with torch.no_grad():
        for name, tensor in target.items():
            if name in report.skipped_shape_mismatch:
                continue
            if name not in state_dict:
                report.missing_in_source.append(name)
            elif name.rpartition(".")[0] in bad_modules:
                report.skipped_module_mismatch.append(name)
            else:
                tensor.copy_(state_dict[name])
                report.copied.append(name)
    report.skipped_name_missing = [name for name in state_dict if name not in target]
    logger.info("%s", report)
    return report


def build_model(backbone: str, n_outputs: int, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The registry architecture (random weights) with a new ``n_outputs`` head.

    Returns
    -------
    model : nn.Module
    head_param_names : list of str
    """
    model, head_names, _ = _build(get_backbone(backbone), n_outputs, seed)
    return model, head_names


def _build(spec: BackboneSpec, n_outputs: int, seed: int) -> tuple[nn.Module, list[str], dict[str, torch.Tensor]]:
    """Random architecture + new head; also returns the architecture's own (seeded random) head."""
    loaded = load_backbone(spec.name, "random", seed=seed)
    original_head = _original_head(spec, loaded.model)
    model, head_names = replace_head(loaded.model, spec, n_outputs)
    if spec.arch == "googlenet":
        model.transform_input = True  # as load_backbone sets for any non-random weights file
    return model, head_names, original_head


def load_checkpoint(path: str | Path, backbone: str, n_outputs: int) -> nn.Module:
    """Rebuild a fine-tuned model from its state-dict checkpoint (``weights_only=True``), in eval mode."""
    model, _ = build_model(backbone, n_outputs)
    model.load_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _original_head(spec: BackboneSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    prefix = head_module_name(spec) + "."
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


# ============================================================================ data
class _TrainTransform:
    """Resize as at test time, then random-resized-crop (or center-crop), optional flip, normalise."""

    def __init__(self, pre: Preprocessor, random_crop: bool, scale: tuple[float, float], hflip: bool) -> None:
        self.pre = pre
        self.interpolation = T.InterpolationMode(pre.interpolation)
        self.crop = (T.RandomResizedCrop(pre.input_size, scale=scale, interpolation=self.interpolation,
                                         antialias=True) if random_crop else T.CenterCrop(pre.input_size))
        self.hflip = hflip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pre = self.pre
        if pre.resize_mode == "squash":
            side = max(pre.input_size, pre.resize_size if min(image.size) >= pre.input_size else pre.input_size)
            image = TF.resize(image, [side, side], interpolation=self.interpolation)
        else:
            target = pre.input_size if min(image.size) < pre.input_size else pre.resize_size
            image = TF.resize(image, target, interpolation=self.interpolation)
        image = self.crop(image)
        if self.hflip and torch.rand(()) < 0.5:
            image = TF.hflip(image)
        tensor = TF.pil_to_tensor(image).to(torch.float32).div_(255.0)
        return TF.normalize(tensor, pre.mean, pre.std)


class _Rows(Dataset):
    """Manifest rows as ``(row, image tensor, target)``; an unreadable image gives ``None``."""

    def __init__(self, manifest: Manifest, rows: np.ndarray, targets: np.ndarray,
                 transform: Callable[[Image.Image], torch.Tensor], pre: Preprocessor) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.paths = [str(manifest.absolute_path(int(row))) for row in self.rows]
        self.targets = targets
        self.transform = transform
        self.background = pre.background
        # The preprocessor's decompression-bomb limit, where this featcache version has one.
        self.limit = (pre.max_image_pixels,) if hasattr(pre, "max_image_pixels") else ()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, float] | None:
        try:
            image = load_rgb(self.paths[index], self.background, *self.limit)
        except Exception as error:  # noqa: BLE001 - reported by id, the run goes on
            logger.warning("Skipping unreadable image %s: %s: %s", self.paths[index], type(error).__name__, error)
            return None
        return int(self.rows[index]), self.transform(image), self.targets[self.rows[index]]


def _collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    items = [item for item in items if item is not None]
    if not items:
        return None
    rows = torch.tensor([item[0] for item in items], dtype=torch.int64)
    targets = torch.tensor(np.asarray([item[2] for item in items]))
    return rows, torch.stack([item[1] for item in items]), targets


def _loader(dataset: _Rows, batch_size: int, shuffle: bool, workers: int, seed: int,
            drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=_collate,
                      generator=generator, drop_last=drop_last, persistent_workers=False)


# ============================================================================ optimisation
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
        The head's parameter names (from :func:`replace_head`).
    config : FinetuneConfig
        ``mode``, ``lr``, ``backbone_lr_mult``, ``lr_groups``, ``optimizer``, ``weight_decay``.
    phase : {"head", "full"}
        ``head``: only the head is trained (``frozen``, ``unfreeze`` warm-up).

    Returns
    -------
    torch.optim.Optimizer
        Groups carry ``name`` (``head``, ``backbone`` or ``backbone.<i>``) and ``lr``.
    """
    if phase not in ("head", "full"):
        raise ValueError(f"phase={phase!r} is invalid; allowed: 'head', 'full'.")
    groups = _param_groups(model, head_names, config, "head" if config.mode == "frozen" else phase)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, kind: str, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    if kind == "none" or steps <= 1:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps)))


def _set_trainable(model: nn.Module, head_names: Sequence[str], backbone_trainable: bool) -> None:
    head = set(head_names)
    for name, param in model.named_parameters():
        param.requires_grad_(backbone_trainable or name in head)


def _set_train_mode(model: nn.Module, spec: BackboneSpec, backbone_trainable: bool, freeze_bn: bool = False) -> None:
    """Train mode for what is trained; a frozen backbone stays in eval mode (BatchNorm running stats)."""
    if backbone_trainable:
        model.train()
        if freeze_bn:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
    else:
        model.eval()
        model.get_submodule(head_module_name(spec)).train()


# ============================================================================ results
@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`.

    Attributes
    ----------
    model : nn.Module
        The best checkpoint's model, in eval mode, on the CPU.
    metrics : dict
        Test metrics with ``ci`` (as :func:`metrics_with_ci`), ``tta_<metric>``
        beside each scalar metric when TTA ran, and ``n_train``, ``n_val``,
        ``n_features``, ``fit_seconds``, ``predict_seconds``, ``best_params``.
    history : list of dict
        Per epoch: ``epoch``, ``phase``, ``steps``, ``train_loss``, ``val_loss``,
        ``val_metric`` (``val_accuracy`` or ``val_rmse``), ``lr`` (group -> LR), ``seconds``.
    step_losses : list of float
        Training loss of every optimizer step, in order.
    best_epoch, epochs_run, steps : int
        1-based epoch of the kept checkpoint, epochs run, optimizer steps taken.
    fit_seconds, predict_seconds : float
        Training (incl. val) and plain test inference wall time.
    report : WeightCopyReport
        What was copied from the source weights.
    test_rows : numpy.ndarray
        (n,) manifest rows scored on test (unreadable images are left out).
    y_true : numpy.ndarray
        (n,) labels or targets of ``test_rows``.
    y_score : numpy.ndarray
        (n, K) probabilities or (n,) predictions.
    tta_score : numpy.ndarray or None
        Same shapes, with test-time augmentation.
    """

    model: nn.Module
    spec: BackboneSpec
    config: FinetuneConfig
    task: str
    classes: list[str]
    head_names: list[str]
    original_head: dict[str, torch.Tensor]
    report: WeightCopyReport
    weights_id: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    step_losses: list[float]
    best_epoch: int
    epochs_run: int
    steps: int
    fit_seconds: float
    predict_seconds: float
    n_features: int
    input_size: int
    target_mean: float
    target_std: float
    test_rows: np.ndarray
    y_true: np.ndarray
    y_score: np.ndarray
    tta_score: np.ndarray | None
    checkpoint_path: Path | None = None

    @property
    def n_outputs(self) -> int:
        """K classes, or 1 (regression)."""
        return len(self.classes) if self.task == "classification" else 1

    @property
    def y_pred(self) -> np.ndarray:
        """(n,) predicted class indices (classification) or values (regression)."""
        return self.y_score.argmax(axis=1) if self.task == "classification" else self.y_score

    def metadata(self) -> dict[str, Any]:
        """What is needed to rebuild and use the checkpoint (written as ``model.json``)."""
        return {
            "format": "featcache-finetune/1", "backbone": self.spec.name, "weights": self.weights_id,
            "mode": self.config.mode, "task": self.task, "classes": list(self.classes),
            "n_outputs": self.n_outputs, "head": head_module_name(self.spec), "n_features": self.n_features,
            "input_size": self.input_size, "target_mean": self.target_mean, "target_std": self.target_std,
            "preprocess": _preprocessor(self.spec, self.config).config(), "best_epoch": self.best_epoch,
            "config": self.config.to_dict(), "torch_version": torch.__version__,
        }


def _preprocessor(spec: BackboneSpec, config: FinetuneConfig) -> Preprocessor:
    return Preprocessor.from_spec(spec, config.resize_mode, config.input_size)


def _write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def _save_state(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, partial)
    os.replace(partial, path)
    return path


# ============================================================================ training
@contextlib.contextmanager
def _threads(n_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available. Hint: use device 'auto' or 'cpu'.")
    return torch.device(name)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
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
def predict(model: nn.Module, loader: DataLoader, task: str, device: torch.device | str = "cpu",
            tta: bool = False, amp: bool = False, channels_last: bool = True,
            target_mean: float = 0.0, target_std: float = 1.0) -> dict[str, Any]:
    """Score every batch of ``loader`` (the model is put in eval mode).

    Parameters
    ----------
    model : nn.Module
        Fine-tuned model.
    loader : DataLoader
        Batches ``(rows (B,), images (B, 3, S, S), targets (B,))``.
    task : {"classification", "regression"}
    tta : bool
        Also return the mean of the outputs on the images and their horizontal flips.
    target_mean, target_std : float
        Regression outputs are de-standardised with these.

    Returns
    -------
    dict
        ``rows`` (n,), ``y_true`` (n,), ``scores`` ((n, K) probabilities or
        (n,) predictions), ``tta_scores`` (same or None), ``loss`` (mean
        cross-entropy or MSE in standardised units), ``seconds`` (plain pass only).
    """
    device = torch.device(device)
    model.eval()
    rows, y_true, scores, tta_scores, losses, seconds = [], [], [], [], [], 0.0

    def convert(out: torch.Tensor) -> torch.Tensor:
        return out.softmax(dim=1) if task == "classification" else out * target_std + target_mean

    for batch in loader:
        if batch is None:
            continue
        row, images, target = batch
        images = _to_device(images, device, channels_last)
        start = time.perf_counter()
        with _autocast(device, amp):
            out = _outputs(model, images, task)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        target = target.to(device)
        if task == "classification":
            losses.append(F.cross_entropy(out, target.long(), reduction="sum").item())
        else:
            losses.append(F.mse_loss(out, (target.float() - target_mean) / target_std, reduction="sum").item())
        scores.append(convert(out).cpu())
        if tta:
            with _autocast(device, amp):
                flipped = _outputs(model, torch.flip(images, dims=[3]), task)
            tta_scores.append(((convert(out) + convert(flipped)) / 2).cpu())
        rows.append(row)
        y_true.append(target.cpu())
    if not rows:
        raise ValueError("No readable image in this split; nothing to score.")
    n = sum(len(r) for r in rows)
    return {
        "rows": torch.cat(rows).numpy(), "y_true": torch.cat(y_true).numpy(),
        "scores": torch.cat(scores).double().numpy(),
        "tta_scores": torch.cat(tta_scores).double().numpy() if tta else None,
        "loss": float(sum(losses) / n), "seconds": seconds,
    }


def _val_metric(task: str, y_true: np.ndarray, scores: np.ndarray) -> float:
    if task == "classification":
        return float(np.mean(scores.argmax(axis=1) == y_true))
    return float(np.sqrt(np.mean((scores - y_true) ** 2)))


def _better(task: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if task == "classification" else value < best


def _resolve_manifest(manifest: Manifest | str | Path) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.read(manifest)


def finetune(manifest: Manifest | str | Path, backbone_name: str, weights: str = "pretrained",
             config: FinetuneConfig | None = None, out_dir: str | Path | None = None, task: str | None = None,
             on_epoch_end: Callable[[dict[str, Any], nn.Module], None] | None = None) -> FinetuneResult:
    """Fine-tune a registered backbone end to end on a manifest's splits.

    Parameters
    ----------
    manifest : Manifest or path
        Images with labels (or targets) and the train/val/test split (the one
        the cached heads use). Train rows are augmented; val and test are not.
    backbone_name : str
        Registry name, e.g. ``efficientnet_lite0``.
    weights : str
        Source weights: ``pretrained``, ``random`` or a state-dict path (as
        :func:`~featcache.extract.weights.load_backbone`). Ignored in ``scratch``.
    config : FinetuneConfig, optional
        Hyper-parameters; defaults to ``FinetuneConfig()``.
    out_dir : path, optional
        If given: ``model.pt`` (best state dict), ``model.json`` (metadata),
        ``weight_report.json`` and ``history.json`` are written there.
    task : {"classification", "regression"}, optional
        Must match the manifest's task; None takes it from the manifest.
    on_epoch_end : callable, optional
        ``on_epoch_end(history_row, model)`` after each epoch's validation
        (inspection and tests; must not change the model).

    Returns
    -------
    FinetuneResult
        Test metrics of the best checkpoint (val accuracy, or val RMSE for
        regression), plain and with TTA; the model; history and timings.
    """
    config = config or FinetuneConfig()
    manifest = _resolve_manifest(manifest)
    task = task or manifest.task
    if task != manifest.task:
        raise ValueError(f"task={task!r} but the manifest is a {manifest.task} manifest. Hint: leave task=None.")
    spec = get_backbone(backbone_name)
    device = _device(config.device)
    use_amp = bool(config.amp and device.type == "cuda")
    if config.amp and not use_amp:
        logger.debug("amp=True ignored: mixed precision runs on CUDA only (device %s).", device)
    with _threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _finetune(manifest, spec, weights, config, out_dir, task, device, use_amp, on_epoch_end)


def _source_model(spec: BackboneSpec, weights: str, config: FinetuneConfig, n_outputs: int
                  ) -> tuple[nn.Module, list[str], dict[str, torch.Tensor], WeightCopyReport, str]:
    """The architecture with a new head, the source weights copied in (none for ``scratch``).

    Returns
    -------
    model, head_names, original_head, report, weights_id
    """
    model, head_names, original_head = _build(spec, n_outputs, config.seed)
    if config.mode == "scratch":
        weights_id = f"random:seed={config.seed}"
        return model, head_names, original_head, load_weights_with_report(model, {}, source=weights_id), weights_id
    source = load_backbone(spec.name, weights, seed=config.seed)
    if hasattr(source.model, "transform_input"):
        model.transform_input = source.model.transform_input
    report = load_weights_with_report(model, source.model.state_dict(), source=source.weights_id)
    return model, head_names, _original_head(spec, source.model), report, source.weights_id


def _targets(manifest: Manifest, task: str, train_rows: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-row targets and, for regression, the train split's mean and std (standardisation)."""
    if task == "classification":
        return np.asarray(manifest.labels, dtype=np.int64), 0.0, 1.0
    targets = np.asarray(manifest.targets, dtype=np.float32)
    train = targets[train_rows].astype(np.float64)
    return targets, float(train.mean()), float(train.std()) or 1.0


@dataclass
class _Fit:
    """What the training loop hands back."""

    history: list[dict[str, Any]]
    step_losses: list[float]
    best_epoch: int
    steps: int
    seconds: float


class _Trainer:
    """The epoch loop: phases, optimizer and schedule per phase, validation, early stopping, best state."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, head_names: Sequence[str], config: FinetuneConfig,
                 task: str, device: torch.device, use_amp: bool, target_mean: float, target_std: float) -> None:
        self.model, self.spec, self.head_names, self.config = model, spec, list(head_names), config
        self.task, self.device, self.use_amp = task, device, use_amp
        self.target_mean, self.target_std = target_mean, target_std
        self.metric_name = "val_accuracy" if task == "classification" else "val_rmse"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.step = 0
        self.step_losses: list[float] = []
        self.last_val = float("nan")

    def _loss(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.use_amp):
            out = _outputs(self.model, images, self.task)
        if self.task == "classification":
            return F.cross_entropy(out, target.long())
        return F.mse_loss(out, (target.float() - self.target_mean) / self.target_std)

    def _done(self) -> bool:
        return self.config.max_train_steps is not None and self.step >= self.config.max_train_steps

    def _epoch(self, loader: DataLoader, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR, bar: tqdm, epoch: int) -> list[float]:
        losses: list[float] = []
        for batch in loader:
            if batch is None:
                continue
            _, images, target = batch
            loss = self._loss(_to_device(images, self.device, self.config.channels_last), target.to(self.device))
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            scheduler.step()
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

    def _start_phase(self, phase: str, phases: list[str], steps_per_epoch: int
                     ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        _set_trainable(self.model, self.head_names, phase == "full")
        optimizer = make_optimizer(self.model, self.head_names, self.config, phase)
        steps = steps_per_epoch * phases.count(phase)
        if self.config.max_train_steps is not None:
            steps = min(steps, max(1, self.config.max_train_steps - self.step))
        logger.info("%s: phase %r, %d epoch(s), groups %s", self.config.mode, phase, phases.count(phase),
                    {g["name"]: f"{g['lr']:.2e}" for g in optimizer.param_groups})
        return optimizer, _scheduler(optimizer, self.config.schedule, steps)

    def fit(self, train_loader: DataLoader, val_loader: DataLoader | None,
            on_epoch_end: Callable[[dict[str, Any], nn.Module], None] | None) -> _Fit:
        """Train, validate every epoch, stop early on val; the model ends with the best epoch's weights."""
        config, phases = self.config, _phases(self.config)
        history: list[dict[str, Any]] = []
        best_metric: float | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch, since_best, phase = 0, 0, ""
        start = time.perf_counter()
        total = len(train_loader) * config.epochs
        bar = tqdm(total=min(total, config.max_train_steps or total), disable=not config.progress,
                   desc=f"finetune {config.mode}", unit="step", leave=False)
        for epoch, epoch_phase in enumerate(phases, start=1):
            if epoch_phase != phase:
                phase, since_best = epoch_phase, 0
                optimizer, scheduler = self._start_phase(phase, phases, len(train_loader))
            _set_train_mode(self.model, self.spec, phase == "full", config.freeze_bn)
            epoch_start = time.perf_counter()
            lrs = {group["name"]: float(group["lr"]) for group in optimizer.param_groups}
            losses = self._epoch(train_loader, optimizer, scheduler, bar, epoch)
            row: dict[str, Any] = {"epoch": epoch, "phase": phase, "steps": len(losses), "lr": lrs,
                                   "train_loss": float(np.mean(losses)) if losses else None,
                                   "metric": self.metric_name, "val_loss": None, "val_metric": None}
            improved = True  # without a val split the last epoch is kept
            if val_loader is not None:
                scored = predict(self.model, val_loader, self.task, self.device, amp=self.use_amp,
                                 channels_last=config.channels_last, target_mean=self.target_mean,
                                 target_std=self.target_std)
                self.last_val = _val_metric(self.task, scored["y_true"], scored["scores"])
                row.update(val_loss=scored["loss"], val_metric=self.last_val)
                improved = _better(self.task, self.last_val, best_metric)
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
            if config.patience and since_best >= config.patience and phase == phases[-1]:
                logger.info("%s: early stop after epoch %d (best %d)", config.mode, epoch, best_epoch)
                break
        bar.close()
        assert best_state is not None
        self.model.load_state_dict(best_state)
        return _Fit(history, self.step_losses, best_epoch, self.step, time.perf_counter() - start)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _test_metrics(task: str, scored: dict[str, Any], n_classes: int | None, config: FinetuneConfig
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """``metrics_with_ci`` of the plain scores, plus ``tta_<metric>`` (and its CI) when TTA ran."""
    y_true = scored["y_true"].astype(np.int64 if task == "classification" else np.float64)
    metrics = metrics_with_ci(task, y_true, scored["scores"], n_classes, n_boot=config.n_boot, seed=config.seed)
    if scored["tta_scores"] is not None:
        tta = metrics_with_ci(task, y_true, scored["tta_scores"], n_classes, n_boot=config.n_boot, seed=config.seed)
        metrics.update({f"tta_{name}": value for name, value in tta.items() if isinstance(value, float)})
        metrics["ci"].update({f"tta_{name}": ci for name, ci in tta["ci"].items()})
    return y_true, metrics


def _finetune(manifest: Manifest, spec: BackboneSpec, weights: str, config: FinetuneConfig,
              out_dir: str | Path | None, task: str, device: torch.device, use_amp: bool,
              on_epoch_end: Callable[[dict[str, Any], nn.Module], None] | None) -> FinetuneResult:
    classes = list(manifest.classes) if task == "classification" else []
    n_outputs = len(classes) if task == "classification" else 1
    if task == "classification" and n_outputs < 2:
        raise ValueError(f"Fine-tuning a classifier needs >= 2 classes; the manifest has {classes}.")
    rows = {name: np.flatnonzero(manifest.splits == code) for name, code in SPLIT_CODES.items()}
    if len(rows["train"]) == 0 or len(rows["test"]) == 0:
        raise ValueError(f"Fine-tuning needs train and test rows; split counts: {manifest.split_counts()}.")

    model, head_names, original_head, report, weights_id = _source_model(spec, weights, config, n_outputs)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    n_features = int(model.get_submodule(head_module_name(spec)).in_features)

    targets, target_mean, target_std = _targets(manifest, task, rows["train"])
    pre = _preprocessor(spec, config)
    train_tf = _TrainTransform(pre, config.random_resized_crop, config.crop_scale, config.hflip)
    # A last batch of one row would break BatchNorm in train mode: drop it (only then).
    lonely = len(rows["train"]) > config.batch_size and len(rows["train"]) % config.batch_size == 1
    train_loader = _loader(_Rows(manifest, rows["train"], targets, train_tf, pre), config.batch_size, True,
                           config.num_workers, config.seed, drop_last=lonely)
    eval_loaders = {split: _loader(_Rows(manifest, rows[split], targets, pre, pre), 2 * config.batch_size, False,
                                   config.num_workers, config.seed) for split in ("val", "test") if len(rows[split])}

    trainer = _Trainer(model, spec, head_names, config, task, device, use_amp, target_mean, target_std)
    fit = trainer.fit(train_loader, eval_loaders.get("val"), on_epoch_end)

    scored = predict(model, eval_loaders["test"], task, device, tta=config.tta, amp=use_amp,
                     channels_last=config.channels_last, target_mean=target_mean, target_std=target_std)
    y_true, metrics = _test_metrics(task, scored, n_outputs if task == "classification" else None, config)
    best_params: dict[str, Any] = {"mode": config.mode, "epochs": len(fit.history), "best_epoch": fit.best_epoch,
                                   "lr": config.lr, "input_size": pre.input_size, "batch_size": config.batch_size}
    if config.mode in ("low_lr", "unfreeze"):
        best_params["backbone_lr_mult"] = config.backbone_lr_mult
    metrics.update(n_train=len(rows["train"]), n_val=len(rows["val"]), n_features=n_features,
                   fit_seconds=float(fit.seconds), predict_seconds=float(scored["seconds"]), best_params=best_params)
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    _set_trainable(model, head_names, True)
    result = FinetuneResult(
        model=model, spec=spec, config=config, task=task, classes=classes, head_names=list(head_names),
        original_head=original_head, report=report, weights_id=weights_id, metrics=metrics, history=fit.history,
        step_losses=fit.step_losses, best_epoch=fit.best_epoch, epochs_run=len(fit.history), steps=fit.steps,
        fit_seconds=float(fit.seconds), predict_seconds=float(scored["seconds"]), n_features=n_features,
        input_size=pre.input_size, target_mean=target_mean, target_std=target_std, test_rows=scored["rows"],
        y_true=y_true, y_score=scored["scores"], tta_score=scored["tta_scores"],
    )
    if out_dir is not None:
        out = Path(out_dir)
        result.checkpoint_path = _save_state(model.state_dict(), out / CHECKPOINT_NAME)
        _write_json(out / META_NAME, result.metadata())
        report.save(out / REPORT_NAME)
        _write_json(out / HISTORY_NAME, {"history": fit.history, "step_losses": fit.step_losses})
    metric = "accuracy" if task == "classification" else "rmse"
    logger.info("%s/%s: test %s %.4f%s after %d epochs (best %d), %.1fs", spec.name, config.mode, metric,
                metrics[metric], f" (TTA {metrics[f'tta_{metric}']:.4f})" if config.tta else "",
                result.epochs_run, fit.best_epoch, fit.seconds)
    return result


def _phases(config: FinetuneConfig) -> list[str]:
    """Phase of each epoch: ``head`` (backbone frozen) or ``full``."""
    if config.mode == "frozen":
        return ["head"] * config.epochs
    if config.mode == "unfreeze":
        return ["head"] * config.warmup_epochs + ["full"] * (config.epochs - config.warmup_epochs)
    return ["full"] * config.epochs


# ============================================================================ export
def export_backbone(model: nn.Module, spec: BackboneSpec, path: str | Path,
                    original_head: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the fine-tuned backbone as a state dict that ``load_backbone(name, weights=path)`` loads.

    :func:`~featcache.extract.weights.load_backbone` loads strictly into the
    registry's architecture, whose classifier has the original shape (1000
    ImageNet classes). The file therefore holds the fine-tuned trunk with the
    *source* classifier put back (``original_head``: the pretrained head for
    transferred weights, the seeded random one for ``scratch``), so every
    trunk alias (``pool``, ``pool5``, ``head``, ...) gives the fine-tuned
    features while the ``logits`` alias keeps meaning ImageNet logits. The
    fine-tuned K-class head lives in the checkpoint (``model.pt``) and the ONNX export.

    Parameters
    ----------
    model : nn.Module
        The fine-tuned model (new head).
    spec : BackboneSpec
        Its registry entry.
    path : path
        Output ``.pt`` file (written atomically).
    original_head : mapping, optional
        ``{"classifier.weight": ..., "classifier.bias": ...}`` in the
        architecture's shape (``FinetuneResult.original_head``); None takes the
        seeded random head of the architecture.

    Returns
    -------
    Path
    """
    head = head_module_name(spec) + "."
    if original_head is None:
        logger.warning("export_backbone: no original head given; writing the architecture's random head.")
        original_head = _original_head(spec, load_backbone(spec.name, "random").model)
    expected = {k[len(head):] for k in model.state_dict() if k.startswith(head)}
    given = {k[len(head):] for k in original_head}
    if given != expected:
        raise ValueError(f"original_head has tensors {sorted(original_head)}; expected {head}{sorted(expected)}.")
    state = {}
    for key, value in model.state_dict().items():
        state[key] = original_head[key] if key.startswith(head) else value
    return _save_state(state, Path(path))


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the given loggers to WARNING for the duration (the exporter logs every graph pass at INFO)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


class _Scores(nn.Module):
    """Normalised images -> probabilities (classification) or predictions (regression)."""

    def __init__(self, model: nn.Module, task: str, target_mean: float, target_std: float) -> None:
        super().__init__()
        self.model, self.task = model, task
        self.target_mean, self.target_std = float(target_mean), float(target_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if self.task == "classification":
            return out.softmax(dim=1)
        return out[:, 0] * self.target_std + self.target_mean


def export_onnx(result_or_model: FinetuneResult | nn.Module, path: str | Path, input_size: int | None = None,
                task: str = "classification", target_mean: float = 0.0, target_std: float = 1.0,
                opset: int = 18, exporter: str = "dynamo") -> Path:
    """Export the fine-tuned classifier (or regressor) to ONNX with a dynamic batch axis.

    The graph takes ``images`` (B, 3, S, S) float32, normalised exactly as
    :class:`~featcache.extract.preprocess.Preprocessor` does, and returns
    ``scores``: (B, K) probabilities, or (B,) predictions in target units.

    Parameters
    ----------
    result_or_model : FinetuneResult or nn.Module
        A result carries task, input size and target scaling; for a bare model
        pass them.
    path : path
        Output ``.onnx`` file.
    opset : int
        ONNX opset (>= 18 for ``dynamo``).
    exporter : {"dynamo", "torchscript"}
        torch.onnx exporter: the ``torch.export``-based one (default), or the
        deprecated TorchScript one (faster to export, any opset).

    Returns
    -------
    Path
    """
    if isinstance(result_or_model, FinetuneResult):
        result = result_or_model
        model, task, input_size = result.model, result.task, result.input_size
        target_mean, target_std = result.target_mean, result.target_std
    else:
        model = result_or_model
    if input_size is None:
        raise ValueError("input_size is needed to export a bare model (the spatial size is fixed at export).")
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r} is invalid; allowed: 'dynamo', 'torchscript'.")
    wrapper = _Scores(model, task, target_mean, target_std).eval()
    dummy = torch.zeros(2, 3, input_size, input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with warnings.catch_warnings(), _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, fallback notices)
        if exporter == "dynamo":
            program = torch.onnx.export(wrapper, (dummy,), dynamo=True, opset_version=opset, verbose=False,
                                        input_names=["images"], output_names=["scores"], optimize=True,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(str(partial))
        else:
            torch.onnx.export(wrapper, (dummy,), str(partial), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["scores"],
                              dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}})
    os.replace(partial, path)
    logger.info("Exported ONNX %s (%s, opset %d)", path, exporter, opset)
    return path
