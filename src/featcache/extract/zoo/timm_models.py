"""Any timm model as a backbone: its :class:`BackboneSpec` from timm's own facts, and its weights.

``backbones.<name>.model: timm/<model>[.<tag>]`` in params.yaml names a timm
model (``featcache layers timm/<model>`` lists it). :func:`timm_backbone`
builds the same :class:`~featcache.extract.zoo.registry.BackboneSpec` as the
registry's table holds, so extraction, the ONNX export and its cache, the store
and the train stage's store check treat it like a built-in backbone:

* preprocessing from the model's ``pretrained_cfg``: input size, interpolation,
  mean/std, and ``resize_size = floor(input_size / crop_pct)`` (timm's
  ``transforms_imagenet_eval``: resize the shorter side, then center-crop);
* layers: ``pre_logits`` (the default: the input of the classifier, what
  ``forward_head(x, pre_logits=True)`` returns), every ``feature_info`` stage
  under its module name (``stages.3``, ``blocks.11``), and ``logits`` where the
  model has a classifier; their dimensions and kinds (conv map, token map,
  vector) come from one forward pass on the ``meta`` device (no memory, no
  weights), so they are the shapes the extractor will see;
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

import functools
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.extract.zoo.registry import TIMM_PREFIX, BackboneSpec, LayerAlias, UnknownNameError
from featcache.util.names import did_you_mean

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PRE_LOGITS", "LOGITS", "create_timm_model", "model_name", "pretrained_file", "timm_backbone"]

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
    ``meta`` device (no weights, no memory; a fraction of a second), once per
    process.

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
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode != "center":
        logger.warning("timm model %s asks for crop_mode %r in its pretrained_cfg; featcache resizes the shorter "
                       "side to %d and center-crops %d (extract.resize_mode: crop), or squashes the whole image "
                       "(resize_mode: squash)", full, crop_mode, math.floor(height / crop_pct), height)
    num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0) or 0)
    class_token = bool(getattr(net, "has_class_token", getattr(net, "cls_token", None) is not None))
    classifier, classifier_input = _classifier_nodes(net, cfg.get("classifier"))
    layers = _layers(net, height, classifier, classifier_input)
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
    )


def _tracer() -> Any:
    """torchvision's node-naming tracer with timm's leaf modules: the node names ``create_feature_extractor`` uses."""
    import torchvision
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer

    return NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=get_notrace_modules(),
                          autowrap_functions=get_notrace_functions())


def _classifier_nodes(net: nn.Module, classifier: str | None) -> tuple[str | None, str]:
    """(module path of the classifier or None, graph node of its input: the ``pre_logits`` feature)."""
    modules = dict(net.named_modules())
    if not classifier or classifier not in modules:
        found = {id(module): path for path, module in modules.items()}
        classifier = found.get(id(net.get_classifier())) if hasattr(net, "get_classifier") else None
    if not classifier:
        raise UnknownNameError(f"timm model {type(net).__name__} names no classifier module, so featcache cannot "
                               f"find its {PRE_LOGITS!r} feature; pick another model.")
    tracer = _tracer()
    graph = tracer.trace(net)
    for node in graph.nodes:
        if node.op == "call_module" and (node.target == classifier or node.target.startswith(classifier + ".")):
            source = node.args[0] if node.args else None
            if source is not None and source.op != "placeholder" and source in tracer.node_to_qualname:
                is_real = type(modules[classifier]).__name__ != "Identity"
                return (classifier if is_real else None), tracer.node_to_qualname[source]
    raise UnknownNameError(f"featcache could not find the input of the classifier {classifier!r} of timm model "
                           f"{type(net).__name__} in its traced graph; pick another model.")


def _layers(net: nn.Module, size: int, classifier: str | None, classifier_input: str) -> dict[str, LayerAlias]:
    """Alias -> LayerAlias: ``feature_info`` stages, ``pre_logits`` and ``logits``, with shapes from a meta forward."""
    import torch
    from timm.layers import create_feature_extractor

    channels = {info["module"]: int(info["num_chs"]) for info in getattr(net, "feature_info", [])
                if info.get("module")}
    nodes = {**{module: module for module in channels}, classifier_input: PRE_LOGITS}
    if classifier is not None:
        nodes[classifier] = LOGITS
    extractor = create_feature_extractor(net, return_nodes=nodes)
    outputs = extractor(torch.empty(1, 3, size, size, device="meta"))
    layers: dict[str, LayerAlias] = {}
    for node, alias in nodes.items():
        shape = tuple(int(v) for v in outputs[alias].shape[1:])
        layers[alias] = _layer(node, shape, channels.get(node))
    # network order: stages, then pre_logits, then logits
    order = [*channels, PRE_LOGITS, LOGITS]
    return {alias: layers[alias] for alias in order if alias in layers}


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
    from timm.models import get_pretrained_cfg

    from featcache.extract.zoo.weights import WeightsNotFoundError

    cfg = get_pretrained_cfg(spec.arch)
    hub_id, url = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)
    if hub_id:
        return _hf_file(spec, hub_id, getattr(cfg, "hf_hub_filename", None), progress, offline)
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
    from featcache.util.hashing import file_sha256

    blob = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and file_sha256(blob) != blob.name:
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
