"""``extract`` stage: one backbone's layers for every manifest row -> HDF5 store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.extract.decode.preprocess import Preprocessor
from featcache.pipeline.config import Params, expected_config, planned_decode, resolved_choices

if TYPE_CHECKING:
    from featcache.extract.engine import ExtractionReport

__all__ = ["extract", "expected_config"]

logger = logging.getLogger(__name__)


def extract(params: Params, backbone: str, manifest_path: str | Path, out: str | Path,
            progress: bool = True) -> ExtractionReport:
    """Extract the configured layers of ``backbone`` for the manifest's rows.

    Parameters
    ----------
    params : Params
        Validated params (``extract`` and ``backbones.<backbone>`` are used).
    backbone : str
        A key of ``params.backbones``.
    manifest_path : path
        ``manifest.csv`` written by ``prepare``.
    out : path
        The ``.h5`` store to write.
    progress : bool
        Log a line per committed block (rows, img/s, ETA) and show a bar on a terminal.
    """
    # torch and the runners are imported here: ``train`` imports this module for expected_config only
    from featcache.extract.backends import build_runner, runner_attrs
    from featcache.extract.engine import extract_to_store
    from featcache.extract.malloc import tune_malloc
    from featcache.extract.inputs.manifest import Manifest
    from featcache.extract.runners.memory import check_batch_memory
    from featcache.extract.zoo.weights import resolve_weights

    if backbone not in params.backbones:
        raise ValueError(f"Backbone {backbone!r} is not configured in params.backbones "
                         f"(configured: {list(params.backbones)}).")
    knobs = params.extract
    tune_malloc(knobs.malloc_tuning)
    manifest = Manifest.read(manifest_path)
    device, backend, autocast = resolved_choices(knobs)
    source = resolve_weights(backbone, params.backbones[backbone].weights)  # the model is built only if needed
    preprocess = Preprocessor.from_spec(source.spec, knobs.resize_mode, max_image_pixels=knobs.max_image_pixels)
    config = expected_config(params, backbone)
    decode = planned_decode(params)
    attrs = {"backbone": backbone, "weights_id": source.weights_id, "weights_sha256": source.weights_sha256,
             "dataset": params.data.name, **runner_attrs(backend, device, autocast), "decode": decode}
    logger.info("extract %s: backend %s on %s, %s, decode %s", backbone, backend, attrs["provider"],
                attrs["precision"], decode)
    layers = params.backbones[backbone].layers
    if knobs.scheduler != "none":
        from featcache.extract.distributed import RunnerSpec, extract_distributed, local_workers

        spec = RunnerSpec(backbone, params.backbones[backbone].weights, tuple(layers), knobs.pooling, device=device,
                          channels_last=knobs.channels_last, autocast=autocast, backend=backend)
        return extract_distributed(manifest, spec, preprocess, out, config=config, attrs=attrs, dtype=knobs.dtype,
                                   block_rows=knobs.block_rows, batch_size=knobs.batch_size, on_error=knobs.on_error,
                                   scheduler_address=None if knobs.scheduler == "local" else knobs.scheduler,
                                   n_workers=local_workers(knobs.n_workers, device), progress=progress,
                                   max_bad_fraction=knobs.max_bad_fraction)
    runner, built = build_runner(source, layers, backend=backend, device=device,
                                 pooling=knobs.pooling, channels_last=knobs.channels_last, autocast=autocast,
                                 onnx_cache=knobs.onnx_cache)
    attrs.update(built)
    workers = None if knobs.num_workers == "auto" else int(knobs.num_workers)
    if built["backend"] == "torch":
        check_batch_memory(runner, preprocess.input_size, knobs.batch_size, device, num_workers=workers)
    loader_factory = None
    if decode == "gpu":  # JPEGs decoded in batches on the runner's input device
        from featcache.extract.decode.device import iter_device_batches

        input_device = str(getattr(runner, "input_device", device))

        def loader_factory(rows, batch_size):
            return iter_device_batches(manifest, rows, preprocess=preprocess, device=input_device,
                                       batch_size=batch_size, num_workers=workers)

    return extract_to_store(manifest, runner, preprocess, out, config=config, attrs=attrs, dtype=knobs.dtype,
                            batch_size=knobs.batch_size, num_workers=workers, block_rows=knobs.block_rows,
                            on_error=knobs.on_error, pin_memory=device.startswith("cuda"), progress=progress,
                            max_bad_fraction=knobs.max_bad_fraction, loader_factory=loader_factory)
