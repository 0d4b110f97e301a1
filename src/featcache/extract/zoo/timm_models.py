"""Any timm model as a backbone: its :class:`BackboneSpec` from timm's own facts, and its weights.

``backbones.<name>.model: timm/<model>[.<tag>]`` in params.yaml names a timm
model (``featcache layers timm/<model>`` lists it). :func:`timm_backbone`
builds the same :class:`~featcache.extract.zoo.registry.BackboneSpec` as the
registry's table holds, so extraction, the ONNX export and its cache, the store
and the train stage's store check treat it like a built-in backbone:

* preprocessing from the model's ``pretrained_cfg``: input size, interpolation,
  mean/std, and ``resize_size = floor(input_size / crop_pct)`` (timm's
  ``transforms_imagenet_eval``: resize the shorter side, then center-crop);
* layers: ``pre_logits`` (the default: what ``forward_head(x, pre_logits=True)``
  returns, found as the classifier's input, else as that call's own output in
  the graph of :func:`traceable`: distillation and multi-branch heads), every
  ``feature_info`` stage that is a graph node under its module name
  (``stages.3``, ``blocks.11``), and ``logits`` where the model has a
  classifier; their dimensions and kinds (conv map, token map, vector) come
  from one forward pass on the ``meta`` device, the shapes the extractor sees;
* token maps: the number of prefix tokens (class, distillation, register
  tokens) and whether token 0 is a class token, for ``cls``/``avg`` pooling.

Weights (:func:`pretrained_file`): timm's own hub download on first use: the
Hugging Face Hub (``hf_hub_id``, into the Hugging Face cache, with its progress
bar; a file the Hub names by its sha256 is checked against it) or, for the few
models that only have one, the ``url`` (timm's ``download_cached_file`` into the
torch hub cache, with the sha256 prefix of the file name checked). With
``FEATCACHE_OFFLINE=1`` nothing is downloaded and the error says which file to
put where. :func:`create_timm_model` loads a weights file through timm's own
``pretrained=True`` path (its checkpoint filter and strict load).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.extract.zoo.registry import TIMM_PREFIX, BackboneSpec, LayerAlias, UnknownNameError
from featcache.util.compute import float32_weight_bytes
from featcache.util.names import did_you_mean

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PRE_LOGITS", "LOGITS", "create_feature_extractor", "create_timm_model", "graph_node_names", "model_name",
           "pretrained_file", "timm_backbone", "timm_graph_nodes", "traceable"]

logger = logging.getLogger(__name__)

#: The alias of the penultimate feature (the classifier's input), every timm backbone's default layer.
PRE_LOGITS = "pre_logits"

#: The alias of the classifier's output, where the model has one.
LOGITS = "logits"

#: timm's default ``crop_pct`` (``timm.data.DEFAULT_CROP_PCT``) for a config without one.
_DEFAULT_CROP_PCT = 0.875

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def model_name(model: str) -> str:
    """``timm/convnext_tiny.fb_in1k`` or ``convnext_tiny.fb_in1k`` -> ``convnext_tiny.fb_in1k``."""
    return model[len(TIMM_PREFIX):] if model.startswith(TIMM_PREFIX) else model


def _resolve_name(model: str) -> str:
    """The full ``<architecture>.<pretrained tag>`` of a timm model name (timm's default tag when none is given)."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    name = model_name(model)
    architecture, tag = split_model_name_tag(name)
    if not timm.is_model(architecture):
        raise UnknownNameError(
            f"Unknown timm model {model!r}.{did_you_mean(architecture, timm.list_models())} "
            f"List them with `python -c \"import timm; print(timm.list_models('*convnext*'))\"`; "
            f"give `model: {TIMM_PREFIX}<architecture>[.<pretrained tag>]`."
        )
    try:
        known = not tag or get_pretrained_cfg(name) is not None
    except RuntimeError:  # timm: "Invalid pretrained tag"
        known = False
    if not known:
        tags = [option.split(".", 1)[1] for option in timm.list_pretrained(f"{architecture}.*")]
        raise UnknownNameError(
            f"timm model {architecture!r} has no pretrained tag {tag!r}.{did_you_mean(tag, tags)} "
            f"Tags: {', '.join(tags) or 'none'}."
        )
    return name


@functools.lru_cache(maxsize=64)
def timm_backbone(name: str, model: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of timm model ``model``, under the backbone name ``name``.

    Built from the model's ``pretrained_cfg`` and ``feature_info`` on the
    ``meta`` device (no weights, no memory; a fraction of a second after
    importing torch and timm), once per process.
    :func:`~featcache.extract.zoo.timm_spec_cache.cached_timm_backbone` keeps it
    on disk for the next process.

    Parameters
    ----------
    name : str
        The backbone's name (the ``backbones`` key: folders, stage names).
    model : str
        ``timm/<architecture>[.<pretrained tag>]``; without a tag, timm's default.

    Raises
    ------
    UnknownNameError
        For a model or tag timm does not know (with a close match), or a
        model whose input is not square.
    """
    import timm
    import torch

    full = _resolve_name(model)
    with torch.device("meta"):
        net = timm.create_model(full, pretrained=False)
    net.eval()
    cfg = dict(net.pretrained_cfg)
    tag = cfg.get("tag")
    if tag and "." not in full:
        full = f"{full}.{tag}"
    _, height, width = cfg.get("input_size", (3, 224, 224))
    if height != width:
        raise UnknownNameError(f"timm model {full!r} takes {height}x{width} inputs; featcache extracts square "
                               f"inputs only. Pick another model or pretrained tag.")
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in _INTERPOLATIONS:
        raise UnknownNameError(f"timm model {full!r} asks for {interpolation!r} interpolation; featcache "
                               f"resizes with {', '.join(_INTERPOLATIONS)}. Pick another model or pretrained tag.")
    crop_pct = cfg.get("crop_pct") or _DEFAULT_CROP_PCT
    num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0) or 0)
    class_token = bool(getattr(net, "has_class_token", getattr(net, "cls_token", None) is not None))
    layers, classifier = _layers(net, height, cfg.get("classifier"))
    stages = [alias for alias, layer in layers.items() if layer.kind in ("conv", "nhwc")]
    source = cfg.get("hf_hub_id") or cfg.get("url") or "no pretrained weights"
    return BackboneSpec(
        name=name, family="timm", arch=full, weights=f"timm:{full}",
        input_size=int(height), resize_size=int(math.floor(height / crop_pct)), interpolation=interpolation,
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),  # type: ignore[arg-type]
        layers=layers, default_layer=PRE_LOGITS, classifier=classifier or "",
        cam_layer=stages[-1] if stages and layers[stages[-1]].kind == "conv" else None,
        description=f"timm {full} (pretrained weights: {source})",
        num_prefix_tokens=num_prefix_tokens, class_token=class_token and num_prefix_tokens > 0,
        crop_mode=str(cfg.get("crop_mode") or "center"), weight_bytes=float32_weight_bytes(net),
        pretrained_source={key: str(cfg[key]) for key in ("hf_hub_id", "hf_hub_filename", "url") if cfg.get(key)},
    )


def _tracer() -> Any:
    """torchvision's node-naming tracer with timm's leaf modules: the node names ``create_feature_extractor`` uses."""
    import torchvision
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer

    return NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=get_notrace_modules(),
                          autowrap_functions=get_notrace_functions())


@functools.lru_cache(maxsize=None)
def _traceable_class(cls: type) -> type:
    """``cls`` with the forward :func:`traceable` traces (same name and module: error messages stay timm's)."""

    def forward(self: Any, x: Any) -> Any:
        features = self.forward_features(x)
        return self.forward_head(features), self.forward_head(features, pre_logits=True)

    # torch.fx wraps timm's no-trace functions in the globals of the traced forward: give it the model's globals
    forward = types.FunctionType(forward.__code__, cls.forward.__globals__, "forward")
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def traceable(net: nn.Module) -> nn.Module:
    """A shallow twin of timm model ``net`` (same submodules) whose forward also computes ``pre_logits``.

    Its forward is ``features = forward_features(x)``, then ``forward_head(features)`` (the logits: timm's
    ``forward``, so every node keeps its name), then ``forward_head(features, pre_logits=True)``, timm's own
    penultimate feature, traced after the logits. That last node is the ``pre_logits`` layer of the models
    whose classifier input is not it: distillation heads (DeiT, LeViT, PiT, EfficientFormer average two
    tokens or two heads), several heads (CrossViT), or a forward with extra arguments (Hiera's ``mask``).
    Nodes a feature extractor does not return are pruned, so nothing of it runs twice.
    """
    twin = copy.copy(net)
    twin.__class__ = _traceable_class(type(net))
    return twin


def create_feature_extractor(net: nn.Module, return_nodes: dict[str, str]) -> nn.Module:
    """timm's ``create_feature_extractor`` on :func:`traceable` ``(net)``: what the torch runner extracts with."""
    from timm.layers import create_feature_extractor as create

    return create(traceable(net), return_nodes=return_nodes)


def graph_node_names(net: nn.Module) -> list[str]:
    """The eval-mode node names of :func:`traceable` ``(net)`` (the raw layer names a timm backbone takes)."""
    from timm.layers import get_graph_node_names

    return get_graph_node_names(traceable(net))[1]


@functools.lru_cache(maxsize=16)
def timm_graph_nodes(arch: str) -> tuple[str, ...]:
    """The raw layer names of timm model ``arch`` (:func:`graph_node_names`), traced on the ``meta`` device."""
    import timm
    import torch

    with torch.device("meta"):
        net = timm.create_model(arch, pretrained=False)
    return tuple(graph_node_names(net.eval()))


def _head_nodes(net: nn.Module, classifier: str | None) -> tuple[str | None, str | None, str, str | None]:
    """(classifier module path or None, its input node or None, timm's pre_logits node, logits node or None)."""
    import torch.fx

    modules = dict(net.named_modules())
    if not classifier or classifier not in modules:
        found = {id(module): path for path, module in modules.items()}
        classifier = found.get(id(net.get_classifier())) if hasattr(net, "get_classifier") else None
    tracer = _tracer()
    graph = tracer.trace(traceable(net))
    (logits_out, pre_out), = next(node for node in graph.nodes if node.op == "output").args
    names = tracer.node_to_qualname
    classifier_input = None
    for node in graph.nodes if classifier else ():
        qualname = names.get(node, "")
        if node.op in ("call_module", "call_function") and (qualname == classifier
                                                              or qualname.startswith(classifier + ".")):
            source = node.args[0] if node.args else None
            if isinstance(source, torch.fx.Node) and source.op not in ("placeholder", "get_attr") and source in names:
                classifier_input = names[source]
            break
    if not isinstance(pre_out, torch.fx.Node) or pre_out not in names:
        raise UnknownNameError(f"timm model {type(net).__name__}: forward_head(x, pre_logits=True) gives no single "
                               f"tensor, so featcache has no {PRE_LOGITS!r} feature for it; pick another model.")
    if classifier is not None and type(modules[classifier]).__name__ == "Identity":  # num_classes=0: no logits
        return None, None, names[pre_out], None
    output = names.get(logits_out, "") if isinstance(logits_out, torch.fx.Node) else ""
    if classifier is not None and (output == classifier or output.startswith(classifier + ".")):
        return classifier, classifier_input, names[pre_out], classifier
    # distillation heads, several heads (their mean): the logits are a node after the classifier modules
    return None, None, names[pre_out], output or None


def _layers(net: nn.Module, size: int, classifier_cfg: str | None) -> tuple[dict[str, LayerAlias], str | None]:
    """(alias -> LayerAlias, classifier module path or None): ``feature_info`` stages, ``pre_logits`` and
    ``logits``, with shapes from a meta forward.

    ``pre_logits`` is the classifier's input where that has the shape of timm's
    ``forward_head(x, pre_logits=True)`` (the node name featcache always gave it), else that output itself.
    A ``feature_info`` module that is no graph node or whose output does not have its ``num_chs`` channels
    (HRNet's virtual stages) is left out.
    """
    import torch

    classifier, classifier_input, pre_logits, logits = _head_nodes(net, classifier_cfg)
    channels = {info["module"]: int(info["num_chs"]) for info in getattr(net, "feature_info", [])
                if info.get("module")}
    graph = set(graph_node_names(net))
    present = {module: module for module in channels
               if module in graph or any(node.startswith(module + ".") for node in graph)}
    for module in set(channels) - set(present):  # timm's feature_info says block.N where the graph has stages.N
        options = [f"{parent}.{module.split('.', 1)[1]}" for parent in ("stages", "blocks") if "." in module]
        found = [option for option in options if option in graph or any(n.startswith(option + ".") for n in graph)]
        present.update({module: found[0]} if found else {})
    stages = {module: present[module] for module in channels if module in present}
    wanted = {**stages, PRE_LOGITS: pre_logits, **({LOGITS: logits} if logits is not None else {})}
    if classifier_input is not None:
        wanted["classifier input"] = classifier_input
    outputs = create_feature_extractor(net, {node: node for node in dict.fromkeys(wanted.values())})(
        torch.empty(1, 3, size, size, device="meta"))
    shapes = {alias: tuple(int(v) for v in outputs[node].shape[1:]) for alias, node in wanted.items()}
    if classifier_input is not None and shapes.pop("classifier input") == shapes[PRE_LOGITS]:
        wanted[PRE_LOGITS] = classifier_input  # the node name featcache has always given pre_logits
    wanted.pop("classifier input", None)
    layers: dict[str, LayerAlias] = {}
    for alias, node in wanted.items():
        layer = _layer(node, shapes[alias], channels.get(alias))
        if alias in channels and layer.dim != channels[alias]:
            logger.debug("timm %s: feature_info %s has %d channels, node %s gives %s; left out",
                         type(net).__name__, alias, channels[alias], node, shapes[alias])
            continue
        layers[node if alias in stages else alias] = layer
    return layers, classifier


def _layer(node: str, shape: tuple[int, ...], num_chs: int | None) -> LayerAlias:
    """The LayerAlias of ``node`` whose per-sample output has ``shape``."""
    if len(shape) == 1:
        return LayerAlias(node, shape[0], post_relu=False, kind="flat")
    if len(shape) == 2:
        return LayerAlias(node, shape[1], post_relu=False, kind="tokens")
    if len(shape) == 3 and num_chs is not None and shape[0] != num_chs and shape[2] == num_chs:
        return LayerAlias(node, shape[2], post_relu=False, kind="nhwc")
    return LayerAlias(node, shape[0], post_relu=False, kind="conv")


# ----------------------------------------------------------------- weights
def create_timm_model(spec: BackboneSpec, path: str | os.PathLike[str] | None) -> nn.Module:
    """Build ``spec``'s timm model with the weights file ``path`` (None: timm's random init, seed it first).

    A file goes through timm's own ``pretrained=True`` loading (its
    ``pretrained_cfg_overlay`` ``file``): timm's ``load_state_dict``
    (safetensors, or ``torch.load(weights_only=True)``), the model's checkpoint
    filter (original layouts of e.g. CLIP or npz ViT checkpoints), then a strict load.
    """
    import timm

    if path is None:
        return timm.create_model(spec.arch, pretrained=False)
    return timm.create_model(spec.arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)})


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time.

    ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (the Hub client's own rule).
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _hf_filenames(filename: str | None) -> list[str]:
    """The files timm would read from a Hub repo, safetensors first (timm's ``load_state_dict_from_hf``)."""
    if not filename:
        return ["model.safetensors", "pytorch_model.bin"]
    if filename.endswith(".bin"):
        known = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
        safe = known.get(filename, filename[:-4] + ".safetensors")
        return [safe, filename]
    return [filename]


def pretrained_file(spec: BackboneSpec, progress: bool, offline: bool) -> Path:
    """The pretrained weights file of a timm backbone, downloaded into timm's cache on first use.

    Parameters
    ----------
    spec : BackboneSpec
        A timm backbone (``spec.weights == "timm:<model>"``).
    progress : bool
        Show the download's progress bar on stderr.
    offline : bool
        Never download (``FEATCACHE_OFFLINE``): a missing file raises, saying which file to put where.

    Raises
    ------
    featcache.extract.zoo.weights.WeightsNotFoundError
        The file is missing and ``offline``, or the model has no pretrained weights.
    featcache.extract.zoo.weights.WeightsDownloadError
        The download failed (network, a file that fails the hash check: discarded).
    """
    from featcache.extract.zoo.weights import WeightsNotFoundError

    hub_id, url = spec.pretrained_source.get("hf_hub_id"), spec.pretrained_source.get("url")  # no timm import
    if hub_id:
        return _hf_file(spec, hub_id, spec.pretrained_source.get("hf_hub_filename"), progress, offline)
    if url:
        return _url_file(spec, url, progress, offline)
    raise WeightsNotFoundError(f"timm model {spec.arch!r} (backbone {spec.name!r}) has no pretrained weights (no "
                               f"hf_hub_id or url in its pretrained_cfg). Set backbones.{spec.name}.weights to "
                               f"random or to the path of a state dict.")


def _missing(spec: BackboneSpec, put_it_there: str, error: BaseException | None = None) -> Exception:
    """The error for weights that are not here: offline (``error`` None) or a failed download."""
    from featcache.extract.zoo.weights import OFFLINE_ENV, WeightsDownloadError, WeightsNotFoundError

    if error is None:
        return WeightsNotFoundError(
            f"Pretrained weights for {spec.name!r} (timm {spec.arch}) are not on this machine and {OFFLINE_ENV} is "
            f"set, so featcache does not download them. {put_it_there} Unset {OFFLINE_ENV} to download on first use."
        )
    return WeightsDownloadError(
        f"Pretrained weights for {spec.name!r} (timm {spec.arch}) are not on this machine and downloading them "
        f"failed ({type(error).__name__}: {error}). {put_it_there} Set {OFFLINE_ENV}=1 to skip the download attempt."
    )


def _hf_file(spec: BackboneSpec, hub_id: str, filename: str | None, progress: bool, offline: bool) -> Path:
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    cache = _hf_cache_dir()
    names = _hf_filenames(filename)
    link = f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{names[0]}"
    put_it_there = (
        f"Put the file {names[0]} of the Hugging Face repo {repo} ({link}) into the Hugging Face cache {cache} "
        f"(`hf download {repo} {names[0]}` on a machine with network fills "
        f"{cache / ('models--' + repo.replace('/', '--'))}: copy that folder; HF_HOME moves the cache), or set "
        f"backbones.{spec.name}.weights to the path of that file in params.yaml, or use weights: random for a "
        f"smoke test."
    )
    for name in names:
        cached = huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=str(cache), revision=revision or None)
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
    if offline:
        raise _missing(spec, put_it_there)
    logger.info("Downloading the %s weights %s from the Hugging Face repo %s into %s (%s)",
                spec.name, names[0], repo, cache, "FEATCACHE_OFFLINE=1 forbids this")
    for name in names:
        try:
            with _hf_progress(progress):
                found = Path(huggingface_hub.hf_hub_download(repo, name, revision=revision or None,
                                                             cache_dir=str(cache)))
        except EntryNotFoundError:
            continue
        except (OSError, ValueError) as error:  # network, HTTP and offline-mode errors of the Hub client
            raise _missing(spec, put_it_there, error) from None
        _check_blob(spec, found, put_it_there)
        return found
    raise _missing(spec, put_it_there, FileNotFoundError(f"the repo has none of {names}"))


class _hf_progress:
    """Hide the Hub's progress bars while downloading when ``progress`` is False."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.was_disabled = False

    def __enter__(self) -> None:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        self.was_disabled = are_progress_bars_disabled()
        if not self.progress:
            disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        from huggingface_hub.utils import enable_progress_bars

        if not self.progress and not self.was_disabled:
            enable_progress_bars()


def _check_blob(spec: BackboneSpec, path: Path, put_it_there: str) -> None:
    """A Hub download whose cache blob is named by a sha256 (Git LFS files) must have that sha256."""
    from featcache.util.machine_records import cached_file_sha256

    blob = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and cached_file_sha256(blob) != blob.name:
        blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise _missing(spec, put_it_there, ValueError(
            f"the downloaded {path.name} does not have the sha256 {blob.name[:12]}... the Hub names it by; "
            f"the file was discarded"))


def _url_file(spec: BackboneSpec, url: str, progress: bool, offline: bool) -> Path:
    from urllib.error import URLError
    from urllib.parse import urlparse

    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    put_it_there = (
        f"Put the file {path.name} (timm {spec.arch}, from {url}) at {path} (the torch hub cache timm uses; set "
        f"TORCH_HOME to move it), or set backbones.{spec.name}.weights to the path of that file in params.yaml, "
        f"or use weights: random for a smoke test."
    )
    if path.is_file():
        return path
    if offline:
        raise _missing(spec, put_it_there)
    from timm.models._hub import download_cached_file

    logger.info("Downloading the %s weights %s from %s to %s", spec.name, path.name, url, path.parent)
    try:
        # timm's own download: a temporary file, the sha256 prefix in the file name checked, then moved into place.
        found = Path(download_cached_file(url, check_hash=True, progress=progress))
    except RuntimeError as error:
        if "invalid hash value" not in str(error):
            raise
        raise _missing(spec, put_it_there, ValueError(f"the file failed the sha256 check ({error}); discarded")) \
            from None
    except (URLError, OSError) as error:
        raise _missing(spec, put_it_there, error) from None
    return found
