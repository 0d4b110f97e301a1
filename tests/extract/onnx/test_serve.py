"""extract/onnx/serve.py on a synthetic backbone (no export): the head appended after the features, ``label`` for a
classifier only, the description in metadata_props, opset checks, and the file written checked."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from featcache.extract.onnx.format import MODEL_KEY
from featcache.extract.onnx.serve import (
    ServingExportError,
    serving_description,
    serving_model,
    write_serving_model,
)
from featcache.heads import make_head
from featcache.heads.onnx_graph import head_graph

ort = pytest.importorskip("onnxruntime")

PREPROCESS = {"input_size": 8, "resize_size": 8, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
              "resize_mode": "squash", "background": [255, 255, 255]}


def _features(opset: int = 18) -> onnx.ModelProto:
    """images (B, 3, 8, 8) -> features (B, 3): the spatial mean, as a pooled backbone's output."""
    node = helper.make_node("ReduceMean", ["images", "axes"], ["features"], keepdims=0)
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    graph = helper.make_graph([node], "backbone", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                 ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3])], [axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _head(task: str, name: str = "logreg"):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 3)).astype(np.float32)
    y = np.arange(90) % 3 if task == "classification" else X @ [1.0, 2.0, -1.0]
    params = {"n_estimators": 10, "min_child_samples": 2, "n_jobs": 1} if name == "lightgbm" else {}
    return make_head(name, task, params).fit(X, y)


def _describe(task: str) -> dict:
    return serving_description(task, ["a", "b", "c"], PREPROCESS, backbone="toy", layer="pool", head="logreg",
                               weights_id="random (seed 0)", pooling="avg", dtype="float32")


@pytest.mark.parametrize(("task", "name"), [("classification", "logreg"), ("regression", "logreg"),
                                            ("classification", "lightgbm")])
def test_the_served_model_is_the_head_after_the_features(task, name, tmp_path):
    head = _head(task, name)
    path = write_serving_model(serving_model(_features(), head_graph(head), _describe(task)), tmp_path / "a" / "m.onnx")
    images = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images})
    features = images.mean(axis=(2, 3))
    expected = head.predict_proba(features) if task == "classification" else head.predict(features)
    np.testing.assert_allclose(outputs[0], expected, rtol=1e-5, atol=1e-6)
    names = [o.name for o in session.get_outputs()]
    if task == "classification":
        assert names == ["scores", "label"] and outputs[1].dtype == np.int64
        assert np.array_equal(outputs[1], expected.argmax(axis=1))
    else:
        assert names == ["scores"] and outputs[0].shape == (5,)
    described = json.loads(session.get_modelmeta().custom_metadata_map[MODEL_KEY])
    assert described == json.loads(json.dumps(_describe(task)))


def test_the_description_names_classes_and_preprocessing():
    described = _describe("classification")
    assert described["classes"] == ["a", "b", "c"] and described["input"]["shape"] == ["batch", 3, 8, 8]
    assert described["preprocess"] == PREPROCESS and described["preprocess_steps"][1].startswith("resize to")
    assert "preprocess_steps" in described["input"]["meaning"] and described["label"]["name"] == "label"
    regression = _describe("regression")
    assert "classes" not in regression and "label" not in regression and regression["output"]["shape"] == ["batch"]


def test_a_head_of_another_opset_is_refused():
    with pytest.raises(ServingExportError, match=r"opset 17 of 'ai.onnx'.*backbone's 18"):
        serving_model(_features(18), head_graph(_head("classification"), opset=17), _describe("classification"))


def test_a_served_model_over_what_one_onnx_file_holds_is_refused(monkeypatch):
    features, graph = _features(), head_graph(_head("classification"))
    total = features.ByteSize() + graph.ByteSize()
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", total)
    with pytest.raises(ServingExportError, match=r"backbone and head take 0\.00 GiB \(backbone 0\.00\), over the 0 "
                                                 r"GiB one ONNX file holds.*featcache predict"):
        serving_model(features, graph, _describe("classification"))
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", total + 1)
    assert serving_model(features, graph, _describe("classification")).graph.output[0].name == "scores"
