"""timm specs kept on disk (``timm_spec_cache``): the same spec as a build, read without importing torch or timm."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from featcache.extract.zoo import timm_spec_cache
from featcache.extract.zoo.registry import get_backbone
from featcache.extract.zoo.timm_models import timm_backbone
from featcache.util.cache_dir import CACHE_ENV

MODELS = ("timm/test_convnext", "timm/test_vit", "timm/vit_xsmall_patch16_clip_224.tinyclip_yfcc15m")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache root, and no spec remembered by this process."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    timm_spec_cache.cached_timm_backbone.cache_clear()
    yield tmp_path / timm_spec_cache.SPEC_FOLDER
    timm_spec_cache.cached_timm_backbone.cache_clear()


@pytest.mark.parametrize("model", MODELS)
def test_a_cached_spec_is_the_built_one_layers_in_network_order(cache, model):
    built = timm_backbone("mine", model)
    assert get_backbone("mine", model) == built  # builds and writes the entry
    timm_spec_cache.cached_timm_backbone.cache_clear()
    read = get_backbone("mine", model)  # from the entry
    assert read == built and list(read.layers.items()) == list(built.layers.items())
    assert read.weight_bytes == built.weight_bytes > 0
    assert get_backbone("other", model).name == "other"  # one entry serves any backbone name
    assert len(list(cache.glob("*.json"))) == 1


def test_a_hit_imports_neither_torch_nor_timm(cache):
    script = ("import sys; from featcache.extract.zoo.registry import get_backbone; "
              "spec = get_backbone('cnx', 'timm/test_convnext'); "
              "print(spec.default_layer, 'torch' in sys.modules, 'timm' in sys.modules)")
    env = {**os.environ, CACHE_ENV: str(cache.parent)}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["pre_logits", "True", "True"]
    assert second.stdout.split() == ["pre_logits", "False", "False"]


def test_another_key_or_a_damaged_entry_builds_the_spec_again(cache, monkeypatch):
    get_backbone("cnx", "timm/test_convnext")
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json", encoding="utf-8")
    timm_spec_cache.cached_timm_backbone.cache_clear()
    assert get_backbone("cnx", "timm/test_convnext") == timm_backbone("cnx", "timm/test_convnext")
    assert json.loads(entry.read_text(encoding="utf-8"))["key"]["model"] == "timm/test_convnext"  # replaced

    monkeypatch.setattr(timm_spec_cache, "_code_sha256", lambda: "0" * 64)  # featcache's code changed
    timm_spec_cache.cached_timm_backbone.cache_clear()
    get_backbone("cnx", "timm/test_convnext")
    assert len(list(cache.glob("*.json"))) == 2


def test_a_stale_entry_is_not_read_even_under_its_own_name(cache):
    """An entry whose recorded key differs from today's (another timm, say) is never used, whatever its file name."""
    get_backbone("cnx", "timm/test_convnext")
    (entry,) = cache.glob("*.json")
    record = json.loads(entry.read_text(encoding="utf-8"))
    record["key"]["timm"] = "0.0.1"
    record["value"]["input_size"] = 999
    entry.write_text(json.dumps(record), encoding="utf-8")
    timm_spec_cache.cached_timm_backbone.cache_clear()
    assert get_backbone("cnx", "timm/test_convnext").input_size != 999


def test_a_model_asking_for_another_crop_is_warned_about_on_a_hit_too(cache, caplog):
    get_backbone("cnx", "timm/test_convnext")
    (entry,) = cache.glob("*.json")
    record = json.loads(entry.read_text(encoding="utf-8"))
    record["value"]["crop_mode"] = "squash"
    entry.write_text(json.dumps(record), encoding="utf-8")
    timm_spec_cache.cached_timm_backbone.cache_clear()
    with caplog.at_level(logging.WARNING, logger="featcache"):
        spec = get_backbone("cnx", "timm/test_convnext")
        get_backbone("cnx", "timm/test_convnext")
    assert spec.crop_mode == "squash"
    assert caplog.text.count("asks for crop_mode 'squash' in its pretrained_cfg") == 1
