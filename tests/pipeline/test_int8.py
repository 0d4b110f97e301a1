"""``extract.precision: int8`` through the extract stage: calibrated, gated, cached, recorded, never mixed."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import dask
import h5py
import numpy as np
import pytest
import yaml

import featcache.extract.onnx.quantize as quantize
from featcache.errors import ExtractionError
from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.pipeline.config import load_params
from featcache.pipeline.extract import extract
from featcache.pipeline.params.base import ConfigError
from featcache.pipeline.prepare import prepare
from featcache.store.reader import FeatureStore

INT8 = {"backend": "onnx", "precision": "int8", "int8_calibration": 16, "int8_holdout": 8}


def _params(tmp, params_factory, data, run=None, **extract_knobs):
    raw = params_factory(str(data))
    raw["extract"].update(extract_knobs)
    raw["extract_run"].update(onnx_cache=str(tmp / "cache"), **(run or {}))
    path = tmp / f"params-{len(list(tmp.glob('params-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_params(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, folder_factory, params_factory):
    """A tiny image folder, its manifest and an int8 store of it (the first, calibrating run)."""
    tmp = tmp_path_factory.mktemp("int8")
    data = folder_factory(tmp / "images", per_class=12)
    params = _params(tmp, params_factory, data, **INT8)
    manifest = prepare(params, tmp / "prepared")
    out = tmp / "int8.h5"
    extract(params, "efficientnet_lite0", tmp / "prepared" / "manifest.csv", out, progress=False)
    return {"tmp": tmp, "data": data, "params": params, "manifest": manifest, "out": out}


def test_int8_store_records_precision_calibration_and_parity(workspace, params_factory):
    with h5py.File(workspace["out"], "r") as f:
        attrs = dict(f.attrs)
        config = json.loads(f.attrs["config"])
    assert attrs["precision"] == "int8" and attrs["backend"] == "onnx"
    assert config["extract"]["precision"] == "int8" and config["extract"]["int8_calibration"] == 16
    assert attrs["int8_calibration_rows"] == 16 and attrs["int8_holdout_split"] == "val"
    parity = json.loads(attrs["int8_parity"])
    assert set(parity) == {"pool", "block6"} and min(parity.values()) >= 0.99
    assert attrs["onnx_sha256"] != attrs["float_onnx_sha256"]
    method = json.loads(attrs["int8_method"])
    assert method["per_channel"] is True and method["bias_correction"] == "sequential-empirical"
    # The stored int8 features are close to float32 ones of the same images (the gate's promise).
    tmp = workspace["tmp"]
    params = _params(tmp, params_factory, workspace["data"], backend="onnx")
    out = tmp / "float32.h5"
    extract(params, "efficientnet_lite0", tmp / "prepared" / "manifest.csv", out, progress=False)
    with h5py.File(out, "r") as f:
        assert f.attrs["precision"] == "float32" and "precision" not in json.loads(f.attrs["config"])["extract"]
    for layer in ("pool", "block6"):
        a = FeatureStore(workspace["out"]).read(layer, dtype=np.float64)
        b = FeatureStore(out).read(layer, dtype=np.float64)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.mean() > 0.99 and not np.array_equal(a, b)


def test_warm_int8_run_does_not_recalibrate(workspace, monkeypatch):
    def no_quantizing(*args, **kwargs):
        raise AssertionError("a warm int8 run quantized again")

    monkeypatch.setattr(quantize, "quantize_graph", no_quantizing)
    out = workspace["tmp"] / "warm.h5"
    extract(workspace["params"], "efficientnet_lite0", workspace["tmp"] / "prepared" / "manifest.csv", out,
            progress=False)
    with h5py.File(out, "r") as warm, h5py.File(workspace["out"], "r") as cold:
        assert warm.attrs["onnx_sha256"] == cold.attrs["onnx_sha256"]
        np.testing.assert_array_equal(warm["features/pool"][()], cold["features/pool"][()])


def test_a_read_only_cache_serves_its_int8_graph(workspace, monkeypatch, caplog):
    """A cache prepared once and shared read-only: a warm int8 run neither probes it for writing nor warns."""
    from featcache.extract.onnx import runner as runner_module

    def no_write_access(setting):
        raise AssertionError(f"probed {setting} for writing on a cache hit")

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a warm int8 run quantized again")

    monkeypatch.setattr(quantize, "writable_cache_dir", no_write_access)
    monkeypatch.setattr(runner_module, "writable_cache_dir", no_write_access)
    monkeypatch.setattr(quantize, "quantize_graph", no_quantizing)
    out = workspace["tmp"] / "read-only.h5"
    with caplog.at_level(logging.WARNING):
        extract(workspace["params"], "efficientnet_lite0", workspace["tmp"] / "prepared" / "manifest.csv", out,
                progress=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with h5py.File(out, "r") as warm, h5py.File(workspace["out"], "r") as cold:
        assert warm.attrs["onnx_sha256"] == cold.attrs["onnx_sha256"]
        assert warm.attrs["int8_float_nodes"] == cold.attrs["int8_float_nodes"]


def test_int8_blocks_are_not_resumed_by_a_float32_run(workspace, params_factory, monkeypatch):
    tmp = workspace["tmp"]
    out = tmp / "resume.h5"
    original = OnnxFeatureRunner.__call__
    calls = {"n": 0}

    def crashing(self, batch):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("killed")
        return original(self, batch)

    monkeypatch.setattr(OnnxFeatureRunner, "__call__", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        extract(workspace["params"], "efficientnet_lite0", tmp / "prepared" / "manifest.csv", out, progress=False)
    assert list(out.with_name(out.name + ".parts").rglob("block-*"))  # int8 blocks were committed
    monkeypatch.setattr(OnnxFeatureRunner, "__call__", original)
    params = _params(tmp, params_factory, workspace["data"], backend="onnx")
    report = extract(params, "efficientnet_lite0", tmp / "prepared" / "manifest.csv", out, progress=False)
    assert report.n_resumed_blocks == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["precision"] == "float32"


def test_int8_with_the_torch_backend_is_a_clear_error(workspace, params_factory):
    params = _params(workspace["tmp"], params_factory, workspace["data"], precision="int8")  # backend: torch
    with pytest.raises(ExtractionError, match=r"int8 needs extract.backend onnx \(or auto\), got 'torch'"):
        extract(params, "efficientnet_lite0", workspace["tmp"] / "prepared" / "manifest.csv",
                workspace["tmp"] / "never.h5", progress=False)
    assert not (workspace["tmp"] / "never.h5").exists()


def test_precision_values_are_checked(workspace, params_factory):
    with pytest.raises(ConfigError, match="precision"):
        _params(workspace["tmp"], params_factory, workspace["data"], precision="int4")


def test_the_gate_stops_a_graph_forced_to_quantize_everything(workspace, monkeypatch, caplog):
    monkeypatch.setattr(quantize, "FLOAT_PREFIX_STEPS", (0,))  # no float32 fallback: every node quantized
    tmp = workspace["tmp"]
    cache = tmp / "cache-forced"
    params = workspace["params"].model_copy(deep=True)
    params.extract.onnx_cache = str(cache)
    params.extract.int8_min_cosine = 0.99995  # the log shows it as given (it showed "gate 1", rounded)
    caplog.set_level(logging.INFO, logger="featcache")
    with pytest.raises(quantize.Int8GateError) as caught:
        extract(params, "efficientnet_lite0", tmp / "prepared" / "manifest.csv", tmp / "forced.h5", progress=False)
    attempts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("int8 attempt 1")]
    assert len(attempts) == 1 and "(extract.int8_min_cosine 0.99995)" in attempts[0]
    message = str(caught.value)
    assert "int8_min_cosine=0.99995" in message and "attempt 1: 0 leading node(s) in float32" in message
    assert "Hint:" in message and caught.value.failed
    assert not (tmp / "forced.h5").exists()
    assert not list(cache.glob("*-int8-*.onnx"))  # nothing that failed the gate is cached


def test_onnxruntime_quantizer_logs_go_to_featcache_at_debug(monkeypatch, caplog, tmp_path):
    """onnxruntime's quantizer logs warnings per tensor on the root logger: they reach the user only with -v."""
    def chatty_quantizer(*args, **kwargs):
        logging.warning("failed to infer the type of tensor: t1. Skip to quantize it.")
        logging.info("Quantization parameters for tensor:\"t2\" not specified")
        raise RuntimeError("stop here")

    monkeypatch.setattr(quantize, "quantize_static", chatty_quantizer)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="featcache")  # the CLI sets featcache's level (INFO) in earlier tests
    with pytest.raises(RuntimeError, match="stop here"):
        quantize.quantize_graph(tmp_path / "in.onnx", tmp_path / "out.onnx", np.zeros((1, 3, 8, 8), np.float32), [],
                                tmp_path / "ranges", {})
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("featcache.extract.onnx.quantize", "DEBUG",
         "onnxruntime quantizer: failed to infer the type of tensor: t1. Skip to quantize it."),
        ("featcache.extract.onnx.quantize", "DEBUG",
         "onnxruntime quantizer: Quantization parameters for tensor:\"t2\" not specified")]
    caplog.clear()
    logging.warning("after quantizing")  # the root logger is left as it was
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def _int8_graph_bytes(store, cache):
    """The bytes of the int8 graph ``store`` was extracted with, from the ONNX cache."""
    with h5py.File(store, "r") as handle:
        sha = handle.attrs["onnx_sha256"]
    return next(path.read_bytes() for path in cache.glob("*-int8-*.onnx")
                if hashlib.sha256(path.read_bytes()).hexdigest() == sha)


def test_int8_on_two_dask_workers_writes_the_single_process_file(workspace, params_factory, caplog):
    """Under ``extract_run.scheduler`` the driver calibrates and gates once (here from the warm cache) and the
    workers run that graph's bytes: the store is the single-process one, byte for byte (onnxruntime's int8
    features do not depend on the intra-op thread count either)."""
    tmp = workspace["tmp"]
    params = _params(tmp, params_factory, workspace["data"], run={"scheduler": "local", "n_workers": 2}, **INT8)
    out = tmp / "int8-dask.h5"
    graph_bytes = len(_int8_graph_bytes(workspace["out"], tmp / "cache"))
    # The graph travels scattered, never inside a task: no "Sending large graph" warning, even for a small one.
    with caplog.at_level(logging.INFO, logger="featcache"), warnings.catch_warnings(record=True) as caught, \
            dask.config.set({"distributed.admin.large-graph-warning-threshold": graph_bytes // 2}):
        warnings.simplefilter("always")
        report = extract(params, "efficientnet_lite0", tmp / "prepared" / "manifest.csv", out, progress=False)
    assert report.n_written == len(workspace["manifest"]) and "tasks on dask" in caplog.text
    assert not [w for w in caught if "large graph" in str(w.message)], [str(w.message) for w in caught]
    assert hashlib.md5(out.read_bytes()).hexdigest() == hashlib.md5(workspace["out"].read_bytes()).hexdigest()
