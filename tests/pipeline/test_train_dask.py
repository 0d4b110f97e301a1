"""``train.scheduler``: LightGBM trains on a dask cluster; the other heads run here and say so."""

from __future__ import annotations

import csv
import json
import logging
import socket

import numpy as np
import pytest
import yaml

from featcache.errors import ParamError
from featcache.pipeline import extract, parse_params, prepare, train
from featcache.pipeline.cli import main


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, folder_factory, params_factory):
    """A prepared tiny folder, its raw params (one small layer) and its store."""
    root = tmp_path_factory.mktemp("traindask")
    folder_factory(root / "images")
    raw = params_factory(str(root / "images"))
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["block6"]
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "block6"}]
    raw["train"].update(n_boot=20)
    prepare(parse_params(raw), root / "prepared")
    store = root / "lite0.h5"
    extract(parse_params(raw), "efficientnet_lite0", root / "prepared" / "manifest.csv", store, progress=False)
    return {"root": root, "raw": raw, "store": store}


def _params(tiny_store, **train_settings):
    raw = json.loads(json.dumps(tiny_store["raw"]))
    raw["train"].update(train_settings)
    return parse_params(raw)


def _train(tiny_store, out, head, **train_settings):
    return train(_params(tiny_store, **train_settings), tiny_store["store"], "efficientnet_lite0", "block6", head,
                 out / "m.json", model_dir=out / "model", predictions_path=out / "p.csv")


def test_lightgbm_trains_on_a_local_cluster_and_predict_loads_the_head(tiny_store, tmp_path, caplog):
    """train.scheduler: local: fit_lightgbm_dask on a LocalCluster of 2 processes (closed afterwards), the run's
    sidecar says so, the saved head is an ordinary LightGBM head that `featcache predict` scores like the stage."""
    caplog.set_level(logging.INFO)
    run = _train(tiny_store, tmp_path, "lightgbm", scheduler="local", n_workers=2)
    assert run["accuracy"] >= 0.8
    assert "lightgbm trains on dask (train.scheduler=local): 2 workers" in caplog.text
    assert "fit_lightgbm_dask: 2 workers" in caplog.text
    sidecar = json.loads((tmp_path / "m.run.json").read_text(encoding="utf-8"))
    assert sidecar["dask"] == {"scheduler": "local", "n_workers": 2, "n_parts": 2}
    scores = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert scores["efficientnet_lite0"]["block6"]["lightgbm"]["accuracy"] == run["accuracy"]
    # the saved head: featcache predict loads it and gives the stage's test predictions
    assert main(["predict", "--model", str(tmp_path / "model"), "--store", str(tiny_store["store"]),
                 "--split", "test", "--out", str(tmp_path / "pred.csv")]) == 0
    with open(tmp_path / "pred.csv", newline="", encoding="utf-8") as f:
        predicted = [row["prediction"] for row in csv.DictReader(f)]
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        staged = [row["predicted"] for row in csv.DictReader(f)]
    assert predicted == staged and len(staged) == run["n_test"]


def test_in_memory_heads_ignore_the_scheduler_with_one_line(tiny_store, tmp_path, caplog):
    """logreg with train.scheduler set: trained here (no cluster), one line says so, the scores equal a plain run."""
    caplog.set_level(logging.INFO)
    local = _train(tiny_store, tmp_path / "none", "logreg")
    assert "train.scheduler" not in caplog.text
    on = _train(tiny_store, tmp_path / "local", "logreg", scheduler="tcp://127.0.0.1:9")  # never connected
    lines = [r.getMessage() for r in caplog.records if "train.scheduler" in r.getMessage()]
    assert lines == ["train.scheduler=tcp://127.0.0.1:9 is not used for head logreg: it trains in memory in this "
                     "process"]
    assert "dask" not in json.loads((tmp_path / "local" / "m.run.json").read_text(encoding="utf-8"))
    for key in ("accuracy", "log_loss", "best_params", "ci"):
        assert on[key] == local[key], key
    assert np.array_equal(np.load(tmp_path / "local" / "m.rows.npz")["p_true"],
                          np.load(tmp_path / "none" / "m.rows.npz")["p_true"])


def test_a_scheduler_that_does_not_answer_names_train_scheduler(tiny_store, tmp_path):
    import dask

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(ParamError) as info:
        _train(tiny_store, tmp_path, "lightgbm", scheduler=address)
    message = str(info.value)
    assert message.startswith(f"Cannot connect to the dask scheduler at train.scheduler={address!r}: ")
    assert "set train.scheduler: local" in message
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("value", ["locla", "10.0.0.5:8786"])
def test_check_rejects_a_bad_train_scheduler(tiny_store, tmp_path, value, capsys):
    raw = json.loads(json.dumps(tiny_store["raw"]))
    raw["train"]["scheduler"] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["check", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.scheduler" in err and "must be 'none', 'local' or a scheduler address" in err, err
    assert ("did you mean 'local'" in err.lower()) == (value == "locla")


def test_lightgbm_on_dask_without_val_rows_is_refused_before_any_cluster(monkeypatch):
    """The early stopping replays on val rows: a store without them is named (no cluster is started)."""
    import distributed

    from featcache.heads import make_head
    from featcache.pipeline.train_dask import DaskLightGBM

    monkeypatch.setattr(distributed, "LocalCluster", lambda **kwargs: pytest.fail("a cluster was started"))
    fitter = DaskLightGBM(make_head("lightgbm", "classification", {}), "classification", "local", 2)
    with pytest.raises(ParamError, match=r"train.scheduler='local' trains lightgbm on dask, which needs val rows"):
        fitter.fit(np.zeros((4, 2)), np.array([0, 1, 0, 1]), None, None)


def test_a_head_lightgbm_on_dask_cannot_take_is_refused_before_any_cluster(monkeypatch):
    """fit_lightgbm_dask grows no PCA: a head made with pca_components (by the API; params.yaml's are refused by
    check, below) is named with the hint before the store is opened or a cluster started; it failed inside the
    fit, after both. A selection_metric is taken (it was refused)."""
    import distributed

    from featcache.heads import make_head
    from featcache.pipeline.params.train import TrainParams
    from featcache.pipeline.train_dask import DaskLightGBM, dask_lightgbm

    monkeypatch.setattr(distributed, "LocalCluster", lambda **kwargs: pytest.fail("a cluster was started"))
    head = make_head("lightgbm", "classification", {"pca_components": 8})
    with pytest.raises(ParamError, match=r"train.scheduler='local' trains lightgbm on dask .* does not take "
                                         r"pca_components=8.*Hint: set train.scheduler: none"):
        dask_lightgbm(head, "lightgbm", "classification", TrainParams(scheduler="local"))
    head = make_head("lightgbm", "classification", {"selection_metric": "balanced_accuracy"})
    assert isinstance(dask_lightgbm(head, "lightgbm", "classification", TrainParams(scheduler="local")), DaskLightGBM)


def test_check_names_what_lightgbm_on_dask_does_not_take(tiny_store, tmp_path, capsys):
    """``featcache check`` (and the train stage's sections) refuse it before any stage runs."""
    raw = json.loads(json.dumps(tiny_store["raw"]))
    raw["train"].update(scheduler="local")
    raw["heads"]["lightgbm"] = {**raw["heads"].get("lightgbm", {}), "pca_components": 8}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["check", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.scheduler='local' trains lightgbm on dask" in err and "pca_components=8" in err, err


@pytest.mark.parametrize(("train_settings", "lightgbm"), [
    ({"metric": "log_loss"}, {}),
    ({"metric": "balanced_accuracy"}, {"selection_metric": "balanced_accuracy"}),
])
def test_check_takes_a_selection_metric_for_lightgbm_on_dask(tiny_store, tmp_path, train_settings, lightgbm):
    """``train.metric`` (or heads.lightgbm.selection_metric) beside ``train.scheduler`` passes check (it was
    refused: fit_lightgbm_dask early-stops on the metric now)."""
    raw = json.loads(json.dumps(tiny_store["raw"]))
    raw["train"].update(scheduler="local", **train_settings)
    raw["heads"]["lightgbm"] = {**raw["heads"].get("lightgbm", {}), **lightgbm}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["check", "--params", str(tmp_path / "params.yaml")]) == 0


def test_lightgbm_on_a_local_cluster_early_stops_on_train_metric(tiny_store, tmp_path, caplog):
    """train.metric with train.scheduler: the stage trains lightgbm on dask, early-stopped on that metric (the
    stage refused it)."""
    caplog.set_level(logging.INFO)
    run = _train(tiny_store, tmp_path, "lightgbm", scheduler="local", n_workers=1, metric="log_loss")
    assert "post-hoc early stopping 20 on log_loss" in caplog.text
    assert run["accuracy"] >= 0.8 and run["best_params"]["n_estimators"] >= 1
