"""The ``finetune`` stage: metrics JSON in the train stage's format, run files, and the compare report."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.extract.inputs.manifest import Manifest, ManifestError
from featcache.extract.zoo.weights import load_backbone
from featcache.pipeline.compare import compare
from featcache.pipeline.config import parse_params
from featcache.pipeline.finetune import export_stage, finetune_section, finetune_stage, mode_config
from featcache.pipeline.prepare import prepare
from featcache.runs import read_run, sidecar_path, write_run


def _section(**modes: Any) -> dict[str, Any]:
    return {
        "backbone": "efficientnet_lite0", "weights": "pretrained", "export_onnx": False, "cam_images": 4,
        "defaults": {"input_size": 32, "batch_size": 6, "epochs": 2, "lr": 0.01, "patience": 0, "hflip": False,
                     "num_threads": 1, "max_train_steps": 3},
        "modes": modes or {"frozen": {}},
    }


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory: pytest.TempPathFactory, folder_factory, params_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ftstage")
    folder_factory(root / "images", per_class=8)
    params = parse_params(params_factory(str(root / "images")))
    prepare(params, root / "prepared")
    paths = {"manifest": root / "prepared" / "manifest.csv", "out": root / "models" / "frozen",
             "metrics": root / "metrics" / "finetune" / "tiny" / "frozen.json",
             "confusion": root / "plots" / "frozen.csv"}
    metrics = finetune_stage(params, "frozen", paths["manifest"], paths["out"], paths["metrics"], paths["confusion"],
                             finetune=_section(), progress=False)
    return {"root": root, "params": params, "result": metrics, **paths}


def test_stage_writes_metrics_in_the_train_stage_format(stage_run):
    # As the train stage: the metrics file holds the test scores only (clean `dvc metrics show/diff` columns),
    # everything else is in the sidecar, and read_run gives back the whole run.
    scores = json.loads(stage_run["metrics"].read_text())["efficientnet_lite0"]["finetune"]["finetune-frozen"]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "log_loss", "tta_accuracy"} <= scores.keys()
    assert all(isinstance(value, float) for value in scores.values()), scores
    assert not {"fit_seconds", "n_train", "n_bad_images", "best_params"} & scores.keys()
    saved = read_run(stage_run["metrics"])
    assert saved == json.loads(json.dumps(stage_run["result"]))
    assert {k: saved[k] for k in ("dataset", "backbone", "layer", "head", "task")} == {
        "dataset": "tiny", "backbone": "efficientnet_lite0", "layer": "finetune", "head": "finetune-frozen",
        "task": "classification"}
    assert {"accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ci", "n_features", "n_train", "n_val",
            "fit_seconds", "predict_seconds", "best_params", "tta_accuracy"} <= saved.keys()
    assert saved["n_features"] == 1280 and saved["node"] == "classifier"
    assert saved["best_params"]["mode"] == "frozen" and saved["best_params"]["input_size"] == 32
    assert set(saved["ci"]["accuracy"]) and len(saved["ci"]["accuracy"]) == 2


def test_stage_writes_checkpoint_report_backbone_and_confusion_and_no_export(stage_run):
    out = stage_run["out"]
    for name in ("model.pt", "model.json", "weight_report.json", "history.json", "backbone.pt"):
        assert (out / name).is_file(), name
    assert not (out / "model.onnx").exists() and not (out / "cam").exists()  # the export stage's
    report = json.loads((out / "weight_report.json").read_text())
    assert set(report["skipped_shape_mismatch"]) == {"classifier.weight", "classifier.bias"}
    assert torch.load(out / "model.pt", weights_only=True)["classifier.weight"].shape == (3, 1280)
    load_backbone("efficientnet_lite0", weights=str(out / "backbone.pt"))  # usable by the extract stage
    with open(stage_run["confusion"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == stage_run["result"]["n_test"] and set(rows[0]) == {"actual", "predicted"}


def test_compare_ranks_the_finetune_run_beside_cached_heads(stage_run, tmp_path: Path):
    metrics_dir = tmp_path / "metrics"
    cached = {"dataset": "tiny", "backbone": "efficientnet_lite0", "layer": "pool", "head": "logreg",
              "task": "classification", "accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5,
              "log_loss": 1.0, "ci": {}, "n_features": 1280, "fit_seconds": 0.1, "predict_seconds": 0.01,
              "best_params": {"C": 1.0}}
    (metrics_dir / "efficientnet_lite0" / "pool").mkdir(parents=True)
    (metrics_dir / "efficientnet_lite0" / "pool" / "logreg.json").write_text(json.dumps(cached))
    (metrics_dir / "finetune").mkdir()
    for path in (stage_run["metrics"], sidecar_path(stage_run["metrics"])):
        (metrics_dir / "finetune" / path.name).write_text(path.read_text())
    runs = compare(metrics_dir, tmp_path / "reports")
    assert {run["head"] for run in runs} == {"logreg", "finetune-frozen"}
    table = (tmp_path / "reports" / "compare.md").read_text()
    assert "| efficientnet_lite0 | finetune | finetune-frozen |" in table


def test_mode_settings_merge_defaults_and_overrides():
    section = finetune_section(None, _section(frozen={"lr": 0.5}, unfreeze={"epochs": 3, "warmup_epochs": 1}))
    assert mode_config(section, "frozen").lr == 0.5
    unfreeze = mode_config(section, "unfreeze", n_boot=7)
    assert (unfreeze.epochs, unfreeze.warmup_epochs, unfreeze.lr, unfreeze.n_boot) == (3, 1, 0.01, 7)
    assert mode_config(section, "scratch").epochs == 2  # unlisted mode: defaults
    with pytest.raises(ValueError, match="mode 'frozen'.*did you mean 'epochs'"):
        mode_config(finetune_section(None, _section(frozen={"epoch": 3})), "frozen")
    with pytest.raises(ValueError, match="Unknown key"):
        finetune_section(None, {"backbnoe": "resnet18"})
    with pytest.raises(ValueError, match="No 'finetune' section"):
        finetune_section(object())


@pytest.fixture(scope="module")
def regression_images(tmp_path_factory: pytest.TempPathFactory):
    """12 images whose target is their brightness, in ``images/t.csv`` (path,target)."""
    root = tmp_path_factory.mktemp("ftreg") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = ["path,target"]
    for k in range(12):
        brightness = rng.uniform(0.1, 0.9)
        Image.fromarray(np.full((24, 24, 3), int(brightness * 255), dtype=np.uint8)).save(root / f"i{k:02d}.png")
        lines.append(f"i{k:02d}.png,{brightness:.4f}")
    (root / "t.csv").write_text("\n".join(lines) + "\n")
    return root


def test_regression_writes_the_predictions_the_scatter_plot_reads(regression_images, tmp_path, params_factory):
    raw = params_factory(str(regression_images))
    raw["data"].update(source="csv", csv="t.csv", task="regression")
    raw["heads"] = {}
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    plot = tmp_path / "plots" / "frozen.csv"
    metrics = finetune_stage(params, "frozen", tmp_path / "prepared" / "manifest.csv", tmp_path / "out",
                             tmp_path / "metrics" / "frozen.json", plot, finetune=_section(), progress=False)
    with open(plot, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == metrics["n_test"] > 0 and list(rows[0]) == ["actual", "predicted"]  # as the heads' CSV
    targets = {round(float(line.split(",")[1]), 4) for line in (regression_images / "t.csv").read_text().split()[1:]}
    assert {round(float(row["actual"]), 4) for row in rows} <= targets  # numbers in target units
    assert all(np.isfinite(float(row["predicted"])) for row in rows)


@pytest.mark.parametrize(("splits", "message"), [
    ([0] * 8 + [1] * 4, r"The manifest \(images under .*\) has no test rows \(rows per split: "
                        r"\{'train': 8, 'val': 4, 'test': 0\}\).*split 'test'"),
    ([1] * 8 + [2] * 4, r"has no train rows .*split 'train'"),
])
def test_a_hand_made_manifest_without_train_or_test_rows_is_refused(regression_images, tmp_path, params_factory,
                                                                    splits, message):
    ids = [f"i{k:02d}.png" for k in range(12)]
    manifest = tmp_path / "manifest.csv"
    Manifest(ids, ids, np.array(splits, dtype=np.uint8), "regression", targets=np.arange(12.0),
             root=regression_images).write(manifest)
    raw = params_factory(str(regression_images))
    raw["data"].update(task="regression", source="csv")  # (a hand-made manifest)
    raw["heads"] = {}
    with pytest.raises(ManifestError, match=message):
        finetune_stage(parse_params(raw), "frozen", manifest, tmp_path / "out", tmp_path / "m.json",
                       finetune=_section(), progress=False)
    assert not (tmp_path / "out").exists()  # refused before any training


def test_a_hand_made_manifest_with_a_constant_train_target_is_refused(regression_images, tmp_path, params_factory):
    ids = [f"i{k:02d}.png" for k in range(12)]
    manifest = tmp_path / "manifest.csv"
    Manifest(ids, ids, np.array([0] * 8 + [2] * 4, dtype=np.uint8), "regression",
             targets=np.array([0.5] * 8 + [1.0, 2.0, 3.0, 4.0]), root=regression_images).write(manifest)
    raw = params_factory(str(regression_images))
    raw["data"].update(task="regression", source="csv")  # (a hand-made manifest)
    raw["heads"] = {}
    with pytest.raises(ManifestError, match=r"all 8 train rows have the same regression target 0\.5"):
        finetune_stage(parse_params(raw), "frozen", manifest, tmp_path / "out", tmp_path / "m.json",
                       finetune=_section(), progress=False)


def test_the_finetune_project_validates_the_whole_params_file_first():
    """The finetune stages track only the keys they read: a mistyped one (``finetune.cam_image``) passed unseen."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    stages = yaml.safe_load((root / "finetune" / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    first, definition = next(iter(stages.items()))  # dvc repro runs independent stages in file order
    assert first == "check" and definition["cmd"] == "featcache check --params ../params.yaml"
    assert definition["params"] == [{"../params.yaml": None}]  # every key, so any edit reruns it


def test_the_cis_are_drawn_as_the_cached_heads_are_with_train_seed(regression_images, tmp_path, params_factory):
    """The train stage bootstraps with ``train.seed``; the finetune stage used its training seed instead."""
    from featcache.heads.bootstrap import metrics_with_ci

    raw = params_factory(str(regression_images))
    raw["data"].update(source="csv", csv="t.csv", task="regression")
    raw["train"].update(seed=5, n_boot=50)
    raw["heads"] = {}
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    plot = tmp_path / "frozen.csv"
    metrics = finetune_stage(params, "frozen", tmp_path / "prepared" / "manifest.csv", tmp_path / "out",
                             tmp_path / "frozen.json", plot, finetune=_section(), progress=False)
    with open(plot, newline="") as handle:
        rows = list(csv.DictReader(handle))
    actual, predicted = (np.array([float(row[key]) for row in rows]) for key in ("actual", "predicted"))
    as_the_heads = metrics_with_ci("regression", actual, predicted, n_boot=50, seed=5)["ci"]["rmse"]
    assert metrics["ci"]["rmse"] == pytest.approx(as_the_heads, rel=1e-5)
    assert metrics["ci"]["tta_rmse"] == pytest.approx(as_the_heads, rel=1e-5)  # hflip: false, one view
    assert metrics_with_ci("regression", actual, predicted, n_boot=50, seed=0)["ci"]["rmse"] != pytest.approx(
        as_the_heads, rel=1e-5)  # the seeds draw different resamples, so the test tells them apart


def test_a_rerun_into_the_same_folder_leaves_no_file_of_the_old_run(stage_run, tmp_path):
    """Outside DVC: a rerun with ``export_onnx: false`` and fewer overlays kept the old run's ONNX model and CAMs;
    a new training run leaves no export of the old model beside it."""
    out = tmp_path / "out"
    (out / "cam").mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"the previous run's model")
    (out / "cam" / "old__0000_png.png").write_bytes(b"png")
    finetune_stage(stage_run["params"], "frozen", stage_run["manifest"], out, tmp_path / "m.json",
                   finetune=_section(), progress=False)
    assert not (out / "model.onnx").exists() and not list((out / "cam").glob("*.png"))
    (out / "model.onnx").write_bytes(b"an earlier export")
    (out / "cam" / "old__0000_png.png").write_bytes(b"png")
    export_stage(stage_run["params"], out, stage_run["manifest"], finetune={**_section(), "cam_images": 1})
    assert not (out / "model.onnx").exists()  # export_onnx: false
    assert len(list((out / "cam").glob("*.png"))) == 1 and not (out / "cam" / "old__0000_png.png").exists()


def test_a_mistyped_mode_is_named_with_the_close_match():
    from featcache.pipeline.finetune import FinetuneSections
    from featcache.pipeline.params.base import ConfigError, validate_sections

    with pytest.raises(ConfigError, match=r"finetune\.modes: unknown mode 'lowlr'\. Did you mean 'low_lr'\? "
                                          r"Allowed: frozen, low_lr, unfreeze, scratch"):
        validate_sections(FinetuneSections, {"finetune": {"modes": {"lowlr": {"epochs": 2}}}})


def _cli_finetune(tmp_path: Path, raw_params: dict, manifest: Path) -> list[str]:
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**raw_params, "finetune": _section()}))
    return ["finetune", "--params", str(tmp_path / "params.yaml"), "--mode", "frozen", "--manifest", str(manifest),
            "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--no-progress"]


@pytest.mark.parametrize("case", ["task", "one_class", "unreadable"])
def test_bad_data_stops_the_cli_with_a_message_not_a_traceback(regression_images, tmp_path, params_factory, capsys,
                                                               case):
    """These were plain ValueErrors: the CLI printed a traceback (UserError is what it reports as a message)."""
    from featcache.pipeline.cli import main

    ids = [f"i{k:02d}.png" for k in range(12)]
    splits = np.array([0] * 8 + [1] * 2 + [2] * 2, dtype=np.uint8)
    root = regression_images
    if case == "unreadable":
        root = tmp_path / "broken"
        root.mkdir()
        for name in ids:
            (root / name).write_bytes(b"not a png")
    if case == "task":
        manifest = Manifest(ids, ids, splits, "regression", targets=np.arange(12.0), root=root)
        expected = r"data\.task is 'classification' but .* is a regression manifest"
    else:
        labels = np.zeros(12, dtype=np.int64) if case == "one_class" else np.arange(12) % 2
        manifest = Manifest(ids, ids, splits, "classification", labels=labels,
                            classes=["a"] if case == "one_class" else ["a", "b"], root=root)
        expected = (r"needs >= 2 classes; the manifest has \['a'\]\. Hint" if case == "one_class"
                    else r"no readable training image .* Hint")
    manifest.write(tmp_path / "manifest.csv")
    raw = params_factory(str(root))
    raw["heads"] = {}
    assert main(_cli_finetune(tmp_path, raw, tmp_path / "manifest.csv")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(expected, err.splitlines()[-1]), err


def test_a_class_only_in_the_test_split_is_refused_as_prepare_and_the_heads_do(regression_images, tmp_path,
                                                                                 params_factory):
    """A hand-made manifest whose class 'c' has no train row: fine-tuning trained on and scored 0 on it."""
    ids = [f"i{k:02d}.png" for k in range(12)]
    labels = np.array([0, 1] * 4 + [2] * 4)
    manifest = tmp_path / "manifest.csv"
    Manifest(ids, ids, np.array([0] * 8 + [2] * 4, dtype=np.uint8), "classification", labels=labels,
             classes=["a", "b", "c"], root=regression_images).write(manifest)
    raw = params_factory(str(regression_images))
    raw["heads"] = {}
    with pytest.raises(ManifestError, match=r"Classes without any training example after the split: \['c'\]"):
        finetune_stage(parse_params(raw), "frozen", manifest, tmp_path / "out", tmp_path / "m.json",
                       finetune=_section(), progress=False)
    assert not (tmp_path / "out").exists()  # refused before any training


# ------------------------------------------------------------------------------ the export stage
def test_the_export_is_made_from_the_saved_run_folder_as_from_the_run_in_memory(stage_run, tmp_path, capsys):
    """``featcache finetune-export`` reads the run folder back: the CAM overlays are the ones the trained model
    in memory gives (same images, same maps), and the ONNX model scores as the checkpoint does."""
    import onnxruntime as ort
    import yaml

    from featcache.extract.decode.images import load_rgb
    from featcache.finetune.cam import class_activation_maps, save_cam_overlays, tensor_to_pil
    from featcache.finetune.export import MODEL_KEY
    from featcache.finetune.model import load_checkpoint
    from featcache.finetune.run import preprocessor
    from featcache.finetune.saved import SavedRun
    from featcache.pipeline.cli import main

    raw = {"data": stage_run["params"].data.model_dump(), "finetune": {**_section(), "export_onnx": True}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "exports"
    assert main(["finetune-export", "--params", str(tmp_path / "params.yaml"), "--model", str(stage_run["out"]),
                 "--manifest", str(stage_run["manifest"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: model.onnx and 3 CAM overlays"
    assert not (stage_run["out"] / "model.onnx").exists()  # the run folder is only read

    run = SavedRun.load(stage_run["out"])
    meta = json.loads((stage_run["out"] / "model.json").read_text())
    model = load_checkpoint(stage_run["out"] / "model.pt", "efficientnet_lite0", 3)
    manifest = Manifest.read(stage_run["manifest"])
    test_rows = np.flatnonzero(manifest.splits == 2)
    picked = [int(next(r for r in test_rows if manifest.labels[r] == k)) for k in range(3)]  # one per class
    pre = preprocessor(run.spec, run.config)
    images = torch.stack([pre(load_rgb(manifest.absolute_path(row))) for row in picked])
    expected = save_cam_overlays([tensor_to_pil(image, pre.mean, pre.std) for image in images],
                                 class_activation_maps(model, run.spec, images), tmp_path / "expected",
                                 [manifest.ids[row] for row in picked])
    assert sorted(path.name for path in (out / "cam").glob("*.png")) == sorted(path.name for path in expected)
    for path in expected:
        assert (out / "cam" / path.name).read_bytes() == path.read_bytes(), path.name

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(scores, model(images).softmax(dim=1).numpy(), atol=1e-5)
    described = json.loads(session.get_modelmeta().custom_metadata_map[MODEL_KEY])
    assert described["classes"] == meta["classes"] and described["preprocess"] == meta["preprocess"]
    assert described["mode"] == "frozen" and described["weights_id"] == meta["weights"]


def test_the_export_refuses_a_folder_that_is_not_a_run_and_another_manifest(stage_run, tmp_path, capsys):
    from featcache.finetune.saved import SavedRunError
    from featcache.pipeline.cli import main

    with pytest.raises(SavedRunError, match=r"model\.json not found\. Hint: pass the --out folder"):
        export_stage(stage_run["params"], tmp_path, stage_run["manifest"], finetune=_section())
    (tmp_path / "params.yaml").write_text("data: {name: tiny}\n")
    assert main(["finetune-export", "--params", str(tmp_path / "params.yaml"), "--model", str(tmp_path),
                 "--manifest", str(stage_run["manifest"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featcache finetune-export: error: ") and "model.json not found" in err, err
    ids = [f"i{k:02d}.png" for k in range(4)]
    Manifest(ids, ids, np.array([0, 0, 2, 2], dtype=np.uint8), "classification", labels=np.array([0, 1, 0, 1]),
             classes=["x", "y"], root=tmp_path).write(tmp_path / "other.csv")
    with pytest.raises(SavedRunError, match=r"trained on a classification manifest with classes \[.*\]; the "
                                            r"manifest given is a classification one with classes \['x', 'y'\]"):
        export_stage(stage_run["params"], stage_run["out"], tmp_path / "other.csv", tmp_path / "x",
                     finetune=_section())
    assert not (tmp_path / "x").exists()  # refused before writing anything


def test_the_training_stage_tracks_no_export_setting_and_the_export_stage_only_those():
    """``export_onnx`` and ``cam_images`` were params of ``finetune@<mode>``: toggling one retrained every mode."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    stages = yaml.safe_load((root / "finetune" / "dvc.yaml").read_text(encoding="utf-8"))["stages"]

    def tracked(stage: dict) -> set[str]:
        return {key for entry in stage["do"]["params"] for keys in entry.values() for key in keys}

    exports = {"finetune.export_onnx", "finetune.cam_images"}
    assert not tracked(stages["finetune"]) & exports, tracked(stages["finetune"])
    assert tracked(stages["export"]) == exports
    export = stages["export"]["do"]
    assert export["cmd"].split()[:2] == ["featcache", "finetune-export"]
    assert "models/${data.name}/${key}" in export["deps"]  # made from the trained run folder
    assert "models/${data.name}/${key}" in stages["finetune"]["do"]["outs"]
    assert stages["export"]["foreach"] == stages["finetune"]["foreach"]


def test_the_run_writes_its_test_rows_and_compare_pairs_it_with_a_cached_head(stage_run, tmp_path: Path):
    """The fine-tuned run's ``.rows.npz`` holds the manifest's test ids (the order a store of that manifest keeps),
    so compare gives it a paired delta beside a cached head scored on the same rows."""
    from featcache.heads.bootstrap import metrics_with_ci, row_arrays
    from featcache.heads.paired import ids_sha256, read_rows, rows_path, write_rows

    manifest = Manifest.read(stage_run["manifest"])
    test_ids = [manifest.ids[k] for k in np.flatnonzero(manifest.splits == 2)]
    rows = read_rows(rows_path(stage_run["metrics"]))
    assert rows["ids_sha256"] == ids_sha256(test_ids) and len(rows["y_true"]) == stage_run["result"]["n_test"]
    np.testing.assert_array_equal(rows["y_true"], manifest.labels[manifest.splits == 2])

    metrics_dir = tmp_path / "metrics"
    (metrics_dir / "finetune").mkdir(parents=True)
    for path in (stage_run["metrics"], sidecar_path(stage_run["metrics"]), rows_path(stage_run["metrics"])):
        (metrics_dir / "finetune" / path.name).write_bytes(path.read_bytes())
    y = rows["y_true"].astype(np.int64)
    proba = np.full((y.size, 3), 0.05)
    proba[np.arange(y.size), y] = 0.9  # a perfect cached head: the best run
    cached = metrics_dir / "efficientnet_lite0" / "pool" / "logreg.json"
    write_run(cached, {"dataset": "tiny", "backbone": "efficientnet_lite0", "layer": "pool", "head": "logreg",
                       "task": "classification", **metrics_with_ci("classification", y, proba, 3, n_boot=50)})
    write_rows(rows_path(cached), row_arrays("classification", y, proba, 3),
               {"task": "classification", "ids_sha256": ids_sha256(test_ids), "n_boot": 50, "seed": 0,
                "n_classes": 3})
    runs = compare(metrics_dir, tmp_path / "reports")
    finetuned = next(run for run in runs if run["head"] == "finetune-frozen")
    assert "skipped" not in finetuned["paired"], finetuned["paired"]
    assert finetuned["paired"]["accuracy"]["delta"] == pytest.approx(stage_run["result"]["accuracy"] - 1.0)


def test_the_run_record_carries_the_kept_epochs_val_score_and_compare_selects_on_it(stage_run, tmp_path: Path):
    """The trainer scored val each epoch and kept the epoch of the best val loss (the default criterion): its val
    scores (no other pass over the val images) are the record's ``val``, which compare selects the run to quote on
    by accuracy, a metric the run was not selected on."""
    from featcache.heads.bootstrap import metrics_with_ci, row_arrays
    from featcache.heads.metrics import SELECTION_METRICS
    from featcache.heads.paired import read_rows, rows_path, write_rows

    saved = read_run(stage_run["metrics"])
    history = json.loads((stage_run["out"] / "history.json").read_text())["history"]
    kept = history[saved["best_params"]["best_epoch"] - 1]
    assert saved["n_val"] > 0 and kept["metric"] == "val_loss"
    assert saved["val"] == kept["val_scores"] == stage_run["result"]["val"]
    assert set(saved["val"]) == set(SELECTION_METRICS["classification"])
    assert kept["val_metric"] == kept["val_loss"] == min(row["val_loss"] for row in history)

    metrics_dir = tmp_path / "metrics"
    (metrics_dir / "finetune").mkdir(parents=True)
    for path in (stage_run["metrics"], sidecar_path(stage_run["metrics"]), rows_path(stage_run["metrics"])):
        (metrics_dir / "finetune" / path.name).write_bytes(path.read_bytes())
    rows = read_rows(rows_path(stage_run["metrics"]))
    y = rows["y_true"].astype(np.int64)
    proba = np.full((y.size, 3), 0.05)
    proba[np.arange(y.size), y] = 0.9  # perfect on test, worse on val: the test-best, not the selected run
    cached = metrics_dir / "efficientnet_lite0" / "pool" / "logreg.json"
    write_run(cached, {"dataset": "tiny", "backbone": "efficientnet_lite0", "layer": "pool", "head": "logreg",
                       "task": "classification", **metrics_with_ci("classification", y, proba, 3, n_boot=50),
                       "val": {"accuracy": saved["val"]["accuracy"] - 0.5, "log_loss": 9.0}})
    write_rows(rows_path(cached), row_arrays("classification", y, proba, 3),
               {"task": "classification", "ids_sha256": rows["ids_sha256"], "n_boot": 50, "seed": 0, "n_classes": 3})
    runs = {run["head"]: run for run in compare(metrics_dir, tmp_path / "reports")}
    assert runs["logreg"]["rank"] == 1 and runs["finetune-frozen"]["paired"].get("selected") is True
    assert runs["logreg"]["paired"]["reference"] == "efficientnet_lite0/finetune/finetune-frozen"
    assert runs["logreg"]["paired"]["accuracy"]["delta"] == pytest.approx(1.0 - stage_run["result"]["accuracy"])


def test_the_cli_exports_after_training_unless_told_not_to(stage_run, tmp_path: Path, params_factory, capsys):
    """``featcache finetune`` alone makes the exports its params ask for; the DVC project passes ``--no-export``
    and makes them in its export@<mode> stage."""
    import yaml

    from featcache.pipeline.cli import main

    raw = params_factory(str(stage_run["root"] / "images"))
    raw["finetune"] = {**_section(), "cam_images": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for flags, cams in (([], 2), (["--no-export"], 0)):
        out = tmp_path / f"out{len(flags)}"
        assert main(["finetune", "--params", str(tmp_path / "params.yaml"), "--mode", "frozen", "--manifest",
                     str(stage_run["manifest"]), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
                     "--no-progress", *flags]) == 0
        assert len(list(out.glob("cam/*.png"))) == cams, flags
        assert not (out / "model.onnx").exists()  # export_onnx: false
    assert f"{tmp_path / 'out0'}: 2 CAM overlays" in capsys.readouterr().out


def test_a_regression_run_is_paired_with_a_cached_head_on_the_manifest_targets(regression_images, tmp_path,
                                                                              params_factory):
    """The fine-tuned regression run's rows hold the manifest's float64 targets, as the cached heads' do (their
    store keeps the manifest's targets), so compare pairs the two. The run used to write its float32 training
    targets (0.3456 -> 0.34560001): compare then found other true values and left it unpaired."""
    from featcache.heads.bootstrap import metrics_with_ci, row_arrays
    from featcache.heads.paired import ids_sha256, read_rows, rows_path, write_rows

    raw = params_factory(str(regression_images))
    raw["data"].update(source="csv", csv="t.csv", task="regression")
    raw["train"].update(n_boot=20)
    raw["heads"] = {}
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    manifest = Manifest.read(tmp_path / "prepared" / "manifest.csv")
    metrics_path = tmp_path / "metrics" / "finetune" / "frozen.json"
    metrics = finetune_stage(params, "frozen", tmp_path / "prepared" / "manifest.csv", tmp_path / "out", metrics_path,
                             tmp_path / "frozen.csv", finetune=_section(), progress=False)
    test = np.flatnonzero(manifest.splits == 2)
    rows = read_rows(rows_path(metrics_path))
    assert rows["y_true"].dtype == np.float64
    np.testing.assert_array_equal(rows["y_true"], manifest.targets[test])  # exactly, not to float32 precision

    y = manifest.targets[test].astype(np.float64)  # a perfect cached head scored on the same rows: the best run
    cached = tmp_path / "metrics" / "efficientnet_lite0" / "pool" / "logreg.json"
    write_run(cached, {"dataset": params.data.name, "backbone": "efficientnet_lite0", "layer": "pool",
                       "head": "logreg", "label": "ridge", "task": "regression",
                       **metrics_with_ci("regression", y, y, n_boot=20)})
    write_rows(rows_path(cached), row_arrays("regression", y, y),
               {"task": "regression", "ids_sha256": ids_sha256(manifest.ids[k] for k in test), "n_boot": 20,
                "seed": 0})
    runs = compare(tmp_path / "metrics", tmp_path / "reports")
    finetuned = next(run for run in runs if run["head"] == "finetune-frozen")
    assert "skipped" not in finetuned["paired"], finetuned["paired"]
    assert finetuned["paired"]["rmse"]["delta"] == pytest.approx(metrics["rmse"])


def test_a_timm_model_fine_tunes_exports_and_feeds_the_extract_stage(stage_run, tmp_path: Path):
    """``finetune.backbone: timm/<model>``: the stage trains it (low_lr: every layer), its metrics are keyed
    by that name, the export stage writes its ONNX model (scores as the checkpoint's) and CAM overlays, and its
    ``backbone.pt`` loads as the weights of a ``backbones`` entry of that model."""
    import onnxruntime as ort

    from featcache.finetune.saved import SavedRun

    model = "timm/convnext_atto"
    section = {**_section(low_lr={}), "backbone": model, "weights": "random", "export_onnx": True, "cam_images": 2}
    out, metrics_path = tmp_path / "models" / "low_lr", tmp_path / "metrics" / "low_lr.json"
    metrics = finetune_stage(stage_run["params"], "low_lr", stage_run["manifest"], out, metrics_path,
                             finetune=section, progress=False)
    assert list(json.loads(metrics_path.read_text())) == [model]
    assert metrics["backbone"] == model and metrics["node"] == "head.fc" and metrics["n_features"] == 320
    compare(tmp_path / "metrics", tmp_path / "reports")
    assert f"| {model} | finetune | finetune-low_lr |" in (tmp_path / "reports" / "compare.md").read_text()

    exported = export_stage(stage_run["params"], out, stage_run["manifest"], tmp_path / "exports", finetune=section)
    assert sorted(path.suffix for path in exported) == [".onnx", ".png", ".png"]
    run = SavedRun.load(out)
    images = torch.rand(2, 3, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "exports" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0],
                                   run.model(images).softmax(dim=1).numpy(), atol=1e-5)

    loaded = load_backbone("convnext", weights=str(out / "backbone.pt"), model=model).model.state_dict()
    fine_tuned = {k: v for k, v in run.model.state_dict().items() if not k.startswith("head.fc.")}
    assert set(fine_tuned) <= set(loaded)
    for name, tensor in fine_tuned.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    initial = load_backbone("convnext", weights="random", model=model).model.state_dict()  # where training began
    assert not torch.equal(initial["stem.0.weight"], fine_tuned["stem.0.weight"])  # the first layer trained too


def test_finetune_backbone_naming_a_timm_backbones_key_says_what_to_write(params_factory):
    raw = params_factory("images")
    raw["backbones"]["convnext"] = {"model": "timm/convnext_atto", "weights": "random", "layers": ["pre_logits"]}
    raw["finetune"] = {"backbone": "convnext"}
    with pytest.raises(ValueError, match=r"finetune.backbone 'convnext' is the backbones key of timm model "
                                         r"'timm/convnext_atto'.*Hint: set finetune.backbone: timm/convnext_atto"):
        parse_params(raw)
    raw["finetune"] = {"backbone": "convnxt"}
    with pytest.raises(ValueError, match=r"Unknown backbone 'convnxt'.*finetune.backbone: timm/<model>"):
        parse_params(raw)
    raw["finetune"] = {"backbone": "timm/convnext_atto"}
    assert parse_params(raw).finetune.backbone == "timm/convnext_atto"
