"""``compare`` sets every run against the best one on the same test rows: a paired delta with its CI.

A run is paired only when its rows file holds the best run's test rows (same
sha256 of the test ids, classes and true labels); any other run is shown
without a delta and with a footnote saying why, never paired wrongly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from _support.reports import report_table
from featcache.heads.bootstrap import metrics_with_ci, row_arrays
from featcache.heads.paired import ids_sha256, rows_path, write_rows
from featcache.pipeline.compare import UNPAIRED, compare
from featcache.runs import write_run

N, K = 200, 3
IDS = [f"img{k:03d}.png" for k in range(N)]


def _scores(y: np.ndarray, n_wrong: int) -> np.ndarray:
    """Probabilities right on all but the first ``n_wrong`` rows (there: the next class)."""
    pred = y.copy()
    pred[:n_wrong] = (y[:n_wrong] + 1) % K
    proba = np.full((y.size, K), 0.1)
    proba[np.arange(y.size), pred] = 0.8
    return proba


def _write(metrics: Path, head: str, n_wrong: int, *, ids: list[str] | None = IDS, rows: bool = True,
           also_wrong: slice | None = None) -> None:
    y = np.arange(N) % K
    proba = _scores(y, n_wrong)
    if also_wrong is not None:  # wrong on these rows too (there: the next class)
        proba[also_wrong] = _scores(y[also_wrong], N)
    path = metrics / "b" / "pool" / f"{head}.json"
    write_run(path, {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": "classification",
                     **metrics_with_ci("classification", y, proba, K, n_boot=200, seed=0)})
    if rows:
        write_rows(rows_path(path), row_arrays("classification", y, proba, K),
                   {"task": "classification", "ids_sha256": ids_sha256(ids), "n_classes": K, "n_boot": 200,
                    "seed": 0})


def _json(out: Path) -> dict[str, dict]:
    return {run["head"]: run for run in json.loads((out / "compare.json").read_text())["runs"]}


def test_every_run_gets_its_paired_delta_to_the_best(tmp_path):
    _write(tmp_path / "m", "mlp", 10)
    _write(tmp_path / "m", "logreg", 12)  # wrong on mlp's 10 rows and 2 more: close, but never better
    _write(tmp_path / "m", "lightgbm", 40)
    compare(tmp_path / "m", tmp_path / "r")
    table, runs = report_table(tmp_path / "r"), _json(tmp_path / "r")
    assert table["mlp"]["Δ accuracy vs best"] == table["mlp"]["distinguishable from best"] == "(best)"
    assert runs["mlp"]["paired"]["accuracy"] == {"delta": 0.0, "ci": [0.0, 0.0], "ci_excludes_0": False,
                                                 "simultaneous_ci": [0.0, 0.0], "distinguishable": False,
                                                 "decided_by": None}
    logreg = runs["logreg"]["paired"]
    assert logreg["reference"] == "b/pool/mlp" and (logreg["n_boot"], logreg["seed"]) == (200, 0)
    assert logreg["accuracy"]["delta"] == pytest.approx(-2 / N)
    lo, hi = logreg["accuracy"]["ci"]
    assert lo < 0 and hi <= 0  # never better on a shared resample; 0 when no extra wrong row is drawn
    assert table["logreg"]["Δ accuracy vs best"] == f"{-2 / N:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    assert runs["lightgbm"]["paired"]["accuracy"]["distinguishable"] is True
    assert table["lightgbm"]["distinguishable from best"] == "accuracy, log_loss"
    assert "Δ log_loss vs best" in table["logreg"]
    text = (tmp_path / "r" / "compare.md").read_text()
    assert "paired 95% bootstrap CI" in text and "(200 resamples, seed 0" in text and "Not paired" not in text


def test_runs_on_other_test_rows_or_without_rows_are_not_paired_and_say_why(tmp_path):
    _write(tmp_path / "m", "mlp", 10)
    _write(tmp_path / "m", "logreg", 12, ids=[*IDS[1:], "other.png"])  # another split: same labels, other ids
    _write(tmp_path / "m", "lightgbm", 40, rows=False)  # recorded before rows files
    bad = tmp_path / "m" / "b" / "pool" / "old.json"
    _write(tmp_path / "m", "old", 50)
    rows_path(bad).write_bytes(b"damaged")
    compare(tmp_path / "m", tmp_path / "r")
    table, runs = report_table(tmp_path / "r"), _json(tmp_path / "r")
    assert {head: run["paired"].get("skipped") for head, run in runs.items()} == {
        "mlp": None, "logreg": "other_rows", "lightgbm": "no_rows", "old": "bad_rows"}
    assert all("accuracy" not in runs[head]["paired"] for head in ("logreg", "lightgbm", "old"))
    text = (tmp_path / "r" / "compare.md").read_text()
    for head, mark in (("logreg", "¹"), ("lightgbm", "²"), ("old", "³")):
        assert table[head]["Δ accuracy vs best"] == table[head]["distinguishable from best"] == f"-{mark}"
        assert f"{mark} Not paired with the best run: {UNPAIRED[runs[head]['paired']['skipped']]}." in text


def test_nothing_is_paired_when_the_best_run_has_no_rows(tmp_path):
    _write(tmp_path / "m", "mlp", 10, rows=False)
    _write(tmp_path / "m", "logreg", 12)
    _write(tmp_path / "m", "lightgbm", 40)
    compare(tmp_path / "m", tmp_path / "r")
    runs = _json(tmp_path / "r")
    assert {head: run["paired"]["skipped"] for head, run in runs.items()} == {
        "mlp": "no_rows", "logreg": "reference_unpaired", "lightgbm": "reference_unpaired"}


def test_regression_runs_are_paired_on_rmse_and_mae(tmp_path):
    y = np.linspace(0.0, 1.0, 60)
    for head, noise in (("logreg", 0.05), ("mlp", 0.2)):
        pred = y + noise * np.cos(np.arange(60))
        path = tmp_path / "m" / f"{head}.json"
        write_run(path, {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": "regression",
                         **metrics_with_ci("regression", y, pred, n_boot=100, seed=0)})
        write_rows(rows_path(path), row_arrays("regression", y, pred),
                   {"task": "regression", "ids_sha256": ids_sha256(range(60)), "n_boot": 100, "seed": 0})
    compare(tmp_path / "m", tmp_path / "r")
    runs, table = _json(tmp_path / "r"), report_table(tmp_path / "r")
    assert runs["mlp"]["paired"]["rmse"]["delta"] == pytest.approx(runs["mlp"]["rmse"] - runs["logreg"]["rmse"])
    assert runs["mlp"]["paired"]["mae"]["distinguishable"] is True
    assert {"Δ rmse vs best", "Δ mae vs best"} <= set(table["mlp"])


def test_without_bootstrap_the_report_claims_no_cis(tmp_path):
    """``train.n_boot: 0`` draws no CI: the report said "Brackets: 95% bootstrap CI" and "a paired 95% bootstrap
    CI ... (0 resamples ...)" over a table with neither; it now says that there are no CIs and why."""
    y = np.linspace(0.0, 1.0, 60)
    for head, noise in (("logreg", 0.05), ("mlp", 0.2)):
        pred = y + noise * np.cos(np.arange(60))
        path = tmp_path / "m" / f"{head}.json"
        write_run(path, {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": "regression",
                         **metrics_with_ci("regression", y, pred, n_boot=0, seed=0)})
        write_rows(rows_path(path), row_arrays("regression", y, pred),
                   {"task": "regression", "ids_sha256": ids_sha256(range(60)), "n_boot": 0, "seed": 0})
    compare(tmp_path / "m", tmp_path / "r")
    text, table = (tmp_path / "r" / "compare.md").read_text(), report_table(tmp_path / "r")
    assert "[" not in table["mlp"]["rmse"] and "[" not in table["mlp"]["Δ rmse vs best"]  # no CI drawn
    assert "bootstrap CI" not in text and "0 resamples" not in text, text
    assert "no CIs (train.n_boot: 0)" in text, text


def test_distinguishable_is_corrected_for_the_many_comparisons(tmp_path):
    """12 runs, each wrong on the best run's 10 rows and on 6 rows of its own: alone, each one's paired 95% CI
    excludes 0 on both metrics, and the old column said `accuracy, log_loss` 12 times: 24 calls, each with a 5% chance
    of being luck. Corrected for the 24 comparisons (step-down bootstrap max-|t|), it says `no`, and the
    report says which correction, over how many comparisons."""
    _write(tmp_path / "m", "mlp", 10)
    for j in range(12):
        _write(tmp_path / "m", f"h{j:02d}", 10, also_wrong=slice(10 + 6 * j, 16 + 6 * j))
    compare(tmp_path / "m", tmp_path / "r")
    table, runs = report_table(tmp_path / "r"), _json(tmp_path / "r")
    for head in (f"h{j:02d}" for j in range(12)):
        paired = runs[head]["paired"]
        assert table[head]["distinguishable from best"] == "no", table[head]
        for metric in ("accuracy", "log_loss"):
            lo, hi = paired[metric]["ci"]
            assert (hi < 0 if metric == "accuracy" else lo > 0) and paired[metric]["ci_excludes_0"] is True
            assert paired[metric]["distinguishable"] is False
            low, high = paired[metric]["simultaneous_ci"]
            assert low < 0 < high
        # The brackets stay the unadjusted paired 95% CI.
        lo, hi = paired["accuracy"]["ci"]
        assert table[head]["Δ accuracy vs best"] == f"{-6 / N:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        assert paired["correction"]["comparisons"] == 24 and paired["correction"]["level"] == 0.95
    assert runs["mlp"]["paired"]["correction"] == runs["h00"]["paired"]["correction"]
    text = (tmp_path / "r" / "compare.md").read_text()
    assert "paired 95% bootstrap CI in brackets (of that comparison alone, unadjusted)" in text, text
    critical = runs["h00"]["paired"]["correction"]["critical_value"]
    # Step-down (Romano-Wolf): step 1 is the single step (its c, the simultaneous CIs); it calls none of these 24
    # equal differences, so there is no step 2. compare.json carries each step's critical value.
    assert runs["h00"]["paired"]["correction"]["steps"] == [{"critical_value": critical, "comparisons": 24,
                                                             "called": 0}]
    assert runs["h00"]["paired"]["accuracy"]["decided_by"]["critical_value"] == critical
    assert ("Distinguishable from best: the metrics whose Δ stays clear of 0 after a family-wise correction for the "
            "24 comparisons of this table (12 runs × 2 metrics), by step-down bootstrap max-|t| (Romano-Wolf): step 1 "
            f"calls those whose simultaneous CI (`simultaneous_ci` in compare.json: Δ ± {critical:.2f} bootstrap SEs"
            ) in text, text
    assert (f"until none is new (bounds by step: {critical:.2f}; `correction.steps` in compare.json)" in text
            and "The step-down gives calls, not intervals" in text), text


def test_the_paired_chart_draws_the_tables_delta_for_each_paired_run(tmp_path):
    """``plots/compare/<data>.paired.csv``: one row per run paired with the best (the best at 0), Δ = its score -
    the best's with the paired CI of the table and the simultaneous CI that the "distinguishable" column reads;
    unpaired runs are left out (the report's footnote says why). The old code drew only each run's own CI."""
    from featcache.pipeline.compare import PAIRED_PLOT_COLUMNS, paired_plot_path

    _write(tmp_path / "m", "mlp", 10)
    _write(tmp_path / "m", "logreg", 12)
    _write(tmp_path / "m", "lightgbm", 40)
    _write(tmp_path / "m", "sgd", 30, rows=False)
    _write(tmp_path / "m", "knn", 20, ids=[*IDS[1:], "other.png"])
    plot = tmp_path / "plots" / "d.csv"
    compare(tmp_path / "m", tmp_path / "r", plot_path=plot)
    assert paired_plot_path(plot) == tmp_path / "plots" / "d.paired.csv"
    with open(paired_plot_path(plot), newline="") as handle:
        rows = list(csv.DictReader(handle))
    table, runs = report_table(tmp_path / "r"), _json(tmp_path / "r")
    assert tuple(rows[0]) == PAIRED_PLOT_COLUMNS
    assert [row["run"] for row in rows] == ["b/pool/mlp", "b/pool/logreg", "b/pool/lightgbm"]  # sgd, knn: unpaired
    assert {table[head]["Δ accuracy vs best"][:2] for head in ("sgd", "knn")} == {"-¹", "-²"}
    for row in rows:
        head = row["run"].rsplit("/", 1)[1]
        paired = runs[head]["paired"]["accuracy"]
        assert row["metric"] == "accuracy" and row["rank"] == str(runs[head]["rank"])
        assert float(row["delta"]) == pytest.approx(runs[head]["accuracy"] - runs["mlp"]["accuracy"], abs=1e-6)
        assert [float(row["ci_low"]), float(row["ci_high"])] == pytest.approx(paired["ci"], abs=1e-6)
        assert [float(row["simultaneous_low"]), float(row["simultaneous_high"])] == pytest.approx(
            paired["simultaneous_ci"], abs=1e-6)
        said = table[head]["distinguishable from best"]
        assert row["distinguishable"] == ("best" if said == "(best)" else "yes" if "accuracy" in said else "no")
    assert [row["distinguishable"] for row in rows] == ["best", "no", "yes"]
    assert float(rows[0]["delta"]) == float(rows[0]["ci_low"]) == float(rows[0]["simultaneous_high"]) == 0.0
