"""The registry's fine-tuning facts: each backbone's classifier module and CAM layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featcache.extract.zoo.registry import BACKBONES, BackboneSpec


def _meta_model(spec: BackboneSpec) -> nn.Module:
    """The architecture on the meta device (shapes only: no memory, no initialisation cost)."""
    with torch.device("meta"):
        if spec.family == "timm":
            import timm

            return timm.create_model(spec.arch, pretrained=False)
        import torchvision

        return torchvision.models.get_model(spec.arch, weights=None, **dict(spec.constructor_kwargs))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_classifier_is_the_linear_output_layer(name: str):
    spec = BACKBONES[name]
    head = _meta_model(spec).get_submodule(spec.classifier)
    assert isinstance(head, nn.Linear) and head.out_features == 1000
    outputs = [alias for alias in spec.layers.values() if alias.kind == "flat" and not alias.post_relu]
    assert outputs[-1].node == spec.classifier and outputs[-1].dim == head.out_features


@pytest.mark.parametrize("name", list(BACKBONES))
def test_cam_layer_is_the_map_the_classifier_pools(name: str):
    spec = BACKBONES[name]
    head = _meta_model(spec).get_submodule(spec.classifier)
    convs = [alias for alias in spec.layers if spec.layers[alias].kind == "conv"]
    if spec.cam_layer is None:  # fully connected layers between the last map and the classifier
        assert head.in_features != spec.layers[convs[-1]].dim
    else:
        layer = spec.layers[spec.cam_layer]
        assert spec.cam_layer == convs[-1] and layer.kind == "conv"
        assert layer.dim == head.in_features == spec.layers[spec.default_layer].dim
