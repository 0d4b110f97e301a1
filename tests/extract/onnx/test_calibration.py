"""The int8 samples: train rows calibrate, val (else other train) rows check, test rows are never read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featcache.errors import ExtractionError
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.onnx.calibration import calibration_images, hash_order
from featcache.store.schema import SPLIT_CODES

PRE = Preprocessor(16, 16, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _manifest(tmp_path, splits, corrupt=()):
    paths = []
    for row, split in enumerate(splits):
        path = tmp_path / f"{row:03d}.png"
        if split in corrupt:
            path.write_bytes(b"not an image")  # reading it would log a bad image and count it as skipped
        else:
            Image.fromarray(np.full((20, 20, 3), row * 7 % 256, np.uint8)).save(path)
        paths.append(path.name)
    codes = np.array([SPLIT_CODES[s] for s in splits], np.uint8)
    ids = [f"id{row:03d}" for row in range(len(splits))]
    return Manifest(ids, paths, codes, labels=np.zeros(len(splits), np.int64), classes=["a"], root=tmp_path)


def test_samples_come_from_train_and_val_only(tmp_path):
    manifest = _manifest(tmp_path, ["train"] * 10 + ["val"] * 4 + ["test"] * 4, corrupt=("test",))
    images = calibration_images(manifest, PRE, n_calibration=6, n_holdout=3)
    assert images.calibration.shape == (6, 3, 16, 16) and images.holdout.shape == (3, 3, 16, 16)
    assert images.holdout_split == "val" and images.skipped == 0  # the corrupt test images were never read
    train = hash_order(manifest.ids, np.arange(10))[:6]
    expected = PRE.normalize_batch(np.stack([np.full((3, 16, 16), row * 7 % 256, np.uint8) for row in train]))
    np.testing.assert_allclose(images.calibration, expected)
    again = calibration_images(manifest, PRE, n_calibration=6, n_holdout=3)
    assert again.sha256 == images.sha256
    assert calibration_images(manifest, PRE, n_calibration=5, n_holdout=3).sha256 != images.sha256


def test_without_val_the_holdout_is_train_rows_outside_the_calibration_sample(tmp_path):
    manifest = _manifest(tmp_path, ["train"] * 8 + ["test"] * 2, corrupt=("test",))
    images = calibration_images(manifest, PRE, n_calibration=5, n_holdout=10)
    assert images.holdout_split == "train" and len(images.calibration) == 5 and len(images.holdout) == 3
    with pytest.raises(ExtractionError, match="lower extract.int8_calibration"):
        calibration_images(manifest, PRE, n_calibration=8, n_holdout=4)


def test_no_train_rows_is_a_clear_error(tmp_path):
    with pytest.raises(ExtractionError, match="calibrates on the train split"):
        calibration_images(_manifest(tmp_path, ["val", "test"]), PRE, n_calibration=4, n_holdout=4)


def test_hash_order_does_not_depend_on_the_other_rows():
    ids = [f"id{i}" for i in range(20)]
    full = hash_order(ids, np.arange(20))
    part = hash_order(ids, np.arange(10))
    assert [row for row in full if row < 10] == part
