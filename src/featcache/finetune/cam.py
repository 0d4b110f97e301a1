"""Class activation maps (CAM) of a linear head on a globally pooled conv map.

For networks that end ``conv map A (C, h, w) -> global average pool -> Linear``
(ResNet, GoogLeNet, EfficientNet), the logit of class k is the spatial mean of
``M_k = sum_c W[k, c] * A[c]`` plus a bias, so ``M_k`` shows where the evidence
for class k sits (Zhou et al. 2016; fast.ai's CAM lesson). The map is taken
after ReLU, upsampled to the input resolution and scaled to [0, 1] per image.

The conv map is the registry's :attr:`~featcache.extract.zoo.registry.BackboneSpec.cam_layer`
(EfficientNet-Lite ``head`` -> ``bn2``, ResNet ``res5`` -> ``layer4``, GoogLeNet
``inception_5b``), the classifier its ``classifier``; AlexNet and VGG16 put fully
connected layers between their last conv map and the classifier (``cam_layer``
is None), so CAM does not apply to them and is refused.

Overlays are written with PIL and numpy only (a jet colour map blended on the
image the network saw).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from featcache.extract.zoo.registry import BackboneSpec, LayerAlias
from featcache.util.atomic import atomic_path

__all__ = ["cam_layer", "class_activation_maps", "jet", "save_cam_overlays", "tensor_to_pil"]

logger = logging.getLogger(__name__)


def cam_layer(spec: BackboneSpec) -> tuple[str, LayerAlias]:
    """The conv map CAM uses: the registry's ``cam_layer`` alias.

    Returns
    -------
    alias : str
        Registry alias (``head``, ``res5``, ``inception_5b``).
    layer : LayerAlias
        Its entry; ``layer.node`` is the module whose output is the map.

    Raises
    ------
    ValueError
        If the classifier does not sit directly on the pooled map (AlexNet, VGG16).
    """
    if spec.cam_layer is None:
        convs = [name for name, alias in spec.layers.items() if alias.kind == "conv"]
        raise ValueError(
            f"CAM needs the linear classifier directly on the globally pooled conv map; {spec.name} has "
            f"fully connected layers between {convs[-1]!r} and its classifier {spec.classifier!r}. "
            "Hint: use a ResNet, GoogLeNet or EfficientNet-Lite backbone."
        )
    return spec.cam_layer, spec.layers[spec.cam_layer]


@torch.no_grad()
def class_activation_maps(model: nn.Module, spec: BackboneSpec, images: torch.Tensor,
                          class_idx: int | Sequence[int] | None = None) -> np.ndarray:
    """Class activation maps of a batch, in [0, 1] at the input resolution.

    Parameters
    ----------
    model : nn.Module
        A registry architecture with a linear head (e.g. a fine-tuned model);
        its train/eval state is restored afterwards.
    spec : BackboneSpec
        Its registry entry (which conv map, which head).
    images : torch.Tensor
        (N, 3, H, W) normalised images, as the preprocessor makes them.
    class_idx : int, sequence of int, or None
        Class per image (or one for all); None uses the predicted class.

    Returns
    -------
    numpy.ndarray
        (N, H, W) float32 in [0, 1]; an all-zero map where the class has no
        positive evidence anywhere.
    """
    _, layer = cam_layer(spec)
    head = model.get_submodule(spec.classifier)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"CAM needs an nn.Linear head at {spec.classifier!r}; found {type(head).__name__}.")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, 3, H, W); got {tuple(images.shape)}.")
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(layer.node).register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    device = head.weight.device
    try:
        model.eval()
        logits = model(images.to(device))
    finally:
        hook.remove()
        model.train(was_training)
    fmap = captured[-1].float()  # (N, C, h, w)
    n = images.shape[0]
    if class_idx is None:
        classes = logits.argmax(dim=1)
    else:
        classes = torch.as_tensor(class_idx, dtype=torch.int64, device=device).reshape(-1).expand(n) \
            if np.ndim(class_idx) == 0 else torch.as_tensor(class_idx, dtype=torch.int64, device=device)
        if classes.numel() != n:
            raise ValueError(f"class_idx has {classes.numel()} entries for {n} images.")
        if classes.min() < 0 or classes.max() >= head.out_features:
            raise ValueError(f"class_idx must lie in 0..{head.out_features - 1}; got {classes.tolist()}.")
    weights = head.weight.float()[classes]  # (N, C)
    cams = torch.einsum("nchw,nc->nhw", fmap, weights).relu()
    cams = F.interpolate(cams[:, None], size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    flat = cams.reshape(n, -1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    scale = torch.where(high > low, high - low, torch.ones_like(high))
    cams = ((flat - low[:, None]) / scale[:, None]).clamp_(0, 1).reshape_as(cams)
    cams[high <= 0] = 0.0
    return cams.cpu().numpy().astype(np.float32)


def tensor_to_pil(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo the normalisation of one (3, H, W) tensor: the RGB image the network saw."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    rgb = (image.detach().cpu().float() * std_t + mean_t).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), mode="RGB")


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map: (...) values in [0, 1] -> (..., 3) uint8 RGB."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * v - offset), 0, 1) for offset in (3, 2, 1)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def _safe_name(sample_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(sample_id).replace("/", "__")).strip("_")
    return name or "image"


def save_cam_overlays(images_pil: Sequence[Image.Image], cams: np.ndarray, out_dir: str | Path,
                      ids: Sequence[str], alpha: float = 0.45, min_size: int = 128,
                      side_by_side: bool = True) -> list[Path]:
    """Write one PNG per image: the CAM heat map blended on the image (beside the plain image).

    Parameters
    ----------
    images_pil : sequence of PIL.Image.Image
        The images the maps belong to (e.g. from :func:`tensor_to_pil`, so the
        crop matches the map); resized to the map's size.
    cams : numpy.ndarray
        (N, H, W) maps in [0, 1].
    out_dir : path
        Folder for ``<id>.png`` (ids made file-name safe: ``3/0001.png`` -> ``3__0001_png.png``).
    ids : sequence of str
        One id per image.
    alpha : float
        Weight of the heat map in the blend.
    min_size : int
        Small maps are enlarged (nearest) to at least this side, so tiny inputs stay visible.
    side_by_side : bool
        Put the plain image left of the overlay (the PNG is then twice as wide).

    Returns
    -------
    list of Path
        The files written, in input order.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or len(images_pil) != cams.shape[0] or len(ids) != cams.shape[0]:
        raise ValueError(f"Need one (H, W) map and one id per image: {len(images_pil)} images, "
                         f"{len(ids)} ids, maps of shape {cams.shape}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} is invalid; allowed: a number in [0, 1].")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image, cam, sample_id in zip(images_pil, cams, ids, strict=True):
        height, width = cam.shape
        base = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float32)
        blend = (1 - alpha) * base + alpha * jet(cam).astype(np.float32)
        overlay = Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), mode="RGB")
        if side_by_side:
            pair = Image.new("RGB", (2 * width, height))
            pair.paste(Image.fromarray(base.astype(np.uint8), mode="RGB"), (0, 0))
            pair.paste(overlay, (width, 0))
            overlay = pair
        factor = max(1, -(-min_size // max(height, width)))
        if factor > 1:
            overlay = overlay.resize((overlay.width * factor, overlay.height * factor), Image.NEAREST)
        path = out_dir / f"{_safe_name(sample_id)}.png"
        with atomic_path(path) as tmp:
            overlay.save(tmp, format="PNG")
        written.append(path)
    logger.info("Wrote %d CAM overlays to %s", len(written), out_dir)
    return written
