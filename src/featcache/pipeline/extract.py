"""``extract`` stage: one backbone's layers for every manifest row -> HDF5 store."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.extract.plan import ExtractionPlan, plan_extraction
from featcache.pipeline.params.backbones import ExtractSections
from featcache.pipeline.params.base import as_sections
from featcache.pipeline.params.extract import INT8_GRAPH, extraction_config

if TYPE_CHECKING:
    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.extract.engine import ExtractionReport
    from featcache.extract.inputs.manifest import Manifest

__all__ = ["INPUT_ATTRS_IGNORED", "extract", "store_config", "up_to_date_report", "warn_transient"]

logger = logging.getLogger(__name__)

#: Root attributes a store records that are no input of its features: the software that made it. A rerun on other
#: versions keeps a finished store of the same inputs, as ``dvc repro`` does (``--force`` rebuilds it).
INPUT_ATTRS_IGNORED = ("featcache_version", "torch_version", "python_version")


def store_config(params: Any, backbone: str, plan: ExtractionPlan, preprocess: Preprocessor,
                 torch_threads: int | None = None) -> dict[str, Any]:
    """The config the store of ``backbone`` records: the params that change its features, what the plan
    resolved (backend, autocast, a ``gpu`` decode path), and the backbone's preprocessing.

    ``torch_threads``: torch's intra-op thread count, recorded (as ``extract.torch_threads``) for torch on
    the CPU only, where it changes the features' bits (1 and 2 threads differ by up to 8.7e-6 before the
    float16 cast on the 2-core VM); onnxruntime's CPU features and CUDA's do not depend on it
    (``tests/extract/onnx/test_threads.py``), so their config never holds it.
    """
    config = extraction_config(params, backbone)
    config["extract"].update(plan.config())
    if torch_threads is not None and plan.backend == "torch" and not plan.device.startswith("cuda"):
        config["extract"]["torch_threads"] = int(torch_threads)
    config["preprocess"] = preprocess.config()
    return config


def extract(params: Any, backbone: str, manifest_path: str | Path, out: str | Path,
            progress: bool = True, force: bool = False) -> ExtractionReport:
    """Extract the configured layers of ``backbone`` for the manifest's rows.

    A finished ``out`` made from the same inputs (config, manifest, weights, and no local input file modified
    since: :func:`up_to_date_report`) is kept as it is, before any model is built; anything else is rebuilt (an
    interrupted run into ``out`` resumes from its committed blocks, but for those with an input file modified
    since), the log line saying why ``out`` is not kept.

    Parameters
    ----------
    params : ExtractSections, Params, path or mapping
        Validated params (``data``, ``extract`` and ``backbones.<backbone>`` are used), or a params file's
        path or mapping (validated here).
    backbone : str
        A key of ``params.backbones``.
    manifest_path : path
        ``manifest.csv`` written by ``prepare``.
    out : path
        The ``.h5`` store to write.
    progress : bool
        Log a line per committed block (rows, img/s, ETA) and show a bar on a terminal.
    force : bool
        Rebuild ``out`` even when it is up to date.

    Returns
    -------
    ExtractionReport
        Rows read, written and skipped (with the reasons), resumed blocks, time and throughput; ``up_to_date``
        when ``out`` was kept.
    """
    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.extract.engine import extract_to_store
    from featcache.extract.inputs.manifest import Manifest
    from featcache.extract.inputs.storage import StorageOptions
    from featcache.extract.malloc import tune_malloc
    from featcache.extract.plan import build_runner
    from featcache.extract.runners.memory import check_batch_memory
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.util.machine_records import remember_torch_threads, torch_default_threads

    params = as_sections(params, ExtractSections)
    extraction_config(params, backbone)  # an unknown backbone fails here, before any work
    knobs, chosen = params.extract, params.backbones[backbone]
    source = resolve_weights(backbone, chosen.weights, model=chosen.model)  # the model is built only if needed
    plan = plan_extraction(**knobs.plan_settings(), weight_bytes=source.spec.weight_bytes)
    tune_malloc(knobs.malloc_tuning)
    manifest = Manifest.read(manifest_path, storage=StorageOptions(**params.data.io.model_dump()))
    pooling = chosen.pooling or knobs.pooling
    preprocess = Preprocessor.from_spec(source.spec, knobs.resize_mode, max_image_pixels=knobs.max_image_pixels)
    if plan.distributed:
        from featcache.extract.distributed import THREADS_PER_WORKER as threads
    elif plan.backend == "torch":
        threads = torch_default_threads()  # without importing torch when this machine recorded its count
    else:
        threads = None
    config = store_config(params, backbone, plan, preprocess, torch_threads=threads)
    attrs = {"backbone": backbone, "weights_id": source.weights_id, "weights_sha256": source.weights_sha256,
             "dataset": params.data.name, **plan.attrs()}
    if force:
        if Path(out).exists():
            logger.info("Rebuilding %s (--force)", out)
    else:
        kept = up_to_date_report(out, manifest, config, attrs, ignore_config=(f"extract.{INT8_GRAPH}",))
        if kept is not None:
            return kept
    logger.info("extract %s: %s", backbone, plan.describe())
    common = {"config": config, "attrs": attrs, "dtype": knobs.dtype, "batch_size": knobs.batch_size,
              "block_rows": knobs.block_rows, "on_error": knobs.on_error, "progress": progress,
              "max_bad_fraction": knobs.max_bad_fraction}
    if plan.distributed and not plan.int8:  # each worker builds its own runner
        return warn_transient(_extract_on_dask(params, backbone, plan, manifest, preprocess, pooling, out, threads,
                                               common), backbone)
    calibration = None
    if plan.int8:
        from featcache.extract.onnx.calibration import calibration_images

        calibration = calibration_images(manifest, preprocess, knobs.int8_calibration, knobs.int8_holdout)
    runner, built = build_runner(source, chosen.layers, plan, pooling=pooling,
                                 channels_last=knobs.channels_last, onnx_cache=knobs.onnx_cache,
                                 calibration=calibration, int8_min_cosine=knobs.int8_min_cosine)
    attrs.update(built)
    if plan.int8:  # the graph that makes the features, so that `featcache predict --images` runs it again
        from featcache.extract.onnx.quantize import int8_graph_record

        config["extract"][INT8_GRAPH] = int8_graph_record(built, manifest_path)
    if plan.distributed:  # int8: calibrated and gated here once, its bytes run by every worker
        graph = Path(runner.path).read_bytes()
        del runner
        return warn_transient(_extract_on_dask(params, backbone, plan, manifest, preprocess, pooling, out, threads,
                                               common, int8_graph=graph), backbone)
    if plan.backend == "torch":
        recorded = config["extract"].get("torch_threads")
        if recorded is not None and torch_default_threads() != recorded:  # the machine's record was wrong here
            config["extract"]["torch_threads"] = torch_default_threads()  # the count torch runs with now
            remember_torch_threads(config["extract"]["torch_threads"])
        check_batch_memory(runner, preprocess.input_size, knobs.batch_size, plan.device,
                           num_workers=plan.num_workers)
    return warn_transient(extract_to_store(manifest, runner, preprocess, out, plan=plan, **common), backbone)


def _extract_on_dask(params: ExtractSections, backbone: str, plan: ExtractionPlan, manifest: Manifest,
                     preprocess: Preprocessor, pooling: str, out: str | Path, threads: int,
                     common: dict[str, Any], int8_graph: bytes | None = None) -> ExtractionReport:
    """:func:`extract` on the dask cluster of ``extract_run.scheduler`` (``common``: the store's arguments)."""
    from featcache.extract.distributed import extract_distributed
    from featcache.extract.runner_spec import RunnerSpec, local_workers

    knobs, chosen = params.extract, params.backbones[backbone]
    spec = RunnerSpec.from_plan(plan, backbone, chosen.weights, chosen.layers, pooling,
                                channels_last=knobs.channels_last, onnx_cache=knobs.onnx_cache, model=chosen.model,
                                int8_graph=int8_graph)
    return extract_distributed(manifest, spec, preprocess, out, **common,
                               scheduler_address=None if plan.scheduler == "local" else plan.scheduler,
                               n_workers=local_workers(knobs.n_workers, plan.device), threads_per_worker=threads,
                               loader=plan.loader, read_threads=plan.num_workers)


def up_to_date_report(out: str | Path, manifest: Manifest, config: dict[str, Any], attrs: dict[str, Any],
                      ignore_config: tuple[str, ...] = ()) -> ExtractionReport | None:
    """The report of ``out`` if it is a finished store of exactly these inputs, else None (logging why not).

    The inputs: the store's ``config`` (every param that changes the features, its preprocessing and the resolved
    plan), the manifest's sha256 (ids, paths, splits, labels; the shards' sha256) and ``attrs`` (backbone, the
    weights file's id and sha256, backend and provider); not the software versions (:data:`INPUT_ATTRS_IGNORED`).
    A store with rows skipped for a transient cause (timeouts, HTTP 5xx: :func:`warn_transient`) is rebuilt to
    read them. The manifest names image files by path, so, as ``make`` does, a store is also rebuilt when a local
    input file (an image, a shard) was modified after the store's file was last written (its completion time):
    an image fixed in place. URLs and missing files are not checked (the line that keeps the store says so;
    ``--force`` rebuilds): see :mod:`featcache.extract.freshness`.

    Parameters
    ----------
    out : path
        The store to keep or rebuild.
    manifest : Manifest
        The rows of this run.
    config, attrs : dict
        The config and the extra root attributes this run would write
        (:func:`~featcache.extract.engine.build_root_attrs`).
    ignore_config : tuple of str
        Dotted keys of the stored config that a run records only once its runner is built (``extract.int8_graph``).
    """
    from featcache.extract.engine import build_root_attrs
    from featcache.extract.freshness import input_times, named_files
    from featcache.extract.inputs.storage import is_transient_reason
    from featcache.extract.report import build_report
    from featcache.store.errors import StoreError
    from featcache.store.reader import FeatureStore
    from featcache.store.writer import parts_root

    if not Path(out).exists():
        return None
    expected = {key: value for key, value in build_root_attrs(manifest, config, attrs).items()
                if key not in INPUT_ATTRS_IGNORED and key != "config_sha256"}
    try:
        completed = os.stat(out).st_mtime_ns  # its completion: the assembled file's last write (a rename keeps it)
        with FeatureStore(out) as store:
            diffs = store.diff_inputs(expected, ignore_config=ignore_config)
            transient = [row_id for row_id, reason in store.errors() if is_transient_reason(reason)]
    except (StoreError, OSError) as exc:
        logger.info("Rebuilding %s: it cannot be kept (%s)", out, exc)
        return None
    if diffs:
        logger.info("Rebuilding %s: it was made from other inputs: %s%s", out, "; ".join(diffs[:3]),
                    f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")
        return None
    if transient:  # not bad images: a server down for a while (warn_transient said to extract again to read them)
        logger.info("Rebuilding %s: %d of its skipped rows failed a read for a transient cause (e.g. %s), "
                    "read again now", out, len(transient), transient[0])
        return None
    times = input_times(manifest)
    changed = times.newer_than(completed)
    if changed:
        logger.info("Rebuilding %s: %d of its input files were modified after it was written: %s", out,
                    len(changed), named_files(changed))
        future = times.newer_than(time.time_ns())
        if future:
            logger.warning("%d input files of %s are dated in the future (%s; a clock set wrong?): the store is "
                           "rebuilt on every run until then. Hint: touch them", len(future), out, named_files(future))
        return None
    if times.not_checked():
        logger.info("%s: not checked for changes made in place since it was written: %s; --force rebuilds it",
                    out, times.not_checked())
    leftover = parts_root(out)
    if leftover.is_dir() and any(leftover.iterdir()):
        logger.warning("%s holds the committed blocks of an unfinished rebuild of %s, which is kept as up to date: "
                       "--force resumes that rebuild from them, or delete the folder to free its space", leftover,
                       out)
    return build_report(out, manifest, n_extracted=0, n_resumed_blocks=0, seconds=0.0, up_to_date=True)


def warn_transient(report: ExtractionReport, backbone: str) -> ExtractionReport:
    """Warn when skipped rows failed a read for a transient cause (a server down or slow for a while):
    they are not bad images, and a store that DVC counts as done is otherwise missing them for good.

    Returns
    -------
    ExtractionReport
        ``report``, unchanged.
    """
    from featcache.extract.inputs.storage import is_transient_reason

    transient = [(row_id, reason) for row_id, reason in report.errors if is_transient_reason(reason)]
    if transient:
        logger.warning(
            "%d of the %d skipped rows of %s are not bad images: their reads failed for a transient cause "
            "(timeouts, HTTP 5xx/429, dropped connections), e.g. %s: %s. Hint: once the server answers, extract "
            "again to read them (the store is made again; under DVC, which counts the stage as done: "
            "dvc repro --force --single-item extract@%s, then dvc repro); data.io.timeout and data.io.tries "
            "wait longer", len(transient), report.n_skipped, report.path, transient[0][0], transient[0][1], backbone)
    return report
