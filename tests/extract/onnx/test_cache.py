"""The ONNX export cache: hits skip the exporter, every graph input changes the key, bad entries are rebuilt."""

from __future__ import annotations

import importlib.metadata
import json
import logging

import numpy as np
import pytest
import torch

import featcache
import featcache.extract.onnx.cache as onnx_cache
import featcache.extract.onnx.export as onnx_export
from featcache.extract.onnx.format import DEFAULT_OPSET
from featcache.extract.onnx.cache import (
    CACHE_ENV,
    cache_key,
    cached_export,
    default_cache_dir,
    entry_path,
    resolve_cache_dir,
    source_key,
)
import featcache.extract.onnx.runner as onnx_runner
from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.weights import WeightsSource, load_backbone, resolve_weights
from featcache.util.hashing import file_sha256

SIZE = 32


@pytest.fixture(scope="module")
def resnet():
    return load_backbone("resnet18", "random")


def _extractor(loaded, layers=("pool5",), pooling="avg") -> TorchFeatureExtractor:
    return TorchFeatureExtractor(loaded.model, loaded.spec, list(layers), pooling=pooling, channels_last=False)


@pytest.fixture
def fake_exporter(monkeypatch):
    """Replace the (slow) exporter by one that writes a small file and counts its calls."""
    calls = []

    def export(extractor, path, opset=DEFAULT_OPSET, input_size=None, *, exporter="auto"):
        calls.append(path)
        path.write_bytes(f"onnx of {extractor.layer_names} #{len(calls)}".encode() * 64)
        return path

    monkeypatch.setattr(onnx_export, "export_onnx", export)
    return calls


def test_hit_does_not_call_the_exporter(resnet, tmp_path, fake_exporter):
    extractor = _extractor(resnet)
    first, sha = cached_export(extractor, tmp_path, input_size=SIZE)
    again, sha_again = cached_export(_extractor(resnet), tmp_path, input_size=SIZE)
    assert len(fake_exporter) == 1
    assert again == first and sha_again == sha == file_sha256(first)
    sidecar = json.loads(first.with_name(first.name + ".json").read_text())
    assert sidecar["sha256"] == sha and sidecar["key"]["backbone"] == "resnet18"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".json"]  # no temporaries left


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar", "bad_sidecar", "no_file"])
def test_corrupt_entry_is_logged_and_rebuilt(damage, resnet, tmp_path, fake_exporter, caplog):
    path, sha = cached_export(_extractor(resnet), tmp_path, input_size=SIZE)
    sidecar = path.with_name(path.name + ".json")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    elif damage == "no_sidecar":
        sidecar.unlink()
    elif damage == "bad_sidecar":
        sidecar.write_text("{not json")
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="featcache.extract.onnx.cache"):
        rebuilt, new_sha = cached_export(_extractor(resnet), tmp_path, input_size=SIZE)
    assert len(fake_exporter) == 2 and rebuilt == path
    assert new_sha == file_sha256(path) == json.loads(sidecar.read_text())["sha256"]
    assert "rebuilding" in caplog.text and path.name in caplog.text


def test_every_graph_input_changes_the_key(resnet, monkeypatch):
    base = cache_key(_extractor(resnet), 18, SIZE, "auto")
    assert cache_key(_extractor(resnet), 18, SIZE, "auto") == base  # deterministic
    other_weights = load_backbone("resnet18", "random", seed=1)
    variants = {
        "backbone": cache_key(_extractor(load_backbone("alexnet", "random"), layers=("pool5",)), 18, 64, "auto"),
        "weights_sha256": cache_key(_extractor(other_weights), 18, SIZE, "auto"),
        "layers": cache_key(_extractor(resnet, layers=("res4",)), 18, SIZE, "auto"),
        "pooling": cache_key(_extractor(resnet, pooling="max"), 18, SIZE, "auto"),
        "input_size": cache_key(_extractor(resnet), 18, 64, "auto"),
        "opset": cache_key(_extractor(resnet), 19, SIZE, "auto"),
        "exporter": cache_key(_extractor(resnet), 18, SIZE, "torchscript"),
    }
    for field, value in _changed_versions(monkeypatch, resnet.spec):
        variants[field] = cache_key(_extractor(resnet), 18, SIZE, "auto")
        monkeypatch.undo()
    assert set(variants) == set(base)  # every field of the key is exercised
    for field, key in variants.items():
        assert key[field] != base[field], field
        assert entry_path("c", key) != entry_path("c", base), field


def _changed_versions(monkeypatch, spec):
    """Yield (key field, ...) after changing what that field records: each package's version, featcache's, the code's."""
    real = importlib.metadata.version
    for field, package in (("torch_version", "torch"), ("onnx_version", "onnx"), ("model_library", spec.family)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, p=package: "0.0.1" if name == p else real(name))
        yield field, package
    monkeypatch.setattr(featcache, "__version__", "0.0.1")
    yield "featcache_version", None
    monkeypatch.setattr(onnx_cache, "EXPORT_CODE_VERSION", onnx_cache.EXPORT_CODE_VERSION + 1)
    yield "export_code_version", None


def test_every_input_changes_the_source_key(resnet, monkeypatch):
    spec = resnet.spec

    def key(**change):
        args = {"spec": spec, "weights_sha256": "ab" * 32, "layers": ["pool5"], "pooling": "avg",
                "input_size": SIZE, "opset": 18, "exporter": "auto", **change}
        return source_key(**args)

    base = key()
    assert key() == base and key(layers=["default"]) == base  # deterministic; "default" is the default alias
    variants = {
        "backbone": key(spec=load_backbone("alexnet", "random").spec),
        "weights_file_sha256": key(weights_sha256="cd" * 32),
        "layers": key(layers=["res4"]),
        "pooling": key(pooling="max"),
        "input_size": key(input_size=64),
        "opset": key(opset=19),
        "exporter": key(exporter="torchscript"),
    }
    for field, _ in _changed_versions(monkeypatch, spec):
        variants[field] = key()
        monkeypatch.undo()
    assert set(variants) == set(base)  # every field of the key is exercised
    for field, changed in variants.items():
        assert changed[field] != base[field], field
        assert entry_path("c", changed) != entry_path("c", base), field
    with pytest.raises(ValueError, match="sha256 of a weights file"):
        key(weights_sha256="")


def test_weights_hash_sees_a_changed_weight(resnet):
    extractor = _extractor(load_backbone("resnet18", "random"))
    before = cache_key(extractor, 18, SIZE, "auto")["weights_sha256"]
    with torch.no_grad():
        next(extractor.module.parameters()).view(-1)[0] += 1.0
    assert cache_key(extractor, 18, SIZE, "auto")["weights_sha256"] != before


def test_cache_folder_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "onnx"
    assert resolve_cache_dir("auto") == tmp_path / "root" / "onnx"
    assert resolve_cache_dir("none") is None and resolve_cache_dir(None) is None
    assert resolve_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "featcache" / "onnx"


def test_from_model_reuses_the_export(resnet, tmp_path, monkeypatch):
    """A real export once; the second runner opens the cached file without exporting, same outputs."""
    first = OnnxFeatureRunner.from_model(resnet.model, resnet.spec, ["pool5"], input_size=SIZE, intra_op_threads=1,
                                         cache_dir=tmp_path)
    assert first.path.parent == tmp_path and first.onnx_sha256 == file_sha256(first.path)

    def no_export(*args, **kwargs):
        raise AssertionError("the exporter ran on a cache hit")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    second = OnnxFeatureRunner.from_model(resnet.model, resnet.spec, ["pool5"], input_size=SIZE, intra_op_threads=1,
                                          cache_dir=tmp_path)
    copy = OnnxFeatureRunner.from_model(resnet.model, resnet.spec, ["pool5"], input_size=SIZE, intra_op_threads=1,
                                        cache_dir=tmp_path, path=tmp_path / "out" / "copy.onnx")
    assert second.path == first.path and second.onnx_sha256 == first.onnx_sha256
    assert copy.path == tmp_path / "out" / "copy.onnx" and file_sha256(copy.path) == first.onnx_sha256
    batch = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(second(batch)["pool5"], first(batch)["pool5"])
    with pytest.raises(AssertionError, match="exporter ran"):  # without the cache it exports again
        OnnxFeatureRunner.from_model(resnet.model, resnet.spec, ["pool5"], input_size=SIZE, cache_dir="none")


def test_from_source_hit_builds_no_model(resnet, tmp_path, monkeypatch):
    """Weights from a file: the first runner exports; a later one opens the entry without building the model."""
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet.model.state_dict(), weights)
    first = OnnxFeatureRunner.from_source(resolve_weights("resnet18", str(weights)), ["pool5"], input_size=SIZE,
                                          intra_op_threads=1, cache_dir=tmp_path / "cache")
    sidecar = json.loads(first.path.with_name(first.path.name + ".json").read_text())
    assert sidecar["key"]["weights_file_sha256"] == file_sha256(weights)

    def no_model(self):
        raise AssertionError("the model was built on a cache hit")

    monkeypatch.setattr(WeightsSource, "load", no_model)
    second = OnnxFeatureRunner.from_source(resolve_weights("resnet18", str(weights)), ["pool5"], input_size=SIZE,
                                           intra_op_threads=1, cache_dir=tmp_path / "cache")
    assert second.path == first.path and second.onnx_sha256 == first.onnx_sha256
    batch = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(second(batch)["pool5"], first(batch)["pool5"])
    np.testing.assert_allclose(second(batch)["pool5"], _extractor(resnet)(batch)["pool5"], rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match="model was built"):  # other weights: a miss, which needs the model
        torch.save({k: v + 1 if v.is_floating_point() else v for k, v in resnet.model.state_dict().items()}, weights)
        OnnxFeatureRunner.from_source(resolve_weights("resnet18", str(weights)), ["pool5"], input_size=SIZE,
                                      cache_dir=tmp_path / "cache")
    with pytest.raises(AssertionError, match="model was built"):  # random weights have no file to key by
        OnnxFeatureRunner.from_source(resolve_weights("resnet18", "random"), ["pool5"], input_size=SIZE,
                                      cache_dir=tmp_path / "cache")
