"""``class_weight="balanced"`` for the fine-tuned baseline, as the cached classification heads weigh classes.

The weights are scikit-learn's ``n / (n_classes * count)`` over the train split; the trainer's criterion (and
its val loss) carries them; the run records the setting in ``best_params`` (compare's "chosen" column).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.nn import functional as F

from _support.files import COLOUR_CLASSES, write_colour_folder
from _support.imbalanced import ToyClassifier
from featcache.errors import ParamError
from featcache.extract.inputs.manifest import Manifest, assign_splits
from featcache.extract.inputs.sources import from_folder
from featcache.finetune import run as ft_run
from featcache.finetune.config import FinetuneConfig
from featcache.finetune.run import META_NAME, finetune
from featcache.finetune.trainer import Trainer, predict
from featcache.heads.class_weight import balanced_weights

LITE = "efficientnet_lite0"


def test_config_takes_null_or_balanced_and_names_the_close_match_of_a_typo():
    assert FinetuneConfig().class_weight is None  # the default: unweighted, shipped numbers unchanged
    assert FinetuneConfig(class_weight="balanced").to_dict()["class_weight"] == "balanced"
    assert FinetuneConfig.from_dict({"class_weight": None}).class_weight is None
    assert "class_weight" in FinetuneConfig.setting_names()
    with pytest.raises(ValueError, match=r"class_weight='balnced' is invalid\. Did you mean 'balanced'\? "
                                         r"Allowed: null .* or 'balanced'"):
        FinetuneConfig(class_weight="balnced")
    for bad in ("auto", 1.0, {0: 1.0, 1: 2.0}, True):
        with pytest.raises(ValueError, match="class_weight=.* is invalid.*Allowed: null"):
            FinetuneConfig(class_weight=bad)


@pytest.mark.parametrize("labels", [[0, 0, 0, 0, 0, 0, 1, 1, 2], [2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]])
def test_balanced_weights_are_n_over_k_times_count_as_scikit_learn(labels: list[int]):
    y = np.array(labels)
    counts = np.bincount(y)
    expected = len(y) / (3 * counts)
    np.testing.assert_allclose(balanced_weights(y, 3), expected)
    np.testing.assert_allclose(balanced_weights(y, 3), compute_class_weight("balanced", classes=np.arange(3),
                                                                                  y=y))


def _trainer(task: str = "classification", class_weight: torch.Tensor | None = None) -> Trainer:
    config = FinetuneConfig(mode="frozen", epochs=1, patience=0, n_boot=0, progress=False, channels_last=False,
                            device="cpu", amp=False)
    return Trainer(ToyClassifier(), SimpleNamespace(classifier="classifier"), ["classifier.weight", "classifier.bias"],
                   config, task, torch.device("cpu"), False, 0.0, 1.0, class_weight)


def test_the_trainer_criterion_and_val_loss_are_the_weighted_cross_entropy():
    torch.manual_seed(0)
    weight = torch.tensor([0.5, 2.0, 4.0])
    trainer = _trainer(class_weight=weight)
    assert isinstance(trainer.criterion, nn.CrossEntropyLoss) and torch.equal(trainer.criterion.weight, weight)
    images, target = torch.rand(6, 3, 4, 4), torch.tensor([0, 0, 0, 1, 1, 2])
    with torch.no_grad():
        out = trainer.model(images)
        assert trainer._loss(images, target).item() == pytest.approx(F.cross_entropy(out, target, weight=weight).item())
        assert trainer._loss(images, target).item() != pytest.approx(F.cross_entropy(out, target).item())
    # the val loss (history's val_loss) is the same weighted mean, over batches of any size
    batches = [(torch.arange(4), images[:4], target[:4]), (torch.arange(4, 6), images[4:], target[4:])]
    scored = predict(trainer.model, batches, "classification", channels_last=False, class_weight=weight)
    assert scored["loss"] == pytest.approx(F.cross_entropy(out, target, weight=weight).item(), rel=1e-6)
    unweighted = _trainer()
    assert unweighted.criterion.weight is None


def test_the_trainer_refuses_class_weights_for_regression():
    with pytest.raises(ValueError, match="class_weight is for classification"):
        _trainer("regression", torch.ones(3))


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """3 colour classes, 12 / 4 / 4 images (at least one of each per split)."""
    root = write_colour_folder(tmp_path_factory.mktemp("imbalanced"), per_class=12)
    for name in COLOUR_CLASSES[1:]:
        for path in sorted((root / name).iterdir())[4:]:
            path.unlink()
    manifest = from_folder(root, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    train = np.asarray(manifest.labels)[manifest.splits == 0]
    assert len(set(np.bincount(train).tolist())) > 1  # imbalanced train split
    return manifest


def _config(**overrides: Any) -> FinetuneConfig:
    values: dict[str, Any] = {"mode": "frozen", "epochs": 2, "batch_size": 8, "lr": 0.01, "input_size": 32,
                              "random_resized_crop": False, "hflip": False, "patience": 0, "n_boot": 0,
                              "progress": False, "num_threads": 1, "tta": False, "max_train_steps": 2}
    return FinetuneConfig(**{**values, **overrides})


def _run(manifest: Manifest, monkeypatch: pytest.MonkeyPatch, out_dir: Path, **overrides: Any
         ) -> tuple[Trainer, Any]:
    trainers: list[Trainer] = []

    class Recording(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(ft_run, "Trainer", Recording)
    result = finetune(manifest, LITE, "pretrained", _config(**overrides), out_dir=out_dir)
    return trainers[0], result


def test_a_balanced_run_trains_on_n_over_k_count_of_the_train_split_and_records_it(imbalanced, monkeypatch,
                                                                                   tmp_path: Path):
    trainer, result = _run(imbalanced, monkeypatch, tmp_path, class_weight="balanced")
    train = np.asarray(imbalanced.labels)[imbalanced.splits == 0]
    expected = len(train) / (3 * np.bincount(train, minlength=3))
    np.testing.assert_allclose(trainer.criterion.weight.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(result.class_weights, expected)
    assert result.metrics["best_params"]["class_weight"] == "balanced"
    meta = json.loads((tmp_path / META_NAME).read_text())
    assert meta["config"]["class_weight"] == "balanced"
    np.testing.assert_allclose(meta["class_weights"], expected)


def test_an_unweighted_run_is_recorded_as_before(imbalanced, monkeypatch, tmp_path: Path):
    trainer, result = _run(imbalanced, monkeypatch, tmp_path)
    assert trainer.criterion.weight is None and result.class_weights is None
    assert "class_weight" not in result.metrics["best_params"]
    assert "class_weights" not in json.loads((tmp_path / META_NAME).read_text())


def test_the_api_refuses_class_weight_for_a_regression_manifest(tmp_path: Path):
    ids = [f"{k}.png" for k in range(8)]
    for name in ids:
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    splits = assign_splits(ids, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    manifest = Manifest(ids, ids, splits, "regression", targets=np.linspace(0, 1, 8), root=tmp_path)
    with pytest.raises(ParamError, match=r"class_weight='balanced' weighs classes; this is a regression run.*"
                                         r"Allowed for regression: None"):
        finetune(manifest, LITE, "pretrained", _config(class_weight="balanced"))
