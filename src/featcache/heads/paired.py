"""Paired bootstrap: is one run really better than another on the same test rows, or is it noise?

Two runs scored on the same test rows share most of their errors (the hard
images, the label noise). Each run's own 95% CI carries that shared variation,
so two overlapping CIs say little. The paired comparison resamples the test rows
once per bootstrap draw and scores both runs on the very same rows: the CI of the
difference then holds only what the runs do differently: far tighter where
they err on the same rows.

The per-row arrays are a run's :func:`~featcache.heads.bootstrap.row_arrays`;
``featcache train`` writes them beside the run's metrics (``<head>.rows.npz``,
:func:`write_rows`) with the sha256 of its test ids (:func:`ids_sha256`), so
that ``compare`` pairs only runs scored on the same test rows. The resamples
are those of the run's own CIs (:func:`~featcache.heads.bootstrap.metrics_with_ci`)
for the same ``n_boot`` and ``seed``. Whether a run is *distinguishable* from the
reference is judged over all the comparisons at once (:func:`paired_comparison`:
step-down bootstrap max-|t|, Romano-Wolf), not one CI at a time.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import UserError
from featcache.store.schema import TASKS
from featcache.util.atomic import write_bytes

from .bootstrap import ROW_FIELDS, percentile_ci, resampled_scores, simultaneous_cis, stepdown_max_t

__all__ = ["CORRECTION", "ROWS_FORMAT", "ROWS_SUFFIX", "PairingError", "check_rows", "ids_sha256", "paired_comparison",
           "paired_deltas", "read_rows", "rows_path", "write_rows"]

#: ``metrics/.../logreg.json`` -> ``metrics/.../logreg.rows.npz``: the run's per-test-row arrays (:func:`write_rows`).
ROWS_SUFFIX = ".rows.npz"

#: How :func:`paired_comparison` corrects ``distinguishable`` for the many comparisons.
CORRECTION = "step-down bootstrap max-|t| (Romano-Wolf)"

#: The ``format`` of the rows files this version writes.
ROWS_FORMAT = "featcache-rows/1"


class PairingError(UserError, ValueError):
    """Per-row arrays that cannot be paired: a field missing, lengths that differ, or other test rows."""


def check_rows(task: str, rows: Mapping[str, Any], name: str = "run") -> dict[str, np.ndarray]:
    """``rows`` as 1-D arrays of one length, holding :data:`~featcache.heads.bootstrap.ROW_FIELDS` of ``task``.

    Parameters
    ----------
    task : {"classification", "regression"}
    rows : mapping of str to array-like
        A run's per-row test arrays (:func:`~featcache.heads.bootstrap.row_arrays`).
    name : str
        How messages name the run.

    Returns
    -------
    dict of ndarray
        The fields of ``task`` only.

    Raises
    ------
    PairingError
        Naming the missing fields or the lengths.
    """
    if task not in ROW_FIELDS:
        raise PairingError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}.")
    fields = ROW_FIELDS[task]
    missing = [field for field in fields if field not in rows]
    if missing:
        raise PairingError(f"{name}: per-row test arrays lack {missing} (it has {sorted(rows)}); allowed: "
                           f"{', '.join(fields)} ({task}). Hint: write them with featcache.heads.bootstrap.row_arrays.")
    arrays = {field: np.asarray(rows[field]).ravel() for field in fields}
    sizes = {field: int(array.size) for field, array in arrays.items()}
    if len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
        raise PairingError(f"{name}: per-row test arrays of lengths {sizes}; allowed: one length, at least one row. "
                           "Hint: the file is damaged or hand-made; rerun the run's train stage.")
    return arrays


def paired_deltas(task: str, reference: Mapping[str, Any], runs: Sequence[Mapping[str, Any]],
                  metrics: Sequence[str], n_classes: int | None = None, *, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> list[dict[str, dict[str, Any]]]:
    """Each run's score minus the reference's, with a paired percentile-bootstrap CI.

    :func:`paired_comparison` without the description of the correction: see it for the parameters.

    Returns
    -------
    list of dict
        Per run, ``{metric: {"delta", "ci", "ci_excludes_0", "simultaneous_ci", "distinguishable", "decided_by"}}``.
    """
    return paired_comparison(task, reference, runs, metrics, n_classes, n_boot=n_boot, seed=seed, alpha=alpha)[0]


def paired_comparison(task: str, reference: Mapping[str, Any], runs: Sequence[Mapping[str, Any]],
                      metrics: Sequence[str], n_classes: int | None = None, *, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[list[dict[str, dict[str, Any]]], dict[str, Any]]:
    """Each run's score minus the reference's, with a paired CI, judged with a family-wise correction.

    Every bootstrap draw resamples the test rows once and scores the reference and
    every run on those same rows. Per (run, metric), ``ci`` is the percentile
    interval of the per-draw differences: 1 - ``alpha`` for that comparison alone.
    Read alone, with many runs, some of those CIs exclude 0 by luck (at 95%, one in
    20 ties). So ``distinguishable`` does not read them: it is the step-down bootstrap
    max-|t| call (Romano-Wolf, :func:`~featcache.heads.bootstrap.stepdown_max_t`) over the
    family of every (run, metric) difference in this call, so that the chance of calling
    any tie distinguishable is about ``alpha`` in all. Step 1 calls the differences whose
    *simultaneous* CI (:func:`~featcache.heads.bootstrap.simultaneous_cis`: Δ ± c SE, the
    single-step max-|t| interval) excludes 0; each next step recomputes c over the
    differences not yet called, which can only call more, never fewer. The method works on
    the very resamples of the CIs (no other draws: deterministic for ``n_boot`` and
    ``seed``), stays usable with 1000 resamples however many comparisons there are (Holm or
    Bonferroni on bootstrap p-values would need tail probabilities finer than 1 / ``n_boot``),
    and is less conservative than Bonferroni because the comparisons, all with one reference,
    are correlated. ``simultaneous_ci`` stays the single step's interval, valid for all at once
    (symmetric, Δ ± c SE; the percentile ``ci`` need not be); the step-down gives calls, not
    intervals, so a difference called at a later step may have a simultaneous CI that touches 0.

    Parameters
    ----------
    task : {"classification", "regression"}
    reference : mapping of str to array-like
        The per-row test arrays of the run the others are compared with (compare: the run selected on val).
    runs : sequence of mapping
        Per-row test arrays of the same test rows, in the same order (the
        reference itself may be among them: its delta is 0 with CIs [0, 0], and
        it is no comparison of the family; nor is any run with its very arrays).
    metrics : sequence of str
        Metric names (any but ``top5_accuracy``).
    n_classes : int or None
        K (classification); None takes the largest class index + 1.
    n_boot, seed : int
        Bootstrap draws and seed (``train.n_boot``, ``train.seed``); ``n_boot=0`` gives deltas without CIs.
    alpha : float
        1 - the confidence level, of each ``ci`` and of the simultaneous CIs together.

    Returns
    -------
    deltas : list of dict
        Per run, ``{metric: {"delta": float, "ci": [lo, hi] or None, "ci_excludes_0": bool or None,
        "simultaneous_ci": [lo, hi] or None, "distinguishable": bool or None, "decided_by": dict or None}}``;
        ``distinguishable``: called by the step-down (None without a simultaneous CI); ``decided_by``: the
        ``step`` that called it (or the last, which did not), its ``critical_value`` c_k and the difference's
        ``t`` (|Δ| / SE; called when above c_k); None for a difference that does not vary over the resamples
        (called when not 0) or without resamples.
    correction : dict
        ``method`` (:data:`CORRECTION`), ``comparisons`` (the family's size: runs other than the
        reference x metrics), ``level`` (1 - ``alpha``), ``critical_value`` (c of step 1: each simultaneous
        CI is Δ ± c bootstrap SEs; None without resamples or when no difference varies), ``steps`` (per step
        ``critical_value`` c_k, ``comparisons`` not yet called, ``called``; empty when none varies).

    Raises
    ------
    PairingError
        For a run whose ``y_true`` differs from the reference's (other test rows, or another order).
    """
    arrays = [check_rows(task, rows, name) for rows, name in
              zip([reference, *runs], ["reference", *(f"run {index}" for index in range(len(runs)))], strict=True)]
    truth = arrays[0]["y_true"]
    for index, rows in enumerate(arrays[1:]):
        if rows["y_true"].shape != truth.shape or not np.array_equal(rows["y_true"], truth):
            raise PairingError(f"run {index} was scored on other test rows than the reference ({rows['y_true'].size} "
                               f"vs {truth.size} rows, or other true values); allowed: the same test rows in the same "
                               "order. Hint: pair only runs of one dataset and split (the same test ids).")
    if task == "classification" and n_classes is None:
        n_classes = int(max(int(rows[field].max()) for rows in arrays for field in ("y_true", "y_pred"))) + 1
    scores = resampled_scores(task, arrays, metrics, n_classes or 0, n_boot=n_boot, seed=seed)
    differences = [{name: run[name] - scores[0][name] for name in metrics} for run in scores[1:]]
    family = [index for index, rows in enumerate(arrays[1:])
              if not all(np.array_equal(rows[field], arrays[0][field]) for field in rows)]
    stats = [diff[name] for diff in differences for name in metrics]
    simultaneous, critical = simultaneous_cis(stats, alpha) if n_boot else ([None] * len(stats), None)
    calls, steps = stepdown_max_t(stats, alpha) if n_boot else ([None] * len(stats), [])
    out = []
    for index, diff in enumerate(differences):
        deltas = {}
        for position, name in enumerate(metrics):
            ci = list(percentile_ci(diff[name][1:], alpha)) if n_boot else None
            band, call = simultaneous[index * len(metrics) + position], calls[index * len(metrics) + position]
            decided = None if call is None or call["step"] is None else {
                key: call[key] for key in ("step", "critical_value", "t")}
            deltas[name] = {"delta": float(diff[name][0]), "ci": ci,
                            "ci_excludes_0": None if ci is None else bool(ci[0] > 0 or ci[1] < 0),
                            "simultaneous_ci": band,
                            "distinguishable": None if call is None else call["distinguishable"],
                            "decided_by": decided}
        out.append(deltas)
    correction = {"method": CORRECTION, "comparisons": len(family) * len(metrics), "level": 1 - alpha,
                  "critical_value": critical, "steps": steps}
    return out, correction


def rows_path(metrics_path: str | Path) -> Path:
    """The per-row test file of a metrics file: ``a/logreg.json`` -> ``a/logreg.rows.npz``."""
    path = Path(metrics_path)
    return path.with_name(path.name.removesuffix(".json") + ROWS_SUFFIX)


def ids_sha256(ids: Iterable[Any]) -> str:
    """sha256 of a sequence of row ids, in order: equal for the same test rows in the same order.

    Each id is hashed as its UTF-8 text with its length in front, so no two sequences of ids collide by
    concatenation (``["ab", "c"]`` vs ``["a", "bc"]``).
    """
    digest = hashlib.sha256()
    for row_id in ids:
        text = str(row_id).encode("utf-8")
        digest.update(len(text).to_bytes(8, "little") + text)
    return digest.hexdigest()


def write_rows(path: str | Path, arrays: Mapping[str, Any], info: Mapping[str, str | int]) -> Path:
    """Write a run's per-test-row arrays and what they need to be paired, as a deflated ``.npz``.

    The file is byte-identical for the same arrays (fixed zip timestamps), so a
    rerun that scores the same leaves git and DVC nothing to see.

    Parameters
    ----------
    path : path
        :func:`rows_path` of the run's metrics file.
    arrays : mapping of str to array-like
        1-D arrays of one length (:func:`featcache.heads.bootstrap.row_arrays`).
    info : mapping of str to str or int
        Scalars stored beside them (``task``, ``ids_sha256``, ``n_classes``, ``n_boot``, ``seed``).

    Returns
    -------
    Path
    """
    clash = sorted(set(arrays) & set(info) | ({"format"} & (set(arrays) | set(info))))
    if clash:
        raise ValueError(f"write_rows: names {clash} given twice or reserved; allowed: distinct names, not 'format'.")
    members = {**{key: np.asarray(value) for key, value in arrays.items()},
               **{key: np.asarray(value) for key, value in info.items()}, "format": np.asarray(ROWS_FORMAT)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in sorted(members.items()):
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w") as handle:
                np.lib.format.write_array(handle, value, allow_pickle=False)
    return write_bytes(path, buffer.getvalue())


def read_rows(path: str | Path) -> dict[str, Any] | None:
    """A rows file written by :func:`write_rows`: its arrays, and its scalars as ``str`` / ``int``.

    Returns
    -------
    dict or None
        None when there is no such file (a run recorded before featcache wrote rows files).

    Raises
    ------
    ValueError
        For a file that is no rows file of :data:`ROWS_FORMAT` (damaged, or of another version).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            out = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} could not be read as a rows file ({type(error).__name__}: {error}). Hint: rerun "
                         "the run's train stage, which writes it.") from None
    if out.get("format", np.asarray("")).item() != ROWS_FORMAT:
        raise ValueError(f"{path} is not a rows file of format {ROWS_FORMAT!r} (it holds {sorted(out)}). Hint: "
                         "rerun the run's train stage with this featcache.")
    return {name: value.item() if value.ndim == 0 else value for name, value in out.items()}
