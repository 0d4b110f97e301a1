"""The ``train`` stage refuses a store it cannot fit or score a head on, naming the split (hand-made manifests)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featcache.extract.inputs.manifest import Manifest
from featcache.pipeline import extract, parse_params, train
from featcache.pipeline.train import check_classes_trainable, check_store_rows
from featcache.store import StoreError


def test_a_store_without_test_rows_is_refused_by_name(tmp_path, params_factory):
    """A hand-made manifest (never checked by prepare) with no test rows: refused before any head is fit."""
    root = tmp_path / "images"
    root.mkdir()
    ids = [f"i{k}.png" for k in range(10)]
    for k, name in enumerate(ids):
        Image.fromarray(np.full((16, 16, 3), 20 * k, dtype=np.uint8)).save(root / name)
    splits = np.array([0] * 7 + [1] * 3, dtype=np.uint8)  # train, val; no test
    Manifest(ids, ids, splits, "regression", targets=np.arange(10.0), root=root).write(tmp_path / "manifest.csv")
    raw = params_factory(str(root))
    raw["data"].update(task="regression", source="csv")  # (a hand-made manifest)
    raw["heads"] = {"logreg": {"refine": False}}
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool"]
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    params = parse_params(raw)
    store = tmp_path / "lite0.h5"
    extract(params, "efficientnet_lite0", tmp_path / "manifest.csv", store, progress=False)
    with pytest.raises(StoreError, match=r"lite0\.h5 has no test rows \(rows per split: \{'train': 7, 'val': 3, "
                                         r"'test': 0\}\).*its manifest has no 'test' rows.*featcache prepare"):
        train(params, store, "efficientnet_lite0", "pool", "logreg", tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists()


def test_an_empty_train_split_is_named_before_test():
    y = {"train": np.zeros(0), "val": np.zeros(2), "test": np.zeros(0)}
    with pytest.raises(StoreError, match=r"has no train and no test rows.*give rows the split 'train'"):
        check_store_rows("s.h5", "classification", y, 0)


def test_a_constant_regression_target_in_train_is_refused():
    y = {"train": np.full(5, 3.0), "val": np.zeros(0), "test": np.arange(3.0)}
    with pytest.raises(StoreError, match=r"s\.h5: all 5 train rows have the same regression target 3; .*"
                                         r"R² is undefined"):
        check_store_rows("s.h5", "regression", y, 0)
    check_store_rows("s.h5", "classification", {**y, "train": np.zeros(5, dtype=np.int64)}, 0)  # labels: fine


def test_a_store_of_one_class_is_refused_by_name_not_as_a_head_parameter():
    """A hand-made manifest of one class: named as the data's fault, not `n_classes=1 ... set n_classes`."""
    with pytest.raises(StoreError, match=r"^The feature store holds 1 class \(\['blue'\]\); allowed: at least 2 "
                                         r"for a classifier\. Hint: give its manifest images of at least two"):
        check_classes_trainable(["blue"], np.zeros(4, dtype=np.int64), [])


def test_a_class_only_in_test_without_bad_images_blames_the_split_column():
    """No image was skipped: the manifest's split column, not bad images, left the class without train rows."""
    with pytest.raises(StoreError, match=r"\['red'\]; extraction skipped no image, so its manifest gives them no "
                                         r"'train' row\. Hint: .*split column.*featcache prepare") as info:
        check_classes_trainable(["blue", "red"], np.zeros(4, dtype=np.int64), [])
    assert "fix or replace those images" not in str(info.value)


def test_a_class_whose_train_images_were_skipped_names_the_bad_images():
    with pytest.raises(StoreError, match=r"\['red'\]; extraction skipped 1 bad images \(first: \[\('red/0\.png', "
                                         r"'missing file'\)\]\)\. Hint: fix or replace those images"):
        check_classes_trainable(["blue", "red"], np.zeros(4, dtype=np.int64), [("red/0.png", "missing file")])
