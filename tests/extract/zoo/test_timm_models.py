"""Any timm model as a backbone: the spec from timm's own facts, token pooling, preprocessing, weights.

Three families, each by its smallest timm model: a ConvNeXt (``test_convnext``,
timm's 0.3M-parameter test model at 160 px), a ViT (``test_vit``) and a CLIP
image tower (``vit_xsmall_patch16_clip_224.tinyclip_yfcc15m``, 8M parameters);
DINOv2 with register tokens (``vit_small_patch14_reg4_dinov2``, 518 px) checks
that ``avg`` leaves out several prefix tokens. Weights are random or local
files: nothing is downloaded (the download test fetches a ``file://`` URL through
timm's own ``download_cached_file``; the Hugging Face path reads a cache laid out
as the Hub client lays it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import timm.models
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.runners.torch_runner import PoolingError, TorchFeatureExtractor
from featcache.extract.zoo import weights as weights_module
from featcache.extract.zoo.registry import UnknownNameError, get_backbone, list_layers, resolve_layer
from featcache.extract.zoo.timm_models import PRE_LOGITS
from featcache.extract.zoo.weights import (
    OFFLINE_ENV,
    WeightsDownloadError,
    WeightsNotFoundError,
    load_backbone,
    resolve_weights,
)

CONVNEXT, VIT, CLIP = "timm/test_convnext", "timm/test_vit", "timm/vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"
DINOV2_REG = "timm/vit_small_patch14_reg4_dinov2"
FAMILIES = {"convnext": CONVNEXT, "vit": VIT, "clip": CLIP}


@pytest.fixture(scope="module")
def loaded():
    """name -> LoadedBackbone with seed-0 random weights, built once for the module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_backbone(name, "random", model=FAMILIES[name])
        return cache[name]

    return get


def _batch(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- the spec
@pytest.mark.parametrize("model", [CONVNEXT, VIT, CLIP, DINOV2_REG])
def test_spec_comes_from_pretrained_cfg_and_feature_info(model):
    spec = get_backbone("mine", model)
    with torch.device("meta"):
        net = timm.create_model(model.removeprefix("timm/"))
    cfg = net.pretrained_cfg
    assert spec.name == "mine" and spec.family == "timm" and spec.arch == f"{cfg['architecture']}.{cfg['tag']}"
    assert spec.weights == f"timm:{spec.arch}"
    assert spec.input_size == cfg["input_size"][1]
    assert spec.resize_size == math.floor(cfg["input_size"][1] / cfg["crop_pct"])
    assert spec.interpolation == cfg["interpolation"]
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    assert spec.default_layer == PRE_LOGITS
    stages = {info["module"]: info["num_chs"] for info in net.feature_info}
    assert list(spec.layers)[: len(stages)] == list(stages)
    assert {alias: spec.layers[alias].dim for alias in stages} == stages
    assert spec.layers[PRE_LOGITS].kind == "flat"
    assert spec.layers[PRE_LOGITS].dim == net.num_features
    assert spec.num_prefix_tokens == getattr(net, "num_prefix_tokens", 0)
    assert get_backbone("mine", model) is spec  # built once per process
    if model != CONVNEXT:
        assert {spec.layers[alias].kind for alias in stages} == {"tokens"} and spec.class_token
    else:
        assert {spec.layers[alias].kind for alias in stages} == {"conv"} and spec.cam_layer == "stages.3"


def test_timm_names_work_without_params():
    spec = get_backbone("timm/test_vit")
    assert spec.name == "timm/test_vit" and spec.arch == "test_vit.r160_in1k"
    assert list_layers("timm/test_vit") == dict(spec.layers)
    assert resolve_layer(spec, "default") == (spec.layers[PRE_LOGITS].node, spec.layers[PRE_LOGITS])
    assert get_backbone("resnet50").family == "torchvision"  # the table's names stay the table's


def test_unknown_timm_model_or_tag_names_a_close_match():
    with pytest.raises(UnknownNameError, match="Did you mean 'convnext_atto'"):
        get_backbone("x", "timm/convnext_ato")
    with pytest.raises(UnknownNameError, match="no pretrained tag 'd2_in1kk'.*Did you mean 'd2_in1k'"):
        get_backbone("x", "timm/convnext_atto.d2_in1kk")
    with pytest.raises(UnknownNameError, match="any timm model is a backbone too"):
        get_backbone("convnext_atto")


# ------------------------------------------------------- features and pooling
@pytest.mark.parametrize("name", list(FAMILIES))
def test_feature_dims_match_the_layer_table(name, loaded):
    backbone = loaded(name)
    layers = list(backbone.spec.layers)
    extractor = TorchFeatureExtractor(backbone.model, backbone.spec, layers, pooling="avg")
    out = extractor(_batch(backbone.spec.input_size))
    assert {layer: out[layer].shape for layer in layers} == \
        {layer: (2, alias.dim) for layer, alias in backbone.spec.layers.items()}
    assert {spec.alias: spec.dim for spec in extractor.layer_specs()} == \
        {layer: alias.dim for layer, alias in backbone.spec.layers.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pre_logits_is_timm_forward_head_pre_logits(name, loaded):
    backbone = loaded(name)
    x = _batch(backbone.spec.input_size)
    with torch.inference_mode():
        expected = backbone.model.forward_head(backbone.model.forward_features(x), pre_logits=True)
        logits = backbone.model(x)
    out = TorchFeatureExtractor(backbone.model, backbone.spec, ["default", "logits"], channels_last=False)(x)
    np.testing.assert_allclose(out[PRE_LOGITS], expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-5, atol=1e-5)


def _block_output(model: torch.nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    seen = []
    handle = model.blocks[index].register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return seen[0]


def test_token_pooling_cls_and_avg_over_patch_tokens(loaded):
    backbone = loaded("vit")
    x = _batch(backbone.spec.input_size)
    tokens = _block_output(backbone.model, x, -1)  # (B, N, C), token 0 the class token
    assert backbone.spec.num_prefix_tokens == 1 and backbone.spec.class_token
    expected = {"cls": tokens[:, 0], "avg": tokens[:, 1:].mean(1), "max": tokens[:, 1:].amax(1),
                "none": tokens.flatten(1)}
    for pooling, reference in expected.items():
        extractor = TorchFeatureExtractor(backbone.model, backbone.spec, ["blocks.5"], pooling=pooling)
        np.testing.assert_allclose(extractor(x)["blocks.5"], reference.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=pooling)
        (spec,) = extractor.layer_specs()
        assert spec.pooling == pooling and spec.map_shape == tuple(tokens.shape[1:]) and spec.prefix_tokens == 1
    assert not np.allclose(expected["avg"].numpy(), tokens.mean(1).numpy(), atol=1e-4)  # the prefix matters
    with pytest.raises(PoolingError, match="avg2x2.*does not apply to layer.*token map"):
        TorchFeatureExtractor(backbone.model, backbone.spec, ["blocks.5"], pooling="avg2x2")


def test_a_register_token_is_no_class_token():
    """timm's test_vit2 has one prefix token, a register token: ``avg`` leaves it out, ``cls`` is refused."""
    backbone = load_backbone("vit2", "random", model="timm/test_vit2")
    assert backbone.spec.num_prefix_tokens == 1 and not backbone.spec.class_token
    x = _batch(backbone.spec.input_size)
    tokens = _block_output(backbone.model, x, -1)
    last = f"blocks.{len(backbone.model.blocks) - 1}"
    out = TorchFeatureExtractor(backbone.model, backbone.spec, [last], pooling="avg")(x)
    np.testing.assert_allclose(out[last], tokens[:, 1:].mean(1).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(PoolingError, match="'cls' takes the class token.*has none"):
        TorchFeatureExtractor(backbone.model, backbone.spec, [last], pooling="cls")


@pytest.mark.slow
def test_dinov2_register_tokens_are_left_out_of_avg():
    backbone = load_backbone("dinov2", "random", model=DINOV2_REG)
    assert backbone.spec.num_prefix_tokens == 5 and backbone.spec.class_token
    x = _batch(backbone.spec.input_size, n=1)
    tokens = _block_output(backbone.model, x, -1)
    assert tokens.shape[1] == 5 + 37 * 37
    out = TorchFeatureExtractor(backbone.model, backbone.spec, ["blocks.11"], pooling="avg")(x)
    np.testing.assert_allclose(out["blocks.11"], tokens[:, 5:].mean(1).numpy(), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- preprocessing
def _photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: resampling filters see both edges and flat areas."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    noise = rng.normal(0, 25, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("model", [CONVNEXT, VIT, CLIP, DINOV2_REG])
def test_preprocessing_equals_timms_transform_bitwise(model):
    spec = get_backbone("x", model)
    with torch.device("meta"):
        net = timm.create_model(spec.arch)
    transform = create_transform(**resolve_data_config(model=net))
    preprocess = Preprocessor.from_spec(spec)
    side = spec.input_size
    # landscape, portrait, square, exactly the input size: every shorter side >= the input size
    for width, height in [(side * 3 // 2, side + 7), (side + 1, side * 2), (side * 2, side * 2), (side, side)]:
        image = _photo_like(width, height, seed=width)
        ours, theirs = preprocess(image), transform(image)
        assert ours.shape == theirs.shape == (3, side, side)
        assert torch.equal(ours, theirs), f"{model} {width}x{height}: max diff {(ours - theirs).abs().max()}"


def test_small_images_are_upsized_to_the_input_not_to_the_resize_size():
    """The one stated difference: a shorter side below the input size is resized to the input size (featcache's
    rule for 8x8 digits, so nothing of a tiny image is cropped away); timm resizes it to input / crop_pct."""
    spec = get_backbone("x", CONVNEXT)
    image = _photo_like(40, 30, seed=1)
    pixels = Preprocessor.from_spec(spec).pixels_array(image)
    expected = np.asarray(image.resize((spec.input_size * 40 // 30, spec.input_size), Image.BICUBIC))
    left = round((expected.shape[1] - spec.input_size) / 2)
    np.testing.assert_array_equal(pixels.transpose(1, 2, 0), expected[:, left:left + spec.input_size])


# -------------------------------------------------------------------- weights
def _state_equal(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[key], state[key]) for key in own)


def test_random_weights_are_seeded():
    first, again, other = (load_backbone("vit", "random", seed=s, model=VIT) for s in (0, 0, 1))
    assert _state_equal(first.model, again.model.state_dict())
    assert not _state_equal(first.model, other.model.state_dict())
    assert first.weights_id == "random:seed=0" and first.weights_sha256 == ""
    assert not first.model.training


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_state_dict(suffix, tmp_path):
    state = load_backbone("vit", "random", seed=3, model=VIT).model.state_dict()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_backbone("vit", str(path), model=VIT)
    assert _state_equal(loaded.model, state)
    assert loaded.weights_id == f"file:vit{suffix}"
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_backbone("vit", str(tmp_path / "missing.pth"), model=VIT)


def test_missing_pretrained_offline_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("convnext", "pretrained", model="timm/convnext_tiny.fb_in22k_ft_in1k")
    message = str(info.value)
    for needed in ["model.safetensors", "timm/convnext_tiny.fb_in22k_ft_in1k",
                   "https://huggingface.co/timm/convnext_tiny.fb_in22k_ft_in1k/resolve/main/model.safetensors",
                   str(tmp_path / "hf" / "hub"), "models--timm--convnext_tiny.fb_in22k_ft_in1k",
                   "backbones.convnext.weights", "weights: random", OFFLINE_ENV]:
        assert needed in message, needed
    assert not (tmp_path / "hf").exists()  # nothing was written


def _hub_cache(root, repo: str, filename: str, data: bytes) -> None:
    """Lay out a Hugging Face hub cache as its client does: blobs by sha256, a snapshot link, refs/main."""
    folder = root / f"models--{repo.replace('/', '--')}"
    sha = hashlib.sha256(data).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / sha).write_bytes(data)
    commit = "0" * 40
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / filename).symlink_to(folder / "blobs" / sha)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_pretrained_from_the_hugging_face_cache(tmp_path, monkeypatch):
    state = load_backbone("vit", "random", seed=7, model=VIT).model.state_dict()
    staging = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(staging))
    _hub_cache(tmp_path / "hub", "timm/test_vit.r160_in1k", "model.safetensors", staging.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    source = resolve_weights("vit", "pretrained", model=VIT)
    assert source.path.name == "model.safetensors" and "models--timm--test_vit.r160_in1k" in str(source.path)
    assert source.weights_id == "timm:test_vit.r160_in1k:model.safetensors"
    assert source.weights_sha256 == hashlib.sha256(staging.read_bytes()).hexdigest()
    assert _state_equal(source.load().model, state)

    # Found again in a fresh process from the spec cache's pretrained source: neither timm nor torch imported.
    script = ("import sys; from featcache.extract.zoo.weights import resolve_weights; "
              f"source = resolve_weights('vit', 'pretrained', model={VIT!r}); "
              "print(source.weights_sha256, 'torch' in sys.modules, 'timm' in sys.modules)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), OFFLINE_ENV: "1"}
    for _ in range(2):  # the first may build the spec (and import both)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [source.weights_sha256, "False", "False"]


@pytest.fixture
def served_convnext(tmp_path, monkeypatch):
    """test_convnext's pretrained source is a ``file://`` URL (no Hub id), named like timm's (``-<sha256[:8]>``)."""
    state = load_backbone("cnx", "random", seed=5, model=CONVNEXT).model.state_dict()
    staging = tmp_path / "staging.pth"
    torch.save(state, staging)
    served = tmp_path / "server" / f"test_convnext-{hashlib.sha256(staging.read_bytes()).hexdigest()[:8]}.pth"
    served.parent.mkdir()
    staging.rename(served)
    real = weights_module.get_backbone

    def pointing_at_the_file(name, model=None):
        spec = real(name, model)
        return dataclasses.replace(spec, pretrained_source={"url": served.as_uri()}) if model == CONVNEXT else spec

    monkeypatch.setattr(weights_module, "get_backbone", pointing_at_the_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    return {"state": state, "served": served, "cached": tmp_path / "torch" / "hub" / "checkpoints" / served.name}


def test_missing_url_weights_are_downloaded_by_timm_into_the_torch_hub_cache(served_convnext, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsNotFoundError, match=f"Put the file {served_convnext['served'].name}"):
        resolve_weights("cnx", "pretrained", model=CONVNEXT)
    monkeypatch.delenv(OFFLINE_ENV)
    source = resolve_weights("cnx", "pretrained", model=CONVNEXT)
    assert source.path == served_convnext["cached"] and source.path.is_file()
    assert source.weights_id == f"timm:test_convnext.r160_in1k:{served_convnext['served'].name}"
    assert _state_equal(source.load().model, served_convnext["state"])


def test_a_download_that_fails_the_hash_check_is_discarded(served_convnext):
    with open(served_convnext["served"], "ab") as handle:
        handle.write(b"corrupt")
    with pytest.raises(WeightsDownloadError, match="sha256 check"):
        resolve_weights("cnx", "pretrained", model=CONVNEXT)
    assert not served_convnext["cached"].exists()


# ---------------------------------------------------------------- NHWC stages
def test_nhwc_stages_are_read_as_conv_maps():
    """timm's Swin stages give (B, H, W, C): the spec says so, and pooling reads them as (B, C, H, W)."""
    from featcache.extract.runners.torch_runner import pool_features

    spec = get_backbone("swin", "timm/swin_tiny_patch4_window7_224")
    assert spec.layers["layers.3"].kind == "nhwc" and spec.layers["layers.3"].dim == 768
    assert spec.cam_layer is None  # CAMs need NCHW maps
    nhwc = torch.randn(2, 7, 7, 768)
    nchw = nhwc.permute(0, 3, 1, 2)
    for pooling in ("avg", "max", "avg2x2", "none"):
        torch.testing.assert_close(pool_features(nhwc, pooling, nhwc=True), pool_features(nchw, pooling))


@pytest.mark.parametrize("corrupt", [False, True])
def test_hub_download_goes_to_the_hf_cache_and_is_checked_against_its_sha256(corrupt, tmp_path, monkeypatch):
    """The Hub client itself is replaced by a fake that lays the file out as it does (no network here)."""
    import huggingface_hub

    state = load_backbone("vit", "random", seed=9, model=VIT).model.state_dict()
    staging = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(staging))
    calls = []

    def fake_download(repo, filename, revision=None, cache_dir=None):
        calls.append((repo, filename, cache_dir))
        data = staging.read_bytes()
        _hub_cache(Path(cache_dir), repo, filename, data)
        folder = Path(cache_dir) / f"models--{repo.replace('/', '--')}"
        if corrupt:  # the blob keeps the name of the true sha256, its bytes went wrong on the way
            (folder / "blobs" / hashlib.sha256(data).hexdigest()).write_bytes(data + b"x")
        return str(folder / "snapshots" / ("0" * 40) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    if corrupt:
        with pytest.raises(WeightsDownloadError, match="does not have the sha256.*discarded"):
            resolve_weights("vit", "pretrained", model=VIT)
        snapshot = tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / ("0" * 40)
        assert not (snapshot / "model.safetensors").exists() and not any((snapshot.parent.parent / "blobs").iterdir())
        return
    source = resolve_weights("vit", "pretrained", model=VIT)
    assert calls == [("timm/test_vit.r160_in1k", "model.safetensors", str(tmp_path / "hub"))]
    assert _state_equal(source.load().model, state)


# ------------------------------------------------------ families beyond ConvNeXt and ViT
# The smallest model of families whose pre_logits is not simply the classifier's input, each with why.
MORE_FAMILIES = [
    pytest.param("timm/mobilenetv3_small_050", "blocks.3", id="mobilenetv3-traced-linear-head"),
    pytest.param("timm/deit_tiny_distilled_patch16_224", "blocks.5", id="deit-distilled-two-tokens"),
    pytest.param("timm/hiera_tiny_224", "blocks.2", id="hiera-forward-with-mask-argument"),
    pytest.param("timm/crossvit_tiny_240", "blocks.1", id="crossvit-two-branches-two-heads"),
    pytest.param("timm/twins_svt_small", "blocks.1", id="twins-feature-info-says-block"),
    pytest.param("timm/hrnet_w18_small", None, id="hrnet-virtual-stages"),
    pytest.param("timm/levit_128s", "stages.1", id="levit-distilled-heads"),
    pytest.param("timm/efficientformer_l1", "stages.2", id="efficientformer-distilled"),
]


@pytest.mark.parametrize("model, stage", MORE_FAMILIES)
def test_more_families_pre_logits_logits_and_a_stage(model, stage):
    """pre_logits is timm's ``forward_head(x, pre_logits=True)``, logits its output, a stage has its table dim."""
    backbone = load_backbone("b", "random", model=model)
    spec = backbone.spec
    layers = [PRE_LOGITS, "logits", *([stage] if stage else [])]
    assert set(layers) <= set(spec.layers)
    x = _batch(spec.input_size, n=1)
    with torch.inference_mode():
        features = backbone.model.forward_features(x)
        expected = backbone.model.forward_head(features, pre_logits=True)
        logits = backbone.model.forward_head(features)
    extractor = TorchFeatureExtractor(backbone.model, spec, layers, pooling="avg", channels_last=False)
    out = extractor(x)
    np.testing.assert_allclose(out[PRE_LOGITS], expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
    assert {s.alias: s.dim for s in extractor.layer_specs()} == {layer: spec.layers[layer].dim for layer in layers}


def test_pre_logits_keeps_its_node_where_it_is_the_classifier_input():
    """The classifier's input stays the pre_logits node (stores and ONNX cache keys record it)."""
    assert get_backbone("x", CONVNEXT).layers[PRE_LOGITS].node == "head.drop"
    assert get_backbone("x", VIT).layers[PRE_LOGITS].node == "head_drop"
    assert get_backbone("x", "timm/mobilenetv3_small_050").layers[PRE_LOGITS].node == "flatten"
