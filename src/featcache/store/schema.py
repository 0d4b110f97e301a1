"""The HDF5 feature-store schema: every name and code in one place.

A store is one HDF5 file per (dataset, backbone)::

    /                 attrs: format, backbone, weights_id, weights_sha256, backend,
                             config (canonical JSON), config_sha256, manifest_sha256,
                             featcache_version, torch_version, ... (from the caller),
                             shards (JSON: the WebDataset shards read, with their sha256),
                             n_rows (kept), n_input, n_skipped, complete (set by the writer)
    /ids      (N,)    utf-8 str, sorted stable ids
    /label    (N,)    int64, class index (-1 if none)
    /target   (N,)    float64, regression target (NaN if none)
    /split    (N,)    uint8 enum: train=0, val=1, test=2
    /classes  (K,)    utf-8 str, class names in index order (empty for regression)
    /features         attrs: layers (aliases in extraction order)
    /features/<alias> (N, D) float16|float32, chunked by rows, compressed
                      attrs: node, pooling, map_shape, post_relu, dim (token maps: prefix_tokens)
    /errors   (E,)    compound (id, reason) utf-8 of inputs that were skipped

N counts kept rows only: n_rows + n_skipped == n_input.

A layer name read from a store may be a fused name ``a+b[+c...]`` (:data:`LAYER_SEPARATOR`,
:func:`layer_parts`): the listed layers of the one store, concatenated column-wise in that order
(hypercolumn features of one backbone); nothing fused is stored.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from featcache.errors import ParamError

__all__ = [
    "FORMAT",
    "TASKS",
    "SPLITS",
    "SPLIT_CODES",
    "SHARDS_ATTR",
    "FEATURE_DTYPES",
    "POOLINGS",
    "MAP_POOLINGS",
    "BACKENDS",
    "OPENVINO_PROVIDER",
    "AUTOCASTS",
    "DECODE_PATHS",
    "DECODE_CHOICES",
    "ON_ERROR",
    "PRECISIONS",
    "RESIZE_MODES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_BAD_FRACTION",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BLOCK_ROWS",
    "DEFAULT_FEATURE_DTYPE",
    "COMPRESSIONS",
    "HDF5_LIBVER",
    "LAYER_SEPARATOR",
    "REQUIRED_ATTRS",
    "RESERVED_ATTRS",
    "LayerSpec",
    "canonical_json",
    "layer_parts",
    "pooled_dim",
    "sha256_text",
]

#: Value of the root ``format`` attribute; bump the suffix on breaking changes.
FORMAT = "featcache-features/1"

#: Learning tasks of a data set: ``/label`` holds class indices, ``/target`` regression values.
TASKS: tuple[str, ...] = ("classification", "regression")

#: Split names in code order.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Split name -> uint8 code stored in ``/split``.
SPLIT_CODES: dict[str, int] = {name: code for code, name in enumerate(SPLITS)}

#: Root attribute of a store made from WebDataset shards: canonical JSON ``{"shards": [{path, sha256, size,
#: n_samples}, ...]}``, the shards read, in sample-id order.
SHARDS_ATTR = "shards"

# Extraction choices: the values that the root ``config`` (and ``backend``/``precision``/``decode``
# attributes) record. The params schema validates against them and the extractor resolves them
# (``featcache.extract.plan``); they live here so that a reader of a store, like the train stage,
# checks a store's config without importing the extractor.

#: ``extract.backend`` values (``auto``: torch on CUDA, onnxruntime on the CPU, OpenVINO for a native CPU bf16).
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx", "openvino")

#: The ``provider`` attribute of a store that OpenVINO's CPU plugin extracted.
OPENVINO_PROVIDER = "OpenVINO CPU"

#: ``extract.autocast`` values (``none``: float32; ``auto``: fp16 for torch on CUDA, else none).
AUTOCASTS: tuple[str, ...] = ("auto", "none", "bf16", "fp16")

#: Where images are decoded: PIL in worker processes (``cpu``), or batched on the runner's device (``gpu``).
DECODE_PATHS: tuple[str, ...] = ("cpu", "gpu")

#: ``extract.decode`` values: a decode path, or ``auto`` (the device path when torch runs on CUDA, else ``cpu``).
DECODE_CHOICES: tuple[str, ...] = ("auto", *DECODE_PATHS)

#: ``extract.on_error`` values: ``skip`` reports bad images and goes on, ``fail`` stops at the first.
ON_ERROR: tuple[str, ...] = ("skip", "fail")

#: ``extract.precision``: the weights and activations of the forward. ``int8`` runs a graph quantized with
#: onnxruntime, calibrated on the train split and checked against float32 (``featcache.extract.onnx.quantize``).
PRECISIONS: tuple[str, ...] = ("float32", "int8")

#: ``extract.resize_mode``: ``crop`` resizes the shorter side then center-crops; ``squash`` resizes to the square.
RESIZE_MODES: tuple[str, ...] = ("crop", "squash")

#: Default decompression-bomb limit in pixels (width x height): Pillow's own default, 1024**3 // 4 // 3.
#: A config records ``max_image_pixels`` only when it differs from this.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

#: Default ``extract_run.max_bad_fraction``: a run with more bad images than good ones fails.
DEFAULT_MAX_BAD_FRACTION = 0.5

#: Default ``extract_run.batch_size``: images per forward of the backbone.
DEFAULT_BATCH_SIZE = 64

#: Default ``extract_run.block_rows``: rows per committed block (the unit of resume) and per HDF5 chunk.
DEFAULT_BLOCK_ROWS = 512

#: Allowed storage dtypes for ``/features/<alias>``.
FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32")

#: Default storage dtype (``extract.dtype``), one of :data:`FEATURE_DTYPES`.
DEFAULT_FEATURE_DTYPE = "float16"

#: Allowed pooling of conv maps (B, C, H, W) and transformer token maps (B, N, C) before storage.
#: Conv maps: ``avg``/``max`` over H x W, ``avg2x2`` a 2x2 spatial pyramid level, ``none`` the whole map.
#: Token maps: ``avg``/``max`` over the patch tokens (the prefix tokens, class/distillation/register, left
#: out), ``cls`` the class token (token 0), ``none`` every token. Vectors are stored as they are (``none``).
POOLINGS: tuple[str, ...] = ("avg", "max", "none", "avg2x2", "cls")

#: Poolings of each kind of map (``map_shape`` (C, H, W) or (N, C)).
MAP_POOLINGS: dict[str, tuple[str, ...]] = {"conv": ("avg", "max", "none", "avg2x2"),
                                            "tokens": ("avg", "max", "none", "cls")}


#: Allowed compression filters for ``/features/<alias>`` (``None``: uncompressed).
#: Both ship with every h5py build; gzip uses h5py's fixed default level 4.
COMPRESSIONS: tuple[str | None, ...] = ("lzf", "gzip", None)

#: HDF5 format bounds used for every store file. A fixed upper bound keeps the
#: on-disk layout (and so the file bytes) independent of the installed HDF5
#: release; "earliest" keeps files readable by any HDF5 >= 1.8 tool.
HDF5_LIBVER: tuple[str, str] = ("earliest", "v110")

#: Joins the layers of a fused layer name, ``pool+block6``: those layers of one store side by side
#: (:func:`layer_parts`). No stored layer's name contains it: the registry's aliases are letters, digits and
#: ``_`` (``pool``, ``block6``, ``inception_4e``), and raw graph node names, the torchvision / timm ``torch.fx``
#: node names, join with ``.`` and ``_`` (``features.12``, ``stages.2.blocks.1``, ``add_1``).
LAYER_SEPARATOR = "+"

#: Root attributes the writer requires from its caller.
REQUIRED_ATTRS: tuple[str, ...] = ("config", "config_sha256")

#: Root attributes the writer sets itself; callers may not pass them.
RESERVED_ATTRS: tuple[str, ...] = ("format", "n_rows", "n_input", "n_skipped", "complete")


@dataclass(frozen=True)
class LayerSpec:
    """One stored layer: ``/features/<alias>`` of shape (N, ``dim``).

    Attributes
    ----------
    alias : str
        Dataset name, e.g. ``"pool"`` or ``"fc7"``; no ``/``.
    node : str
        Graph node it was read from, e.g. ``"global_pool.flatten"``.
    dim : int
        Feature dimension D after pooling (:func:`pooled_dim` of ``map_shape``).
    pooling : str
        One of :data:`POOLINGS`; ``"none"`` for maps stored whole and for
        outputs that are already flat.
    map_shape : tuple of int
        Per-sample shape before pooling, e.g. ``(1280, 7, 7)`` or ``(1280,)``.
    post_relu : bool
        Whether the activation is taken after the ReLU.
    prefix_tokens : int
        Token maps (``map_shape`` (N, C)): how many leading tokens are not
        patch tokens (class, distillation, register tokens), which ``avg`` and
        ``max`` leave out; 0 otherwise. Stored as an attribute of token maps only.
    """

    alias: str
    node: str
    dim: int
    pooling: str
    map_shape: tuple[int, ...]
    post_relu: bool
    prefix_tokens: int = 0


def pooled_dim(map_shape: tuple[int, ...], pooling: str) -> int:
    """Feature dimension D of a per-sample map of shape ``map_shape`` after ``pooling``.

    Parameters
    ----------
    map_shape : tuple of int
        (C, H, W) of a conv map, (N, C) of a token map, or (C,) of a flat output.
    pooling : str
        ``avg`` / ``max`` (and ``cls`` of tokens): D = C; ``avg2x2`` (a 2x2
        spatial pyramid level): D = 4C; ``none``: D = C*H*W or N*C (the whole map).

    Returns
    -------
    int
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {list(POOLINGS)}.")
    if pooling == "none" or len(map_shape) == 1:
        return math.prod(map_shape)
    kind = "tokens" if len(map_shape) == 2 else "conv"
    if pooling not in MAP_POOLINGS[kind]:
        raise ValueError(f"pooling {pooling!r} does not apply to a {kind} map of shape {tuple(map_shape)}; "
                         f"{kind} maps take {list(MAP_POOLINGS[kind])}.")
    channels = int(map_shape[-1] if kind == "tokens" else map_shape[0])
    return 4 * channels if pooling == "avg2x2" else channels


def layer_parts(name: str) -> tuple[str, ...]:
    """The layers a layer name reads: ``("pool",)`` for ``pool``, ``("pool", "block6")`` for ``pool+block6``.

    A fused name (parts joined by :data:`LAYER_SEPARATOR`) means those layers of one store concatenated
    column-wise in that order: (N, D1 + D2 + ...).

    Parameters
    ----------
    name : str
        A layer alias or raw node name, or several joined by ``+``.

    Returns
    -------
    tuple of str
        The parts in order (one for a plain layer name).

    Raises
    ------
    ParamError
        For an empty part (``pool+``, ``pool++block6``) or a part named twice (``pool+pool``).
    """
    parts = tuple(str(name).split(LAYER_SEPARATOR))
    allowed = (f"allowed: one layer name, or several distinct layers of the same backbone joined by "
               f"{LAYER_SEPARATOR!r} (e.g. 'pool{LAYER_SEPARATOR}block6')")
    if any(not part.strip() for part in parts):
        raise ParamError(f"layer {name!r} has an empty part; {allowed}. Hint: remove the stray {LAYER_SEPARATOR!r} "
                         "(and any spaces around the layer names).")
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise ParamError(f"layer {name!r} names {repeated} more than once; {allowed}. Hint: list each layer once.")
    return parts


def canonical_json(obj: Mapping[str, Any]) -> str:
    """Serialise a config mapping deterministically (sorted keys, no spaces).

    Parameters
    ----------
    obj : mapping
        JSON-serialisable configuration.

    Returns
    -------
    str
        The canonical JSON text, identical for equal configs.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    """Hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
