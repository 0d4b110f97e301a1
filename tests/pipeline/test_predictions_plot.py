"""The test-predictions plot follows ``data.task``: DVC's confusion matrix, or a predicted-vs-true scatter.

``dvc.yaml`` (train) and ``finetune/dvc.yaml`` draw each run's ``actual,predicted`` CSV with
``template: ${data.task}``: ``.dvc/plots/classification.json`` (DVC's own confusion template, unchanged) or
``.dvc/plots/regression.json`` (points and the y = x line). Rendered here with dvc_render, as ``dvc plots show``
does; ``tests/pipeline/test_dvc.py`` runs the real ``dvc plots show`` on a classification project.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_render.vega import VegaRenderer
from dvc_render.vega_templates import ConfusionTemplate

from featcache.heads.metrics import PREDICTION_COLUMNS, prediction_rows
from featcache.store.schema import TASKS

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / ".dvc" / "plots"


def _prediction_plots() -> dict[str, dict]:
    """``file:stage`` -> the properties of the stage's one predictions plot."""
    found = {}
    for dvc_file, stage in (("dvc.yaml", "train"), ("finetune/dvc.yaml", "finetune")):
        body = yaml.safe_load((REPO / dvc_file).read_text())["stages"][stage]
        (plot,) = body.get("do", body)["plots"]
        (found[f"{dvc_file}:{stage}"],) = plot.values()
    return found


@pytest.mark.parametrize("where", sorted(_prediction_plots()))
def test_the_predictions_plot_takes_its_template_from_data_task(where):
    props = _prediction_plots()[where]
    assert props["template"] == "${data.task}", where
    assert (props["x"], props["y"]) == PREDICTION_COLUMNS
    assert props["cache"] is False


@pytest.mark.parametrize("task", TASKS)
def test_each_task_has_a_template_in_both_dvc_projects(task):
    main = TEMPLATES / f"{task}.json"
    assert main.is_file(), f"data.task: {task} names .dvc/plots/{task}.json, which is missing"
    for name in ("ci_points.json", f"{task}.json"):  # the fine-tune subrepo has its own .dvc/plots
        assert (REPO / "finetune" / ".dvc" / "plots" / name).read_text() == (TEMPLATES / name).read_text(), name


def test_classification_draws_dvcs_own_confusion_matrix():
    assert json.loads((TEMPLATES / "classification.json").read_text()) == ConfusionTemplate.DEFAULT_CONTENT


def _render(task: str, rows: list[dict]) -> dict:
    data = [{**{key: str(value) for key, value in row.items()}, "rev": "workspace"} for row in rows]  # as DVC reads CSV
    renderer = VegaRenderer(data, "plots/p.csv", template=task, template_dir=str(TEMPLATES),
                            x=PREDICTION_COLUMNS[0], y=PREDICTION_COLUMNS[1])
    spec = renderer.get_filled_template()
    assert "<DVC_METRIC_" not in json.dumps(spec), "an anchor was left unfilled"
    return spec


def test_regression_draws_predicted_against_true_with_the_identity_line():
    spec = _render("regression", prediction_rows("regression", [1.0, 2.5, 10.0], [1.5, 2.0, 9.0]))
    numbers = {step["as"]: step["calculate"] for step in spec["transform"]}
    assert numbers == {"true_value": "toNumber(datum['actual'])", "predicted_value": "toNumber(datum['predicted'])"}
    line, points = spec["layer"]
    assert line["mark"]["type"] == "rule"  # from (low, low) to (high, high): y = x over both ranges
    enc = line["encoding"]
    assert (enc["x"]["field"], enc["y"]["field"], enc["x2"]["field"], enc["y2"]["field"]) == ("low", "low", "high",
                                                                                              "high")
    assert [step["as"] for step in line["transform"][1:]] == ["low", "high"]
    assert points["mark"]["type"] == "point"
    assert (points["encoding"]["x"]["field"], points["encoding"]["y"]["field"]) == ("true_value", "predicted_value")
    assert (points["encoding"]["x"]["title"], points["encoding"]["y"]["title"]) == PREDICTION_COLUMNS
    assert points["encoding"]["color"]["field"] == "rev"  # dvc plots diff: one colour per revision
    assert spec["data"]["values"][0] == {"actual": "1.0", "predicted": "1.5", "rev": "workspace"}


def test_classification_renders_the_class_names_as_a_matrix():
    spec = _render("classification", prediction_rows("classification", [0, 1], [1, 1], ["cat", "dog"]))
    assert spec["spec"]["encoding"]["x"] == {"field": "actual", "type": "nominal", "sort": "ascending",
                                             "title": "actual"}
