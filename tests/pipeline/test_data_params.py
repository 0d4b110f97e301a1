"""The ``data`` keys of WebDataset shards and remote reads: strict, with the close match and the fix."""

from __future__ import annotations

import pytest

from featcache.extract.inputs.storage import StorageOptions
from featcache.pipeline.config import parse_params
from featcache.pipeline.params.base import ConfigError


@pytest.mark.parametrize("data, expected", [
    ({"source": "webdataset", "lable_key": "cls"}, "Did you mean 'label_key'"),
    ({"source": "webdataset", "io": {"retries": 3}}, "Did you mean 'tries'"),
    ({"source": "folder", "path": ["a.tar", "b.tar"]}, "only data.source: webdataset takes"),
    ({"source": "tars"}, "webdataset"),
    ({"source": "webdataset", "io": {"tries": 0}}, "data.io.tries"),
    ({"source": "webdataset", "io": {"timeout": 0}}, "data.io.timeout"),
])
def test_bad_shard_settings_name_the_key_and_the_fix(data, expected):
    with pytest.raises(ConfigError) as error:
        parse_params({"data": data})
    assert expected in str(error.value).replace('"', "'")


def test_shard_defaults_and_io_become_storage_options():
    data = parse_params({"data": {"source": "webdataset", "path": ["s/{0..3}.tar", "https://h/x.tar"],
                                  "io": {"timeout": 5, "options": {"s3": {"anon": True}}}}}).data
    assert data.image_keys == ["jpg", "jpeg", "png", "webp"] and data.label_key == "cls" and data.split_key == "split"
    options = StorageOptions(**data.io.model_dump())
    assert (options.timeout, options.tries, options.backoff) == (5.0, 3, 0.5)
    assert options.filesystem_kwargs("s3") == {"anon": True}
    both = StorageOptions(options={"client_kwargs": {"trust_env": True}, "gs": {"token": "anon"}})
    assert both.filesystem_kwargs("gs") == {"client_kwargs": {"trust_env": True}, "token": "anon"}


def test_split_ratios_that_do_not_sum_to_one_name_the_defaults_they_took():
    # {train: 0.8, val: 0.2} sums to 1 as written: the message must say that test took its default 0.2.
    with pytest.raises(ConfigError) as error:
        parse_params({"data": {"split": {"train": 0.8, "val": 0.2}}})
    assert "got 1.2 (0.8+0.2+0.2; test: 0.2 is its default, not set). Hint: set all three" in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_params({"data": {"split": {"train": 0.5, "val": 0.2, "test": 0.2}}})
    assert "got 0.9 (0.5+0.2+0.2). Hint: set all three, e.g. {train: 0.6, val: 0.2, test: 0.2}" in str(error.value)


def test_a_folder_source_refuses_regression_before_any_work():
    # It prepared a classification manifest from the class folders, and train died on NaN targets in sklearn.
    with pytest.raises(ConfigError) as error:
        parse_params({"data": {"source": "folder", "path": "imgs", "task": "regression"}})
    assert "data.source: folder labels each image by its class folder, so it takes data.task: classification, " \
           "not 'regression'. Hint: for regression give a CSV with path,target columns" in str(error.value)
    assert parse_params({"data": {"source": "csv", "task": "regression"}}).data.task == "regression"
