"""The ONNX backend through params (``extract.backend: onnx``) and the ONNX commands."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml

import featcache.extract.onnx.export as onnx_export
from featcache.extract.decode.images import ImageTooLargeError
from featcache.extract.inputs.sources import from_folder
from featcache.extract.onnx.cache import default_cache_dir
from featcache.extract.onnx.openvino_runner import native_autocasts
from featcache.pipeline import extract, parse_params, prepare, train
from featcache.pipeline.cli import main
from featcache.pipeline.onnx import parity_from_params
from featcache.store import FeatureStore
from featcache.util.hashing import file_sha256


def test_onnx_backend_matches_torch_backend(tmp_path, folder_factory, params_factory):
    raw = params_factory(str(folder_factory(tmp_path / "images", per_class=4)))
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool"]
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    torch_params = parse_params(raw)
    prepare(torch_params, tmp_path / "prepared")
    manifest = tmp_path / "prepared" / "manifest.csv"
    extract(torch_params, "efficientnet_lite0", manifest, tmp_path / "torch.h5", progress=False)
    raw["extract"]["backend"] = "onnx"
    extract(parse_params(raw), "efficientnet_lite0", manifest, tmp_path / "onnx.h5", progress=False)
    with FeatureStore(tmp_path / "torch.h5") as ref, FeatureStore(tmp_path / "onnx.h5") as got:
        assert got.attrs["backend"] == "onnx" and got.attrs["provider"] == "CPUExecutionProvider"
        assert ref.attrs["backend"] == "torch"
        assert ref.config_sha256 != got.config_sha256  # a different backend is a different config
        np.testing.assert_allclose(got.read("pool"), ref.read("pool"), atol=2e-3, rtol=2e-3)
        assert "onnx_sha256" not in ref.attrs
        onnx_sha256 = got.attrs["onnx_sha256"]
    # the export is cached (tests/conftest.py points FEATCACHE_CACHE_DIR at a session folder)
    entries = list(default_cache_dir().glob("efficientnet_lite0-*.onnx"))
    assert onnx_sha256 in [file_sha256(entry) for entry in entries]


def test_bf16_on_the_cpu_runs_openvino_and_its_store_trains(tmp_path, folder_factory, params_factory):
    """``extract.autocast: bf16`` with ``backend: auto`` on the CPU: OpenVINO's bf16 graph where the CPU has it
    (onnxruntime's float32 elsewhere); the store records what ran and the train stage accepts it."""
    raw = params_factory(str(folder_factory(tmp_path / "images", per_class=6)))
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool"]
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    raw["extract"]["backend"] = "onnx"
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    manifest = tmp_path / "prepared" / "manifest.csv"
    extract(params, "efficientnet_lite0", manifest, tmp_path / "float32.h5", progress=False)
    raw["extract"].update(backend="auto", autocast="bf16")
    bf16_params = parse_params(raw)
    extract(bf16_params, "efficientnet_lite0", manifest, tmp_path / "bf16.h5", progress=False)
    native = "bf16" in native_autocasts()
    with FeatureStore(tmp_path / "float32.h5") as ref, FeatureStore(tmp_path / "bf16.h5") as got:
        assert (got.attrs["backend"], got.attrs["precision"]) == (
            ("openvino", "bfloat16") if native else ("onnx", "float32"))
        assert got.attrs["onnx_sha256"] == ref.attrs["onnx_sha256"]  # the same export, another runtime
        assert got.config["extract"]["autocast"] == ("bf16" if native else "none")
        cosines = np.einsum("ij,ij->i", ref.read("pool"), got.read("pool")) / (
            np.linalg.norm(ref.read("pool"), axis=1) * np.linalg.norm(got.read("pool"), axis=1))
        assert cosines.min() >= 0.995
        if native:
            assert ref.config_sha256 != got.config_sha256
    # the train stage checks the store against the params (a stale store is refused): this one is accepted
    train(bf16_params, tmp_path / "bf16.h5", "efficientnet_lite0", "pool", "logreg", tmp_path / "metrics.json")
    assert (tmp_path / "metrics.json").is_file()


def test_an_openvino_store_made_on_a_cpu_without_bf16_is_valid_for_its_params():
    from featcache.pipeline.params.extract import ExtractParams, stored_choices

    params = ExtractParams(backend="openvino", autocast="bf16")
    assert stored_choices(params, {"backend": "openvino", "autocast": "none"})["autocast"] == "none"
    assert stored_choices(params, {"backend": "openvino", "autocast": "bf16"})["autocast"] == "bf16"
    assert stored_choices(ExtractParams(backend="onnx", autocast="bf16"), {"autocast": "none"})["autocast"] == "none"


def test_second_onnx_extraction_does_not_export(tmp_path, folder_factory, params_factory, monkeypatch):
    raw = params_factory(str(folder_factory(tmp_path / "images", per_class=4)))
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool"]
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    raw["extract"]["backend"] = "onnx"
    raw["extract_run"]["onnx_cache"] = str(tmp_path / "cache")
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    manifest = tmp_path / "prepared" / "manifest.csv"
    extract(params, "efficientnet_lite0", manifest, tmp_path / "first.h5", progress=False)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    extract(params, "efficientnet_lite0", manifest, tmp_path / "second.h5", progress=False)
    with FeatureStore(tmp_path / "first.h5") as first, FeatureStore(tmp_path / "second.h5") as second:
        sha = first.attrs["onnx_sha256"]
        assert second.attrs["onnx_sha256"] == sha
        np.testing.assert_array_equal(first.read("pool"), second.read("pool"))
    [entry] = (tmp_path / "cache").glob("*.onnx")
    assert file_sha256(entry) == sha


def test_export_and_parity_commands(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"backbones": {"resnet18": {"weights": "random", "layers": ["res4", "pool5"]}}}))
    out = tmp_path / "r18.onnx"
    assert main(["export-onnx", "--params", str(params), "--backbone", "resnet18", "--out", str(out)]) == 0
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["res4", "pool5"]
    assert any(p.key == "featcache_export" for p in model.metadata_props)
    capsys.readouterr()
    assert main(["onnx-parity", "--params", str(params), "--backbone", "resnet18", "--onnx", str(out),
                 "--batch-size", "2"]) == 0
    table = capsys.readouterr().out
    assert "res4" in table and "pool5" in table and "cosine" in table


def test_local_dask_cluster_gives_the_same_store(tmp_path, folder_factory, params_factory):
    """``extract_run.scheduler: local`` shards blocks over a LocalCluster; the store is byte-identical.

    Workers run one torch thread each; the single-process reference does too, since
    CPU kernels may round differently with another thread count.
    """
    import hashlib

    import torch

    raw = params_factory(str(folder_factory(tmp_path / "images", per_class=4)))
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool"]
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    raw["extract_run"].update(batch_size=4, block_rows=4)
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    manifest = tmp_path / "prepared" / "manifest.csv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(params, "efficientnet_lite0", manifest, tmp_path / "single.h5", progress=False)
    finally:
        torch.set_num_threads(threads)
    raw["extract_run"].update(scheduler="local", n_workers=2)
    report = extract(parse_params(raw), "efficientnet_lite0", manifest, tmp_path / "dask.h5", progress=False)
    assert report.n_written == 12
    digest = lambda path: hashlib.md5(path.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "dask.h5") == digest(tmp_path / "single.h5")


def test_parity_on_manifest_images_applies_the_configured_pixel_limit(tmp_path, folder_factory):
    """The parity batch decoded its images under Pillow's global limit, not extract.max_image_pixels."""
    root = folder_factory(tmp_path / "images", per_class=2, size=24)  # 576 pixels each
    manifest = from_folder(root, {"train": 1.0}, seed=0).write(tmp_path / "prepared" / "manifest.csv")
    raw = {"backbones": {"resnet18": {"weights": "random", "layers": ["pool5"]}},
           "extract": {"max_image_pixels": 500}}
    with pytest.raises(ImageTooLargeError, match="exceeds the decompression-bomb limit of 500 pixels"):
        parity_from_params(raw, "resnet18", manifest_path=manifest, batch_size=2)
