"""Which run ``compare`` pairs every other run with: the one selected on validation, not the test-best.

Every head chooses its hyper-parameters on the val split and is scored on test; picking the *run* (backbone,
layer, head) by its test score and quoting that score would make the test split part of the choice, and its
score optimistic (the winner's curse: with many runs, the test-best is partly the luckiest). So, as AutoGluon's
leaderboard does, the run is selected by its val score on the ranking metric (:func:`select_reference`, from
each run record's ``val``: :func:`featcache.heads.fit_and_evaluate`'s point scores on the val rows), and the
selected run's test score is the estimate to quote. The table stays sorted by test score; every run is paired
with the selected one.

When any run has no val score on the ranking metric (a record written before featcache scored val, a run
without a val split or refit on it, a fine-tuned run selected on another metric), no run is selected on val:
every run is paired with the test-best, as before, and the report and a warning say which runs lack one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from featcache.heads.metrics import selection_key

from .compare_charts import REFERENCE_MARK, head_name, run_label

__all__ = ["Selection", "select_reference", "selection_text", "val_cell", "val_score"]

logger = logging.getLogger(__name__)

#: Runs named in the report's sentence on runs without val scores (the warning names them all).
_NAMED = 5


@dataclass(frozen=True)
class Selection:
    """The run every run is paired with, and how it was picked.

    Attributes
    ----------
    run : dict
        The reference run (one of the ranked runs, not a copy).
    on : {"val", "test"}
        ``val``: the best val score on the ranking metric; ``test``: the test-best (some run lacks a val score).
    metric, tie_break : str
        The ranking metric and its tie-break (:func:`featcache.pipeline.compare.ranking`).
    without_val : tuple of str
        :func:`~featcache.pipeline.compare_charts.run_label` of each run without a val score on ``metric``.
    """

    run: dict[str, Any]
    on: str
    metric: str
    tie_break: str
    without_val: tuple[str, ...] = field(default=())

    @property
    def mark(self) -> str:
        """``selected`` or ``best``: the reference's flag in ``paired``, its Δ cells and the paired chart."""
        return REFERENCE_MARK[self.on]

    def as_json(self) -> dict[str, Any]:
        """compare.json's ``selection``: ``on``, ``run``, ``metric``, ``tie_break``, ``without_val``, and where the
        run's model is: ``backbone``, ``layer``, ``head`` (the registry's name, as the run folder
        ``models/<dataset>/<backbone>/<layer>/<head>`` names it; ``run`` shows ``ridge`` for logreg's regression
        twin) and ``model_sha256`` (:func:`featcache.runs.model_sha256`, recorded by its train stage; None for
        a run without a saved model). The export stage depends on this entry only, so it reruns when the selected
        model changes, not whenever any run does."""
        return {"on": self.on, "run": run_label(self.run), "metric": self.metric, "tie_break": self.tie_break,
                "without_val": list(self.without_val), "backbone": self.run["backbone"], "layer": self.run["layer"],
                "head": self.run["head"], "model_sha256": self.run.get("model_sha256")}


def val_score(run: dict[str, Any], metric: str) -> float | None:
    """The run's val score on ``metric`` (its record's ``val``), or None when it has no finite one."""
    val = run.get("val")
    value = val.get(metric) if isinstance(val, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def select_reference(ranked: Sequence[dict[str, Any]], metric: str, tie_break: str) -> Selection:
    """The run with the best val ``metric`` (then val ``tie_break``, then the name); the test-best without them.

    Parameters
    ----------
    ranked : sequence of dict
        The runs, ranked by test score (the first is the test-best); at least one.
    metric, tie_break : str
        The ranking metric and its tie-break (:func:`featcache.pipeline.compare.ranking`); a run without a val
        ``tie_break`` comes after those with one among runs tied on val ``metric``.

    Returns
    -------
    Selection
        ``on="val"`` when every run has a val ``metric``; else ``on="test"``, the first of ``ranked``, and the
        runs without one (logged as a warning).
    """
    without = tuple(run_label(run) for run in ranked if val_score(run, metric) is None)
    if without:
        logger.warning("Pairing every run with the test-best, not with the run selected on validation: %d run(s) "
                       "have no val %s: %s. Hint: rerun their train stage, with a val split (records written "
                       "before featcache scored val have none).", len(without), metric, ", ".join(without))
        return Selection(ranked[0], "test", metric, tie_break, without)

    def key(run: dict[str, Any]) -> tuple[float, float, str, str, str]:
        score, tie = val_score(run, metric), val_score(run, tie_break)
        return (selection_key(metric, score), math.inf if tie is None else selection_key(tie_break, tie),
                run["backbone"], run["layer"], head_name(run))

    return Selection(min(ranked, key=key), "val", metric, tie_break)


def val_cell(run: dict[str, Any], metric: str) -> str:
    """The ``val <metric>`` cell of the report: the point score, or ``-`` without one."""
    value = val_score(run, metric)
    return "-" if value is None else f"{value:.4f}"


def selection_text(selection: Selection, test_cell: str, n_runs: int) -> str:
    """The report's sentence on the reference: the run selected on val and its test score to quote, or why not.

    Parameters
    ----------
    selection : Selection
    test_cell : str
        The reference's test score on the ranking metric as the table shows it (with its CI where drawn).
    n_runs : int
        Runs in the table.
    """
    metric, label = selection.metric, run_label(selection.run)
    if selection.on == "val":
        top = ("it also ranks first on test" if selection.run.get("rank") == 1 else
               "the top of this table, sorted by test score, was picked on the test split itself and is optimistic")
        return (f"Selected on validation: `{label}` (the best val {metric} of the {n_runs} runs: "
                f"{val_cell(selection.run, metric)}); its test {metric} {test_cell} is the estimate to quote: the "
                f"test split had no part in choosing it ({top}).")
    named = ", ".join(f"`{name}`" for name in selection.without_val[:_NAMED])
    more = f" and {len(selection.without_val) - _NAMED} more" if len(selection.without_val) > _NAMED else ""
    return (f"Not selected on validation: {len(selection.without_val)} run(s) have no val {metric} ({named}{more}: "
            "recorded before featcache scored val, without a val split, refit on it, or fine-tuned on another "
            f"metric), so every run is paired with the best on test, `{label}`, whose test {metric} {test_cell} was "
            "picked on the test split itself and is optimistic.")
