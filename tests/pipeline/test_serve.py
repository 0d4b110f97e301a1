"""``featcache export``: a trained run as one ONNX file gives, in onnxruntime alone, the scores of ``featcache predict
--images`` on the same images (a store made as ``dvc repro`` makes it: onnxruntime on the CPU, float16 storage).

Tolerance: ``predict`` rounds its probabilities to 6 decimals (5e-7), and the served graph runs the same exported
backbone in the same runtime, then the head in float32 where scikit-learn computes in float64 (1e-7): 2e-6 absolute.
Without the float16 rounding of the features the MLP's probabilities move by 2e-5 here (the separable colours leave
logreg's within 1e-6: the backbone part is checked against the store's rows bit for bit instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featcache.pipeline import export_serving_model, extract, parse_params, prepare, train
from featcache.pipeline.cli import main
from featcache.pipeline.predict import predict_images, stored_preprocessor
from featcache.runs import read_run_info

from .conftest import shipped_backend

ort = pytest.importorskip("onnxruntime")

HEADS = ("logreg", "mlp", "lightgbm", "knn")
FUSED = "pool+block6"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder_factory, params_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    images = folder_factory(root / "images", per_class=8)
    raw = params_factory(str(images))
    raw["extract"]["backend"] = shipped_backend()
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": FUSED}]
    params = parse_params(raw)
    assert params.extract.dtype == "float16"  # the rounding the served graph must apply
    prepare(params, root / "prepared")
    store = root / "features.h5"
    extract(params, "efficientnet_lite0", root / "prepared" / "manifest.csv", store, progress=False)
    for head in HEADS:
        train(params, store, "efficientnet_lite0", "pool", head, root / "metrics" / f"{head}.json",
              model_dir=root / "models" / head)
    train(params, store, "efficientnet_lite0", FUSED, "logreg", root / "metrics" / "fused.json",
          model_dir=root / "models" / "fused_logreg")
    paths = sorted(images.rglob("*.png"))[::3]
    return {"root": root, "images": paths, "models": root / "models", "store": store, "folder": images}


def _served(path: Path, model: Path, images: list[Path]) -> tuple[list[np.ndarray], dict]:
    """The exported file run on the images, preprocessed as its description says (the run's preprocessing)."""
    preprocess = stored_preprocessor(read_run_info(model)["extraction_config"])
    pixels = np.stack([np.asarray(preprocess(preprocess.load(str(image)))) for image in images])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    described = json.loads(session.get_modelmeta().custom_metadata_map["featcache_model"])
    return session.run(None, {"images": pixels.astype(np.float32)}), described


@pytest.mark.parametrize("head", [*HEADS, "fused_logreg"])
def test_the_served_file_gives_the_scores_of_predict_images(trained, head, tmp_path):
    """Was: no such export (predict needed Python, featcache and the head's library). Now the one file gives
    predict --images' probabilities (within its 6-decimal rounding) and its predictions as ``label``."""
    model = trained["models"] / head
    rows = predict_images(model, trained["images"])  # fills the export cache the export then reads
    path = export_serving_model(model, tmp_path / "served" / "model.onnx")
    (scores, label), described = _served(path, model, trained["images"])
    classes = described["classes"]
    expected = np.array([[row[f"p_{name}"] for name in classes] for row in rows])
    assert scores.shape == expected.shape == (len(trained["images"]), 3) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=0, atol=2e-6)
    assert [classes[k] for k in label] == [row["prediction"] for row in rows]


def test_the_backbone_part_gives_the_stores_features_bit_for_bit(trained):
    """The fused layer's parts, each rounded to float16 and back and concatenated in order, are the store's rows
    exactly (same export, same runtime); without the rounding 43% of the values differ."""
    from featcache.extract.onnx.serve import feature_graph
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.store import FeatureStore

    info = read_run_info(trained["models"] / "fused_logreg")
    config = info["extraction_config"]
    with FeatureStore(trained["store"]) as store:
        ids, stored = list(store.ids()), store.read(FUSED)
    source = resolve_weights("efficientnet_lite0", "pretrained")
    graph = feature_graph(source, FUSED, pooling=config["extract"]["pooling"], dtype="float16")
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    preprocess = stored_preprocessor(config)
    pixels = np.stack([np.asarray(preprocess(preprocess.load(str(trained["folder"] / name)))) for name in ids])
    (features,) = session.run(None, {"images": pixels})
    assert features.shape == stored.shape == (len(ids), 1280 + 192)  # pool, block6
    np.testing.assert_array_equal(features, stored)


def test_the_description_round_trips(trained, tmp_path):
    """metadata_props['featcache_model']: task, classes in order, the preprocessing the run recorded and the words
    that apply it, backbone, layer, head, store dtype, featcache's version; the inputs and outputs it names."""
    import featcache

    model = trained["models"] / "fused_logreg"
    info = read_run_info(model)
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    described = json.loads(session.get_modelmeta().custom_metadata_map["featcache_model"])
    config = info["extraction_config"]
    assert described["task"] == "classification" and described["classes"] == info["classes"]
    assert described["preprocess"] == config["preprocess"] and len(described["preprocess_steps"]) == 4
    assert (described["backbone"], described["layer"], described["head"]) == ("efficientnet_lite0", FUSED, "logreg")
    assert described["store_dtype"] == "float16" and described["featcache_version"] == featcache.__version__
    size = config["preprocess"]["input_size"]
    assert described["input"]["shape"] == ["batch", 3, size, size]
    assert [i.name for i in session.get_inputs()] == ["images"] == [described["input"]["name"]]
    assert [o.name for o in session.get_outputs()] == ["scores", "label"]
    assert [described["output"]["name"], described["label"]["name"]] == ["scores", "label"]


def test_an_int8_run_is_refused_with_a_hint(trained, tmp_path, capsys):
    import shutil

    model = tmp_path / "int8"
    shutil.copytree(trained["models"] / "logreg", model)
    info = json.loads((model / "featcache-run.json").read_text())
    info["extraction_config"]["extract"]["precision"] = "int8"
    (model / "featcache-run.json").write_text(json.dumps(info))
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "int8 features" in capsys.readouterr().err


def test_a_bad_model_folder_exits_2_with_one_line(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featcache export: error:") and "not a featcache run directory" in err
    assert len(err.splitlines()) == 1


def test_a_regression_run_serves_its_predictions_in_target_units(tmp_path, params_factory):
    """Ridge and the MLP (trained on the standardised target): ``scores`` (B,) are predict --images' predictions
    (not rounded there: rtol 1e-5), no ``label``, and the description says regression."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = ["path,target"]
    for index in range(24):
        brightness = rng.uniform(0.05, 0.95)
        pixels = np.clip(brightness * 255 + rng.normal(0, 8, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{index:02d}.png")
        lines.append(f"img{index:02d}.png,{brightness * 100:.2f}")
    (images / "targets.csv").write_text("\n".join(lines) + "\n")
    raw = params_factory(str(images))
    raw["data"].update(source="csv", csv="targets.csv", task="regression")
    raw["extract"]["backend"] = shipped_backend()
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool"]
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    store = tmp_path / "lite0.h5"
    extract(params, "efficientnet_lite0", tmp_path / "prepared" / "manifest.csv", store, progress=False)
    paths = sorted(images.glob("*.png"))[:8]
    for head in ("logreg", "mlp"):
        model = tmp_path / "models" / head
        train(params, store, "efficientnet_lite0", "pool", head, tmp_path / "metrics" / f"{head}.json",
              model_dir=model)
        rows = predict_images(model, paths)
        path = export_serving_model(model, tmp_path / f"{head}.onnx")
        outputs, described = _served(path, model, paths)
        assert len(outputs) == 1 and described["task"] == "regression" and "classes" not in described
        assert described["head"] == {"logreg": "ridge", "mlp": "mlp"}[head]
        np.testing.assert_allclose(outputs[0], [row["prediction"] for row in rows], rtol=1e-5)
