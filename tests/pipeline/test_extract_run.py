"""``extract_run``: the speed-only extraction keys, in a section the extract stages do not track.

The DVC side (an ``extract_run`` edit reruns only ``check``) is in ``test_dvc.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from featcache.pipeline.config import parse_params
from featcache.pipeline.params.backbones import load_extract_sections
from featcache.pipeline.params.base import ConfigError
from featcache.pipeline.params.extract import RUN_SECTION, SPEED_ONLY, ExtractParams, extraction_config

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_params_keep_every_speed_key_out_of_the_tracked_section():
    shipped = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert not set(SPEED_ONLY) & set(shipped["extract"]), "a speed-only key in extract reruns the extraction"
    assert set(shipped[RUN_SECTION]) <= set(SPEED_ONLY)
    assert set(SPEED_ONLY) <= set(ExtractParams.model_fields)  # the run section is a part of ExtractParams
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["extract"]["do"]
    assert RUN_SECTION not in stage["params"] and "extract" in stage["params"]


def test_run_keys_reach_the_extraction_and_leave_the_store_config_alone(tmp_path):
    raw = {"extract": {"dtype": "float32"}, RUN_SECTION: {"batch_size": 8, "num_workers": 0, "device": "cpu"}}
    params = parse_params(raw)
    assert (params.extract.batch_size, params.extract.num_workers, params.extract.device) == (8, 0, "cpu")
    assert params.extract.dtype == "float32"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_extract_sections(path).extract.batch_size == 8  # the extract command reads it too
    # The same settings under extract (a params file from before the split) give the same params.
    old = parse_params({"extract": {"dtype": "float32", "batch_size": 8, "num_workers": 0, "device": "cpu"}})
    assert old.extract == params.extract
    assert extraction_config(params, "efficientnet_lite0") == extraction_config(parse_params({"extract": {
        "dtype": "float32"}}), "efficientnet_lite0")


@pytest.mark.parametrize("raw, expected", [
    ({RUN_SECTION: {"batchsize": 8}}, ["unknown key 'extract_run.batchsize'", "Did you mean 'batch_size'?"]),
    ({RUN_SECTION: {"dtype": "float32"}}, ["'extract_run.dtype'", "it belongs under extract (extract.dtype)"]),
    ({"extract": {"batch_size": 8}, RUN_SECTION: {"batch_size": 16}},
     ["batch_size is set twice", "extract.batch_size = 8", "extract_run.batch_size = 16", "Hint:"]),
    ({RUN_SECTION: {"batch_size": 0}}, ["extract_run.batch_size", "greater than or equal to 1", "(got 0)"]),
    ({RUN_SECTION: {"scheduler": "yarn"}}, ["extract_run.scheduler", "'local'", "'yarn'"]),
    ({RUN_SECTION: [1]}, ["extract_run must be a mapping"]),
])
def test_a_bad_run_section_is_named_by_its_own_keys(raw, expected):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_check_says_which_keys_to_move(tmp_path, caplog):
    from featcache.pipeline.cli import main

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"extract": {"batch_size": 8, "dtype": "float16"}, RUN_SECTION: {"block_rows": 8}}))
    assert main(["check", "--params", str(path)]) == 0
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warned) == 1 and "batch_size under extract" in warned[0] and "extract_run" in warned[0], warned
    path.write_text(yaml.safe_dump({"extract": {"dtype": "float16"}, RUN_SECTION: {"batch_size": 8}}))
    caplog.clear()
    assert main(["check", "--params", str(path)]) == 0
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


@pytest.mark.parametrize("raw, line", [
    ({RUN_SECTION: {"scheduler": "lcoal"}}, "- extract_run.scheduler: must be 'none', 'local' or a scheduler address "
                                            "like 'tcp://10.0.0.5:8786'. Did you mean 'local'? (got 'lcoal')"),
    ({RUN_SECTION: {"n_workers": 0}}, "- extract_run.n_workers: must be 'auto' or >= 1 (dask worker processes) "
                                      "(got 0)"),
])
def test_a_bad_dask_setting_names_the_value_once_with_a_close_match(raw, line):
    """The messages said 'got 'lcoal' (got 'lcoal')': the validator and the formatter both named the value."""
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert line in str(info.value).splitlines(), str(info.value)
