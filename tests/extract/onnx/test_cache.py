"""The ONNX export cache: hits skip the exporter, every graph input changes the key, bad entries are rebuilt."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import featcache
import featcache.extract.onnx.cache as onnx_cache
import featcache.extract.onnx.export as onnx_export
from featcache.extract.onnx.cache import (
    CACHE_ENV,
    cache_key,
    cached_export,
    default_cache_dir,
    entry_path,
    resolve_cache_dir,
    source_key,
)
from featcache.extract.onnx.format import DEFAULT_OPSET
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
    for field, _ in _changed_versions(monkeypatch, resnet.spec):
        variants[field] = cache_key(_extractor(resnet), 18, SIZE, "auto")
        monkeypatch.undo()
    assert set(variants) == set(base)  # every field of the key is exercised
    for field, key in variants.items():
        assert key[field] != base[field], field
        assert entry_path("c", key) != entry_path("c", base), field


def _changed_versions(monkeypatch, spec):
    """Yield (key field, ...) after changing what that field records: each package's version, featcache's, the
    code's."""
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


# ------------------------------------------------------------------ concurrency
#: A child process: wait for the go file, then export the key (the parent's cache_key of a random resnet18) through
#: the cache with a slow, counting stand-in exporter; print one JSON line: the entry, its sha256, the cache's warnings.
#: The stand-in is installed as the export module, so the child imports neither torch nor onnx (it starts fast).
_RACE_CHILD = r"""
import json, logging, os, sys, time, types
from pathlib import Path

cache_dir, go, count, key = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])

def export_onnx(extractor, path, opset=18, input_size=None, *, exporter="auto"):
    with open(count, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(0.5)  # the other process looks the key up meanwhile
    path.write_bytes(b"onnx graph " * 4096)
    return path

sys.modules["featcache.extract.onnx.export"] = types.SimpleNamespace(export_onnx=export_onnx)
from featcache.extract.onnx.cache import cached_export

warnings = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("featcache.extract.onnx.cache").addHandler(handler)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
path, sha = cached_export(None, cache_dir, input_size=32, key=key)
print(json.dumps({"path": str(path), "sha": sha, "warnings": warnings}), flush=True)
"""


def test_two_processes_export_a_missing_key_once(resnet, tmp_path):
    """Two processes ask for the same missing entry at once: one exports, both get the same verified entry."""
    cache, go, count = tmp_path / "cache", tmp_path / "go", tmp_path / "exports.txt"
    key = json.dumps(cache_key(_extractor(resnet), DEFAULT_OPSET, SIZE, "auto"))
    children = [subprocess.Popen([sys.executable, "-c", _RACE_CHILD, str(cache), str(go), str(count), key],
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [child.stdout.readline().strip() for child in children] == ["ready", "ready"]
        go.touch()
        outputs = [child.communicate(timeout=120)[0] for child in children]
    finally:
        for child in children:
            child.kill()
    assert [child.returncode for child in children] == [0, 0]
    results = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    assert len(count.read_text().splitlines()) == 1  # exactly one export
    path = Path(results[0]["path"])
    assert results[1]["path"] == str(path) and results[0]["sha"] == results[1]["sha"] == file_sha256(path)
    assert json.loads(path.with_name(path.name + ".json").read_text())["sha256"] == results[0]["sha"]
    assert results[0]["warnings"] == results[1]["warnings"] == []
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.name + ".json"]  # no temporaries, no lock


@pytest.mark.parametrize("reader", ["lookup", "cached_export"])
def test_a_reader_during_publication_sees_no_corrupt_entry(reader, resnet, tmp_path, fake_exporter, monkeypatch,
                                                          caplog):
    """A reader between the writer's two renames (graph, sidecar) waits for the entry: no warning, no rebuild."""
    extractor = _extractor(resnet)
    key = cache_key(extractor, DEFAULT_OPSET, SIZE, "auto")
    half_published, done = threading.Event(), threading.Event()
    real_replace = os.replace

    def replace(src, dst):  # the writer pauses after publishing its first file
        real_replace(src, dst)
        if not half_published.is_set() and Path(dst).parent == tmp_path:
            half_published.set()
            done.wait(timeout=1.0)  # a fixed reader waits for the lock meanwhile: it cannot set done

    monkeypatch.setattr(os, "replace", replace)
    writer = threading.Thread(target=cached_export, args=(extractor, tmp_path), kwargs={"input_size": SIZE})
    writer.start()
    assert half_published.wait(timeout=30)
    with caplog.at_level(logging.INFO, logger="featcache.extract.onnx.cache"):
        if reader == "lookup":
            found = onnx_cache.lookup(tmp_path, key)
        else:
            found = cached_export(extractor, tmp_path, input_size=SIZE, key=key)
    done.set()
    writer.join(timeout=30)
    path = entry_path(tmp_path, key)
    assert found == (path, file_sha256(path))
    assert len(fake_exporter) == 1  # the reader did not export again
    assert "rebuilding" not in caplog.text and "corrupt" not in caplog.text and "unreadable" not in caplog.text


@pytest.mark.parametrize("setting", ["folder", "auto"])
def test_an_unwritable_cache_exports_to_a_temporary_file(resnet, tmp_path, monkeypatch, caplog, setting):
    """The extraction path (``build_runner`` -> ``from_source``) with ``extract_run.onnx_cache`` (or the default
    folder under ``$FEATCACHE_CACHE_DIR``) where a file is in the way: was NotADirectoryError from mkdir; now a
    warning and an export to a temporary file."""
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet.model.state_dict(), weights)
    (tmp_path / "a_file").write_text("in the way")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a_file"))
    cache_dir = "auto" if setting == "auto" else tmp_path / "a_file" / "onnx"
    with caplog.at_level(logging.WARNING, logger="featcache.extract.onnx.cache"):
        runner = OnnxFeatureRunner.from_source(resolve_weights("resnet18", str(weights)), ["pool5"], input_size=SIZE,
                                               intra_op_threads=1, cache_dir=cache_dir)
    assert [r.getMessage() for r in caplog.records if "is not writable" in r.getMessage()]  # warned (once a folder)
    assert tmp_path / "a_file" not in runner.path.parents and runner.path.is_file()
    batch = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(runner(batch)["pool5"], _extractor(resnet)(batch)["pool5"], rtol=1e-4, atol=1e-5)
    from featcache.extract.onnx.cache import writable_cache_dir

    assert writable_cache_dir(cache_dir) is None
    assert writable_cache_dir(tmp_path / "fine") == tmp_path / "fine" and (tmp_path / "fine").is_dir()
    assert list((tmp_path / "fine").iterdir()) == []  # the write probe leaves nothing behind


def test_a_read_only_cache_still_serves_its_entries(resnet, tmp_path, monkeypatch, caplog):
    """A cache prepared once and shared read-only: a hit needs no write access (no probe, no warning)."""
    from featcache.extract.onnx import runner as runner_module

    weights = tmp_path / "resnet18.pth"
    torch.save(resnet.model.state_dict(), weights)
    first = OnnxFeatureRunner.from_source(resolve_weights("resnet18", str(weights)), ["pool5"], input_size=SIZE,
                                          intra_op_threads=1, cache_dir=tmp_path / "shared")

    def no_write_access(setting):
        raise AssertionError(f"probed {setting} for writing on a cache hit")

    monkeypatch.setattr(runner_module, "writable_cache_dir", no_write_access)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featcache.extract.onnx.cache"):
        again = OnnxFeatureRunner.from_source(resolve_weights("resnet18", str(weights)), ["pool5"], input_size=SIZE,
                                              intra_op_threads=1, cache_dir=tmp_path / "shared")
    assert again.path == first.path and again.onnx_sha256 == first.onnx_sha256
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
