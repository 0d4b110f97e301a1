"""``compare`` selects the run to quote on validation, as AutoGluon's leaderboard, not on test.

The table stays sorted by test score, but every run is paired with the run of the best val score (run minus
it), and the report says which run that is and that its test score is the estimate to quote. When a run has
no val score (an older record), the reference is the test-best for the whole table, as before, and the report
and a warning say so. The old code always paired with the test-best.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from _support.reports import report_table
from featcache.heads.bootstrap import metrics_with_ci, row_arrays
from featcache.heads.paired import ids_sha256, rows_path, write_rows
from featcache.pipeline.compare import compare
from featcache.runs import write_run

N, K = 200, 3


def _write(metrics: Path, head: str, n_wrong: int, val: dict[str, float] | None) -> None:
    """A classification run wrong on its first ``n_wrong`` test rows, with the val scores ``val`` (None: none)."""
    y = np.arange(N) % K
    pred = y.copy()
    pred[:n_wrong] = (y[:n_wrong] + 1) % K
    proba = np.full((N, K), 0.1)
    proba[np.arange(N), pred] = 0.8
    path = metrics / "b" / "pool" / f"{head}.json"
    write_run(path, {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": "classification",
                     **metrics_with_ci("classification", y, proba, K, n_boot=200, seed=0),
                     **({} if val is None else {"val": val})})
    write_rows(rows_path(path), row_arrays("classification", y, proba, K),
               {"task": "classification", "ids_sha256": ids_sha256(range(N)), "n_classes": K, "n_boot": 200,
                "seed": 0})


def _document(out: Path) -> dict:
    return json.loads((out / "compare.json").read_text())


def test_every_run_is_paired_with_the_run_selected_on_val_not_the_test_best(tmp_path, caplog):
    """mlp is best on test, logreg on val: logreg is the reference, its test score the one to quote."""
    _write(tmp_path / "m", "mlp", 10, {"accuracy": 0.80, "log_loss": 0.5})
    _write(tmp_path / "m", "logreg", 12, {"accuracy": 0.90, "log_loss": 0.4})
    _write(tmp_path / "m", "lightgbm", 40, {"accuracy": 0.85, "log_loss": 0.45})
    plot = tmp_path / "plots" / "d.csv"
    with caplog.at_level(logging.INFO, logger="featcache.pipeline.compare"):
        runs = compare(tmp_path / "m", tmp_path / "r", plot_path=plot)
    assert [run["head"] for run in runs] == ["mlp", "logreg", "lightgbm"]  # still sorted by test
    logreg_test = next(run["accuracy"] for run in runs if run["head"] == "logreg")
    assert f"Compared 3 runs -> {tmp_path / 'r' / 'compare.md'}; selected on val: b/pool/logreg (test accuracy " \
           f"{logreg_test:.4f})" in caplog.text  # the stage's last line names the run to quote
    document, table = _document(tmp_path / "r"), report_table(tmp_path / "r")
    assert document["selection"] == {"on": "val", "run": "b/pool/logreg", "metric": "accuracy",
                                     "tie_break": "log_loss", "without_val": [], "backbone": "b", "layer": "pool",
                                     "head": "logreg", "model_sha256": None}  # these records have no saved model
    paired = {run["head"]: run["paired"] for run in document["runs"]}
    assert {p["reference"] for p in paired.values()} == {"b/pool/logreg"}
    assert paired["logreg"]["selected"] is True and "best" not in paired["mlp"] and "selected" not in paired["mlp"]
    assert paired["mlp"]["accuracy"]["delta"] == pytest.approx(+2 / N)  # run minus reference: mlp is ahead on test
    assert paired["lightgbm"]["accuracy"]["delta"] == pytest.approx(-28 / N)
    assert table["logreg"]["Δ accuracy vs selected"] == table["logreg"]["distinguishable from selected"] == "(selected)"
    assert table["mlp"]["Δ accuracy vs selected"].startswith("+0.0100 [")
    assert [table[head]["val accuracy"] for head in ("mlp", "logreg", "lightgbm")] == ["0.8000", "0.9000", "0.8500"]
    text = (tmp_path / "r" / "compare.md").read_text()
    assert (f"Selected on validation: `b/pool/logreg` (the best val accuracy of the 3 runs: 0.9000); its test "
            f"accuracy {table['logreg']['accuracy']} is the estimate to quote") in text, text
    assert "The best was picked on this same test split" not in text and "(best)" not in text
    with open(plot.with_name("d.paired.csv"), newline="") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert rows["b/pool/logreg"]["distinguishable"] == "selected" and float(rows["b/pool/logreg"]["delta"]) == 0
    assert float(rows["b/pool/mlp"]["delta"]) == pytest.approx(2 / N)


def test_val_ties_are_broken_on_val_then_by_name(tmp_path):
    """Equal val accuracy: the lower val log_loss wins (not the test order, nor the name); then the name."""
    _write(tmp_path / "m", "aaa", 10, {"accuracy": 0.9, "log_loss": 0.5})
    _write(tmp_path / "m", "zzz", 12, {"accuracy": 0.9, "log_loss": 0.3})
    _write(tmp_path / "m", "mmm", 30, {"accuracy": 0.7, "log_loss": 0.1})
    compare(tmp_path / "m", tmp_path / "r")
    assert _document(tmp_path / "r")["selection"]["run"] == "b/pool/zzz"
    _write(tmp_path / "m", "zzz", 12, {"accuracy": 0.9, "log_loss": 0.5})
    compare(tmp_path / "m", tmp_path / "r")
    assert _document(tmp_path / "r")["selection"]["run"] == "b/pool/aaa"
    compare(tmp_path / "m", tmp_path / "r", metric="log_loss")  # lower is better; its tie-break is accuracy
    assert _document(tmp_path / "r")["selection"]["run"] == "b/pool/mmm"


def test_regression_selects_the_lowest_val_rmse(tmp_path):
    y = np.linspace(0.0, 1.0, 60)
    for head, noise, val_rmse in (("logreg", 0.05, 0.3), ("mlp", 0.2, 0.1)):
        pred = y + noise * np.cos(np.arange(60))
        path = tmp_path / "m" / f"{head}.json"
        write_run(path, {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": "regression",
                         **metrics_with_ci("regression", y, pred, n_boot=100, seed=0),
                         "val": {"rmse": val_rmse, "mae": val_rmse, "r2": 0.5}})
        write_rows(rows_path(path), row_arrays("regression", y, pred),
                   {"task": "regression", "ids_sha256": ids_sha256(range(60)), "n_boot": 100, "seed": 0})
    runs = {run["head"]: run for run in compare(tmp_path / "m", tmp_path / "r")}
    assert runs["logreg"]["rank"] == 1 and runs["mlp"]["paired"].get("selected") is True
    assert runs["logreg"]["paired"]["rmse"]["delta"] == pytest.approx(runs["logreg"]["rmse"] - runs["mlp"]["rmse"])
    assert "Δ rmse vs selected" in report_table(tmp_path / "r")["mlp"]


def test_a_run_without_val_scores_falls_back_to_the_test_best_and_says_so(tmp_path, caplog):
    _write(tmp_path / "m", "mlp", 10, {"accuracy": 0.80, "log_loss": 0.5})
    _write(tmp_path / "m", "logreg", 12, {"accuracy": 0.90, "log_loss": 0.4})
    _write(tmp_path / "m", "old", 40, None)  # a record from before val scores
    _write(tmp_path / "m", "partial", 41, {"log_loss": 0.3})  # no val score on the ranking metric
    with caplog.at_level(logging.WARNING, logger="featcache.pipeline"):
        compare(tmp_path / "m", tmp_path / "r")
    document, table = _document(tmp_path / "r"), report_table(tmp_path / "r")
    assert document["selection"] == {"on": "test", "run": "b/pool/mlp", "metric": "accuracy",
                                     "tie_break": "log_loss", "without_val": ["b/pool/old", "b/pool/partial"],
                                     "backbone": "b", "layer": "pool", "head": "mlp", "model_sha256": None}
    assert {run["paired"]["reference"] for run in document["runs"]} == {"b/pool/mlp"}
    assert table["mlp"]["Δ accuracy vs best"] == "(best)" and table["old"]["val accuracy"] == "-"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "b/pool/old, b/pool/partial" in warnings[0], warnings
    text = (tmp_path / "r" / "compare.md").read_text()
    assert "Not selected on validation: 2 run(s) have no val accuracy (`b/pool/old`, `b/pool/partial`" in text, text
    assert "every run is paired with the best on test, `b/pool/mlp`" in text
    assert "The best was picked on this same test split" in text and "Selected on validation" not in text


def test_the_paired_charts_template_has_a_shape_for_each_reference_mark():
    """The paired chart's ``distinguishable`` is ``selected`` for the run selected on val: a value of the shape's
    domain (it was ``best`` only), in both projects' template."""
    from featcache.pipeline.compare_charts import REFERENCE_MARK

    repo = Path(__file__).resolve().parents[2]
    for template in (repo / ".dvc" / "plots" / "paired_delta.json",
                     repo / "finetune" / ".dvc" / "plots" / "paired_delta.json"):
        text = template.read_text()
        domain = json.loads(text)["layer"][0]["layer"][-1]["encoding"]["shape"]["scale"]["domain"]
        assert set(REFERENCE_MARK.values()) | {"yes", "no", "-"} == set(domain), template
        assert "from best" not in text, template
