"""``extract.decode``: the extract stage with device JPEG decode (on the CPU device) matches the PIL path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.extract.plan import plan_extraction
from featcache.pipeline import extract, parse_params, prepare
from featcache.pipeline.train import expected_store_config
from featcache.store import FeatureStore, StaleStoreError

CLASSES = ("red", "green", "blue")


def _folder(root: Path) -> Path:
    """JPEGs of several sizes (one EXIF-rotated, one grayscale, one progressive), a PNG and a truncated JPEG."""
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (48, 64), (90, 30), (33, 33)]
    for channel, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index, (width, height) in enumerate(sizes):
            pixels = rng.integers(0, 90, size=(height, width, 3))
            pixels[..., channel] += 120 + np.linspace(0, 40, width).astype(int)[None, :]
            image = Image.fromarray(pixels.astype(np.uint8))
            if index == 0:
                exif = Image.Exif()
                exif[0x0112] = 6
                image.save(root / name / f"{index}.jpg", exif=exif)
            elif index == 1 and name == "green":
                image.convert("L").save(root / name / f"{index}.jpg")
            else:
                image.save(root / name / f"{index}.jpg", progressive=index == 2)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)).save(root / name / "png.png")
    data = (root / "red" / "3.jpg").read_bytes()
    (root / "blue" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return root


def _params(images: Path, decode: str):
    return parse_params({
        "data": {"name": "decode", "source": "folder", "path": str(images),
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "extract": {"batch_size": 8, "num_workers": 0, "block_rows": 8, "device": "cpu", "backend": "torch",
                    "decode": decode},
        "backbones": {"efficientnet_lite0": {"weights": "pretrained", "layers": ["pool", "block6"]}},
        "features": [{"backbone": "efficientnet_lite0", "layer": "pool"}],
    })


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("decode")
    images = _folder(root / "images")
    out = {}
    for decode in ("cpu", "gpu"):
        params = _params(images, decode)
        prepare(params, root / decode)
        out[decode] = extract(params, "efficientnet_lite0", root / decode / "manifest.csv", root / f"{decode}.h5",
                              progress=False)
    return {"root": root, "images": images, "reports": out}


def test_gpu_decode_matches_cpu_decode(stores):
    cpu, gpu = stores["reports"]["cpu"], stores["reports"]["gpu"]
    assert cpu.n_written == gpu.n_written == 15 and cpu.n_skipped == gpu.n_skipped == 1
    assert gpu.errors == cpu.errors and cpu.errors[0][0] == "blue/cut.jpg"
    assert cpu.errors[0][1].startswith("truncated or corrupt image")
    with FeatureStore(cpu.path) as a, FeatureStore(gpu.path) as b:
        assert list(a.ids()) == list(b.ids())
        for layer in ("pool", "block6"):
            x, y = a.read(layer).astype(np.float64), b.read(layer).astype(np.float64)
            cosines = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            assert cosines.min() >= 0.999, (layer, cosines.round(5))
            assert not np.array_equal(x, y)  # the device path really ran (it differs by rounding)


def test_the_store_records_the_decode_path(stores):
    cpu, gpu = stores["reports"]["cpu"], stores["reports"]["gpu"]
    with FeatureStore(cpu.path) as a, FeatureStore(gpu.path) as b:
        assert a.attrs["decode"] == "cpu" and b.attrs["decode"] == "gpu"
        assert "decode" not in json.loads(a.attrs["config"])["extract"]  # as before the setting existed
        assert json.loads(b.attrs["config"])["extract"]["decode"] == "gpu"
        # The train stage checks a store against its own decode path: either is valid for the same params.
        for decode in ("cpu", "gpu", "auto"):
            for store in (a, b):
                store.check_config(expected_store_config(_params(stores["images"], decode), "efficientnet_lite0",
                                                         store))
        # Other params are still checked against either store.
        raw = _params(stores["images"], "auto").model_dump()
        raw["extract"]["pooling"] = "max"
        with pytest.raises(StaleStoreError, match="pooling"):
            b.check_config(expected_store_config(parse_params(raw), "efficientnet_lite0", b))


def test_auto_decode_follows_the_runner(stores, monkeypatch):
    def plan(**settings):
        return plan_extraction(**parse_params({"extract": settings}).extract.plan_settings()).decode

    assert plan(device="cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan(device="cuda") == "gpu"
    assert plan(device="cuda", backend="onnx") == "cpu"  # onnxruntime takes host arrays
    assert plan(device="cuda", scheduler="local") == "gpu"  # each dask worker decodes on its GPU
    assert plan(device="cuda", decode="cpu", scheduler="tcp://10.0.0.5:8786") == "cpu"


def test_the_train_check_takes_a_default_layer_as_the_store_resolved_it(tmp_path):
    """``layers: [default]`` is resolved by the extract stage (the registry); the train stage, which imports no
    registry, takes the store's layer at that position and still refuses another layer."""
    from types import SimpleNamespace

    from featcache.pipeline.train import load_train_sections
    from featcache.store.schema import canonical_json

    store = SimpleNamespace(config={"layers": ["pool", "block6"], "extract": {"backend": "onnx", "autocast": "none"},
                                    "preprocess": {"input_size": 224}})
    params = parse_params({"backbones": {"efficientnet_lite0": {"layers": ["pool", "block6"]}}})
    resolved = expected_store_config(params, "efficientnet_lite0", store)
    assert resolved["layers"] == ["pool", "block6"] and resolved["preprocess"] == {"input_size": 224}
    assert resolved["extract"]["backend"] == "onnx" and resolved["extract"]["autocast"] == "none"

    def train_params(layers):
        path = tmp_path / "params.yaml"
        path.write_text(json.dumps({"backbones": {"efficientnet_lite0": {"layers": layers}}}), encoding="utf-8")
        return load_train_sections(path)

    as_default = expected_store_config(train_params(["default", "block6"]), "efficientnet_lite0", store)
    assert canonical_json(as_default) == canonical_json(resolved)
    other = expected_store_config(train_params(["block6", "pool"]), "efficientnet_lite0", store)
    assert other["layers"] == ["block6", "pool"]  # differs from the store: StaleStoreError in check_config
