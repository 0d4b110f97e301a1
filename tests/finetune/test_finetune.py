"""End-to-end fine-tuning on tiny colour images, CPU only, a few steps per mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _support.files import COLOUR_CLASSES, write_colour_folder
from featcache.extract.decode.images import load_rgb
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest, assign_splits
from featcache.extract.inputs.sources import from_folder
from featcache.extract.zoo.registry import get_backbone
from featcache.extract.zoo.weights import load_backbone
from featcache.finetune.config import MODES, FinetuneConfig
from featcache.finetune.export import MODEL_KEY, export_backbone, export_finetuned_onnx
from featcache.finetune.model import build_model, load_checkpoint, load_weights_with_report, replace_head
from featcache.finetune.optim import make_optimizer
from featcache.finetune.run import finetune

LITE = "efficientnet_lite0"
SIZE = 32  # network input side: small enough for a few CPU steps per test


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """24 images, 3 colour classes: 12 train / 6 val / 6 test."""
    root = write_colour_folder(tmp_path_factory.mktemp("colours"), per_class=8)
    return from_folder(root, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)


@pytest.fixture(scope="module")
def regression_manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """24 grey images whose target is their brightness."""
    root = tmp_path_factory.mktemp("grey")
    rng = np.random.default_rng(1)
    ids, targets = [], []
    for index in range(24):
        level = float(rng.uniform(20, 230))
        pixels = np.clip(level + rng.normal(0, 10, size=(24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{index:03d}.png")
        ids.append(f"{index:03d}.png")
        targets.append(level / 255.0)
    splits = assign_splits(ids, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    return Manifest(ids, ids, splits, "regression", targets=np.array(targets), root=root)


def _config(mode: str, **overrides: Any) -> FinetuneConfig:
    # One batch = the whole train split, no augmentation: every step sees the same batch, so its loss must fall.
    values: dict[str, Any] = {"mode": mode, "epochs": 5, "batch_size": 12, "lr": 0.01 if mode == "frozen" else 3e-3,
                              "input_size": SIZE, "random_resized_crop": False, "hflip": False, "patience": 0,
                              "warmup_epochs": 2, "n_boot": 20, "progress": False, "num_threads": 1}
    values.update(overrides)
    return FinetuneConfig(**values)


def _state(model: nn.Module, exclude: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(exclude)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


@pytest.fixture(scope="module")
def pretrained_trunk() -> dict[str, torch.Tensor]:
    return _state(load_backbone(LITE, "pretrained").model, "classifier.")


@pytest.fixture(scope="module")
def runs(manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every mode once on EfficientNet-Lite0 (pretrained), with per-epoch trunk snapshots."""
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        snapshots: list[dict[str, torch.Tensor]] = []
        out_dir = tmp_path_factory.mktemp(f"run-{mode}")

        def snapshot(row: dict[str, Any], model: nn.Module, into: list = snapshots) -> None:
            into.append(_state(model, "classifier."))

        result = finetune(manifest, LITE, "pretrained", _config(mode), out_dir=out_dir, on_epoch_end=snapshot)
        out[mode] = {"result": result, "snapshots": snapshots, "out_dir": out_dir}
    return out


# ------------------------------------------------------------------------------ heads and weights
@pytest.mark.parametrize("name, module, width", [(LITE, "classifier", 1280), ("resnet18", "fc", 512),
                                                 ("googlenet", "fc", 1024), ("alexnet", "classifier.6", 4096)])
def test_replace_head_swaps_the_classifier_of_each_family(name: str, module: str, width: int):
    spec = get_backbone(name)
    assert spec.classifier == module
    model = load_backbone(name, "random").model
    model, names = replace_head(model, spec, 7)
    head = model.get_submodule(module)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (width, 7)
    assert names == [f"{module}.weight", f"{module}.bias"]
    assert set(names) <= dict(model.named_parameters()).keys()


def test_replace_head_regression_has_one_output():
    model, _ = replace_head(load_backbone("resnet18", "random").model, get_backbone("resnet18"), 1)
    assert model(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 1)


def test_weight_report_lists_the_head_as_shape_mismatch_and_copies_everything_else(tmp_path: Path):
    source = load_backbone(LITE, "pretrained").model.state_dict()
    model, _ = build_model(LITE, 3, seed=0)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    report = load_weights_with_report(model, source, source="pretrained")
    assert set(report.skipped_shape_mismatch) == {"classifier.weight", "classifier.bias"}
    assert report.skipped_shape_mismatch["classifier.weight"] == {"source": [1000, 1280], "model": [3, 1280]}
    assert set(report.copied) == set(source) - {"classifier.weight", "classifier.bias"}
    assert not report.skipped_module_mismatch and not report.skipped_name_missing and not report.missing_in_source
    state = model.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in report.copied)
    assert all(torch.equal(state[k], v) for k, v in fresh_head.items())  # the new head is untouched
    text = str(report)
    assert "294 tensors copied" in text and "classifier.weight: source (1000, 1280) -> model (3, 1280)" in text
    saved = json.loads(report.save(tmp_path / "report.json").read_text())
    assert saved["counts"]["copied"] == 294 and saved["counts"]["skipped_shape_mismatch"] == 2


def test_weight_report_never_half_loads_a_module():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model.register_buffer("extra", torch.zeros(1))
    source = nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2)).state_dict()
    source["stray.weight"] = torch.ones(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_weights_with_report(model, source)
    assert report.copied == ["0.weight", "0.bias"]
    assert list(report.skipped_shape_mismatch) == ["1.weight"]
    assert report.skipped_module_mismatch == ["1.bias"]  # same shape, but its module did not match
    assert report.skipped_name_missing == ["stray.weight"] and report.missing_in_source == ["extra"]
    assert torch.equal(model[1].bias, before["1.bias"]) and torch.equal(model[0].weight, source["0.weight"])
    assert sorted(report.not_copied) == ["1.bias", "1.weight", "extra"]


# ------------------------------------------------------------------------------ config and optimizer
def test_config_rejects_bad_values_with_hints():
    with pytest.raises(ValueError, match="Did you mean 'low_lr'"):
        FinetuneConfig(mode="lowlr")
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        FinetuneConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="warmup_epochs < epochs"):
        FinetuneConfig(mode="unfreeze", epochs=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="crop_scale"):
        FinetuneConfig(crop_scale=(0.9, 0.5))
    assert FinetuneConfig.from_dict({"crop_scale": [0.4, 1.0]}).crop_scale == (0.4, 1.0)


def test_optimizer_param_groups_follow_each_recipe():
    model, head = build_model("resnet18", 3)
    n_params = len(list(model.parameters()))

    def groups(mode: str, phase: str = "full", **kw: Any) -> dict[str, tuple[float, int]]:
        opt = make_optimizer(model, head, FinetuneConfig(mode=mode, lr=0.01, epochs=3, **kw), phase)
        return {g["name"]: (g["lr"], len(g["params"])) for g in opt.param_groups}

    assert groups("frozen") == {"head": (0.01, 2)}
    assert groups("unfreeze", "head") == {"head": (0.01, 2)}
    low = groups("low_lr", backbone_lr_mult=0.1)
    assert low["head"] == (0.01, 2) and low["backbone"] == (pytest.approx(0.001), n_params - 2)
    assert groups("scratch") == {"backbone": (0.01, n_params - 2), "head": (0.01, 2)}
    unfrozen = groups("unfreeze", backbone_lr_mult=0.01, lr_groups=2)
    assert list(unfrozen) == ["backbone.0", "backbone.1", "head"]
    assert unfrozen["backbone.0"][0] == pytest.approx(0.0001) and unfrozen["backbone.1"][0] == pytest.approx(0.001)
    assert sum(count for _, count in unfrozen.values()) == n_params
    sgd = make_optimizer(model, head, FinetuneConfig(optimizer="sgd", weight_decay=0.0), "full")
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]


# ------------------------------------------------------------------------------ training runs
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_and_its_loss_falls(runs: dict[str, dict[str, Any]], mode: str):
    result = runs[mode]["result"]
    losses = result.step_losses
    assert result.steps == len(losses) == 5
    assert losses[-1] < losses[0], losses
    assert result.epochs_run == 5 and 1 <= result.best_epoch <= 5
    assert [row["phase"] for row in result.history] == (["head"] * 2 + ["full"] * 3 if mode == "unfreeze"
                                                       else ["head"] * 5 if mode == "frozen" else ["full"] * 5)
    metrics = result.metrics
    assert 0 <= metrics["accuracy"] <= 1 and metrics["n_test"] == 6 and metrics["n_train"] == 12
    assert metrics["n_features"] == 1280 and metrics["fit_seconds"] > 0
    assert metrics["best_params"]["mode"] == mode
    assert result.y_score.shape == (6, 3) and np.allclose(result.y_score.sum(axis=1), 1)


def test_frozen_mode_leaves_the_backbone_bitwise_unchanged(runs, pretrained_trunk):
    run = runs["frozen"]
    assert all(_equal(snapshot, pretrained_trunk) for snapshot in run["snapshots"])  # buffers included
    assert _equal(_state(run["result"].model, "classifier."), pretrained_trunk)
    assert not all(torch.equal(a, b) for a, b in zip(runs["frozen"]["result"].model.classifier.parameters(),
                                                    build_model(LITE, 3, seed=0)[0].classifier.parameters()))


def test_unfreeze_keeps_the_backbone_frozen_during_warmup_only(runs, pretrained_trunk):
    snapshots = runs["unfreeze"]["snapshots"]
    assert _equal(snapshots[0], pretrained_trunk) and _equal(snapshots[1], pretrained_trunk)
    assert not _equal(snapshots[-1], pretrained_trunk)
    lrs = runs["unfreeze"]["result"].history[2]["lr"]
    assert list(lrs) == ["backbone.0", "backbone.1", "backbone.2", "head"]
    assert lrs["backbone.0"] < lrs["backbone.1"] < lrs["backbone.2"] < lrs["head"]


def test_low_lr_moves_the_backbone_at_a_tenth_of_the_head_lr(runs, pretrained_trunk):
    result = runs["low_lr"]["result"]
    after = _state(result.model, "classifier.")
    moved = [k for k in pretrained_trunk if k.endswith("weight") and not torch.equal(after[k], pretrained_trunk[k])]
    assert len(moved) > 50
    assert result.history[0]["lr"] == {"backbone": pytest.approx(3e-4), "head": pytest.approx(3e-3)}


def test_scratch_copies_nothing(runs):
    report = runs["scratch"]["result"].report
    assert report.copied == [] and len(report.missing_in_source) == 296


def test_tta_is_reported_beside_the_plain_score(runs):
    result = runs["low_lr"]["result"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss"):
        assert name in result.metrics and f"tta_{name}" in result.metrics
        assert f"tta_{name}" in result.metrics["ci"]
    assert result.tta_score is not None and result.tta_score.shape == result.y_score.shape


def test_checkpoint_reloads_with_weights_only_and_predicts_identically(runs, manifest):
    run = runs["low_lr"]
    result, out_dir = run["result"], run["out_dir"]
    meta = json.loads((out_dir / "model.json").read_text())
    assert meta["classes"] == sorted(COLOUR_CLASSES) and meta["input_size"] == SIZE and meta["mode"] == "low_lr"
    assert json.loads((out_dir / "weight_report.json").read_text())["counts"]["copied"] == 294
    assert len(json.loads((out_dir / "history.json").read_text())["history"]) == 5
    state = torch.load(out_dir / "model.pt", weights_only=True)
    assert state["classifier.weight"].shape == (3, 1280)
    reloaded = load_checkpoint(out_dir / "model.pt", LITE, meta["n_outputs"])
    pre = Preprocessor.from_spec(get_backbone(LITE), input_size=SIZE)
    images = torch.stack([pre(load_rgb(manifest.absolute_path(int(r)))) for r in result.test_rows])
    with torch.no_grad():
        assert torch.equal(reloaded(images), result.model(images))
        probabilities = reloaded(images).softmax(dim=1).double().numpy()
    assert np.allclose(probabilities, result.y_score, atol=1e-5)


def test_regression_mode_uses_standardised_mse(regression_manifest: Manifest):
    result = finetune(regression_manifest, "resnet18", "random",
                      _config("low_lr", epochs=4, lr=3e-3, max_train_steps=4))
    assert result.task == "regression" and result.n_outputs == 1
    assert result.step_losses[-1] < result.step_losses[0]
    assert result.y_score.shape == (6,) and result.tta_score.shape == (6,)
    assert np.array_equal(result.tta_score, result.y_score)  # hflip false: TTA's only view is the center crop
    assert {"rmse", "mae", "r2", "tta_rmse"} <= result.metrics.keys()
    train = regression_manifest.targets[regression_manifest.splits == 0]
    assert result.target_mean == pytest.approx(train.mean()) and result.target_std == pytest.approx(train.std())
    assert result.history[0]["metric"] == "val_rmse"


# ------------------------------------------------------------------------------ export
def test_exported_backbone_loads_with_load_backbone_and_gives_the_finetuned_features(runs, tmp_path: Path):
    result = runs["low_lr"]["result"]
    path = export_backbone(result.model, result.spec, tmp_path / "backbone.pt", result.original_head)
    loaded = load_backbone(LITE, weights=str(path))  # strict load into the 1000-class architecture
    assert loaded.weights_id == "file:backbone.pt"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = result.model.forward_head(result.model.forward_features(x), pre_logits=True)
        theirs = loaded.model.forward_head(loaded.model.forward_features(x), pre_logits=True)
    assert torch.equal(ours, theirs)
    assert torch.equal(loaded.model.classifier.weight, result.original_head["classifier.weight"])
    with pytest.raises(ValueError, match="original_head"):
        export_backbone(result.model, result.spec, tmp_path / "bad.pt", {"classifier.weight": torch.zeros(1)})


def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(manifest: Manifest, tmp_path: Path):
    import onnxruntime as ort

    # ResNet-18 exports about twice as fast as EfficientNet-Lite0 (whose export the digits budget run covers).
    result = finetune(manifest, "resnet18", "random", _config("low_lr", epochs=1, tta=False, n_boot=0))
    path = export_finetuned_onnx(result, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_outputs()[0].name == "scores"
    x = torch.randn(5, 3, SIZE, SIZE)
    (scores,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = result.model(x).softmax(dim=1).numpy()
    assert scores.shape == (5, 3)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    # The file alone says how to use it: the class order of the scores and the preprocessing of the input.
    described = json.loads(session.get_modelmeta().custom_metadata_map[MODEL_KEY])
    spec = get_backbone("resnet18")
    assert described["task"] == "classification" and described["classes"] == result.classes == manifest.classes
    assert described["input"]["shape"] == ["batch", 3, SIZE, SIZE] and described["backbone"] == "resnet18"
    preprocess = described["preprocess"]
    assert preprocess["mean"] == list(spec.mean) and preprocess["std"] == list(spec.std)
    assert preprocess["input_size"] == SIZE and preprocess["resize_mode"] == "crop"
    assert described["weights_id"] == result.weights_id and described["mode"] == "low_lr"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_trains_and_returns_a_cpu_model(manifest: Manifest):
    result = finetune(manifest, LITE, "pretrained", _config("low_lr", device="cuda", amp=True))
    assert result.step_losses[-1] < result.step_losses[0]
    assert result.model.classifier.weight.device.type == "cpu" and result.model.classifier.weight.dtype == torch.float32


def test_a_bare_regression_model_is_described_by_what_the_export_was_told():
    from featcache.finetune.export import model_description

    described = model_description(None, "regression", 48)
    assert described["output"]["shape"] == ["batch"] and "target units" in described["output"]["meaning"]
    assert described["input"]["shape"] == ["batch", 3, 48, 48]
    assert "classes" not in described and "preprocess" not in described  # nothing invented for a bare model
