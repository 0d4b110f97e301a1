"""Class activation maps: which conv map, the CAM formula, range, class choice and PNG overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.extract.zoo.registry import get_backbone
from featcache.finetune.cam import cam_layer, class_activation_maps, jet, save_cam_overlays, tensor_to_pil
from featcache.finetune.model import build_model

SIZE = 64


@pytest.mark.parametrize("name, alias, node", [("efficientnet_lite0", "head", "bn2"), ("resnet18", "res5", "layer4"),
                                               ("resnet50", "res5", "layer4"),
                                               ("googlenet", "inception_5b", "inception5b")])
def test_cam_uses_the_deepest_conv_map(name: str, alias: str, node: str):
    found, layer = cam_layer(get_backbone(name))
    assert (found, layer.node) == (alias, node)


@pytest.mark.parametrize("name", ["vgg16", "alexnet"])
def test_cam_is_refused_where_fc_layers_sit_between_map_and_head(name: str):
    with pytest.raises(ValueError, match="fully connected"):
        cam_layer(get_backbone(name))


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    model, _ = build_model("resnet18", 3, seed=0)
    return model.eval()


def test_maps_have_the_input_shape_and_lie_in_0_1(resnet):
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    resnet.train()
    cams = class_activation_maps(resnet, get_backbone("resnet18"), images)
    assert resnet.training  # state restored
    resnet.eval()
    assert cams.shape == (3, SIZE, SIZE) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert all(m.max() == pytest.approx(1.0) or m.max() == 0 for m in cams)


def test_map_is_the_head_weighted_sum_of_the_last_conv_map(resnet):
    spec = get_backbone("resnet18")
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    captured = []
    hook = resnet.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        logits = resnet(images)
    hook.remove()
    fmap = captured[0]
    # the CAM premise: logit = spatial mean of (W_k . A) + b_k
    manual = torch.einsum("nchw,kc->nkhw", fmap, resnet.fc.weight.detach())
    assert torch.allclose(manual.mean(dim=(2, 3)) + resnet.fc.bias.detach(), logits, atol=1e-4)
    cams = class_activation_maps(resnet, spec, images, class_idx=[2, 0])
    for i, k in enumerate([2, 0]):
        raw = torch.nn.functional.interpolate(manual[i:i + 1, k:k + 1].relu(), size=(SIZE, SIZE), mode="bilinear",
                                              align_corners=False)[0, 0]
        expected = (raw - raw.min()) / (raw.max() - raw.min())
        assert np.allclose(cams[i], expected.numpy(), atol=1e-5)
    # one class for all images, and the predicted class by default
    assert np.allclose(class_activation_maps(resnet, spec, images, class_idx=2)[0], cams[0], atol=1e-6)
    predicted = logits.argmax(dim=1).tolist()
    assert np.allclose(class_activation_maps(resnet, spec, images),
                       class_activation_maps(resnet, spec, images, class_idx=predicted))
    with pytest.raises(ValueError, match="class_idx"):
        class_activation_maps(resnet, spec, images, class_idx=[5, 0])


def test_cam_on_efficientnet_lite():
    model, _ = build_model("efficientnet_lite0", 4, seed=0)
    cams = class_activation_maps(model, get_backbone("efficientnet_lite0"), torch.randn(2, 3, SIZE, SIZE))
    assert cams.shape == (2, SIZE, SIZE) and 0 <= cams.min() and cams.max() <= 1


def test_overlays_are_written_as_png(resnet, tmp_path: Path):
    spec = get_backbone("resnet18")
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    cams = class_activation_maps(resnet, spec, images)
    pils = [tensor_to_pil(image, spec.mean, spec.std) for image in images]
    assert pils[0].size == (SIZE, SIZE) and pils[0].mode == "RGB"
    paths = save_cam_overlays(pils, cams, tmp_path / "cam", ["3/0001.png", "a b.png"])
    assert [p.name for p in paths] == ["3__0001_png.png", "a_b_png.png"]
    for path, pil in zip(paths, pils, strict=True):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (4 * SIZE, 2 * SIZE)
            left = np.asarray(image)[:, : 2 * SIZE]
        assert np.array_equal(left[::2, ::2], np.asarray(pil))  # the plain image beside the overlay
    single = save_cam_overlays(pils[:1], cams[:1], tmp_path / "one", ["x"], side_by_side=False, min_size=SIZE)
    with Image.open(single[0]) as image:
        assert image.size == (SIZE, SIZE)
    with pytest.raises(ValueError, match="one id per image"):
        save_cam_overlays(pils, cams, tmp_path, ["only-one"])


def test_jet_runs_from_blue_to_red():
    colours = jet(np.array([0.0, 0.5, 1.0]))
    assert colours.dtype == np.uint8 and colours.shape == (3, 3)
    assert colours[0].argmax() == 2 and colours[2].argmax() == 0 and colours[1][1] == 255
