"""Registry: every backbone and alias against an independent forward-hook reference.

Parametrized from :data:`featcache.extract.zoo.registry.BACKBONES`, so a new backbone
or alias is tested without editing this file. Inputs are random images (size per
backbone: ``_support.references.input_size``); weights are random (seed 0), then rescaled
layer by layer on that input so that every activation is of order 1
(:func:`scale_keeping`). With the constructors' own random init the deep
GoogLeNet activations vanish (inception_4a..pool5 below 1e-5 at 32 px), and an
all-zero output would match them; :func:`assert_matches` is relative to the
reference's scale and refuses a reference that is ~0.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from _support.references import input_size, mean_pool, random_batch, reference_activations
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.registry import (
    BACKBONES,
    BackboneSpec,
    LayerAlias,
    UnknownNameError,
    get_backbone,
    list_backbones,
    list_layers,
    resolve_layer,
)
from featcache.extract.zoo.weights import LoadedBackbone, load_backbone

BACKBONE_NAMES = list(BACKBONES)


def _same_table_as_earlier(name: str) -> bool:
    """Whether an earlier backbone has the same alias -> node table (resnet152 ~ resnet50, lite1 ~ lite0)."""
    nodes = {alias: layer.node for alias, layer in BACKBONES[name].layers.items()}
    for other in BACKBONE_NAMES[: BACKBONE_NAMES.index(name)]:
        if {alias: layer.node for alias, layer in BACKBONES[other].layers.items()} == nodes:
            return True
    return False


# One extractor per (backbone, alias). Backbones whose table repeats an earlier
# one's (same nodes, deeper or wider net) run these per-alias cases only with
# -m slow; every alias of every backbone is still checked exactly by
# test_all_aliases_in_one_pass and the default by test_default_layer_is_registry_default.
ALIAS_CASES = [
    pytest.param(name, alias, id=f"{name}-{alias}",
                 marks=[pytest.mark.slow] if _same_table_as_earlier(name) else [])
    for name, spec in BACKBONES.items() for alias in spec.layers
]
_REFERENCES: dict[str, dict[str, np.ndarray]] = {}

#: The smallest max |reference| a check may rely on: below it, float noise and an all-zero
#: output both pass a tolerance, and the check says nothing.
MIN_SCALE = 0.1


def assert_matches(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected|, on a reference that is not ~0.

    Relative to the reference's own scale, so an all-zero (or any other wrong)
    output fails whatever the activations' magnitude; a reference whose largest
    value is below :data:`MIN_SCALE` is refused as a vacuous check.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(expected)), f"{what}: reference is not finite"
    scale = float(np.abs(expected).max())
    assert scale >= MIN_SCALE, f"{what}: reference max |x| = {scale:.3g} < {MIN_SCALE}: the check would be vacuous"
    error = float(np.abs(actual - expected).max())
    assert error <= rtol * scale, f"{what}: max abs error {error:.3g} > {rtol:g} x scale {scale:.3g}"


@torch.no_grad()
def scale_keeping(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Rescale every conv and linear layer in place so its output has unit std on ``x`` (LSUV in one pass).

    A forward hook divides the layer's weight and bias by the std of its output
    and returns the output divided likewise, which is exactly what the rescaled
    layer computes; later layers then see the rescaled activations. BatchNorm
    with its initial running stats is the identity in eval mode, so every
    activation of the network stays of order 1.
    """

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        std = float(output.std())
        module.weight.div_(std)
        if module.bias is not None:
            module.bias.div_(std)
        return output / std

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return model


@functools.lru_cache(maxsize=None)
def _scaled_backbone(name: str) -> LoadedBackbone:
    loaded = load_backbone(name, "random")
    scale_keeping(loaded.model, random_batch(size=input_size(name)))
    return loaded


@pytest.fixture(scope="module")
def scaled_backbone():
    """``scaled_backbone(name)`` -> seed-0 random weights rescaled to order-1 activations (do not modify)."""
    yield _scaled_backbone
    _scaled_backbone.cache_clear()


@pytest.fixture(scope="module")
def reference(scaled_backbone):
    """``reference(name)`` -> node -> mean-pooled hook activation, one hooked forward per backbone."""

    def get(name: str) -> dict[str, np.ndarray]:
        if name not in _REFERENCES:
            spec = BACKBONES[name]
            nodes = [alias.node for alias in spec.layers.values()]
            raw = reference_activations(scaled_backbone(name).model, nodes, random_batch(size=input_size(name)))
            _REFERENCES[name] = {node: mean_pool(value) for node, value in raw.items()}
        return _REFERENCES[name]

    yield get
    _REFERENCES.clear()


# ----------------------------------------------------------------- the table
def test_list_backbones_reads_the_table():
    assert list_backbones() == list(BACKBONES)
    assert len(set(list_backbones())) == len(BACKBONES)
    for name in list_backbones():
        assert get_backbone(name) is BACKBONES[name]
        assert BACKBONES[name].name == name


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_list_layers_and_default(name):
    spec = BACKBONES[name]
    layers = list_layers(name)
    assert list(layers) == list(spec.layers)
    assert all(isinstance(alias, LayerAlias) for alias in layers.values())
    assert spec.default_layer in layers
    assert resolve_layer(name, "default") == (spec.layers[spec.default_layer].node, spec.layers[spec.default_layer])
    # Two aliases never share a node (they would collide in one extraction).
    nodes = [alias.node for alias in layers.values()]
    assert len(nodes) == len(set(nodes))
    # list_layers returns a copy: the registry cannot be edited through it.
    layers.pop(spec.default_layer)
    assert spec.default_layer in list_layers(name)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_spec_preprocessing_is_sane(name):
    spec: BackboneSpec = BACKBONES[name]
    assert spec.family in ("torchvision", "timm")
    assert spec.resize_size >= spec.input_size > 0
    assert spec.interpolation in ("bilinear", "bicubic", "nearest")
    assert len(spec.mean) == len(spec.std) == 3 and all(s > 0 for s in spec.std)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_preprocessing_matches_the_weights_publisher(name):
    """Input size, resize, interpolation and mean/std come from timm's / torchvision's own configs."""
    spec = BACKBONES[name]
    if spec.family == "timm":
        import timm

        cfg = timm.create_model(spec.arch, pretrained=False).pretrained_cfg
        assert spec.input_size == cfg["input_size"][-1]
        assert spec.resize_size == int(math.floor(spec.input_size / cfg["crop_pct"]))
        assert spec.interpolation == cfg["interpolation"]
        assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    else:
        import torchvision.models as tv_models

        enum_name, member = spec.weights.split(":", 1)[1].split(".")
        transforms = getattr(tv_models, enum_name)[member].transforms()
        assert [spec.input_size] == list(transforms.crop_size)
        assert [spec.resize_size] == list(transforms.resize_size)
        assert spec.interpolation == transforms.interpolation.value
        assert list(spec.mean) == list(transforms.mean) and list(spec.std) == list(transforms.std)


# Facts copied from the backbone table of DESIGN.md (the registry must match the documented contract).
# Every alias the table names is listed: the forward-hook checks below read the registry's own node, so a
# registry entry moved to another node of the same shape (res4 -> layer3.0, inception_4b -> inception4c)
# fails only here.
_RESNET = {"conv1": "relu", "pool1": "maxpool", **{f"res{i}": f"layer{i - 1}" for i in range(2, 6)},
           "pool5": "flatten", "fc6": "fc"}
# vgg16's features: a conv then its ReLU per layer (conv at 2k, ReLU at 2k + 1), a max pool closing each stage
_VGG16_CONVS = {f"conv{stage}_{conv}": relu for stage, relus in enumerate(
    ((1, 3), (6, 8), (11, 13, 15), (18, 20, 22), (25, 27, 29)), start=1) for conv, relu in enumerate(relus, start=1)}
DESIGN_TABLE = {
    "alexnet": ({"conv1": "features.1", "conv2": "features.4", "conv3": "features.7", "conv4": "features.9",
                 "conv5": "features.11", "pool5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5",
                 "fc8": "classifier.6"}, "fc7", 4096),
    "vgg16": ({**{alias: f"features.{i}" for alias, i in _VGG16_CONVS.items()},
               **{f"pool{s}": f"features.{i}" for s, i in enumerate((4, 9, 16, 23, 30), start=1)},
               "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}, "fc7", 4096),
    "resnet18": (_RESNET, "pool5", 512),
    "resnet50": (_RESNET, "pool5", 2048),
    "resnet152": (_RESNET, "pool5", 2048),
    "googlenet": ({**{f"inception_{b}": f"inception{b}" for b in "3a 3b 4a 4b 4c 4d 4e 5a 5b".split()},
                   "pool5": "flatten", "loss3_fc": "fc"}, "pool5", 1024),
    "efficientnet_lite0": ({**{f"block{i}": f"blocks.{i - 1}" for i in range(1, 8)}, "head": "bn2",
                            "pool": "global_pool.flatten", "logits": "classifier"}, "pool", 1280),
}


@pytest.mark.parametrize("name", list(DESIGN_TABLE))
def test_registry_matches_design_table(name):
    nodes, default, dim = DESIGN_TABLE[name]
    spec = get_backbone(name)
    for alias, node in nodes.items():
        assert spec.layers[alias].node == node, (name, alias)
    assert spec.default_layer == default
    assert spec.layers[default].dim == dim


def test_vgg16_has_every_caffe_layer():
    layers = list_layers("vgg16")
    expected = [f"conv{s}_{c}" for s, n in enumerate((2, 2, 3, 3, 3), start=1) for c in range(1, n + 1)]
    expected += [f"pool{s}" for s in range(1, 6)] + ["fc6", "fc7", "fc8"]
    assert set(expected) <= set(layers)


# -------------------------------------------------------------- unknown names
def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        get_backbone("resnet19")
    message = str(info.value)
    assert "resnet19" in message
    for name in BACKBONES:
        assert name in message
    assert "resnet18" in message.split("Allowed")[0]  # did-you-mean
    with pytest.raises(UnknownNameError):
        list_layers("nope")
    assert issubclass(UnknownNameError, ValueError)


def test_unknown_layer_lists_valid_aliases(random_backbone):
    spec = BACKBONES["resnet18"]
    with pytest.raises(UnknownNameError) as info:
        resolve_layer("resnet18", "res9")
    assert str(info.value).startswith("Unknown layer 'res9' for backbone 'resnet18'.")
    for alias in spec.layers:
        assert alias in str(info.value)
    with pytest.raises(UnknownNameError) as info:
        TorchFeatureExtractor(random_backbone("resnet18").model, spec, ["no_such_layer"])
    assert "no_such_layer" in str(info.value)
    for alias in spec.layers:
        assert alias in str(info.value)


def test_raw_node_needs_graph_nodes():
    # Without the graph a raw name cannot be checked, so it is refused.
    with pytest.raises(UnknownNameError):
        resolve_layer("vgg16", "classifier.3")
    assert resolve_layer("vgg16", "classifier.3", ["x", "classifier.3"]) == ("classifier.3", None)
    # A module prefix of graph nodes is accepted as well.
    assert resolve_layer("resnet18", "layer1.0", ["layer1.0.conv1", "layer1.0.relu_1"]) == ("layer1.0", None)
    with pytest.raises(UnknownNameError):
        resolve_layer("resnet18", "layer1.0.co", ["layer1.0.conv1"])


def test_raw_graph_node_is_accepted(scaled_backbone):
    loaded = scaled_backbone("vgg16")
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["classifier.3"], channels_last=False)
    x = random_batch(size=input_size("vgg16"))
    out = extractor(x)
    assert extractor.layer_names == ["classifier.3"]
    ref = reference_activations(loaded.model, ["classifier.3"], x)["classifier.3"].numpy()
    assert out["classifier.3"].shape == (x.shape[0], 4096)
    assert_matches(out["classifier.3"], ref, what="vgg16 classifier.3")
    assert (out["classifier.3"] < 0).any(), "pre-ReLU fc7 must have negative values"
    spec_of = {s.alias: s for s in extractor.layer_specs(input_size("vgg16"))}
    assert spec_of["classifier.3"].post_relu is False
    assert spec_of["classifier.3"].node == "classifier.3"


# --------------------------------------------------------- every alias, exact
@pytest.mark.parametrize("name,alias", ALIAS_CASES)
def test_alias_matches_forward_hook(name, alias, scaled_backbone, reference):
    """One alias per extractor (truncated right after it), float32-exact against the hook reference."""
    loaded = scaled_backbone(name)
    spec = BACKBONES[name]
    layer = spec.layers[alias]
    extractor = TorchFeatureExtractor(loaded.model, spec, [alias], pooling="avg", channels_last=False)
    x = random_batch(size=input_size(name))
    out = extractor(x)
    assert list(out) == [alias]
    features = out[alias]
    assert features.dtype == np.float32
    assert features.shape == (x.shape[0], layer.dim)
    assert_matches(features, reference(name)[layer.node], rtol=1e-5, what=f"{name}:{alias}")
    # post_relu is a claim about the values: post-ReLU(6) activations are >= 0;
    # linear outputs (fc8, logits, the projection of a block) go negative.
    if layer.post_relu:
        assert features.min() >= 0.0, f"{name}:{alias} is marked post-ReLU but has negative values"
    else:
        assert features.min() < 0.0, f"{name}:{alias} is marked pre-activation but is all >= 0"


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_all_aliases_in_one_pass(name, scaled_backbone, reference):
    """Every alias in one extractor: exact values, and the layer specs the store records."""
    loaded = scaled_backbone(name)
    spec = BACKBONES[name]
    extractor = TorchFeatureExtractor(loaded.model, spec, list(spec.layers), pooling="avg", channels_last=False)
    out = extractor(random_batch(size=input_size(name)))
    assert list(out) == list(spec.layers) == extractor.layer_names
    for alias, layer in spec.layers.items():
        assert out[alias].shape == (2, layer.dim), alias
        assert_matches(out[alias], reference(name)[layer.node], rtol=1e-5, what=f"{name}:{alias} (all in one pass)")
    specs = extractor.layer_specs(input_size(name))
    assert [s.alias for s in specs] == list(spec.layers)
    for s in specs:
        layer = spec.layers[s.alias]
        assert (s.node, s.dim, s.post_relu) == (layer.node, layer.dim, layer.post_relu)
        assert s.map_shape[0] == layer.dim
        if layer.kind == "conv":
            assert len(s.map_shape) == 3 and s.pooling == "avg", s
        else:
            assert len(s.map_shape) == 1 and s.pooling == "none", s


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_all_aliases_channels_last(name, scaled_backbone, reference):
    """The default memory format (channels_last) agrees with the reference to float32 noise."""
    loaded = scaled_backbone(name)
    spec = BACKBONES[name]
    extractor = TorchFeatureExtractor(loaded.model, spec, list(spec.layers), pooling="avg", channels_last=True)
    out = extractor(random_batch(size=input_size(name)))
    for alias, layer in spec.layers.items():
        assert_matches(out[alias], reference(name)[layer.node], rtol=1e-4, what=f"{name}:{alias} channels_last")


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_default_layer_is_registry_default(name, scaled_backbone, reference):
    loaded = scaled_backbone(name)
    spec = BACKBONES[name]
    extractor = TorchFeatureExtractor(loaded.model, spec, ["default"], channels_last=False)
    assert extractor.layer_names == [spec.default_layer]
    out = extractor(random_batch(size=input_size(name)))
    default = spec.layers[spec.default_layer]
    assert list(out) == [spec.default_layer]
    assert out[spec.default_layer].shape == (2, default.dim)
    assert_matches(out[spec.default_layer], reference(name)[default.node], what=f"{name}:default")


# ------------------------------------------------------ a wrong node must fail
def _wrong_nodes(spec: BackboneSpec, model: nn.Module) -> dict[str, str]:
    """alias -> a neighbouring node of the same shape, to swap the registry entry to.

    Aliases are paired with the nearest later alias of the same dim and kind (the
    two nodes swap, so the nodes stay unique); an alias left without a partner
    whose node is a stage of several blocks (``layer3``, ``blocks.5``) gets the
    stage's last-but-one block, whose output has the stage's shape. Only the
    values can then tell that the entry is wrong.
    """
    wrong: dict[str, str] = {}
    free = list(spec.layers)
    while free:
        alias = free.pop(0)
        layer = spec.layers[alias]
        partner = next((o for o in free if (spec.layers[o].dim, spec.layers[o].kind) == (layer.dim, layer.kind)), None)
        if partner is not None:
            free.remove(partner)
            wrong[alias], wrong[partner] = spec.layers[partner].node, layer.node
    modules = dict(model.named_modules())
    for alias, layer in spec.layers.items():
        stage = modules.get(layer.node)
        if alias not in wrong and isinstance(stage, nn.Sequential) and len(stage) >= 2:
            wrong[alias] = f"{layer.node}.{len(stage) - 2}"
    return wrong


WRONG_NODE_CASES = [
    pytest.param(name, id=name, marks=[pytest.mark.slow] if _same_table_as_earlier(name) else [])
    for name in BACKBONE_NAMES
]


@pytest.mark.parametrize("name", WRONG_NODE_CASES)
def test_registry_entry_swapped_to_a_neighbouring_node_fails_the_check(name, scaled_backbone, reference,
                                                                      monkeypatch):
    """The check above is not vacuous: with aliases moved to neighbouring same-shape nodes, each one fails it."""
    spec, expected = BACKBONES[name], reference(name)  # the reference of the true registry, before the swap
    wrong = _wrong_nodes(spec, scaled_backbone(name).model)
    assert len(wrong) >= 2, f"{name}: too few aliases with a same-shape neighbour: {wrong}"
    layers = {alias: dataclasses.replace(layer, node=wrong.get(alias, layer.node))
              for alias, layer in spec.layers.items()}
    monkeypatch.setitem(BACKBONES, name, dataclasses.replace(spec, layers=layers))
    extractor = TorchFeatureExtractor(scaled_backbone(name).model, BACKBONES[name], list(wrong), pooling="avg",
                                      channels_last=False)
    out = extractor(random_batch(size=input_size(name)))
    for alias in wrong:
        assert out[alias].shape == (2, spec.layers[alias].dim), (alias, wrong[alias])
        with pytest.raises(AssertionError, match="max abs error"):
            assert_matches(out[alias], expected[spec.layers[alias].node],
                           what=f"{name}:{alias} moved to {wrong[alias]}")
    # ... and an all-zero output fails it for every alias.
    for alias, layer in spec.layers.items():
        with pytest.raises(AssertionError, match="max abs error"):
            assert_matches(np.zeros_like(expected[layer.node]), expected[layer.node], what=alias)
