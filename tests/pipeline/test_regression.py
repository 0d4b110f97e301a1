"""Regression end to end: a CSV manifest with continuous targets -> ridge, LightGBM, MLP.

The heads run with the shipped ``params.yaml``'s ``heads`` section unchanged: one
file serves both tasks, and the report names each head as what it is.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from _support.files import write_brightness_folder
from featcache.heads import LogisticRegressionHead, RidgeHead
from featcache.heads.registry import head_label, make_head, task_params
from featcache.pipeline import compare, extract, parse_params, prepare, train
from featcache.pipeline.params.base import ConfigError
from featcache.runs import read_run
from featcache.store import FeatureStore

SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_shipped_params_validate_for_both_tasks(task):
    raw = copy.deepcopy(SHIPPED)
    raw["data"].update(task=task, source="folder" if task == "classification" else "csv")  # folder: classes
    params = parse_params(raw)
    linear = make_head("logreg", task, task_params("logreg", task, params.heads["logreg"]))
    assert type(linear) is {"classification": LogisticRegressionHead, "regression": RidgeHead}[task]
    assert linear.refine is True
    if task == "classification":
        assert linear.max_iter == SHIPPED["heads"]["logreg"]["max_iter"]  # the twin that takes it gets it
    assert head_label("logreg", task) == {"classification": "logreg", "regression": "ridge"}[task]
    for name in SHIPPED["train"]["heads"]:
        make_head(name, task, task_params(name, task, params.heads.get(name, {})))


def test_a_key_no_twin_takes_still_fails():
    raw = copy.deepcopy(SHIPPED)
    raw["data"].update(task="regression", source="csv")
    raw["heads"]["logreg"]["max_iters"] = 5
    with pytest.raises(ConfigError, match=r"unknown parameter 'max_iters' for head 'logreg' \(RidgeHead"):
        parse_params(raw)


@pytest.mark.parametrize("task, typo, meant", [("regression", "max_itr", "max_iter"),
                                                ("classification", "alpha", "alphas")])
def test_a_typo_of_the_other_twins_key_is_named_with_it(task, typo, meant):
    """The shared section accepts the other twin's keys (the shipped ``max_iter`` under regression), so a typo of
    one is named with it: the message used to list the task's twin's keys alone, without ``max_iter`` nor a
    close match, as if the shipped key were not allowed either."""
    raw = copy.deepcopy(SHIPPED)
    raw["data"].update(task=task, source="folder" if task == "classification" else "csv")
    raw["heads"]["logreg"][typo] = 5
    with pytest.raises(ConfigError, match=rf"unknown parameter '{typo}' for head 'logreg'.*allowed: .*\b{meant}\b"
                       rf".*Did you mean '{meant}'\?"):
        parse_params(raw)


def test_csv_regression_pipeline(tmp_path, params_factory):
    images = write_brightness_folder(tmp_path / "images", 40)
    raw = params_factory(str(images))
    raw["data"].update(source="csv", csv="targets.csv", task="regression")
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool"]
    raw["heads"] = copy.deepcopy(SHIPPED["heads"])  # logreg's max_iter is the logistic twin's only
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    params = parse_params(raw)
    manifest = prepare(params, tmp_path / "prepared")
    assert manifest.task == "regression" and len(manifest) == 40
    store = tmp_path / "lite0.h5"
    extract(params, "efficientnet_lite0", tmp_path / "prepared" / "manifest.csv", store, progress=False)
    with FeatureStore(store) as opened:
        assert opened.task == "regression"
        assert np.allclose(np.sort(opened.targets()), np.sort(manifest.targets))
    for head in ("logreg", "lightgbm", "mlp"):
        metrics = train(params, store, "efficientnet_lite0", "pool", head, tmp_path / "metrics" / f"{head}.json",
                        predictions_path=tmp_path / "plots" / f"{head}.csv")
        assert {"rmse", "mae", "r2", "ci"} <= set(metrics)
        assert metrics["task"] == "regression"
    ridge = read_run(tmp_path / "metrics" / "logreg.json")
    assert ridge["r2"] > 0.5, ridge
    assert ridge["head"] == "logreg" and ridge["label"] == "ridge"
    ranked = compare(tmp_path / "metrics", tmp_path / "reports", plot_path=tmp_path / "plots" / "compare.csv")
    rmses = [run["rmse"] for run in ranked]
    assert rmses == sorted(rmses)
    report = (tmp_path / "reports" / "compare.md").read_text()
    assert "rmse" in report
    assert "| pool | ridge |" in report and "logreg" not in report  # named as what it is
    assert "efficientnet_lite0/pool/ridge,rmse," in (tmp_path / "plots" / "compare.csv").read_text()
