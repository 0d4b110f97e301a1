"""``featcache export``: a trained run as one ONNX file gives, in onnxruntime alone, the scores of ``featcache predict
--images`` on the same images (a store made as ``dvc repro`` makes it: onnxruntime on the CPU, float16 storage).

Tolerance: ``predict`` rounds its probabilities to 6 decimals (5e-7), and the served graph runs the same exported
backbone in the same runtime, then the head in float32 where scikit-learn computes in float64 (1e-7): 2e-6 absolute.
Without the float16 rounding of the features the MLP's probabilities move by 2e-5 here (the separable colours leave
logreg's within 1e-6: the backbone part is checked against the store's rows bit for bit instead).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from _support.files import write_brightness_folder
from featcache.pipeline import export_serving_model, extract, parse_params, prepare, train
from featcache.pipeline.cli import main
from featcache.pipeline.predict import predict_images
from featcache.pipeline.run_folder import stored_preprocessor
from featcache.runs import read_run_info

from .conftest import extract_and_train, shipped_backend

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
    store, _ = extract_and_train(params, root, {**{head: ("pool", head) for head in HEADS},
                                                "fused_logreg": (FUSED, "logreg")})
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
    from featcache.extract.onnx.serve import backbone_graph, feature_graph
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.store import FeatureStore

    info = read_run_info(trained["models"] / "fused_logreg")
    config = info["extraction_config"]
    with FeatureStore(trained["store"]) as store:
        ids, stored = list(store.ids()), store.read(FUSED)
    source = resolve_weights("efficientnet_lite0", "pretrained")
    backbone = backbone_graph(source, ["pool", "block6"], pooling=config["extract"]["pooling"])
    graph = feature_graph(backbone, FUSED, dtype="float16")
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


def test_an_int8_run_without_its_graph_is_refused_saying_why(trained, tmp_path, capsys):
    """A run on int8 features serves the store's int8 graph (tests/pipeline/test_predict_int8.py); a store config
    that records none (made before featcache recorded it) exits 2 saying so, never serving float32 features."""
    import shutil

    model = tmp_path / "int8"
    shutil.copytree(trained["models"] / "logreg", model)
    info = json.loads((model / "featcache-run.json").read_text())
    info["extraction_config"]["extract"]["precision"] = "int8"
    (model / "featcache-run.json").write_text(json.dumps(info))
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err
    assert "int8 features" in error and "records no int8 graph" in error and not (tmp_path / "m.onnx").exists()


def test_a_bad_model_folder_exits_2_with_one_line(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featcache export: error:") and "not a featcache run directory" in err
    assert len(err.splitlines()) == 1


def test_a_regression_run_serves_its_predictions_in_target_units(tmp_path, params_factory):
    """Ridge and the MLP (trained on the standardised target): ``scores`` (B,) are predict --images' predictions
    (not rounded there: rtol 1e-5), no ``label``, and the description says regression."""
    images = write_brightness_folder(tmp_path / "images", 24, scale=100.0, decimals=2)
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


def test_a_head_on_one_layer_runs_only_what_that_layer_needs(trained, caplog):
    """The export cache holds the store's graph of both layers (block6, then the head convolution and pooling that
    make pool); a block6 head's served backbone is that graph pruned to block6: fewer nodes and initializers, and
    still the store's block6 rows bit for bit. Was: the extra output's nodes stayed in the file (not pruned)."""
    from featcache.extract.onnx.serve import backbone_graph, feature_graph
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.store import FeatureStore

    config = read_run_info(trained["models"] / "fused_logreg")["extraction_config"]
    with FeatureStore(trained["store"]) as store:
        ids, stored = list(store.ids()), store.read("block6")
    source = resolve_weights("efficientnet_lite0", "pretrained")
    with caplog.at_level(logging.INFO, logger="featcache.extract.onnx.serve"):
        backbone = backbone_graph(source, ["block6"], pooling=config["extract"]["pooling"],
                                  store_layers=config["layers"])
    assert any("from the ONNX export cache" in r.getMessage() for r in caplog.records)  # the extract stage's graph
    assert [o.name for o in backbone.graph.output] == ["pool", "block6"]
    graph = feature_graph(backbone, "block6", dtype="float16")
    assert len(graph.graph.node) < len(backbone.graph.node) - 2  # + 3 added: two casts and an Identity
    assert len(graph.graph.initializer) < len(backbone.graph.initializer)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    preprocess = stored_preprocessor(config)
    pixels = np.stack([np.asarray(preprocess(preprocess.load(str(trained["folder"] / name)))) for name in ids])
    (features,) = session.run(None, {"images": pixels})
    np.testing.assert_array_equal(features, stored)


def test_export_selected_exports_the_run_compare_selected(trained, tmp_path):
    """``--selected reports/compare.json --models models/<dataset>`` (the export stage) exports the run the report's
    ``selection.run`` names: the same file as ``--model`` of that folder; a report without one, or --selected
    without --models, exits 2 naming it."""
    report = tmp_path / "compare.json"
    report.write_text(json.dumps({"runs": [], "selection": {"on": "val", "run": "b/l/mlp", "metric": "accuracy"}}))
    models = tmp_path / "models"
    shutil.copytree(trained["models"] / "mlp", models / "b" / "l" / "mlp")
    assert main(["export", "--selected", str(report), "--models", str(models),
                 "--out", str(tmp_path / "selected.onnx")]) == 0
    assert main(["export", "--model", str(trained["models"] / "mlp"), "--out", str(tmp_path / "direct.onnx")]) == 0
    assert (tmp_path / "selected.onnx").read_bytes() == (tmp_path / "direct.onnx").read_bytes()
    (scores, _), described = _served(tmp_path / "selected.onnx", trained["models"] / "mlp", trained["images"][:2])
    assert described["head"] == "mlp" and scores.shape == (2, 3)


@pytest.mark.parametrize("content, args, expected", [
    ('{"runs": []}', ("--models", "MODELS"), "names no selected run"),
    ('{"selection": {"run": "../../etc"}}', ("--models", "MODELS"), "is not a run <backbone>/<layer>/<head>"),
    ('{"selection": {"run": "x", "backbone": "b", "layer": "..", "head": "mlp"}}', ("--models", "MODELS"),
     "is not a run <backbone>/<layer>/<head>"),
    ('{"selection": {"run": "b/l/mlp"}}', (), "--selected REPORT and --models DIR (models/<dataset>, holding"),
])
def test_export_selected_names_a_bad_report(trained, tmp_path, capsys, content, args, expected):
    report = tmp_path / "compare.json"
    report.write_text(content)
    args = tuple(str(trained["models"]) if a == "MODELS" else a for a in args)
    assert main(["export", "--selected", str(report), *args, "--out", str(tmp_path / "m.onnx")]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_models_without_selected_is_refused(trained, tmp_path, capsys):
    assert main(["export", "--model", str(trained["models"] / "mlp"), "--models", str(trained["models"]),
                 "--out", str(tmp_path / "m.onnx")]) == 2
    assert "allowed otherwise: --model alone" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_export_selected_takes_the_folder_by_head_name_and_refuses_another_model(trained, tmp_path, capsys):
    """compare.json's selection names the run folder by the registry's head (``logreg``, where the report's label for
    a regression run is ``ridge``) and records the model's sha256: the export refuses a folder that holds another
    model than the one compare selected (retrained or replaced since), and exports the one it did."""
    from featcache.runs import model_sha256

    models = tmp_path / "models"
    shutil.copytree(trained["models"] / "logreg", models / "b" / "l" / "logreg")
    selection = {"on": "val", "run": "b/l/ridge", "backbone": "b", "layer": "l", "head": "logreg",
                 "model_sha256": model_sha256(models / "b" / "l" / "logreg")}
    report = tmp_path / "compare.json"
    report.write_text(json.dumps({"selection": selection}))
    args = ["export", "--selected", str(report), "--models", str(models), "--out", str(tmp_path / "m.onnx")]
    assert main(args) == 0 and (tmp_path / "m.onnx").is_file()
    (tmp_path / "m.onnx").unlink()
    shutil.rmtree(models / "b" / "l" / "logreg")
    shutil.copytree(trained["models"] / "mlp", models / "b" / "l" / "logreg")  # another model in its place
    assert main(args) == 2
    assert "holds another model" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_train_records_the_models_sha256_and_compare_selects_it(trained, tmp_path):
    """The run's sidecar carries its saved model's sha256 and compare.json's selection copies the selected run's,
    with the head's registry name (the folder's)."""
    from featcache.pipeline import compare
    from featcache.runs import model_sha256, read_run

    run = read_run(trained["root"] / "metrics" / "mlp.json")
    assert run["model_sha256"] == model_sha256(trained["models"] / "mlp")
    compare(trained["root"] / "metrics", tmp_path / "reports")
    selection = json.loads((tmp_path / "reports" / "compare.json").read_text())["selection"]
    name = selection["head"] if selection["layer"] == "pool" else "fused_logreg"
    picked = read_run(trained["root"] / "metrics" / f"{name}.json")
    assert selection["model_sha256"] == picked["model_sha256"] and selection["backbone"] == "efficientnet_lite0"


@pytest.mark.parametrize(("knobs", "expected"), [
    ({"backend": "torch", "autocast": "fp16", "decode": "gpu"},
     "computed with fp16 autocast (torch) and decoded on the GPU (nvJPEG)"),
    ({"backend": "openvino", "autocast": "bf16"}, "computed with bf16 autocast (openvino)"),
])
def test_a_run_on_autocast_or_device_decoded_features_is_exported_with_a_warning(trained, tmp_path, caplog, knobs,
                                                                                   expected):
    """A GPU store (fp16 autocast, nvJPEG decode) or OpenVINO's bf16 one: the served file computes float32 features
    from PIL-decoded images, so the export says its scores may differ from the evaluated ones (predict warns alike);
    the shipped onnxruntime store exports without it."""
    with caplog.at_level(logging.WARNING, logger="featcache.pipeline.serve"):
        export_serving_model(trained["models"] / "logreg", tmp_path / "plain.onnx")
    assert not caplog.records
    model = tmp_path / "gpu"
    shutil.copytree(trained["models"] / "logreg", model)
    info = json.loads((model / "featcache-run.json").read_text())
    info["extraction_config"]["extract"].update(knobs)
    (model / "featcache-run.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="featcache.pipeline.serve"):
        export_serving_model(model, tmp_path / "gpu.onnx")
    (record,) = caplog.records
    assert f"the head's features were {expected}; the file computes float32 features" in record.getMessage()
    assert (tmp_path / "gpu.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
