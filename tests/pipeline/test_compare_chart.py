"""The comparison charts' Vega-Lite templates (``.dvc/plots/ci_points.json``, ``paired_delta.json``) and their CSVs.

Rendered and looked at once by hand (``dvc plots show --json`` -> vl-convert -> PNG);
this pins the structure that made it readable: a point per run with CI whiskers, an
axis fitted to the data (not from 0) and named by the metric, best run on top.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from featcache.pipeline.compare import PLOT_COLUMNS, compare
from featcache.runs import write_run

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = json.loads((REPO / ".dvc" / "plots" / "ci_points.json").read_text())
PAIRED_TEMPLATE_PATH = REPO / ".dvc" / "plots" / "paired_delta.json"


def _marks() -> dict[str, list[dict]]:
    marks: dict[str, list[dict]] = {}
    for layer in TEMPLATE["layer"]:
        marks.setdefault(layer["mark"]["type"], []).append(layer["encoding"])
    return marks


def test_each_run_is_a_point_with_ci_whiskers():
    marks = _marks()
    assert [enc["x"]["field"] for enc in marks["point"]] == ["<DVC_METRIC_X>"]
    (rule,) = marks["rule"]
    assert (rule["x"]["field"], rule["x2"]["field"]) == ("ci_low", "ci_high")
    assert sorted(enc["x"]["field"] for enc in marks["tick"]) == ["ci_high", "ci_low"]
    assert "bar" not in marks


def test_axis_is_fitted_to_the_data_and_named_by_the_metric():
    x = _marks()["rule"][0]["x"]
    assert x["scale"]["zero"] is False
    title = x["axis"]["title"]["expr"]
    (param,) = [p for p in TEMPLATE["params"] if p["name"] == title]
    assert f"data('{TEMPLATE['data']['name']}')" in param["expr"] and ".metric" in param["expr"]


def test_runs_are_sorted_best_first_and_revisions_told_apart():
    y = TEMPLATE["encoding"]["y"]
    assert y["field"] == "<DVC_METRIC_Y>"
    assert y["sort"] == {"field": "rank", "op": "min", "order": "ascending"}
    assert TEMPLATE["encoding"]["color"] == "<DVC_METRIC_COLOR>"  # dvc plots diff: one colour per revision
    assert TEMPLATE["encoding"]["yOffset"]["field"] == "rev"


def _compare_plots(dvc_file: str) -> dict[str, dict]:
    """The compare stage's plots in ``dvc_file``: path -> properties."""
    stages = yaml.safe_load((REPO / dvc_file).read_text())["stages"]
    return {path: props for plot in stages["compare"]["plots"] for path, props in plot.items()}


def test_dvc_yaml_draws_the_compare_csv_with_this_template():
    plots = _compare_plots("dvc.yaml")
    assert plots["plots/compare/${data.name}.csv"] == {"template": "ci_points", "x": "value", "y": "run",
                                                        "title": "Test score per run (95% bootstrap CI)",
                                                        "cache": False}


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "finetune/dvc.yaml"])
def test_dvc_yaml_draws_the_paired_deltas_beside_it(dvc_file):
    """The paired chart is declared where compare writes it (beside --plot), with a template both projects have."""
    from featcache.pipeline.compare import paired_plot_path

    plots = _compare_plots(dvc_file)
    (scores,) = [path for path, props in plots.items() if props["template"] == "ci_points"]
    props = plots.pop(paired_plot_path(scores).as_posix())
    assert set(plots) == {scores}, plots
    assert (props["template"], props["x"], props["y"], props["cache"]) == ("paired_delta", "delta", "run", False)
    template = Path(dvc_file).parent / ".dvc" / "plots" / "paired_delta.json"
    assert (REPO / template).read_text() == PAIRED_TEMPLATE_PATH.read_text(), template


def test_the_paired_template_draws_delta_both_cis_and_zero(tmp_path):
    """Rendered as ``dvc plots show`` does (dvc_render): every field it reads is a column of the CSV, the point is
    the Δ, the whiskers the paired CI, the bar the simultaneous CI, and a rule marks 0."""
    from dvc_render.vega import VegaRenderer

    from featcache.pipeline.compare import PAIRED_PLOT_COLUMNS

    for head, (accuracy, low, high) in {"logreg": (0.95, 0.93, 0.97), "mlp": (0.97, 0.95, 0.99)}.items():
        write_run(tmp_path / "metrics" / f"{head}.json",
                  {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": "classification",
                   "accuracy": accuracy, "ci": {"accuracy": [low, high]}})
    compare(tmp_path / "metrics", tmp_path / "reports", plot_path=tmp_path / "plot.csv")
    assert (tmp_path / "plot.paired.csv").read_text().splitlines() == [",".join(PAIRED_PLOT_COLUMNS)]  # no rows files
    row = dict(zip(PAIRED_PLOT_COLUMNS, ["b/pool/logreg", "accuracy", "-0.02", "-0.04", "-0.01", "-0.05", "0.01",
                                         "no", "2"]))
    renderer = VegaRenderer([{**row, "rev": "workspace"}], "plots/compare/d.paired.csv", template="paired_delta",
                            template_dir=str(PAIRED_TEMPLATE_PATH.parent), x="delta", y="run")
    spec = renderer.get_filled_template()
    assert "<DVC_METRIC_" not in json.dumps(spec), "an anchor was left unfilled"
    layers, by_mark = [spec], {}
    while layers:  # a layer of marks that share the runs' y, and the line at 0 across them all
        layer = layers.pop()
        layers += layer.get("layer", [])
        if "mark" in layer:
            by_mark.setdefault(layer["mark"]["type"], []).append(layer["encoding"])
        fields = {enc.get("field") for enc in layer.get("encoding", {}).values() if isinstance(enc, dict)} - {None}
        assert fields <= set(PAIRED_PLOT_COLUMNS) | {"rev"}, fields
    assert [enc["x"]["field"] for enc in by_mark["point"]] == ["delta"]
    spans = {(enc["x"].get("field"), enc.get("x2", {}).get("field")) for enc in by_mark["rule"]}
    assert {("ci_low", "ci_high"), ("simultaneous_low", "simultaneous_high")} <= spans
    assert any(enc["x"].get("datum") == 0 for enc in by_mark["rule"])  # the line at Δ = 0
    assert by_mark["point"][0]["shape"]["field"] == "distinguishable"


def test_the_csv_has_the_templates_fields_best_first(tmp_path):
    for head, (accuracy, low, high) in {"logreg": (0.95, 0.93, 0.97), "mlp": (0.97, 0.95, 0.99),
                                        "lightgbm": (0.91, 0.88, 0.94)}.items():
        write_run(tmp_path / "metrics" / f"{head}.json",
                  {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": "classification",
                   "accuracy": accuracy, "ci": {"accuracy": [low, high]}})
    compare(tmp_path / "metrics", tmp_path / "reports", plot_path=tmp_path / "plot.csv")
    with open(tmp_path / "plot.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == PLOT_COLUMNS
    assert [(row["run"], row["rank"]) for row in rows] == [("b/pool/mlp", "1"), ("b/pool/logreg", "2"),
                                                           ("b/pool/lightgbm", "3")]
    assert rows[0]["metric"] == "accuracy" and (rows[0]["ci_low"], rows[0]["ci_high"]) == ("0.95", "0.99")


def test_runs_tied_on_the_metric_share_a_rank_ordered_by_log_loss(tmp_path):
    # An easy dataset: every head at accuracy 1.0. Ranking them 1, 2, 3 by name put the worst-calibrated first.
    for head, (accuracy, log_loss) in {"lightgbm": (1.0, 0.03), "logreg": (1.0, 0.0001), "mlp": (1.0, 0.002),
                                       "sgd": (0.9, 0.2)}.items():
        write_run(tmp_path / "metrics" / f"{head}.json",
                  {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": "classification",
                   "accuracy": accuracy, "log_loss": log_loss})
    runs = compare(tmp_path / "metrics", tmp_path / "reports", plot_path=tmp_path / "plot.csv")
    assert [(run["head"], run["rank"]) for run in runs] == [("logreg", 1), ("mlp", 1), ("lightgbm", 1), ("sgd", 4)]
    with open(tmp_path / "plot.csv", newline="") as handle:
        assert [row["rank"] for row in csv.DictReader(handle)] == ["1", "1", "1", "4"]
    report = (tmp_path / "reports" / "compare.md").read_text()
    assert "Runs with equal test accuracy share a rank, ordered by test log_loss (lower is better)." in report
    assert "| 1 | b | pool | logreg |" in report and "| 4 | b | pool | sgd |" in report


def test_runs_of_two_datasets_are_not_ranked_together(tmp_path, capsys):
    # `featcache compare --metrics-dir metrics` over metrics/digits and metrics/pets made one table headed
    # with one dataset's name, rows of both indistinguishable; other tasks raised a bare ValueError.
    from featcache.pipeline.cli import main

    for dataset, accuracy in (("digits", 0.97), ("pets", 0.9)):
        write_run(tmp_path / "metrics" / dataset / "b" / "pool" / "logreg.json",
                  {"dataset": dataset, "backbone": "b", "layer": "pool", "head": "logreg", "task": "classification",
                   "accuracy": accuracy})
    assert main(["compare", "--metrics-dir", str(tmp_path / "metrics"), "--out", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err
    assert "Cannot rank runs of different datasets together: 'digits' in [" in err and "'pets' in [" in err, err
    assert "Hint: give --metrics-dir one dataset's folder (metrics/<data.name>)" in err
    assert not (tmp_path / "reports" / "compare.md").exists()
    compare(tmp_path / "metrics" / "pets", tmp_path / "reports")  # one dataset's folder: fine


def test_runs_of_two_tasks_are_refused_as_a_user_error(tmp_path):
    from featcache.errors import UserError

    for head, task in (("logreg", "classification"), ("ridge", "regression")):
        write_run(tmp_path / "m" / f"{head}.json", {"dataset": "d", "backbone": "b", "layer": "pool", "head": head,
                                                   "task": task, "accuracy": 0.5, "rmse": 1.0})
    with pytest.raises(UserError, match=r"different tasks together: 'classification' in \[.*'regression' in"):
        compare(tmp_path / "m", tmp_path / "r")
