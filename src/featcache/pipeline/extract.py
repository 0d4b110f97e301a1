"""``extract`` stage: one backbone's layers for every manifest row -> HDF5 store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.extract.plan import ExtractionPlan, plan_extraction
from featcache.pipeline.params.extract import INT8_GRAPH, extraction_config

if TYPE_CHECKING:
    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.extract.engine import ExtractionReport

__all__ = ["extract", "store_config", "warn_transient"]

logger = logging.getLogger(__name__)


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
            progress: bool = True) -> ExtractionReport:
    """Extract the configured layers of ``backbone`` for the manifest's rows.

    Parameters
    ----------
    params : ExtractSections or Params
        Validated params (``data``, ``extract`` and ``backbones.<backbone>`` are used).
    backbone : str
        A key of ``params.backbones``.
    manifest_path : path
        ``manifest.csv`` written by ``prepare``.
    out : path
        The ``.h5`` store to write.
    progress : bool
        Log a line per committed block (rows, img/s, ETA) and show a bar on a terminal.

    Returns
    -------
    ExtractionReport
        Rows read, written and skipped (with the reasons), resumed blocks, time and throughput.
    """
    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.extract.engine import extract_to_store
    from featcache.extract.inputs.manifest import Manifest
    from featcache.extract.inputs.storage import StorageOptions
    from featcache.extract.malloc import tune_malloc
    from featcache.extract.plan import build_runner
    from featcache.extract.runners.memory import check_batch_memory
    from featcache.extract.zoo.weights import resolve_weights

    extraction_config(params, backbone)  # an unknown backbone fails here, before any work
    knobs, chosen = params.extract, params.backbones[backbone]
    plan = plan_extraction(**knobs.plan_settings())
    tune_malloc(knobs.malloc_tuning)
    manifest = Manifest.read(manifest_path, storage=StorageOptions(**params.data.io.model_dump()))
    source = resolve_weights(backbone, chosen.weights, model=chosen.model)  # the model is built only if needed
    pooling = chosen.pooling or knobs.pooling
    preprocess = Preprocessor.from_spec(source.spec, knobs.resize_mode, max_image_pixels=knobs.max_image_pixels)
    if plan.distributed:
        from featcache.extract.distributed import THREADS_PER_WORKER as threads
    elif plan.backend == "torch":
        import torch

        threads = torch.get_num_threads()
    else:
        threads = None
    config = store_config(params, backbone, plan, preprocess, torch_threads=threads)
    attrs = {"backbone": backbone, "weights_id": source.weights_id, "weights_sha256": source.weights_sha256,
             "dataset": params.data.name, **plan.attrs()}
    logger.info("extract %s: %s", backbone, plan.describe())
    common = {"config": config, "attrs": attrs, "dtype": knobs.dtype, "batch_size": knobs.batch_size,
              "block_rows": knobs.block_rows, "on_error": knobs.on_error, "progress": progress,
              "max_bad_fraction": knobs.max_bad_fraction}
    if plan.distributed:
        from featcache.extract.distributed import extract_distributed
        from featcache.extract.runner_spec import RunnerSpec, local_workers

        spec = RunnerSpec.from_plan(plan, backbone, chosen.weights, chosen.layers, pooling,
                                    channels_last=knobs.channels_last, onnx_cache=knobs.onnx_cache,
                                    model=chosen.model)
        return warn_transient(extract_distributed(
            manifest, spec, preprocess, out, **common,
            scheduler_address=None if plan.scheduler == "local" else plan.scheduler,
            n_workers=local_workers(knobs.n_workers, plan.device), threads_per_worker=threads,
            loader=plan.loader, read_threads=plan.num_workers), backbone)
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
    if plan.backend == "torch":
        check_batch_memory(runner, preprocess.input_size, knobs.batch_size, plan.device,
                           num_workers=plan.num_workers)
    return warn_transient(extract_to_store(manifest, runner, preprocess, out, plan=plan, **common), backbone)


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
