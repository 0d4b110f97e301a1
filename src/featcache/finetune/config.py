"""The one schema of fine-tuning settings: :class:`FinetuneConfig`.

The Python API builds it directly; ``params.yaml`` (``finetune.defaults`` and
``finetune.modes``) is validated by building it too
(:class:`featcache.pipeline.params.finetune.FinetuneParams`), so every check runs in one
place with one message. No torch import here: params validation stays fast.

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
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from featcache.heads.metrics import SELECTION_METRICS
from featcache.store.schema import RESIZE_MODES
from featcache.util.checks import check_int
from featcache.util.compute import DEVICES
from featcache.util.names import closest, did_you_mean

__all__ = ["CLASS_WEIGHTS", "DEFAULT_SELECTION", "MODES", "OPTIMIZERS", "SCHEDULES", "PARAMS_DEFAULTS",
           "FinetuneConfig"]

#: Fine-tuning recipes, see the module docstring.
MODES: tuple[str, ...] = ("frozen", "low_lr", "unfreeze", "scratch")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
SCHEDULES: tuple[str, ...] = ("cosine", "none")
#: ``class_weight`` values besides None (unweighted), as the cached classification heads'.
CLASS_WEIGHTS: tuple[str, ...] = ("balanced",)
#: What picks the best epoch and stops early when ``selection_metric`` is None, per task: classification the val
#: ``loss`` (the training cross-entropy on the val rows: class-weighted with ``class_weight``, else the log loss),
#: as the early-stopped cached heads (MLP, LightGBM) stop on theirs, rather than val accuracy, a step function that
#: picked an early epoch by chance (benchmarks/README.md "Fine-tuning on small data"); regression the val rmse.
DEFAULT_SELECTION: dict[str, str] = {"classification": "loss", "regression": "rmse"}

#: Where the pipeline's defaults (``params.yaml`` without a value) differ from the API's:
#: small CPU-friendly inputs, digits-friendly augmentation, steady BatchNorm, one thread, and epochs of at least
#: 32 steps (a 180-row train split makes 6 per epoch: benchmarks/README.md, "Fine-tuning on small data").
PARAMS_DEFAULTS: dict[str, Any] = {"epochs": 4, "patience": 2, "crop_scale": (0.8, 1.0), "hflip": False,
                                   "freeze_bn": True, "input_size": 96, "num_threads": 1,
                                   "min_epoch_steps": 32}

#: Settings only the API sets (the stage sets them from ``train.n_boot``, ``train.seed`` and its own flags).
_API_ONLY = ("mode", "n_boot", "ci_seed", "progress")


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (checked on construction).

    Attributes
    ----------
    mode : str
        One of :data:`MODES`.
    epochs : int
        Total epochs (for ``unfreeze`` the warm-up epochs are included).
    batch_size : int
        Training mini-batch size (evaluation uses twice this), 1..4096.
    lr : float
        Learning rate of the new head (and of everything in ``scratch``).
    backbone_lr_mult : float
        In (0, 1]: backbone LR = ``backbone_lr_mult`` x ``lr`` in ``low_lr``; the
        earliest backbone group's multiplier in ``unfreeze``.
    warmup_epochs : int
        ``unfreeze`` only: epochs with the backbone frozen before unfreezing.
    lr_groups : int
        ``unfreeze`` only: number of consecutive backbone groups with their own LR.
    optimizer : {"adamw", "sgd"}
        AdamW, or SGD with Nesterov momentum ``momentum``.
    momentum : float
        SGD momentum, in [0, 1).
    weight_decay : float
        Decoupled (AdamW) or L2 (SGD) weight decay, on every trained tensor.
    schedule : {"cosine", "none"}
        Per-step cosine decay to 0 over each phase, or a constant LR.
    patience : int
        Stop after this many epochs without a better val metric; 0 never stops early.
    min_epoch_steps : int
        The fewest optimiser steps an epoch counts for: when the train split makes
        fewer batches, ``epochs``, ``warmup_epochs`` and ``patience`` are multiplied
        by ``ceil(min_epoch_steps / batches)`` (as the MLP heads',
        :func:`~featcache.heads.training.epoch_scale`), so a small train split is
        not stopped after a few dozen steps (1: no floor).
    class_weight : {None, "balanced"}
        Classification only (:func:`~featcache.finetune.run.finetune` refuses it for
        regression): ``"balanced"`` weighs the cross-entropy of class ``k`` by
        ``n / (n_classes * count_k)`` over the train split's rows (scikit-learn's
        meaning, as the cached heads' ``class_weight``), in training and in the
        reported val loss; None (default) weighs every class 1. The best epoch is
        the one of the best ``selection_metric`` (by default the val loss, weighted the same way).
    selection_metric : str or None
        The validation metric that picks the best epoch and stops early, as the
        cached heads' ``selection_metric`` (the pipeline sets it from
        ``train.metric``): classification accuracy, balanced_accuracy, macro_f1,
        log_loss; regression rmse, mae, r2 (:data:`~featcache.heads.metrics.SELECTION_METRICS`).
        None (default): :data:`DEFAULT_SELECTION`, the val loss (cross-entropy, class-weighted with
        ``class_weight``), or rmse.
    random_resized_crop : bool
        Train-time random-resized crop of the test-time view.
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
        As in :class:`~featcache.extract.decode.preprocess.Preprocessor`.
    amp : bool
        Mixed precision (``torch.autocast`` fp16 + ``GradScaler``); CUDA only, ignored on CPU.
    tta : bool
        Also score the test split with test-time augmentation, reported as
        ``tta_*``: the mean of the outputs over the views that training's
        augmentation produces, the center crop and, only with ``hflip``, its
        horizontal flip. Without ``hflip`` the center crop is the only view, so
        ``tta_*`` equal the plain metrics (reported all the same, so metric
        files keep the same keys).
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
    ci_seed : int
        Seed of those resamples, apart from ``seed`` (training) so that the CIs draw the same resamples of the
        test rows as the cached heads' (the stage passes ``train.seed``, as the train stage does).
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
    min_epoch_steps: int = 1
    class_weight: str | None = None
    selection_metric: str | None = None
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
    ci_seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        choices = {"mode": MODES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "device": DEVICES,
                   "resize_mode": RESIZE_MODES}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is invalid.{did_you_mean(value, allowed)} "
                                 f"Allowed: {', '.join(allowed)}.")
        if self.class_weight is not None and self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class_weight={self.class_weight!r} is invalid."
                             f"{did_you_mean(self.class_weight, CLASS_WEIGHTS)} Allowed: null (None: every class "
                             f"weighs 1) or {', '.join(map(repr, CLASS_WEIGHTS))} (n / (n_classes * count) per class "
                             "over the train split).")
        metrics = tuple(dict.fromkeys(m for names in SELECTION_METRICS.values() for m in names))
        if self.selection_metric is not None and self.selection_metric not in metrics:
            raise ValueError(f"selection_metric={self.selection_metric!r} is invalid."
                             f"{did_you_mean(self.selection_metric, metrics)} Allowed: null (the val loss, or rmse) or "
                             + "; ".join(f"{task}: {', '.join(names)}" for task, names in SELECTION_METRICS.items())
                             + ".")
        for name in ("random_resized_crop", "hflip", "freeze_bn", "amp", "tta", "channels_last", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: true or false.")
        for name, low, high in (("epochs", 1, None), ("batch_size", 1, 4096), ("warmup_epochs", 0, None),
                                ("lr_groups", 1, None), ("patience", 0, None),
                                ("min_epoch_steps", 1, None), ("num_workers", 0, None),
                                ("n_boot", 0, None), ("seed", 0, None), ("ci_seed", 0, None)):
            check_int(name, getattr(self, name), low, high)
        for name, low in (("input_size", 16), ("num_threads", 1), ("max_train_steps", 1)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low)
        _number("lr", self.lr, low=0.0, low_open=True)
        _number("backbone_lr_mult", self.backbone_lr_mult, low=0.0, low_open=True, high=1.0)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        scale = tuple(self.crop_scale) if isinstance(self.crop_scale, (list, tuple)) else ()
        if len(scale) != 2 or not all(_is_number(v) for v in scale) or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale={self.crop_scale!r} is invalid; allowed: (low, high) with "
                             "0 < low <= high <= 1, e.g. (0.5, 1.0).")
        self.crop_scale = (float(scale[0]), float(scale[1]))
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
                close = closest(key, allowed)
                hints.append(f"{key!r}" + (f" (did you mean {close!r}?)" if close else ""))
            raise ValueError(f"Unknown fine-tuning setting(s): {', '.join(hints)}. Allowed: {', '.join(allowed)}.")
        return cls(**dict(values))

    @classmethod
    def setting_names(cls) -> list[str]:
        """The keys ``params.yaml`` may set under ``finetune.defaults`` / ``finetune.modes.<mode>``."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in _API_ONLY]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        out = dataclasses.asdict(self)
        out["crop_scale"] = list(self.crop_scale)
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _number(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> None:
    ok = _is_number(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lower = f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name}={value!r} is invalid; allowed: a number {lower}{upper}.")
