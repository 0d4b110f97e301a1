"""``finetune.defaults.class_weight`` (and per mode) in params.yaml: checked, recorded, shown by compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from featcache.pipeline.cli import main
from featcache.pipeline.compare import compare
from featcache.pipeline.config import parse_params
from featcache.pipeline.finetune import finetune_section, finetune_stage, mode_config
from featcache.pipeline.prepare import prepare
from featcache.runs import read_run, sidecar_path


def _section(**defaults: Any) -> dict[str, Any]:
    return {"backbone": "efficientnet_lite0", "weights": "pretrained", "export_onnx": False, "cam_images": 0,
            "defaults": {"input_size": 32, "batch_size": 6, "epochs": 2, "lr": 0.01, "patience": 0, "hflip": False,
                         "num_threads": 1, "max_train_steps": 2, **defaults},
            "modes": {"frozen": {}, "low_lr": {"class_weight": None}}}


def test_modes_override_the_default_class_weight():
    section = finetune_section(None, _section(class_weight="balanced"))
    assert mode_config(section, "frozen").class_weight == "balanced"
    assert mode_config(section, "low_lr").class_weight is None
    params = parse_params({"finetune": {"defaults": {"class_weight": "balanced"}, "modes": {"scratch": {}}}})
    assert params.finetune.settings("scratch").class_weight == "balanced"


@pytest.mark.parametrize("where", ["defaults", "mode"])
def test_check_refuses_a_mistyped_class_weight_naming_the_allowed_values(tmp_path: Path, capsys, where: str):
    section: dict[str, Any] = ({"defaults": {"class_weight": "balnced"}} if where == "defaults"
                               else {"modes": {"frozen": {"class_weight": "balnced"}}})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": section}), encoding="utf-8")
    assert main(["check", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "class_weight='balnced' is invalid. Did you mean 'balanced'?" in err
    assert "Allowed: null" in err and "'balanced'" in err and "Traceback" not in err
    params.write_text(yaml.safe_dump({"finetune": {"defaults": {"class_weight": "balanced"}}}), encoding="utf-8")
    assert main(["check", "--params", str(params)]) == 0


def test_the_stage_records_class_weight_in_the_sidecar_and_compare_shows_it(tmp_path: Path, folder_factory,
                                                                             params_factory):
    folder_factory(tmp_path / "images", per_class=8)
    params = parse_params(params_factory(str(tmp_path / "images")))
    prepare(params, tmp_path / "prepared")
    metrics_path = tmp_path / "metrics" / "finetune" / "tiny" / "frozen.json"
    finetune_stage(params, "frozen", tmp_path / "prepared" / "manifest.csv", tmp_path / "out", metrics_path,
                   finetune=_section(class_weight="balanced"), progress=False)
    assert read_run(sidecar_path(metrics_path))["best_params"]["class_weight"] == "balanced"
    compare(tmp_path / "metrics", tmp_path / "reports")
    table = (tmp_path / "reports" / "compare.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    assert "finetune-frozen" in row and "class_weight=balanced" in row


def test_a_regression_stage_does_not_use_class_weight(tmp_path: Path, params_factory):
    """The section is shared by both tasks (as a head section): checked always, used for classification only."""
    root = tmp_path / "images"
    root.mkdir()
    lines = ["path,target"]
    for k in range(12):
        Image.fromarray(np.full((24, 24, 3), 20 * k, dtype=np.uint8)).save(root / f"i{k:02d}.png")
        lines.append(f"i{k:02d}.png,{k / 12:.4f}")
    (root / "t.csv").write_text("\n".join(lines) + "\n")
    raw = params_factory(str(root))
    raw["data"].update(source="csv", csv="t.csv", task="regression")
    raw["heads"] = {}
    raw["finetune"] = {"defaults": {"class_weight": "balanced"}}
    params = parse_params(raw)  # check passes: the value is valid
    prepare(params, tmp_path / "prepared")
    metrics_path = tmp_path / "frozen.json"
    finetune_stage(params, "frozen", tmp_path / "prepared" / "manifest.csv", tmp_path / "out", metrics_path,
                   finetune=_section(class_weight="balanced"), progress=False)
    assert "class_weight" not in read_run(sidecar_path(metrics_path))["best_params"]
