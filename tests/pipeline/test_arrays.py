"""``extract_features``: a backbone's layers for some images as arrays, the rows a pipeline's store holds for them."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from featcache.pipeline import ConfigError, extract, extract_features, parse_params, prepare
from featcache.pipeline.arrays import ArraysError
from featcache.store import FeatureStore

from .conftest import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("arrays") / "images", per_class=4)


@pytest.fixture(scope="module")
def store_rows(folder, tmp_path_factory):
    """{absolute path: {layer: row}} of the pipeline's own store (the shipped backend, float16 storage)."""
    work = tmp_path_factory.mktemp("arrays-pipeline")
    params = parse_params({"data": {"name": "arrays", "path": str(folder), "split": {"train": 0.5, "val": 0.25,
                                                                                        "test": 0.25}},
                           "extract_run": {"batch_size": 5, "block_rows": 5},
                           "backbones": {"efficientnet_lite0": {"layers": ["pool", "block6"]}},
                           "features": [{"backbone": "efficientnet_lite0", "layer": "pool"}]})
    prepare(params, work / "prepared")
    report = extract(params, "efficientnet_lite0", work / "prepared" / "manifest.csv", work / "lite0.h5",
                     progress=False)
    with FeatureStore(report.path) as store:
        ids = [str(i) for i in store.ids()]
        layers = {layer: store.read(layer) for layer in ("pool", "block6")}
    return {str((folder / row_id).resolve()): {layer: values[row] for layer, values in layers.items()}
            for row, row_id in enumerate(ids)}


def test_the_arrays_are_the_pipeline_store_rows_bit_for_bit(folder, store_rows):
    result = extract_features(folder, "efficientnet_lite0", ["pool", "block6"], dtype="float16", batch_size=3)
    assert sorted(result.paths) == sorted(store_rows) and result.errors == []
    assert result.attrs["backbone"] == "efficientnet_lite0" and result.config["extract"]["dtype"] == "float16"
    for layer in ("pool", "block6"):
        assert result.features[layer].dtype == np.float32
        expected = np.stack([store_rows[path][layer] for path in result.paths])
        np.testing.assert_array_equal(result.features[layer], expected)


def test_rows_follow_the_order_given_and_bad_images_are_reported(folder, store_rows, tmp_path, caplog):
    """Files in a shuffled order come back in that order; an unreadable one is in ``errors``, not dropped silently."""
    files = sorted(store_rows)[::-1][:5]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    given = [*files[:2], str(broken), *files[2:]]
    with caplog.at_level(logging.WARNING, logger="featcache"):
        result = extract_features(given, "efficientnet_lite0", ["pool"], dtype="float16")
    assert result.paths == files
    assert [path for path, _ in result.errors] == [str(broken.resolve())] and result.errors[0][1]
    assert "1 of 6 images could not be read" in caplog.text
    np.testing.assert_array_equal(result.features["pool"], np.stack([store_rows[p]["pool"] for p in files]))
    float32 = extract_features(files[:2], "efficientnet_lite0")  # the default layer, float32 storage
    assert list(float32.features) == ["pool"] and float32.config["extract"]["dtype"] == "float32"
    pool = float32.features["pool"]
    assert not np.array_equal(pool, pool.astype(np.float16).astype(np.float32))  # not float16-rounded
    np.testing.assert_allclose(float32.features["pool"], result.features["pool"][:2], rtol=1e-2, atol=1e-3)


def test_settings_are_checked_like_params_yaml(folder):
    with pytest.raises(ConfigError, match="batch_size"):
        extract_features(folder, "efficientnet_lite0", batch_sise=8)
    with pytest.raises(ConfigError, match="pool5"):
        extract_features(folder, "efficientnet_lite0", ["pool5"])
    with pytest.raises(ArraysError, match="No such file or folder"):
        extract_features(folder / "nope", "efficientnet_lite0")
    with pytest.raises(ArraysError, match="more than once"):
        extract_features([folder, next(folder.rglob("*.png"))], "efficientnet_lite0")


def test_a_timm_model_by_name(folder):
    result = extract_features(sorted(folder.rglob("*.png"))[:3], "timm/test_convnext", weights="random")
    assert result.attrs["backbone"] == "test_convnext" and result.config["model"] == "timm/test_convnext"
    (layer,) = result.features
    assert result.features[layer].shape[0] == 3 and np.isfinite(result.features[layer]).all()


def test_urls_are_read_as_the_pipeline_reads_them(folder, store_rows):
    """URLs (here a loopback HTTP server) beside local files, in the order given, with the local files' features."""
    from _support.shards import LoopbackServer

    names = sorted(str(path.relative_to(folder)) for path in folder.rglob("*.png"))[:3]
    with LoopbackServer(folder) as server:
        urls = list(server.urls(names))
        result = extract_features([urls[0], str(folder / names[1]), urls[2]], "efficientnet_lite0", dtype="float16")
    assert result.paths == [urls[0], str((folder / names[1]).resolve()), urls[2]] and result.errors == []
    expected = np.stack([store_rows[str((folder / name).resolve())]["pool"] for name in names])
    np.testing.assert_array_equal(result.features["pool"], expected)


def test_images_in_memory_give_the_features_of_their_pixels(folder, store_rows):
    """PIL images and uint8 arrays (one, a list, a batch) are the same pixels as the PNG files they came from."""
    from PIL import Image

    files = sorted(store_rows)[:3]
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in files]
    expected = np.stack([store_rows[path]["pool"] for path in files])
    mixed = extract_features([Image.open(files[0]), pixels[1], files[2]], "efficientnet_lite0", dtype="float16")
    assert mixed.paths == ["<image 0>", "<image 1>", files[2]] and mixed.errors == []
    np.testing.assert_array_equal(mixed.features["pool"], expected)
    batch = extract_features(np.stack(pixels), "efficientnet_lite0", dtype="float16")
    np.testing.assert_array_equal(batch.features["pool"], expected)
    one = extract_features(pixels[0], "efficientnet_lite0", dtype="float16")
    assert one.paths == ["<image 0>"]
    np.testing.assert_array_equal(one.features["pool"], expected[:1])
    with pytest.raises(ArraysError, match="must be uint8"):
        extract_features(pixels[0].astype(np.float32) / 255, "efficientnet_lite0")
