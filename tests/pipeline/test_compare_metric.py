"""``compare --metric``: the ranking metric (``train.metric``) orders the runs, in its direction, and the paired Δ
column follows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featcache.errors import ParamError
from featcache.heads.bootstrap import metrics_with_ci, row_arrays
from featcache.heads.paired import ids_sha256, rows_path, write_rows
from featcache.pipeline.cli import main
from featcache.pipeline.compare import compare, ranking
from featcache.runs import write_run

N = 100
Y = (np.arange(N) % 10 == 0).astype(np.int64)  # 90/10


def _write(metrics: Path, head: str, pred: np.ndarray, confidence: float, task: str = "classification") -> None:
    """A run predicting ``pred`` (classification: with probability ``confidence``; regression: ``pred`` itself)."""
    path = metrics / "b" / "pool" / f"{head}.json"
    if task == "classification":
        scores = np.where(np.eye(2, dtype=bool)[pred], confidence, 1 - confidence)
        y, k = Y, 2
    else:
        scores, y, k = pred, np.linspace(0.0, 1.0, pred.size), None
    write_run(path, {"dataset": "d", "backbone": "b", "layer": "pool", "head": head, "task": task,
                     **metrics_with_ci(task, y, scores, k, n_boot=100, seed=0)})
    write_rows(rows_path(path), row_arrays(task, y, scores, k),
               {"task": task, "ids_sha256": ids_sha256([str(i) for i in range(y.size)]), "n_boot": 100, "seed": 0,
                **({"n_classes": k} if k else {})})


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """``majority`` predicts class 0 everywhere (accuracy 0.9, balanced accuracy 0.5); ``minority`` finds every
    class-1 row but calls 20 class-0 rows class 1 (accuracy 0.8, balanced accuracy ~0.89)."""
    metrics = tmp_path / "m"
    _write(metrics, "majority", np.zeros(N, dtype=np.int64), 0.6)
    minority = Y.copy()
    minority[np.flatnonzero(Y == 0)[:20]] = 1
    _write(metrics, "minority", minority, 0.8)
    return metrics


def _order(out: Path) -> list[str]:
    return [run["head"] for run in json.loads((out / "compare.json").read_text())["runs"]]


def test_balanced_accuracy_ranks_otherwise_and_the_delta_follows(runs, tmp_path):
    compare(runs, tmp_path / "acc")
    assert _order(tmp_path / "acc") == ["majority", "minority"]
    ranked = compare(runs, tmp_path / "bal", metric="balanced_accuracy")
    assert _order(tmp_path / "bal") == ["minority", "majority"]
    assert ranked[1]["paired"]["balanced_accuracy"]["delta"] == pytest.approx(0.5 - (1 + 70 / 90) / 2)
    text = (tmp_path / "bal" / "compare.md").read_text()
    assert "ranked by test balanced_accuracy (higher is better)" in text
    assert "Δ balanced_accuracy vs best" in text and "Δ log_loss vs best" in text and "Δ accuracy vs best" not in text


def test_log_loss_ranks_lower_first_and_breaks_ties_on_accuracy(runs, tmp_path):
    compare(runs, tmp_path / "ll", metric="log_loss")
    assert _order(tmp_path / "ll") == ["minority", "majority"]  # log-loss 0.50 against 0.55
    text = (tmp_path / "ll" / "compare.md").read_text()
    assert "ranked by test log_loss (lower is better)" in text and "Δ accuracy vs best" in text
    assert ranking("classification", "log_loss") == ("log_loss", "accuracy")
    assert ranking("regression", "mae") == ("mae", "rmse")


def test_regression_directions(tmp_path):
    y = np.linspace(0.0, 1.0, N)
    _write(tmp_path / "m", "close", y + 0.05, 0, task="regression")
    _write(tmp_path / "m", "far", y + np.where(np.arange(N) % 2, 0.3, -0.3), 0, task="regression")
    for metric in ("rmse", "mae", "r2"):
        compare(tmp_path / "m", tmp_path / metric, metric=metric)
        assert _order(tmp_path / metric) == ["close", "far"], metric


def test_an_unknown_metric_names_the_close_match(runs, tmp_path):
    with pytest.raises(ParamError, match=r"--metric 'balanced_acuracy' is not a classification metric; allowed: "
                                         r"accuracy, balanced_accuracy, macro_f1, log_loss\. Did you mean "
                                         r"'balanced_accuracy'\?"):
        compare(runs, tmp_path / "r", metric="balanced_acuracy")
    with pytest.raises(ParamError, match="'r2' is not a classification metric"):
        compare(runs, tmp_path / "r", metric="r2")


def test_the_cli_takes_metric_from_params_unless_given(runs, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  metric: balanced_accuracy\n")
    main(["compare", "--metrics-dir", str(runs), "--out", str(tmp_path / "p"), "--params", str(params)])
    assert _order(tmp_path / "p") == ["minority", "majority"]
    main(["compare", "--metrics-dir", str(runs), "--out", str(tmp_path / "q"), "--params", str(params),
          "--metric", "accuracy"])
    assert _order(tmp_path / "q") == ["majority", "minority"]


def test_check_names_a_missing_train_metric_that_dvc_yaml_tracks(tmp_path, capsys):
    repo = Path(__file__).resolve().parents[2]
    params = tmp_path / "params.yaml"
    params.write_text("".join(line for line in (repo / "params.yaml").read_text().splitlines(keepends=True)
                              if not line.startswith("  metric:")))
    assert main(["check", "--params", str(params)]) == 0  # no dvc.yaml beside it: the CLI defaults it to null
    (tmp_path / "dvc.yaml").write_text((repo / "dvc.yaml").read_text())
    assert main(["check", "--params", str(params)]) == 2
    assert "train has no metric key; the train and compare stages of dvc.yaml track train.metric" in \
        capsys.readouterr().err
