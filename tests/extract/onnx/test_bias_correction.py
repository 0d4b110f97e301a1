"""Bias correction of the int8 graph: the per-channel mean error of each quantized node is taken out of its bias."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import featcache.extract.onnx.quantize as quantize
from featcache.extract.onnx.bias_correction import channel_means, correct_bias
from featcache.extract.onnx.format import INPUT_NAME

NODES = ["conv1", "conv2", "fc"]


def _graph(path, opset: int = 17) -> None:
    """images (N, 3, 8, 8) -> Conv(8) -> Relu -> Conv(4, 1x1) -> GlobalAveragePool -> Flatten -> Gemm(5)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(array.astype(np.float32), name) for name, array in {
        "w1": rng.normal(0, 0.1, (8, 3, 3, 3)), "b1": rng.normal(0, 0.5, 8),
        "w2": rng.normal(0, 0.3, (4, 8, 1, 1)), "b2": rng.normal(0, 0.5, 4),
        "w3": rng.normal(0, 0.3, (5, 4)), "b3": rng.normal(0, 0.5, 5)}.items()]
    nodes = [helper.make_node("Conv", [INPUT_NAME, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p2"], name="pool"),
             helper.make_node("Flatten", ["p2"], ["f2"], name="flatten"),
             helper.make_node("Gemm", ["f2", "w3", "b3"], ["out"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT,
                                                                             ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["N", 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))


def _images(n: int, seed: int) -> np.ndarray:
    """Integers + 0.3 in [0, 255], with 0 and 255 present: the input's uint8 grid (scale 1) rounds every
    value down by 0.3, a systematic shift of the first convolution's output mean that its bias can undo."""
    images = np.random.default_rng(seed).integers(0, 255, (n, 3, 8, 8)).astype(np.float32) + 0.3
    images[0, 0, 0, :2] = 0.0, 255.0
    return images


def _errors(float_model, quantized, images) -> dict[str, float]:
    """Largest per-channel |mean int8 output - mean float32 output| of each node."""
    reference = channel_means(float_model, NODES, images, INPUT_NAME, intra_op_threads=1)
    measured = channel_means(quantized, NODES, images, INPUT_NAME, intra_op_threads=1)
    return {name: float(np.abs(measured[name] - reference[name]).max()) for name in NODES}


@pytest.fixture(scope="module", params=[17, 13])
def graphs(request, tmp_path_factory):
    """The float32 graph, its QDQ graph without bias correction, and the calibration images."""
    tmp = tmp_path_factory.mktemp("bias")
    _graph(tmp / "float.onnx", request.param)
    calibration = _images(32, 0)
    patch = pytest.MonkeyPatch()
    patch.setattr(quantize, "correct_bias", lambda *args, **kwargs: {})
    try:
        quantize.quantize_graph(tmp / "float.onnx", tmp / "plain.onnx", calibration, [], tmp / "ranges", {})
    finally:
        patch.undo()
    return tmp, onnx.load(str(tmp / "float.onnx")), onnx.load(str(tmp / "plain.onnx")), calibration


def test_channel_means_match_numpy(graphs):
    _, float_model, _, calibration = graphs
    means = channel_means(float_model, ["conv1", "fc"], calibration, INPUT_NAME, intra_op_threads=1)
    assert means["conv1"].shape == (8,) and means["fc"].shape == (5,) and means["conv1"].dtype == np.float64
    import onnxruntime as ort

    out = ort.InferenceSession(float_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {INPUT_NAME: calibration})[0]
    np.testing.assert_allclose(means["fc"], out.mean(axis=0), rtol=1e-5, atol=1e-5)


def test_bias_correction_takes_out_the_mean_error_of_each_quantized_node(graphs):
    _, float_model, plain, calibration = graphs
    before = _errors(float_model, plain, calibration)
    assert before["conv1"] > 0.1  # the systematic shift the images were made to have
    corrected = onnx.ModelProto()
    corrected.CopyFrom(plain)
    corrections = correct_bias(float_model, corrected, NODES, calibration, INPUT_NAME, intra_op_threads=1)
    assert set(corrections) == set(NODES) and all(c.ndim == 1 for c in corrections.values())
    after = _errors(float_model, corrected, calibration)
    for name in NODES:
        assert after[name] < 0.1 * before[name] + 1e-3, (name, before, after)
    # Other images of the same kind: the error is gone there too (a property of the graph, not of the sample).
    unseen = _images(32, 1)
    held_before, held_after = _errors(float_model, plain, unseen), _errors(float_model, corrected, unseen)
    assert held_after["conv1"] < 0.1 * held_before["conv1"]
    # Only the int32 biases the corrected nodes read (through their DequantizeLinear) changed.
    producers = {out: node for node in corrected.graph.node for out in node.output}
    biases = {producers[node.input[2]].input[0] for node in corrected.graph.node if node.name in NODES}
    changed = {a.name for a, b in zip(plain.graph.initializer, corrected.graph.initializer) if a != b}
    assert changed == biases and all(numpy_helper.to_array(init).dtype == np.int32
                                     for init in corrected.graph.initializer if init.name in changed)


def test_quantize_graph_corrects_only_the_quantized_nodes(graphs):
    tmp, float_model, plain, calibration = graphs
    quantize.quantize_graph(tmp / "float.onnx", tmp / "corrected.onnx", calibration, [], tmp / "ranges", {})
    after = _errors(float_model, onnx.load(str(tmp / "corrected.onnx")), calibration)
    before = _errors(float_model, plain, calibration)
    assert after["conv1"] < 0.1 * before["conv1"]
    calls = []
    patch = pytest.MonkeyPatch()
    patch.setattr(quantize, "correct_bias", lambda fm, q, nodes, *args, **kwargs: calls.append(list(nodes)))
    try:
        quantize.quantize_graph(tmp / "float.onnx", tmp / "kept.onnx", calibration, ["conv1"], tmp / "ranges", {})
    finally:
        patch.undo()
    assert calls == [["conv2", "fc"]]  # a node kept in float32 is not corrected


def test_bias_correction_is_in_the_settings_and_the_cache_key():
    assert quantize.QUANT_SETTINGS["bias_correction"] == "sequential-empirical"
    assert quantize.QUANT_CODE_VERSION >= 2
    runner = types.SimpleNamespace(export_config={"backbone": "tiny"}, onnx_sha256="f" * 64)
    images = types.SimpleNamespace(sha256="0" * 64, calibration=np.zeros((4, 3, 8, 8)), holdout=np.zeros(2))
    key = quantize.int8_key(runner, images, 0.99)
    assert key["settings"]["bias_correction"] == "sequential-empirical" and key["quant_code_version"] >= 2


def test_a_float_bias_is_corrected_too(graphs):
    """A node whose bias is a float initializer (no DequantizeLinear): a shifted bias is put back."""
    _, float_model, _, calibration = graphs
    shifted = onnx.ModelProto()
    shifted.CopyFrom(float_model)
    b1 = next(init for init in shifted.graph.initializer if init.name == "b1")
    original = numpy_helper.to_array(b1).copy()
    shift = np.linspace(-1, 1, original.size).astype(np.float32)
    b1.CopyFrom(numpy_helper.from_array(original + shift, "b1"))
    corrections = correct_bias(float_model, shifted, ["conv1", "relu1"], calibration, INPUT_NAME,
                               intra_op_threads=1)
    assert list(corrections) == ["conv1"]  # relu1 has no bias to correct
    np.testing.assert_allclose(corrections["conv1"], shift, atol=1e-4)
    restored = next(init for init in shifted.graph.initializer if init.name == "b1")
    np.testing.assert_allclose(numpy_helper.to_array(restored), original, atol=1e-4)


def test_channel_means_skip_a_matmul_of_tokens():
    """A transformer's linear layers are MatMul on (N, T, C) tokens (no bias to correct): they are skipped, not
    probed as a (N, C, H, W) map (which onnxruntime refused, so int8 failed for every ViT)."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Reshape", [INPUT_NAME, "shape"], ["tokens"], name="reshape"),
         helper.make_node("MatMul", ["tokens", "w"], ["out"], name="linear")],
        "tokens", [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, [None, 4, 2, 2])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        [weight, numpy_helper.from_array(np.array([0, 4, 4], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert channel_means(model, ["linear"], np.ones((2, 4, 2, 2), np.float32), INPUT_NAME) == {}
