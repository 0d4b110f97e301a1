"""featcache.pipeline.predict: new images go through the preprocessing the store's extraction recorded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featcache.extract.decode.loaders import ImageDataset
from featcache.pipeline.config import parse_params
from featcache.pipeline.params.extract import extraction_config
from featcache.pipeline.predict import PredictError, feature_config, predict_images, stored_preprocessor
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS


def _store_config(max_image_pixels) -> dict:
    """A store config as the extract stage writes it: the params' extraction config plus the preprocessing."""
    params = parse_params({"extract": {"max_image_pixels": max_image_pixels}})
    config = extraction_config(params, "efficientnet_lite0")
    config["preprocess"] = {"input_size": 32, "resize_size": 36, "interpolation": "bilinear",
                            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize_mode": "crop",
                            "background": [255, 255, 255]}
    return config


@pytest.mark.parametrize("limit", [DEFAULT_MAX_IMAGE_PIXELS, 200_000_000, None, 1000])
def test_stored_preprocessor_keeps_the_extractions_pixel_limit(limit):
    """A raised or disabled ``extract.max_image_pixels`` (recorded only when not the default) reaches predict."""
    config = _store_config(limit)
    assert ("max_image_pixels" in config["extract"]) == (limit != DEFAULT_MAX_IMAGE_PIXELS)
    preprocess = stored_preprocessor(config)
    assert preprocess.max_image_pixels == limit
    assert preprocess.config() == config["preprocess"]


def test_stored_preprocessor_decodes_what_the_extraction_did(tmp_path):
    """An image over the default limit but within the store's: accepted at predict time as at extraction."""
    Image.fromarray(np.zeros((50, 40, 3), np.uint8)).save(tmp_path / "big.png")  # 2,000 pixels
    lowered = stored_preprocessor(_store_config(1000))
    assert ImageDataset([tmp_path / "big.png"], lowered)[0][2].startswith("image too large")
    allowed = stored_preprocessor(_store_config(2000))
    assert ImageDataset([tmp_path / "big.png"], allowed)[0][2] == ""


def test_feature_config_keeps_what_changes_features_and_drops_the_rest():
    config = _store_config(None)
    config["data"] = {"name": "another_dataset", "task": "classification"}
    kept = feature_config(config)
    assert kept["backbone"] == "efficientnet_lite0" and kept["preprocess"] == config["preprocess"]
    assert kept["extract"]["pooling"] == config["extract"]["pooling"]
    assert "data" not in kept and "layers" not in kept and "dtype" not in kept["extract"]


@pytest.mark.parametrize("inputs", [["nope_folder"], ["empty"]])
def test_predict_images_names_a_missing_path_or_an_empty_folder(tmp_path, inputs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="No such file or folder|No images found"):
        predict_images(tmp_path / "model_not_read_yet", [tmp_path / name for name in inputs])


def test_a_batch_size_below_one_fails_before_the_model_loads(tmp_path):
    from featcache.errors import ParamError

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ParamError, match=r"^batch_size=0 is invalid; allowed: an integer >= 1\."):
        predict_images(tmp_path / "no-model", [tmp_path / "a.png"], batch_size=0)


def test_a_folder_that_is_no_run_is_a_run_not_found_error(tmp_path):
    from featcache.errors import UserError
    from featcache.runs import RunNotFoundError, read_run_info

    with pytest.raises(RunNotFoundError, match="is not a featcache run directory") as err:
        read_run_info(tmp_path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, UserError)
