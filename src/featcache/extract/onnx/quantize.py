"""int8 on the CPU: onnxruntime's static quantization of a float32 export, behind a parity gate.

:func:`int8_runner` turns the float32 graph of an
:class:`~featcache.extract.onnx.runner.OnnxFeatureRunner` into an int8 one:

1. **Calibrate** on the user's own train images
   (:func:`~featcache.extract.onnx.calibration.calibration_images`):
   onnxruntime's static quantization in the QDQ format, per-channel int8
   weights, uint8 activations with min/max ranges (:data:`QUANT_SETTINGS`,
   chosen by measurement: ``benchmarks/README.md``), then **bias correction**
   (:func:`~featcache.extract.onnx.bias_correction.correct_bias`): each
   quantized Conv/Gemm's per-channel mean output error on the calibration
   images is taken out of its bias, node after node in graph order.
2. **Gate**: the features of held-out images are computed by both graphs; a
   layer whose lowest per-image cosine is below ``min_cosine`` fails the
   attempt. The next attempt keeps the first 2, 4, 8, ... weighted nodes
   (Conv, Gemm, MatMul in graph order) in float32 (:data:`FLOAT_PREFIX_STEPS`):
   the early layers of depthwise networks (EfficientNet-Lite's stem and first
   blocks, whose activations span wide per-channel ranges) are where per-tensor
   uint8 activations lose the most. Which nodes stayed float32 is logged and
   recorded; when no attempt passes, :class:`Int8GateError` stops the run
   with every attempt's numbers, never a silent loss of feature quality.
3. **Cache** the passing graph like a float32 export
   (:func:`~featcache.extract.onnx.cache.cached_build`), keyed by the float32
   graph's sha256, the samples' hash, the gate and :data:`QUANT_SETTINGS`,
   and the onnxruntime version: a warm run loads it without calibrating again.

The store's config records the graph (:func:`int8_graph_record`: its sha256,
the nodes kept in float32, the manifest it was calibrated on), and
:func:`recorded_int8_runner` opens that very graph again for ``featcache
predict --images``: from the cache, or rebuilt from the same samples.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from featcache.errors import UserError
from featcache.extract.onnx.bias_correction import channel_means, correct_bias
from featcache.extract.onnx.cache import (
    cached_build,
    find_entry,
    read_only_lookup,
    read_sidecar,
    resolve_cache_dir,
    writable_cache_dir,
)
from featcache.extract.onnx.calibration import CalibrationImages, calibration_images
from featcache.extract.onnx.format import INPUT_NAME
from featcache.extract.onnx.parity import LayerParity, ParityError, compare_layers, format_parity
from featcache.extract.onnx.runner import OnnxFeatureRunner

__all__ = ["FLOAT_PREFIX_STEPS", "Int8GateError", "QUANT_CODE_VERSION", "QUANT_SETTINGS", "WEIGHTED_OPS",
           "int8_graph_record", "int8_key", "int8_runner", "quantize_graph", "recorded_int8_runner",
           "weighted_nodes"]

logger = logging.getLogger(__name__)

#: Version of the quantization recipe below: part of the int8 cache key; bump it with any change to it.
QUANT_CODE_VERSION = 2

#: The static quantization settings (recorded in the store's ``int8_method`` attribute).
QUANT_SETTINGS: dict[str, Any] = {"format": "QDQ", "calibration": "minmax", "per_channel": True,
                                  "weights": "int8", "activations": "uint8", "reduce_range": False,
                                  "bias_correction": "sequential-empirical"}

#: Node types with weights; the gate's attempts keep leading ones in float32.
WEIGHTED_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")

#: Leading weighted nodes kept in float32 by successive attempts of the gate.
FLOAT_PREFIX_STEPS: tuple[int, ...] = (0, 2, 4, 8, 16, 32)

#: Images per calibration and parity batch.
BATCH = 32


class Int8GateError(ParityError):
    """No quantized graph reached ``extract.int8_min_cosine`` on the held-out images."""


def weighted_nodes(model_path: str | os.PathLike[str]) -> list[str]:
    """Names of the :data:`WEIGHTED_OPS` nodes of an ONNX graph, in graph (topological) order."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [node.name for node in model.graph.node if node.op_type in WEIGHTED_OPS]


class _Batches(CalibrationDataReader):
    """onnxruntime's calibration reader over a (N, 3, S, S) array, in batches of :data:`BATCH`."""

    def __init__(self, images: np.ndarray) -> None:
        self._next = (images[start:start + BATCH] for start in range(0, len(images), BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._next, None)
        return None if batch is None else {INPUT_NAME: batch}


class _OnnxruntimeAtDebug(logging.Filter):
    """On the root logger while onnxruntime quantizes: its records go to this module's logger at DEBUG
    (``featcache -v`` shows them), not to the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        logger.debug("onnxruntime quantizer: %s", record.getMessage())
        return False


def quantize_graph(prepared: str | os.PathLike[str], out: str | os.PathLike[str], calibration: np.ndarray,
                   keep_float: Sequence[str], ranges: str | os.PathLike[str], metadata: dict[str, str],
                   reference: Mapping[str, np.ndarray] | None = None,
                   intra_op_threads: int | None = None) -> None:
    """Quantize a pre-processed float32 graph to int8 (:data:`QUANT_SETTINGS`), bias-corrected.

    Parameters
    ----------
    prepared : path-like
        The float32 graph after ``onnxruntime.quantization.quant_pre_process``.
    out : path-like
        Where to write the quantized graph.
    calibration : numpy.ndarray
        (N, 3, S, S) float32 calibration images.
    keep_float : sequence of str
        Node names left in float32.
    ranges : path-like
        Calibration cache file: the activation ranges are computed on the
        first call and read back by the next ones (they do not depend on ``keep_float``).
    metadata : dict of str to str
        ``metadata_props`` to write into the quantized graph (the float32 graph's featcache metadata).
    reference : mapping of str to numpy.ndarray, optional
        The prepared graph's (C,) channel means of its weighted nodes on ``calibration``
        (:func:`~featcache.extract.onnx.bias_correction.channel_means`), shared by the gate's attempts.
    intra_op_threads : int, optional
        onnxruntime's intra-op threads while measuring the bias correction.
    """
    reader = _Batches(calibration)
    root = logging.getLogger()
    to_debug = _OnnxruntimeAtDebug()
    root.addFilter(to_debug)  # onnxruntime's quantizer logs a line per tensor on the root logger
    try:
        quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(keep_float),
                        calibration_cache_path=str(ranges))
    finally:
        root.removeFilter(to_debug)
    model = onnx.load(str(out))
    float_model = onnx.load(str(prepared))
    quantized = [name for name in weighted_nodes(prepared) if name not in set(keep_float)]
    correct_bias(float_model, model, quantized, calibration, INPUT_NAME, reference=reference,
                 intra_op_threads=intra_op_threads)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))


def _features(runner: OnnxFeatureRunner, images: np.ndarray) -> dict[str, np.ndarray]:
    """``{layer: (N, D) float32}`` of ``images`` through ``runner``, in batches."""
    parts = [runner(images[start:start + BATCH]) for start in range(0, len(images), BATCH)]
    return {layer: np.concatenate([part[layer] for part in parts]) for layer in runner.layer_names}


def _gated_quantize(float_runner: OnnxFeatureRunner, out: Path, images: CalibrationImages, min_cosine: float,
                    intra_op_threads: int | None) -> dict[str, Any]:
    """Quantize with more leading nodes in float32 until every layer passes the gate; the sidecar facts."""
    reference = _features(float_runner, images.holdout)
    metadata = {prop.key: prop.value for prop in onnx.load(str(float_runner.path), load_external_data=False)
                .metadata_props}
    attempts: list[tuple[list[str], list[LayerParity]]] = []
    with tempfile.TemporaryDirectory(prefix="featcache-int8-") as tmp:
        prepared, ranges = Path(tmp) / "prepared.onnx", Path(tmp) / "ranges"
        quant_pre_process(str(float_runner.path), str(prepared), skip_symbolic_shape=True)
        nodes = weighted_nodes(prepared)
        float_means = channel_means(onnx.load(str(prepared)), nodes, images.calibration, INPUT_NAME,
                                    intra_op_threads)
        steps = sorted({min(step, len(nodes) // 2) for step in FLOAT_PREFIX_STEPS})
        for attempt, step in enumerate(steps, start=1):
            keep = nodes[:step]
            candidate_path = Path(tmp) / f"int8-{step}.onnx"
            started = time.perf_counter()
            quantize_graph(prepared, candidate_path, images.calibration, keep, ranges, metadata, float_means,
                           intra_op_threads)
            candidate = OnnxFeatureRunner(candidate_path, intra_op_threads=intra_op_threads)
            results = compare_layers(reference, _features(candidate, images.holdout))
            del candidate
            attempts.append((keep, results))
            worst = min(result.cosine for result in results)
            logger.info("int8 attempt %d: %d leading node(s) in float32, lowest held-out cosine %.6f "
                        "(extract.int8_min_cosine %r), %.1f s", attempt, len(keep), worst, float(min_cosine),
                        time.perf_counter() - started)
            if worst >= min_cosine:
                shutil.copyfile(candidate_path, out)
                if keep:
                    logger.info("int8: kept in float32 to pass the gate: %s", keep)
                return {"float_nodes": keep, "parity": {r.layer: r.cosine for r in results},
                        "attempts": attempt, "weighted_nodes": len(nodes)}
    lines = [f"attempt {index}: {len(keep)} leading node(s) in float32\n{format_parity(results)}"
             for index, (keep, results) in enumerate(attempts, start=1)]
    raise Int8GateError(
        f"extract.precision: int8: no quantized graph of {float_runner.export_config.get('backbone')!r} reached "
        f"extract.int8_min_cosine={float(min_cosine)!r} on {len(images.holdout)} held-out {images.holdout_split} "
        f"images "
        f"(lowest per-image cosine per layer, int8 vs float32):\n" + "\n".join(lines)
        + "\nHint: use extract.precision: float32 for this backbone, extract more robust layers (pooled "
        "rather than early maps), or lower extract.int8_min_cosine if the measured loss is acceptable.",
        attempts[-1][1], [r.layer for r in attempts[-1][1] if r.cosine < min_cosine])


def int8_key(float_runner: OnnxFeatureRunner, images: CalibrationImages, min_cosine: float) -> dict[str, Any]:
    """The cache key of the int8 graph of ``float_runner`` for these samples and gate."""
    version = importlib.metadata.version
    return {
        "backbone": f"{float_runner.export_config.get('backbone', 'model')}-int8",
        "float_onnx_sha256": float_runner.onnx_sha256,
        "samples_sha256": images.sha256,
        "calibration_rows": len(images.calibration),
        "holdout_rows": len(images.holdout),
        "min_cosine": float(min_cosine),
        "settings": QUANT_SETTINGS,
        "float_prefix_steps": list(FLOAT_PREFIX_STEPS),
        "onnxruntime_version": version("onnxruntime"),
        "onnx_version": version("onnx"),
        "quant_code_version": QUANT_CODE_VERSION,
    }


def int8_runner(float_runner: OnnxFeatureRunner, images: CalibrationImages, *, min_cosine: float = 0.99,
                cache_dir: str | os.PathLike[str] | None = "auto",
                intra_op_threads: int | None = None) -> tuple[OnnxFeatureRunner, dict[str, Any]]:
    """The int8 runner of a float32 one: a cached quantized graph, or a new one that passed the gate.

    Parameters
    ----------
    float_runner : OnnxFeatureRunner
        The float32 graph (reference of the gate; its metadata is the int8 graph's).
    images : CalibrationImages
        Calibration and held-out images.
    min_cosine : float
        ``extract.int8_min_cosine``: lowest per-image cosine of every layer on the held-out images.
    cache_dir : path-like, "auto", "none" or None
        The ONNX cache (``extract_run.onnx_cache``); without one the graph is quantized every run. A
        read-only cache serves a graph it holds; a miss needs a writable one.
    intra_op_threads : int, optional
        Threads of one operator (as the float32 runner's).

    Returns
    -------
    runner : OnnxFeatureRunner
        Over the int8 graph.
    attrs : dict
        Store attributes: ``onnx_sha256`` (the int8 graph), ``float_onnx_sha256``,
        ``int8_method``, ``int8_float_nodes``, ``int8_parity`` (JSON) and the samples' facts.

    Raises
    ------
    Int8GateError
        When no attempt passes the gate (nothing is cached then).
    """
    key = int8_key(float_runner, images, min_cosine)
    found = read_only_lookup(resolve_cache_dir(cache_dir), key)  # a shared cache may be read-only
    folder = None if found is not None else writable_cache_dir(cache_dir)
    tmpdir = None
    if found is not None:
        path, facts = found[0], read_sidecar(found[0])
    elif folder is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="featcache-int8-")
        path = Path(tmpdir.name) / "int8.onnx"
        facts = _gated_quantize(float_runner, path, images, min_cosine, intra_op_threads)
    else:
        path, _ = cached_build(folder, key, lambda partial: _gated_quantize(
            float_runner, partial, images, min_cosine, intra_op_threads))
        facts = read_sidecar(path)
    runner = OnnxFeatureRunner(path, device="cpu", intra_op_threads=intra_op_threads)
    if tmpdir is not None:
        weakref.finalize(runner, tmpdir.cleanup)
    attrs = {"onnx_sha256": runner.onnx_sha256, "float_onnx_sha256": float_runner.onnx_sha256,
             "int8_method": json.dumps(QUANT_SETTINGS, sort_keys=True),
             "int8_float_nodes": json.dumps(facts["float_nodes"]),
             "int8_parity": json.dumps({layer: round(value, 6) for layer, value in facts["parity"].items()},
                                       sort_keys=True),
             "int8_min_cosine": float(min_cosine), **images.facts()}
    logger.info("int8 graph %s: lowest held-out cosine per layer %s, %d node(s) in float32", path.name,
                attrs["int8_parity"], len(facts["float_nodes"]))
    return runner, attrs


def int8_graph_record(attrs: Mapping[str, Any], manifest: str | os.PathLike[str]) -> dict[str, Any]:
    """What an int8 store's config records of its graph, for :func:`recorded_int8_runner`.

    Parameters
    ----------
    attrs : mapping
        The attributes :func:`int8_runner` returned (``onnx_sha256``, ``int8_float_nodes``).
    manifest : path-like
        The manifest the calibration and held-out images were sampled from, as the extraction was given it.

    Returns
    -------
    dict
        ``onnx_sha256`` (the int8 graph's bytes), ``float_nodes`` (the nodes the gate kept in float32) and
        ``manifest``.
    """
    return {"onnx_sha256": str(attrs["onnx_sha256"]), "float_nodes": json.loads(attrs["int8_float_nodes"]),
            "manifest": str(manifest)}


def recorded_int8_runner(record: Mapping[str, Any], source: Any, layers: Sequence[str], knobs: Mapping[str, Any],
                         preprocess: Any, manifest: str | os.PathLike[str],
                         cache_dir: str | os.PathLike[str] | None = "auto") -> tuple[OnnxFeatureRunner | None, str]:
    """The runner of the very int8 graph a store was extracted with, or None and why not.

    The graph whose sha256 ``record`` names is looked for in the ONNX cache (any entry with those bytes; a
    modified file is never used). On a miss it is rebuilt as the extraction built it: the float32 export of
    the store's ``layers``, calibrated and gated on the same samples of ``manifest`` (the same rows give the
    same cache key), published to the cache, and used only if its sha256 is the recorded one.

    Parameters
    ----------
    record : mapping
        :func:`int8_graph_record` of the store (its config's ``extract.int8_graph``).
    source : WeightsSource
        The backbone and weights the store was extracted with.
    layers : sequence of str
        The store's layers (the graph computes them all).
    knobs : mapping
        The store config's ``extract`` section (``pooling`` and the int8 knobs).
    preprocess : Preprocessor
        The store's preprocessing.
    manifest : path-like
        ``record["manifest"]`` resolved to where it is now.
    cache_dir : path-like, "auto", "none" or None
        The ONNX cache the extraction used.

    Returns
    -------
    runner : OnnxFeatureRunner or None
        Over the recorded graph, on the CPU.
    why : str
        Empty with a runner; else why there is none (for the caller's warning).
    """
    sha = str(record["onnx_sha256"])
    folder = resolve_cache_dir(cache_dir)
    found = find_entry(folder, sha, "*-int8-*.onnx")
    if found is not None:
        logger.info("int8 graph of the head's features found in the ONNX cache: %s", found)
        return OnnxFeatureRunner(found, device="cpu"), ""
    where = f"the ONNX cache {folder}" if folder is not None else "no ONNX cache (onnx_cache: none)"
    if not Path(manifest).is_file():
        return None, (f"its graph (sha256 {sha[:12]}...) is not in {where}, and the manifest it was calibrated on, "
                      f"{str(manifest)!r}, is missing, so it cannot be rebuilt")
    logger.info("int8 graph %s... not in %s: rebuilding it from the calibration images of %s", sha[:12], where,
                manifest)
    from featcache.extract.inputs.manifest import Manifest

    try:
        images = calibration_images(Manifest.read(manifest), preprocess, int(knobs["int8_calibration"]),
                                    int(knobs["int8_holdout"]))
        float_runner = OnnxFeatureRunner.from_source(source, list(layers), pooling=knobs["pooling"], device="cpu",
                                                     cache_dir=cache_dir)
        runner, _ = int8_runner(float_runner, images, min_cosine=float(knobs["int8_min_cosine"]),
                                cache_dir=cache_dir)
    except UserError as error:  # a manifest, image or gate problem (Int8GateError included)
        return None, f"its graph (sha256 {sha[:12]}...) is not in {where} and rebuilding it failed: {error}"
    if runner.onnx_sha256 != sha:
        return None, (f"its graph (sha256 {sha[:12]}...) is not in {where}, and the graph rebuilt from {manifest} "
                      f"differs (sha256 {runner.onnx_sha256[:12]}...: other images at those rows, or another "
                      "onnxruntime, onnx or torch version)")
    return runner, ""
