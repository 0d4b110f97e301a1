"""The charts of the ``compare`` stage: the rows of their CSVs, which DVC draws with ``.dvc/plots`` templates.

* ``plots/compare/<dataset>.csv`` (:func:`plot_rows`, template ``ci_points``): each run's test score with
  its own 95% bootstrap CI.
* ``plots/compare/<dataset>.paired.csv`` (:func:`paired_plot_rows`, :func:`paired_plot_path`, template
  ``paired_delta``): each paired run's Δ to the reference run on the ranking metric (the run selected on
  validation, or the test-best when some run has no val score: :mod:`featcache.pipeline.compare_select`), with
  the paired 95% CI of that comparison alone, the single-step simultaneous CI, and the report's "distinguishable
  from selected" call (step-down max-|t|, which may call a Δ whose simultaneous CI touches 0:
  :func:`featcache.heads.paired.paired_comparison`): the chart and the table tell one story.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

__all__ = ["PAIRED_PLOT_COLUMNS", "PLOT_COLUMNS", "REFERENCE_MARK", "head_name", "paired_plot_path",
           "paired_plot_rows", "plot_rows", "run_label"]

#: Columns of the comparison chart's CSV (one row per run, best first).
PLOT_COLUMNS = ("run", "metric", "value", "ci_low", "ci_high", "rank")

#: Columns of the paired chart's CSV (:func:`paired_plot_path`): one row per run paired with the reference, in the
#: table's order: its Δ on the ranking metric, the paired 95% CI, the single-step simultaneous CI, and
#: ``distinguishable``, the step-down call (the reference's :data:`REFERENCE_MARK`, yes, no, or - without resamples).
PAIRED_PLOT_COLUMNS = ("run", "metric", "delta", "ci_low", "ci_high", "simultaneous_low", "simultaneous_high",
                       "distinguishable", "rank")


#: The reference run's mark by the split it was picked on (``val``: selected on validation; ``test``: the test-best,
#: when some run has no val score): its flag in compare.json's ``paired``, its Δ cells (``(selected)``) and its
#: ``distinguishable`` in the paired chart.
REFERENCE_MARK = {"val": "selected", "test": "best"}


def head_name(run: dict[str, Any]) -> str:
    """The head as a reader knows it (``ridge`` for the regression twin of ``logreg``)."""
    return str(run.get("label") or run["head"])


def run_label(run: dict[str, Any]) -> str:
    """``backbone/layer/head``: the run as the charts and ``paired.reference`` name it."""
    return f"{run['backbone']}/{run['layer']}/{head_name(run)}"


def plot_rows(runs: Iterable[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows of the comparison chart (:data:`PLOT_COLUMNS`): each run's ``metric`` with its own CI, in order."""
    rows = []
    for run in runs:
        lo, hi = run.get("ci", {}).get(metric, [run[metric], run[metric]])
        rows.append({"run": run_label(run), "metric": metric,
                     "value": round(run[metric], 6), "ci_low": round(lo, 6), "ci_high": round(hi, 6),
                     "rank": run.get("rank", 0)})
    return rows


def paired_plot_rows(runs: Iterable[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows of the paired chart (:data:`PAIRED_PLOT_COLUMNS`): the runs paired with the reference (it at 0), on
    ``metric`` (the ranking metric), in ``runs``' order; a run not paired is left out (the report says why)."""
    rows = []
    for run in runs:
        paired = run.get("paired", {})
        if metric not in paired:  # not paired: the report's footnote says why
            continue
        entry = paired[metric]
        delta = entry["delta"]
        lo, hi = entry["ci"] or (delta, delta)
        sim_lo, sim_hi = entry.get("simultaneous_ci") or (lo, hi)
        judged = entry.get("distinguishable")
        mark = next((mark for mark in REFERENCE_MARK.values() if paired.get(mark)), None)
        rows.append({"run": run_label(run), "metric": metric, "delta": round(delta, 6), "ci_low": round(lo, 6),
                     "ci_high": round(hi, 6), "simultaneous_low": round(sim_lo, 6),
                     "simultaneous_high": round(sim_hi, 6),
                     "distinguishable": mark or {True: "yes", False: "no"}.get(judged, "-"),
                     "rank": run.get("rank", 0)})
    return rows


def paired_plot_path(plot_path: str | Path) -> Path:
    """The paired chart's CSV, beside the comparison chart's: ``plots/compare/d.csv`` -> ``plots/compare/d.paired.csv``.

    ``dvc.yaml`` declares both (``featcache compare --plot`` names the first).
    """
    path = Path(plot_path)
    return path.with_name(f"{path.stem}.paired{path.suffix or '.csv'}")
