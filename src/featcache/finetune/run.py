"""End-to-end fine-tuning of one mode: :func:`finetune` and its :class:`FinetuneResult`.

A registered backbone gets a new linear output layer (K classes, or 1 output
for regression) and is trained on the manifest's train split, with model
selection (early stopping) on its val split and scores on its test split: the
same rows, split and metrics (:func:`featcache.heads.bootstrap.metrics_with_ci`)
as the heads trained on cached features, so both land in one report.

Checkpoints are plain state dicts (``torch.load(..., weights_only=True)``).
Unreadable images are listed in ``FinetuneResult.bad_images`` (and
``bad_images.json``), counted in the metrics (``n_bad_images``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featcache.errors import ParamError
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest, ManifestError
from featcache.extract.inputs.sources import check_train_classes
from featcache.extract.zoo.registry import BackboneSpec, get_backbone
from featcache.extract.zoo.weights import load_backbone
from featcache.finetune.config import FinetuneConfig
from featcache.finetune.data import BadImages, TrainTransform, eval_batches, train_batches
from featcache.finetune.model import (
    WeightCopyReport,
    build_with_original_head,
    load_weights_with_report,
    original_head,
)
from featcache.finetune.optim import set_trainable
from featcache.finetune.trainer import Trainer, predict
from featcache.heads.bootstrap import metrics_with_ci
from featcache.heads.class_weight import balanced_weights
from featcache.heads.metrics import SELECTION_METRICS
from featcache.heads.trainable import check_trainable_rows
from featcache.store.schema import SPLIT_CODES
from featcache.util.atomic import atomic_path, write_json
from featcache.util.compute import resolve_device, torch_threads

__all__ = ["BAD_IMAGES_NAME", "CHECKPOINT_NAME", "HISTORY_NAME", "META_FORMAT", "META_NAME", "REPORT_NAME",
           "FinetuneResult", "finetune", "preprocessor", "save_state"]

logger = logging.getLogger(__name__)

#: File names written by :func:`finetune` into ``out_dir``.
CHECKPOINT_NAME, META_NAME, REPORT_NAME, HISTORY_NAME = "model.pt", "model.json", "weight_report.json", "history.json"
BAD_IMAGES_NAME = "bad_images.json"
#: ``format`` of ``model.json`` (:meth:`FinetuneResult.metadata`).
META_FORMAT = "featcache-finetune/1"


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`.

    Attributes
    ----------
    model : nn.Module
        The best checkpoint's model, in eval mode, on the CPU.
    spec : BackboneSpec
        The backbone's registry entry.
    config : FinetuneConfig
        The settings of the run.
    task : str
        ``classification`` or ``regression``.
    classes : list of str
        Class names in output order (empty for regression).
    head_names : list of str
        Parameter names of the new classifier layer (``spec.classifier``).
    original_head : dict of str to torch.Tensor
        CPU copies of the source model's classifier tensors, before the head was replaced.
    weights_id : str
        Id of the source weights (``random:seed=<seed>`` for a random initialisation).
    metrics : dict
        Test metrics with ``ci`` (as :func:`metrics_with_ci`), ``tta_<metric>``
        beside each scalar metric when TTA ran, and ``n_train``, ``n_val``,
        ``n_features``, ``n_bad_images``, ``fit_seconds``, ``predict_seconds``, ``best_params``.
    history : list of dict
        Per epoch: ``epoch``, ``phase``, ``steps``, ``train_loss``, ``val_loss``,
        ``metric`` (``val_loss`` or ``val_rmse`` by default), ``val_metric``, ``val_scores``, ``lr`` (group -> LR),
        ``seconds``.
    step_losses : list of float
        Training loss of every optimizer step, in order.
    best_epoch, epochs_run, steps : int
        1-based epoch of the kept checkpoint, epochs run, optimizer steps taken.
    fit_seconds, predict_seconds : float
        Training (incl. val) and plain test inference wall time.
    n_features : int
        Inputs of the classifier layer.
    input_size : int
        Side of the square network input.
    target_mean, target_std : float
        Regression: the train targets' mean and std (the model predicts standardised targets);
        classification: 0 and 1.
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
    bad_images : list of dict
        ``{"id", "reason"}`` of every image of any split that could not be decoded.
    class_weights : list of float or None
        The (K,) cross-entropy weights of ``class_weight="balanced"``; None when unweighted.
    checkpoint_path : Path or None
        ``out_dir/model.pt``, the best checkpoint's state dict; None without ``out_dir``.
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
    bad_images: list[dict[str, str]] = field(default_factory=list)
    class_weights: list[float] | None = None
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
        """What is needed to rebuild and use the checkpoint (written as ``model.json``).

        GoogLeNet's ``transform_input`` (a flag, not in the state dict) is recorded too, as ``transform_input``,
        and a weighted run's per-class weights, as ``class_weights``.
        """
        meta = {
            "format": META_FORMAT, "backbone": self.spec.name, "weights": self.weights_id,
            "mode": self.config.mode, "task": self.task, "classes": list(self.classes),
            "n_outputs": self.n_outputs, "head": self.spec.classifier, "n_features": self.n_features,
            "input_size": self.input_size, "target_mean": self.target_mean, "target_std": self.target_std,
            "preprocess": preprocessor(self.spec, self.config).config(), "best_epoch": self.best_epoch,
            "config": self.config.to_dict(), "torch_version": torch.__version__,
        }
        if hasattr(self.model, "transform_input"):
            meta["transform_input"] = bool(self.model.transform_input)
        if self.class_weights is not None:
            meta["class_weights"] = list(self.class_weights)
        return meta


def preprocessor(spec: BackboneSpec, config: FinetuneConfig) -> Preprocessor:
    """The test-time preprocessor of a run (the registry's, at ``config.input_size``)."""
    return Preprocessor.from_spec(spec, config.resize_mode, config.input_size)


def save_state(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict (CPU, contiguous tensors) atomically; loads with ``weights_only=True``."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    return Path(path)


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
        :func:`~featcache.extract.zoo.weights.load_backbone`). Ignored in ``scratch``.
    config : FinetuneConfig, optional
        Hyper-parameters; defaults to ``FinetuneConfig()``.
    out_dir : path, optional
        If given: ``model.pt`` (best state dict), ``model.json`` (metadata),
        ``weight_report.json``, ``history.json`` and ``bad_images.json`` are written there.
    task : {"classification", "regression"}, optional
        Must match the manifest's task; None takes it from the manifest.
    on_epoch_end : callable, optional
        ``on_epoch_end(history_row, model)`` after each epoch's validation
        (inspection and tests; must not change the model).

    Returns
    -------
    FinetuneResult
        Test metrics of the best checkpoint (``selection_metric``'s: by default the val loss, or val RMSE
        for regression), plain and with TTA; the model; history, timings and bad images.

    Raises
    ------
    ParamError
        If ``task`` is not the manifest's, or ``config.class_weight`` is set for regression.
    """
    config = config or FinetuneConfig()
    manifest = manifest if isinstance(manifest, Manifest) else Manifest.read(manifest)
    task = task or manifest.task
    if task != manifest.task:
        raise ParamError(f"task={task!r} but the manifest is a {manifest.task} manifest. Hint: leave task=None.")
    if task == "regression" and config.class_weight is not None:
        raise ParamError(f"class_weight={config.class_weight!r} weighs classes; this is a regression run. Allowed "
                         "for regression: None. Hint: FinetuneConfig(class_weight=None).")
    if config.selection_metric is not None and config.selection_metric not in SELECTION_METRICS[task]:
        raise ParamError(f"selection_metric={config.selection_metric!r} is not a {task} metric; allowed: "
                         f"{', '.join(SELECTION_METRICS[task])} or None. Hint: pick one of them (train.metric).")
    spec = get_backbone(backbone_name)
    device = torch.device(resolve_device(config.device))
    use_amp = bool(config.amp and device.type == "cuda")
    if config.amp and not use_amp:
        logger.debug("amp=True ignored: mixed precision runs on CUDA only (device %s).", device)
    with torch_threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _finetune(manifest, spec, weights, config, out_dir, task, device, use_amp, on_epoch_end)


def _source_model(spec: BackboneSpec, weights: str, config: FinetuneConfig, n_outputs: int
                  ) -> tuple[nn.Module, list[str], dict[str, torch.Tensor], WeightCopyReport, str]:
    """The architecture with a new head, the source weights copied in (none for ``scratch``)."""
    model, head_names, head = build_with_original_head(spec, n_outputs, config.seed)
    if config.mode == "scratch":
        weights_id = f"random:seed={config.seed}"
        return model, head_names, head, load_weights_with_report(model, {}, source=weights_id), weights_id
    source = load_backbone(spec.name, weights, seed=config.seed)
    if hasattr(source.model, "transform_input"):
        model.transform_input = source.model.transform_input
    report = load_weights_with_report(model, source.model.state_dict(), source=source.weights_id)
    return model, head_names, original_head(spec, source.model), report, source.weights_id


def _class_weights(config: FinetuneConfig, labels: np.ndarray, n_classes: int) -> np.ndarray | None:
    """The cross-entropy's per-class weights of ``config.class_weight`` over the train rows' ``labels``.

    Counted over the manifest's train rows (``n_train``): an image that fails to decode is known only once
    read, so it is counted too.
    """
    if config.class_weight is None:
        return None
    return balanced_weights(labels, n_classes)


def _targets(manifest: Manifest, task: str, train_rows: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-row targets and, for regression, the train split's mean and std (standardisation)."""
    if task == "classification":
        return np.asarray(manifest.labels, dtype=np.int64), 0.0, 1.0
    targets = np.asarray(manifest.targets, dtype=np.float32)
    train = targets[train_rows].astype(np.float64)
    return targets, float(train.mean()), float(train.std()) or 1.0


def _test_metrics(task: str, scored: dict[str, Any], n_classes: int | None, config: FinetuneConfig
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """``metrics_with_ci`` of the plain scores, plus ``tta_<metric>`` (and its CI) when TTA ran."""
    y_true = scored["y_true"].astype(np.int64 if task == "classification" else np.float64)
    metrics = metrics_with_ci(task, y_true, scored["scores"], n_classes, n_boot=config.n_boot,
                              seed=config.ci_seed)
    if scored["tta_scores"] is not None:
        tta = metrics_with_ci(task, y_true, scored["tta_scores"], n_classes, n_boot=config.n_boot,
                              seed=config.ci_seed)
        metrics.update({f"tta_{name}": value for name, value in tta.items() if isinstance(value, float)})
        metrics["ci"].update({f"tta_{name}": ci for name, ci in tta["ci"].items()})
    return y_true, metrics


def _finetune(manifest: Manifest, spec: BackboneSpec, weights: str, config: FinetuneConfig,
              out_dir: str | Path | None, task: str, device: torch.device, use_amp: bool,
              on_epoch_end: Callable[[dict[str, Any], nn.Module], None] | None) -> FinetuneResult:
    classes = list(manifest.classes) if task == "classification" else []
    n_outputs = len(classes) if task == "classification" else 1
    if task == "classification" and n_outputs < 2:
        raise ManifestError(f"Fine-tuning a classifier needs >= 2 classes; the manifest has {classes}. Hint: give "
                            "it images of at least two classes (its label column, or class folders).")
    if task == "classification":  # as prepare (and so the cached heads): a class never seen in training is refused
        check_train_classes(np.asarray(manifest.labels), manifest.splits, classes)
    rows = {name: np.flatnonzero(manifest.splits == code) for name, code in SPLIT_CODES.items()}
    check_trainable_rows(
        manifest.split_counts(), np.asarray(manifest.targets)[rows["train"]] if task == "regression" else None,
        f"The manifest (images under {manifest.root})",
        "give rows the split '{split}' (its split column), or rebuild it with `featcache prepare`.",
        "fix its target column, or rebuild it with `featcache prepare`.", ManifestError)

    model, head_names, head, report, weights_id = _source_model(spec, weights, config, n_outputs)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    n_features = int(model.get_submodule(spec.classifier).in_features)

    targets, target_mean, target_std = _targets(manifest, task, rows["train"])
    pre, bad = preprocessor(spec, config), BadImages(manifest)
    augment = TrainTransform(pre, config.random_resized_crop, config.crop_scale, config.hflip)
    train = train_batches(manifest, rows["train"], targets, pre, augment, bad, config.batch_size,
                          config.num_workers, config.seed)
    evals = {split: eval_batches(manifest, rows[split], targets, pre, bad, 2 * config.batch_size, config.num_workers)
             for split in ("val", "test") if len(rows[split])}

    weights = _class_weights(config, targets[rows["train"]], n_outputs) if task == "classification" else None
    trainer = Trainer(model, spec, head_names, config, task, device, use_amp, target_mean, target_std,
                      None if weights is None else torch.as_tensor(weights, dtype=torch.float32))
    fit = trainer.fit(train, evals.get("val"), on_epoch_end)

    scored = predict(model, evals["test"], task, device, tta=config.tta, amp=use_amp,
                     channels_last=config.channels_last, target_mean=target_mean, target_std=target_std,
                     tta_hflip=config.hflip)
    if task == "regression":  # the manifest's float64 targets, as the cached heads' stores hold them (the loss
        # trained on float32 ones): scores and rows files of the same test rows, which compare pairs
        scored["y_true"] = np.asarray(manifest.targets, dtype=np.float64)[scored["rows"]]
    y_true, metrics = _test_metrics(task, scored, n_outputs if task == "classification" else None, config)
    best_params: dict[str, Any] = {"mode": config.mode, "epochs": len(fit.history), "best_epoch": fit.best_epoch,
                                   "lr": config.lr, "input_size": pre.input_size, "batch_size": config.batch_size}
    if config.mode in ("low_lr", "unfreeze"):
        best_params["backbone_lr_mult"] = config.backbone_lr_mult
    if config.class_weight is not None:  # only where set: an unweighted run's record is as before
        best_params["class_weight"] = config.class_weight
    if config.selection_metric is not None:
        best_params["selection_metric"] = config.selection_metric
    metrics.update(n_train=len(rows["train"]), n_val=len(rows["val"]), n_features=n_features,
                   n_bad_images=len(bad), fit_seconds=float(fit.seconds), predict_seconds=float(scored["seconds"]),
                   best_params=best_params)
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    set_trainable(model, head_names, True)
    result = FinetuneResult(
        model=model, spec=spec, config=config, task=task, classes=classes, head_names=list(head_names),
        original_head=head, report=report, weights_id=weights_id, metrics=metrics, history=fit.history,
        step_losses=fit.step_losses, best_epoch=fit.best_epoch, epochs_run=len(fit.history), steps=fit.steps,
        fit_seconds=float(fit.seconds), predict_seconds=float(scored["seconds"]), n_features=n_features,
        input_size=pre.input_size, target_mean=target_mean, target_std=target_std, test_rows=scored["rows"],
        y_true=y_true, y_score=scored["scores"], tta_score=scored["tta_scores"], bad_images=bad.as_list(),
        class_weights=None if weights is None else [float(w) for w in weights],
    )
    if out_dir is not None:
        out = Path(out_dir)
        result.checkpoint_path = save_state(model.state_dict(), out / CHECKPOINT_NAME)
        write_json(out / META_NAME, result.metadata())
        report.save(out / REPORT_NAME)
        write_json(out / HISTORY_NAME, {"history": fit.history, "step_losses": fit.step_losses})
        write_json(out / BAD_IMAGES_NAME, {"n_bad_images": len(bad), "bad_images": result.bad_images})
    metric = "accuracy" if task == "classification" else "rmse"
    logger.info("%s/%s: test %s %.4f%s after %d epochs (best %d), %.1fs%s", spec.name, config.mode, metric,
                metrics[metric], f" (TTA {metrics[f'tta_{metric}']:.4f})" if config.tta else "",
                result.epochs_run, fit.best_epoch, fit.seconds,
                f"; {len(bad)} unreadable image(s) skipped" if len(bad) else "")
    return result
