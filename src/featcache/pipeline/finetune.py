"""``finetune`` and ``export`` stages: one fine-tuning mode end to end -> metrics JSON beside the cached heads;
then its exports (ONNX model, CAM overlays) from the saved run folder.

The metrics JSON has the same shape as the ``train`` stage's (``dataset``,
``backbone``, ``layer``, ``head``, ``task``, the test metrics with ``ci``,
``n_features``, ``fit_seconds``, ``predict_seconds``, ``best_params``), with
``layer = "finetune"`` and ``head = "finetune-<mode>"``, so
:func:`featcache.pipeline.compare.compare` ranks it with the cached heads.

``out_dir`` receives the run's files: ``model.pt`` (best state dict, loads with
``weights_only=True``), ``model.json`` (classes, input size, target scaling),
``weight_report.json`` (what was copied from the pretrained weights),
``history.json``, ``bad_images.json`` (id and reason of every image that
could not be decoded, counted as ``n_bad_images`` in the metrics) and
``backbone.pt`` (the fine-tuned backbone in the registry's architecture:
usable as ``backbones.<name>.weights`` for the extract stage).

:func:`export_stage` reads that folder back (:class:`~featcache.finetune.saved.SavedRun`)
and writes ``model.onnx`` (optional) and ``cam/*.png`` (class activation maps of
a few test images): a separate stage, so that editing ``export_onnx`` or
``cam_images`` reruns the export, not the training.

Settings come from the ``finetune`` section of ``params.yaml``: ``backbone``,
``weights``, ``defaults`` (every :class:`~featcache.finetune.config.FinetuneConfig`
setting) and ``modes`` (mode -> overrides of ``defaults``) for training;
``export_onnx`` and ``cam_images`` for the export. ``class_weight`` is checked
whatever ``data.task`` is but not used for regression (as a head section's key
that only the classification twin takes), so switching the task needs no edit here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import model_validator

from featcache.pipeline.params.base import StageParams, as_sections, load_sections
from featcache.pipeline.params.data import DataParams
from featcache.pipeline.params.finetune import FinetuneParams
from featcache.pipeline.params.train import TrainParams
from featcache.runs import write_run
from featcache.util.atomic import write_csv

if TYPE_CHECKING:
    from featcache.finetune.config import FinetuneConfig
    from featcache.finetune.saved import SavedRun

__all__ = ["FinetuneSections", "export_stage", "finetune_section", "finetune_stage", "load_finetune_sections",
           "mode_config", "write_cams"]

logger = logging.getLogger(__name__)

#: Section keys besides ``defaults`` and ``modes``, with their defaults.
_SECTION_DEFAULTS: dict[str, Any] = {"backbone": "efficientnet_lite0", "weights": "pretrained",
                                     "export_onnx": True, "cam_images": 4}


class FinetuneSections(StageParams):
    """The sections the finetune stage reads: ``data``, ``train`` (``n_boot``, ``seed``) and ``finetune``."""

    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    finetune: FinetuneParams = FinetuneParams()

    @model_validator(mode="after")
    def _task_metrics(self) -> "FinetuneSections":
        self.finetune.check_task(self.data.task)
        return self


def load_finetune_sections(path: str | Path = "params.yaml") -> FinetuneSections:
    """Read and validate the sections of ``path`` that the finetune stage reads."""
    return load_sections(FinetuneSections, path)


def finetune_section(params: Any, finetune: Mapping[str, Any] | Any | None = None) -> dict[str, Any]:
    """The ``finetune`` section as a plain dict.

    Parameters
    ----------
    params : Params
        Validated params; its ``finetune`` attribute is used when ``finetune`` is None.
    finetune : mapping or pydantic model, optional
        The section itself (tests, or params objects without the section).
    """
    section = finetune if finetune is not None else getattr(params, "finetune", None)
    if section is None:
        raise ValueError("No 'finetune' section in params.yaml. Hint: add one (see README: fine-tuning baseline).")
    if hasattr(section, "model_dump"):
        section = section.model_dump()
    section = dict(section)
    allowed = {*_SECTION_DEFAULTS, "defaults", "modes"}
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"Unknown key(s) in finetune: {unknown}. Allowed: {sorted(allowed)}.")
    return {**_SECTION_DEFAULTS, "defaults": {}, "modes": {}, **section}


def mode_config(section: Mapping[str, Any], mode: str, n_boot: int = 1000, progress: bool = True,
                ci_seed: int = 0, selection_metric: str | None = None) -> FinetuneConfig:
    """``defaults`` updated with ``modes[mode]``, as a validated :class:`FinetuneConfig`.

    ``n_boot`` and ``ci_seed`` are the cached heads' bootstrap settings (``train.n_boot``, ``train.seed``), so the
    CIs of both are drawn from the same resamples of the same test rows; ``selection_metric`` is ``train.metric``,
    what the cached heads select on, used unless the section sets its own, and unless it is a step metric
    (:data:`~featcache.heads.metrics.STEP_METRICS`: accuracy, balanced_accuracy, macro_f1), which, as for the
    early-stopped cached heads, does not reach fine-tuning: it stops on its val loss.
    """
    from featcache.finetune.config import FinetuneConfig
    from featcache.heads.metrics import STEP_METRICS

    overrides = (section.get("modes") or {}).get(mode) or {}
    if selection_metric in STEP_METRICS:  # as for the early-stopped heads: they keep their loss
        selection_metric = None
    values = {"selection_metric": selection_metric, **(section.get("defaults") or {}), **overrides, "mode": mode,
              "n_boot": n_boot, "ci_seed": ci_seed, "progress": progress}
    try:
        return FinetuneConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"finetune settings of mode {mode!r}: {error}") from None


def _cam_rows(run: SavedRun, manifest: Any, n_images: int) -> list[int]:
    """Up to ``n_images`` of the run's test rows, one per class in turn (the first by id), so the maps differ."""
    rows = list(run.test_rows(manifest))
    if run.task != "classification":
        return [int(r) for r in rows[:n_images]]
    truth = np.asarray(manifest.labels)[rows]
    picked: list[int] = []
    for k in range(len(run.classes)):
        hits = [int(rows[i]) for i in np.flatnonzero(truth == k)]
        if hits:
            picked.append(hits[0])
        if len(picked) == n_images:
            break
    return picked


def write_cams(run: SavedRun, manifest: Any, out_dir: str | Path, n_images: int = 4) -> list[Path]:
    """CAM overlays of a few of the run's test images (none, with a log line, where CAM does not apply).

    Parameters
    ----------
    run : SavedRun
        The run, read back from its folder.
    manifest : Manifest
        The manifest it was trained on.
    out_dir : path
        Folder of the ``<id>.png`` overlays.
    n_images : int
        At most this many images, one per class in turn.
    """
    import torch

    from featcache.extract.decode.loaders import ImageReader
    from featcache.finetune.cam import class_activation_maps, save_cam_overlays, tensor_to_pil
    from featcache.finetune.run import preprocessor

    if n_images <= 0:
        return []
    spec = run.spec
    pre = preprocessor(spec, run.config)
    rows = _cam_rows(run, manifest, n_images)
    try:
        reader = ImageReader(manifest, pre)  # a file, a shard member or a URL
        images = torch.stack([pre(pre.load(reader.source(row))) for row in rows])
        cams = class_activation_maps(run.model, spec, images)
    except (ValueError, OSError) as error:
        logger.warning("No CAM overlays: %s", error)
        return []
    pils = [tensor_to_pil(image, pre.mean, pre.std) for image in images]
    return save_cam_overlays(pils, cams, out_dir, [manifest.ids[row] for row in rows])


def _remove_stale(out_dir: Path) -> None:
    """Remove the exports of an earlier run in ``out_dir`` (its ONNX model, its CAM overlays).

    Outside DVC (which deletes a stage's outputs before running it) a new training run in a folder that holds
    exports, or an export with ``export_onnx: false`` or fewer ``cam_images``, would otherwise leave the old
    run's model beside the new one.
    """
    stale = [path for path in (out_dir / "model.onnx", *sorted((out_dir / "cam").glob("*.png"))) if path.is_file()]
    for path in stale:
        path.unlink()
    if stale:
        logger.info("Removed %d file(s) of a previous run in %s (model.onnx, cam/*.png).", len(stale), out_dir)


def _val_scores(history: list[dict[str, Any]], best_epoch: int) -> dict[str, float] | None:
    """The kept epoch's val scores, as the run record's ``val`` (compare selects the run to quote on it).

    The trainer scored the val rows each epoch (every :data:`~featcache.heads.metrics.SELECTION_METRICS` point
    score, ``val_scores``, besides the selection criterion: ``finetune.selection_metric``, ``train.metric`` in
    the stage, the val loss by default) and kept the best epoch's weights, so those scores are the kept model's,
    at hand without another pass over the val images, whatever metric compare ranks by.

    Parameters
    ----------
    history : list of dict
        :attr:`~featcache.finetune.run.FinetuneResult.history` (``epoch``, ``metric``: ``val_<name>``,
        ``val_metric``, ``val_scores``).
    best_epoch : int
        The kept epoch (1-based).

    Returns
    -------
    dict or None
        ``{name: value}``; None without a val split (no epoch scored val).
    """
    row = next((row for row in history if row.get("epoch") == best_epoch), None)
    if row is None or row.get("val_metric") is None:
        return None
    if row.get("val_scores"):
        return {str(name): float(value) for name, value in row["val_scores"].items()}
    return {str(row["metric"]).removeprefix("val_"): float(row["val_metric"])}


def finetune_stage(params: Any, mode: str, manifest_path: str | Path, out_dir: str | Path,
                   metrics_path: str | Path, confusion_path: str | Path | None = None, *,
                   finetune: Mapping[str, Any] | Any | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune one mode on the prepared manifest; write metrics, checkpoint, report and backbone.

    The ONNX model and the CAM overlays are :func:`export_stage`'s, made from ``out_dir`` afterwards.

    Parameters
    ----------
    params : FinetuneSections, Params, path or mapping
        Validated params (``data.name``, ``train.n_boot`` and ``train.seed`` (the CIs' bootstrap, as the cached
        heads') and the ``finetune`` section).
    mode : {"frozen", "low_lr", "unfreeze", "scratch"}
        Which recipe.
    manifest_path : path
        ``manifest.csv`` of the prepare stage (the cached heads' split).
    out_dir : path
        Folder for ``model.pt``, ``model.json``, ``weight_report.json``,
        ``history.json``, ``bad_images.json`` and ``backbone.pt`` (exports of an earlier run there,
        ``model.onnx`` and ``cam/*.png``, are removed).
    metrics_path : path
        Metrics JSON in the ``train`` stage's format (:func:`featcache.runs.write_run`): the test scores only,
        keyed ``<backbone>.finetune.finetune-<mode>.<score>``, with names, CIs, sizes, timings and ``val`` (the
        kept epoch's val score on the selection metric only, :func:`_val_scores`) in its ``.run.json`` sidecar,
        and its per-test-row arrays in ``<name>.rows.npz``
        (:func:`featcache.heads.paired.write_rows`: compare's paired deltas, as the train stage's).
    confusion_path : path, optional
        ``actual,predicted`` CSV of the test split (:func:`featcache.heads.metrics.prediction_rows`: class names
        for the confusion plot, or numbers for the regression scatter), as the train stage's ``--predictions``.
    finetune : mapping, optional
        The ``finetune`` section, when ``params`` has none.
    progress : bool
        Show the tqdm bar.

    Returns
    -------
    dict
        The metrics written to ``metrics_path``.
    """
    from featcache.extract.inputs.manifest import Manifest, ManifestError
    from featcache.finetune.export import export_backbone
    from featcache.finetune.run import finetune as run_finetune
    from featcache.heads.bootstrap import row_arrays
    from featcache.heads.metrics import PREDICTION_COLUMNS, prediction_rows
    from featcache.heads.paired import ids_sha256, rows_path, write_rows

    params = as_sections(params, FinetuneSections)
    section = finetune_section(params, finetune)
    config = mode_config(section, mode, n_boot=params.train.n_boot, progress=progress, ci_seed=params.train.seed,
                         selection_metric=params.train.metric)
    manifest = Manifest.read(manifest_path)
    if manifest.task != params.data.task:
        raise ManifestError(f"data.task is {params.data.task!r} but {manifest_path} is a {manifest.task} manifest. "
                            "Hint: rerun the prepare stage.")
    if manifest.task == "regression" and config.class_weight is not None:  # the heads' rule for a shared section
        logger.info("finetune: class_weight=%r is not used for regression (classification only).",
                    config.class_weight)
        config = dataclasses.replace(config, class_weight=None)
    out_dir = Path(out_dir)
    result = run_finetune(manifest, section["backbone"], section["weights"], config, out_dir=out_dir,
                          task=manifest.task)
    export_backbone(result.model, result.spec, out_dir / "backbone.pt", result.original_head)
    _remove_stale(out_dir)

    metrics = {"dataset": params.data.name, "backbone": section["backbone"], "layer": "finetune",
               "head": f"finetune-{mode}", "task": manifest.task, "node": result.spec.classifier,
               "pooling": "end-to-end", "weights": result.weights_id, **result.metrics}
    metrics["best_params"] = dict(metrics["best_params"])
    metrics["val"] = _val_scores(result.history, result.best_epoch)
    n_classes = len(result.classes) if manifest.task == "classification" else None
    write_rows(rows_path(metrics_path), row_arrays(manifest.task, result.y_true, result.y_score, n_classes),
               {"task": manifest.task, "ids_sha256": ids_sha256(manifest.ids[k] for k in result.test_rows),
                "n_boot": params.train.n_boot, "seed": params.train.seed,
                **({"n_classes": n_classes} if n_classes else {})})
    write_run(metrics_path, metrics)
    if confusion_path is not None:
        write_csv(confusion_path, prediction_rows(manifest.task, result.y_true, result.y_pred, result.classes),
                  PREDICTION_COLUMNS)
    summary = metrics.get("accuracy", metrics.get("rmse"))
    logger.info("finetune-%s: test %s = %.4f in %.1fs", mode,
                "accuracy" if manifest.task == "classification" else "rmse", summary, result.fit_seconds)
    return metrics


def export_stage(params: Any, model_dir: str | Path, manifest_path: str | Path, out_dir: str | Path | None = None,
                 *, finetune: Mapping[str, Any] | Any | None = None) -> list[Path]:
    """The exports of a fine-tuned run, made from its folder: ``model.onnx`` and ``cam/*.png``.

    What :func:`finetune_stage` used to write after training, from the same model
    (:class:`~featcache.finetune.saved.SavedRun` reads back its ``model.pt`` and ``model.json``), so editing
    ``finetune.export_onnx`` or ``finetune.cam_images`` reruns this, not the training.

    Parameters
    ----------
    params : FinetuneSections, Params, path or mapping
        Validated params (the ``finetune`` section's ``export_onnx`` and ``cam_images``).
    model_dir : path
        The run folder of :func:`finetune_stage` (its ``out_dir``).
    manifest_path : path
        The ``manifest.csv`` the run was trained on (the CAM overlays' images).
    out_dir : path, optional
        Folder for ``model.onnx`` and ``cam/`` (exports of an earlier run there are removed first);
        default: ``model_dir``.
    finetune : mapping, optional
        The ``finetune`` section, when ``params`` has none.

    Returns
    -------
    list of Path
        The files written.
    """
    from featcache.extract.inputs.manifest import Manifest
    from featcache.finetune.export import export_finetuned_onnx
    from featcache.finetune.saved import SavedRun

    params = as_sections(params, FinetuneSections)
    section = finetune_section(params, finetune)
    run = SavedRun.load(model_dir)
    manifest = Manifest.read(manifest_path)
    run.test_rows(manifest)  # the run's manifest, or a message before any work
    out = Path(model_dir if out_dir is None else out_dir)
    out.mkdir(parents=True, exist_ok=True)  # the stage's output, even with nothing to write in it
    _remove_stale(out)
    written = [export_finetuned_onnx(run, out / "model.onnx")] if section["export_onnx"] else []
    written += write_cams(run, manifest, out / "cam", int(section["cam_images"]))
    logger.info("finetune-%s: %d export file(s) in %s", run.config.mode, len(written), out)
    return written
