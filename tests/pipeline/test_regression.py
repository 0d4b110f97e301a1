"""Regression end to end: a CSV manifest with continuous targets -> ridge, LightGBM, MLP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from featcache.pipeline import compare, extract, parse_params, prepare, train
from featcache.store import FeatureStore


def test_csv_regression_pipeline(tmp_path, params_factory):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = ["path,target"]
    for index in range(40):
        brightness = rng.uniform(0.05, 0.95)
        pixels = np.clip(brightness * 255 + rng.normal(0, 8, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{index:02d}.png")
        lines.append(f"img{index:02d}.png,{brightness:.4f}")
    (images / "targets.csv").write_text("\n".join(lines) + "\n")
    raw = params_factory(str(images))
    raw["data"].update(source="csv", csv="targets.csv", task="regression")
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool"]
    raw["heads"]["logreg"] = {"refine": False}  # the ridge twin takes alphas, not Cs
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
    ridge = json.loads((tmp_path / "metrics" / "logreg.json").read_text())
    assert ridge["r2"] > 0.5, ridge
    ranked = compare(tmp_path / "metrics", tmp_path / "reports")
    rmses = [run["rmse"] for run in ranked]
    assert rmses == sorted(rmses)
    assert "rmse" in (tmp_path / "reports" / "compare.md").read_text()
