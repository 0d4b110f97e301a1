"""Empirical bias correction of a QDQ int8 graph (Nagel et al., 2019, "Data-Free Quantization", section 4.2).

Quantizing weights and activations shifts the *mean* of each output channel
of a convolution: a systematic error that the layers after it carry and
amplify, and that depthwise networks (EfficientNet-Lite) suffer most from.
:func:`correct_bias` measures it on the calibration images and takes it out
of the bias: for every quantized Conv or Gemm node, the per-channel mean of
its output (before its activation) through the int8 graph minus the same
mean through the float32 graph is subtracted from the node's bias. The QDQ
graph stores that bias as an int32 initializer read by a ``DequantizeLinear``
whose scale is the input scale times the weight scale; the correction is
rounded to that grid, so the graph stays what onnxruntime fuses into
``QLinearConv``.

The nodes are corrected one after the other, in graph order: node k is
measured through the int8 graph whose nodes before it are already corrected,
so its correction also takes out, on average, the shift its input still
carries. Correcting every node at once from one measurement over-corrects (a
node's error is mostly inherited, and its inputs are corrected at the same
time): measured worse than no correction on EfficientNet-Lite0. Each
measurement runs only the part of the graph up to the node. Only the
calibration images (train split) are read, never the gate's held-out ones.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

__all__ = ["BIAS_OPS", "BiasCorrection", "channel_means", "correct_bias"]

logger = logging.getLogger(__name__)

#: Node types whose bias is corrected (MatMul has none).
BIAS_OPS: tuple[str, ...] = ("Conv", "Gemm")

#: Images per measuring batch.
BATCH = 32

#: Suffix of the outputs added to measure a node's output.
_PROBE = "__featcache_channel_mean"

BiasCorrection = dict[str, np.ndarray]
"""Node name -> (C,) float64 correction subtracted from its bias (the measured int8 - float32 channel mean)."""


def _opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)


def _probe_model(model: onnx.ModelProto, nodes: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose outputs are the (N, C) spatial means of each node's first output."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    by_name = {node.name: node for node in probe.graph.node}
    del probe.graph.output[:]
    outputs = []
    new_axes = _opset(probe) >= 18  # ReduceMean's axes: an input from opset 18, an attribute before
    for name in nodes:
        tensor, out = by_name[name].output[0], f"{name}{_PROBE}"
        if by_name[name].op_type == "Gemm":
            probe.graph.node.append(helper.make_node("Identity", [tensor], [out]))
        elif new_axes:
            axes = f"{out}_axes"
            probe.graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
            probe.graph.node.append(helper.make_node("ReduceMean", [tensor, axes], [out], keepdims=0))
        else:
            probe.graph.node.append(helper.make_node("ReduceMean", [tensor], [out], axes=[2, 3], keepdims=0))
        probe.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        outputs.append(out)
    needed, kept = set(outputs), []
    for node in reversed(probe.graph.node):  # only what the outputs need: the graph up to the deepest node
        if needed.intersection(node.output):
            needed.update(node.input)
            kept.append(node)
    del probe.graph.node[:]
    probe.graph.node.extend(reversed(kept))
    used = [init for init in probe.graph.initializer if init.name in needed]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(used)
    return probe, outputs


def channel_means(model: onnx.ModelProto, nodes: Sequence[str], images: np.ndarray, input_name: str,
                  intra_op_threads: int | None = None) -> dict[str, np.ndarray]:
    """Per-channel mean of each node's output over ``images`` (and space, for a Conv).

    Parameters
    ----------
    model : onnx.ModelProto
        A float32 or QDQ graph (not modified).
    nodes : sequence of str
        Names of Conv (output (N, C, H, W)) or Gemm (output (N, C)) nodes of ``model``; others are skipped.
    images : numpy.ndarray
        (N, 3, S, S) float32 input images, run in batches of :data:`BATCH`.
    input_name : str
        The graph's image input.
    intra_op_threads : int, optional
        onnxruntime's intra-op threads (its default when None).

    Returns
    -------
    dict of str to numpy.ndarray
        Node name -> (C,) float64 mean (summed in float64 batch by batch).
    """
    ops = {node.name: node.op_type for node in model.graph.node}
    nodes = [name for name in nodes if ops.get(name) in BIAS_OPS]  # a MatMul (transformers) has no bias
    if not nodes:
        return {}
    probe, outputs = _probe_model(model, nodes)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    sums: list[np.ndarray] = []
    for start in range(0, len(images), BATCH):
        values = session.run(outputs, {input_name: images[start:start + BATCH]})
        batch_sums = [np.asarray(value, np.float64).sum(axis=0) for value in values]
        sums = batch_sums if not sums else [a + b for a, b in zip(sums, batch_sums)]
    return {name: total / len(images) for name, total in zip(nodes, sums)}


def _bias_update(model: onnx.ModelProto, node: onnx.NodeProto, delta: np.ndarray) -> bool:
    """Subtract ``delta`` (C,) from ``node``'s bias in ``model``: an int32 QDQ bias on its grid, or a float one."""
    if len(node.input) < 3 or not node.input[2]:
        return False
    inits = {init.name: init for init in model.graph.initializer}
    producer = next((n for n in model.graph.node if node.input[2] in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in inits:
        quantized, scale = inits[producer.input[0]], numpy_helper.to_array(inits[producer.input[1]])
        values = numpy_helper.to_array(quantized)
        if values.dtype != np.int32 or values.size != delta.size:
            return False
        step = np.round(delta / scale.astype(np.float64))
        info = np.iinfo(np.int32)
        updated = np.clip(values.astype(np.int64) - step.astype(np.int64), info.min, info.max).astype(np.int32)
        quantized.CopyFrom(numpy_helper.from_array(updated.reshape(values.shape), quantized.name))
        return True
    if node.input[2] in inits:
        bias = inits[node.input[2]]
        values = numpy_helper.to_array(bias)
        if values.size != delta.size or values.dtype not in (np.float32, np.float64):
            return False
        updated = (values.astype(np.float64) - delta.reshape(values.shape)).astype(values.dtype)
        bias.CopyFrom(numpy_helper.from_array(updated, bias.name))
        return True
    return False


def correct_bias(float_model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: Sequence[str],
                 images: np.ndarray, input_name: str, *, reference: Mapping[str, np.ndarray] | None = None,
                 intra_op_threads: int | None = None) -> BiasCorrection:
    """Correct, in place, the biases of ``nodes`` in ``quantized`` by their mean error on ``images``, in order.

    Parameters
    ----------
    float_model : onnx.ModelProto
        The float32 graph ``quantized`` was made from (the same node names).
    quantized : onnx.ModelProto
        The QDQ graph; its bias initializers are rewritten.
    nodes : sequence of str
        The quantized Conv/Gemm nodes to correct, in graph (topological) order; other names are skipped.
    images : numpy.ndarray
        (N, 3, S, S) float32 calibration images (train split).
    input_name : str
        The graph's image input.
    reference : mapping of str to numpy.ndarray, optional
        The float32 graph's (C,) channel means of these nodes on ``images`` (:func:`channel_means`),
        when already measured; measured here otherwise.
    intra_op_threads : int, optional
        onnxruntime's intra-op threads.

    Returns
    -------
    BiasCorrection
        Node name -> (C,) correction subtracted from its bias, for each node corrected (a node
        without a bias, or with one of another shape, is left as it is).
    """
    ops = {node.name: node.op_type for node in quantized.graph.node}
    names = [name for name in nodes if ops.get(name) in BIAS_OPS]
    missing = [name for name in names if reference is None or name not in reference]
    reference = {**(reference or {}), **channel_means(float_model, missing, images, input_name, intra_op_threads)}
    corrections: BiasCorrection = {}
    for name in names:  # node k is measured with nodes < k already corrected (its input's shift included)
        delta = channel_means(quantized, [name], images, input_name, intra_op_threads)[name] - reference[name]
        node = next(node for node in quantized.graph.node if node.name == name)
        if _bias_update(quantized, node, delta):
            corrections[name] = delta
        else:
            logger.debug("int8 bias correction: %s has no bias of %d channels; left as it is", name, delta.size)
    if corrections:
        largest = max(corrections, key=lambda name: float(np.abs(corrections[name]).max()))
        logger.info("int8 bias correction: %d of %d node(s) corrected on %d calibration images; largest channel "
                    "mean error %.4g (%s)", len(corrections), len(names), len(images),
                    float(np.abs(corrections[largest]).max()), largest)
    return corrections
