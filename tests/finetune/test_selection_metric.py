"""The fine-tuned baseline picks its best epoch on the metric the cached heads select on (``train.metric``).

It picked the epoch of the best val accuracy (rmse) whatever ``train.metric`` said; now
``FinetuneConfig.selection_metric`` (the stage sets it from ``train.metric`` unless the finetune section sets its own,
but not a step metric, as for the early-stopped heads) names the val metric of the best epoch and of early stopping,
scored as the heads score it; None, the default, is the val loss (class-weighted with ``class_weight``).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, log_loss

from _support.imbalanced import ToyClassifier
from featcache.finetune.config import FinetuneConfig
from featcache.finetune.trainer import Trainer, predict
from featcache.pipeline.finetune import mode_config


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.tensor([0] * (n - 4) + [1, 1, 2, 2])  # imbalanced
    images = torch.rand(n, 3, 4, 4, generator=generator) + target[:, None, None, None] * 0.3
    return [(torch.arange(i, min(i + 8, n)), images[i:i + 8], target[i:i + 8]) for i in range(0, n, 8)]


def _fit(selection_metric: str | None):
    torch.manual_seed(0)
    config = FinetuneConfig(mode="frozen", epochs=8, patience=0, lr=0.05, n_boot=0, progress=False,
                            channels_last=False, device="cpu", amp=False, selection_metric=selection_metric)
    trainer = Trainer(ToyClassifier(), SimpleNamespace(classifier="classifier"),
                      ["classifier.weight", "classifier.bias"], config, "classification", torch.device("cpu"), False,
                      0.0, 1.0)
    val = _batches(1, 24)
    return trainer, trainer.fit(_batches(0, 40), val, None), val


@pytest.mark.parametrize(("name", "score", "lower"), [
    ("log_loss", lambda y, p: log_loss(y, p / p.sum(axis=1, keepdims=True), labels=[0, 1, 2]), True),
    ("balanced_accuracy", lambda y, p: balanced_accuracy_score(y, p.argmax(axis=1)), False),
])
def test_the_best_epoch_is_the_best_on_the_selection_metric(name, score, lower):
    trainer, fit, val = _fit(name)
    assert {row["metric"] for row in fit.history} == {f"val_{name}"}
    values = [row["val_metric"] for row in fit.history]
    best = (np.argmin if lower else np.argmax)(values)  # the first best, as a strict improvement keeps it
    assert fit.best_epoch == best + 1
    scored = predict(trainer.model, val, "classification", channels_last=False)  # the model left: the best epoch
    assert score(scored["y_true"], scored["scores"]) == pytest.approx(values[best], rel=1e-6)


def test_without_a_selection_metric_the_best_epoch_is_the_best_val_loss():
    """The default criterion is the val loss, as the early-stopped cached heads' (it was val accuracy, a step
    function that picked an early epoch by chance: benchmarks/README.md "Fine-tuning on small data")."""
    _, fit, _ = _fit(None)
    assert {row["metric"] for row in fit.history} == {"val_loss"}
    losses = [row["val_loss"] for row in fit.history]
    assert [row["val_metric"] for row in fit.history] == losses
    assert fit.best_epoch == int(np.argmin(losses)) + 1
    assert set(fit.history[0]["val_scores"]) == {"accuracy", "balanced_accuracy", "macro_f1", "log_loss"}


def test_the_default_val_loss_is_class_weighted_as_the_training_loss():
    """With ``class_weight`` the criterion is the weighted cross-entropy of the val rows (the trainer's loss)."""
    torch.manual_seed(0)
    config = FinetuneConfig(mode="frozen", epochs=3, patience=0, lr=0.05, n_boot=0, progress=False,
                            channels_last=False, device="cpu", amp=False)
    weight = torch.tensor([0.2, 3.0, 3.0])
    trainer = Trainer(ToyClassifier(), SimpleNamespace(classifier="classifier"),
                      ["classifier.weight", "classifier.bias"], config, "classification", torch.device("cpu"), False,
                      0.0, 1.0, class_weight=weight)
    val = _batches(1, 24)
    fit = trainer.fit(_batches(0, 40), val, None)
    scored = predict(trainer.model, val, "classification", channels_last=False, class_weight=weight)
    kept = fit.history[fit.best_epoch - 1]
    assert kept["metric"] == "val_loss" and kept["val_metric"] == pytest.approx(scored["loss"], rel=1e-6)
    proba = scored["scores"] / scored["scores"].sum(axis=1, keepdims=True)
    assert scored["loss"] != pytest.approx(log_loss(scored["y_true"], proba, labels=[0, 1, 2]), rel=1e-3)


def test_the_config_names_the_close_match_and_the_trainer_refuses_another_tasks_metric():
    with pytest.raises(ValueError, match=r"selection_metric='log_los' is invalid\. Did you mean 'log_loss'\?"):
        FinetuneConfig(selection_metric="log_los")
    config = FinetuneConfig(selection_metric="rmse", progress=False)
    with pytest.raises(ValueError, match="'rmse' is not a classification metric; allowed: accuracy"):
        Trainer(ToyClassifier(), SimpleNamespace(classifier="classifier"), ["classifier.weight"], config,
                "classification", torch.device("cpu"), False, 0.0, 1.0)


def test_the_stage_selects_on_train_metric_unless_the_finetune_section_sets_its_own():
    section = {"defaults": {"epochs": 2}, "modes": {"frozen": {}, "low_lr": {"selection_metric": "macro_f1"}}}
    assert mode_config(section, "frozen", selection_metric="log_loss").selection_metric == "log_loss"
    assert mode_config(section, "frozen").selection_metric is None
    # a step metric of train.metric does not reach fine-tuning, as it does not reach the early-stopped heads
    for step in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert mode_config(section, "frozen", selection_metric=step).selection_metric is None
    section["defaults"]["selection_metric"] = "accuracy"  # the section asks for it: it gets it
    assert mode_config(section, "frozen", selection_metric="balanced_accuracy").selection_metric == "accuracy"
    assert mode_config(section, "low_lr", selection_metric="log_loss").selection_metric == "macro_f1"


def test_check_refuses_a_finetune_selection_metric_of_the_other_task(tmp_path, capsys):
    """``featcache check`` (and the finetune stage's sections) name a mode whose selection_metric is not a metric of
    data.task (it failed only when that mode's trainer was built, after the backbone)."""
    from pathlib import Path

    import yaml

    from featcache.pipeline.cli import main

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    raw["finetune"]["modes"]["low_lr"] = {**(raw["finetune"]["modes"]["low_lr"] or {}), "selection_metric": "rmse"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["check", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "finetune.modes.low_lr: selection_metric 'rmse' is not a classification metric" in err, err
