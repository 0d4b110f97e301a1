"""``compare`` stage: rank every (backbone, layer, head) run in one report.

Reads the run record of each run (its metrics JSON and sidecar, see
:mod:`featcache.runs`) and writes ``compare.md`` (a table), ``compare.json``
(the same rows, every field) and a CSV for DVC's comparison chart: the primary
test metric of each run with its 95% bootstrap confidence interval and rank
(template ``.dvc/plots/ci_points.json``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from featcache.runs import SIDECAR_SUFFIX, read_run
from featcache.util.atomic import write_csv, write_text

__all__ = ["compare", "collect_runs", "PLOT_COLUMNS", "PRIMARY_METRIC"]

logger = logging.getLogger(__name__)

#: Ranking metric per task and whether higher is better.
PRIMARY_METRIC = {"classification": ("accuracy", True), "regression": ("rmse", False)}

#: Columns of the comparison chart's CSV (one row per run, best first).
PLOT_COLUMNS = ("run", "metric", "value", "ci_low", "ci_high", "rank")

_COLUMNS = {
    "classification": ["accuracy", "balanced_accuracy", "macro_f1", "log_loss"],
    "regression": ["rmse", "mae", "r2"],
}


def collect_runs(metrics_dir: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """All runs under ``metrics_dir`` (one folder or several; ``**/*.json``), sorted by path.

    Each metrics file is merged with its sidecar (:func:`featcache.runs.read_run`);
    JSON files that are no run record are skipped.
    """
    folders = [metrics_dir] if isinstance(metrics_dir, (str, Path)) else list(metrics_dir)
    runs = []
    for path in sorted({p for folder in folders for p in Path(folder).rglob("*.json")}):
        if path.name.endswith(SIDECAR_SUFFIX):
            continue
        run = read_run(path)
        if run is not None:
            run["source"] = path.as_posix()
            runs.append(run)
    return runs


def _name(run: dict[str, Any]) -> str:
    """The head as a reader knows it (``ridge`` for the regression twin of ``logreg``)."""
    return str(run.get("label") or run["head"])


def _rank(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not runs:
        return []
    tasks = {run["task"] for run in runs}
    if len(tasks) > 1:
        raise ValueError(f"Cannot rank runs of different tasks together: {sorted(tasks)}.")
    metric, higher = PRIMARY_METRIC[tasks.pop()]
    key = lambda run: (-run[metric] if higher else run[metric], run["backbone"], run["layer"], _name(run))  # noqa: E731
    ranked = sorted(runs, key=key)
    for rank, run in enumerate(ranked, start=1):
        run["rank"] = rank
    return ranked


def _cell(run: dict[str, Any], metric: str) -> str:
    value = run.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    ci = run.get("ci", {}).get(metric)
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{value:.4f}"


def _markdown(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "# featcache comparison\n\nNo runs found.\n"
    task = runs[0]["task"]
    metric, higher = PRIMARY_METRIC[task]
    columns = _COLUMNS[task]
    header = ["rank", "backbone", "layer", "head", *columns, "dim", "fit s", "predict s", "chosen"]
    lines = [
        "# featcache comparison",
        "",
        f"Dataset `{runs[0].get('dataset', '?')}`, task {task}; ranked by test {metric} "
        f"({'higher' if higher else 'lower'} is better). Brackets: 95% bootstrap CI on the test split.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for run in runs:
        chosen = ", ".join(f"{k}={_short(v)}" for k, v in sorted(run.get("best_params", {}).items()))
        cells = [str(run["rank"]), run["backbone"], run["layer"], _name(run),
                 *(_cell(run, m) for m in columns), str(run.get("n_features", "")),
                 f"{run.get('fit_seconds', float('nan')):.2f}", f"{run.get('predict_seconds', float('nan')):.3f}",
                 chosen]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot_rows(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        metric, _ = PRIMARY_METRIC[run["task"]]
        lo, hi = run.get("ci", {}).get(metric, [run[metric], run[metric]])
        rows.append({"run": f"{run['backbone']}/{run['layer']}/{_name(run)}", "metric": metric,
                     "value": round(run[metric], 6), "ci_low": round(lo, 6), "ci_high": round(hi, 6),
                     "rank": run.get("rank", 0)})
    return rows


def compare(metrics_dir: str | Path | Sequence[str | Path], out_dir: str | Path,
            plot_path: str | Path | None = None) -> list[dict[str, Any]]:
    """Rank all runs and write ``compare.md``, ``compare.json`` (and the plot CSV).

    Returns
    -------
    list of dict
        The ranked runs.
    """
    runs = _rank(collect_runs(metrics_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("compare.md", _markdown(runs)),
                       ("compare.json", json.dumps({"runs": runs}, indent=2, sort_keys=True) + "\n")):
        write_text(out_dir / name, text)
    if plot_path is not None:
        write_csv(plot_path, _plot_rows(runs), PLOT_COLUMNS)
    logger.info("Compared %d runs -> %s", len(runs), out_dir / "compare.md")
    return runs
