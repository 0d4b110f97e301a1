"""The ``extract``, ``extract_run`` and ``backbones`` sections as plain values, and the config a store records.

``extract`` holds what changes the features; ``extract_run`` (:data:`RUN_SECTION`)
holds how fast they are made (:data:`SPEED_ONLY`). The extract stages of
``dvc.yaml`` track ``extract`` alone, so editing ``extract_run`` reruns nothing;
:func:`merge_run_section` folds it into :class:`ExtractParams`, which holds both.

Nothing here imports the extractor: the value sets come from
:mod:`featcache.store.schema`, so the train stage checks a store's config
against these sections without importing ``featcache.extract``. The registry
checks of ``backbones`` (names, layers) are in :mod:`.backbones`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, ValidationError, field_validator

from featcache.pipeline.params.base import ConfigError, StageParams, Strict, format_validation_error
from featcache.store.schema import (
    AUTOCASTS,
    BACKENDS,
    DECODE_CHOICES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLOCK_ROWS,
    DEFAULT_FEATURE_DTYPE,
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_MAX_IMAGE_PIXELS,
    FEATURE_DTYPES,
    LAYER_SEPARATOR,
    ON_ERROR,
    POOLINGS,
    PRECISIONS,
    RESIZE_MODES,
)
from featcache.util.compute import DEVICES
from featcache.util.names import did_you_mean

__all__ = ["BackboneParams", "ExtractParams", "INT8_GRAPH", "INT8_KNOBS", "RUN_SECTION", "SCHEDULERS", "SPEED_ONLY",
           "WEIGHTS_NAMES", "check_scheduler", "check_weights_name", "configured_backbone", "default_backbones",
           "extraction_config", "merge_run_section", "speed_keys_under_extract", "stored_choices"]

#: Extraction settings that change how fast features are made, never their values: left out of the
#: config a store records (and of its hash), so changing them resumes or reuses a store. Their place in
#: params.yaml is :data:`RUN_SECTION`, which the extract stages do not track (an edit reruns nothing).
SPEED_ONLY = ("batch_size", "num_workers", "block_rows", "device", "malloc_tuning", "scheduler", "n_workers",
              "max_bad_fraction", "onnx_cache")

#: The params.yaml section of the :data:`SPEED_ONLY` keys (``extract`` takes them too, tracked as before).
RUN_SECTION = "extract_run"


#: The knobs of ``precision: int8``; they enter a store's config only for int8 stores.
INT8_KNOBS = ("precision", "int8_calibration", "int8_holdout", "int8_min_cosine")

#: The key of an int8 store's ``extract`` config that names its quantized graph (its sha256, the nodes kept in
#: float32, the manifest it was calibrated on): recorded by the extract stage once the graph is built, read by
#: ``featcache predict --images`` to run that very graph. Float32 stores have none.
INT8_GRAPH = "int8_graph"


class ExtractParams(Strict):
    """How features are extracted (shared by every backbone); ``auto`` is resolved by ``featcache.extract.plan``."""

    #: auto: torch on CUDA, onnxruntime on the CPU, OpenVINO on the CPU for a bf16 autocast it runs natively.
    backend: Literal[BACKENDS] = "auto"  # type: ignore[valid-type]
    device: Literal[DEVICES] = "auto"  # type: ignore[valid-type]
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=4096)
    num_workers: int | Literal["auto"] = "auto"
    dtype: Literal[FEATURE_DTYPES] = DEFAULT_FEATURE_DTYPE  # type: ignore[valid-type]
    pooling: Literal[POOLINGS] = "avg"  # type: ignore[valid-type]
    resize_mode: Literal[RESIZE_MODES] = "crop"  # type: ignore[valid-type]
    channels_last: bool = True
    #: auto: fp16 for torch on CUDA, none (float32) elsewhere; bf16 on the CPU: OpenVINO's bf16 graph.
    autocast: Literal[AUTOCASTS] = "auto"  # type: ignore[valid-type]
    #: Where JPEGs are decoded: ``auto`` = batched on the GPU when torch runs on CUDA, else PIL in
    #: the workers (``cpu``); ``gpu`` forces the device path (on a CPU device too). Stored resolved.
    decode: Literal[DECODE_CHOICES] = "auto"  # type: ignore[valid-type]
    #: float32, or int8: a graph quantized by onnxruntime on the CPU, calibrated on train rows and
    #: checked against float32 on held-out rows (``int8_min_cosine``); see README "int8 on the CPU".
    precision: Literal[PRECISIONS] = "float32"  # type: ignore[valid-type]
    #: int8: train rows that calibrate the activation ranges (a deterministic sample).
    int8_calibration: int = Field(256, ge=1, le=100_000)
    #: int8: held-out rows (val, else train rows outside the calibration sample) of the parity gate.
    int8_holdout: int = Field(256, ge=1, le=100_000)
    #: int8: lowest per-image cosine of int8 vs float32 features on the held-out rows, per layer.
    int8_min_cosine: float = Field(0.99, gt=0, le=1)
    on_error: Literal[ON_ERROR] = "skip"  # type: ignore[valid-type]
    block_rows: int = Field(DEFAULT_BLOCK_ROWS, ge=1)
    malloc_tuning: bool = True
    #: Decompression-bomb guard: images with more pixels (width x height) are reported as bad
    #: (checked from the header, in the decode workers); None disables it. Default: Pillow's limit.
    max_image_pixels: int | None = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    #: A run where every row, or more than this fraction of rows, is a bad image fails (no final store).
    max_bad_fraction: float = Field(DEFAULT_MAX_BAD_FRACTION, ge=0, le=1)
    scheduler: str = Field("none", description="none | local | a dask scheduler address (tcp://host:8786)")
    n_workers: int | Literal["auto"] = Field("auto", description="workers of the local dask cluster "
                                             "(scheduler: local); auto: one per GPU on CUDA, else 2; more "
                                             "workers than GPUs share them")
    onnx_cache: str = Field("auto", min_length=1, description="ONNX export cache: auto ($FEATCACHE_CACHE_DIR/onnx "
                            "or ~/.cache/featcache/onnx) | none | a folder")

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        return check_scheduler(value)

    @field_validator("n_workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError("must be 'auto' or >= 1 (dask worker processes)")
        return value

    def plan_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``featcache.extract.plan.plan_extraction`` that these settings give."""
        return {"device": self.device, "backend": self.backend, "autocast": self.autocast, "decode": self.decode,
                "num_workers": self.num_workers, "scheduler": self.scheduler, "precision": self.precision}


#: The named values of a ``scheduler`` setting (``extract_run``, ``train``); anything else is a scheduler's address.
SCHEDULERS = ("none", "local")


def check_scheduler(value: str) -> str:
    """``value`` if it is ``none``, ``local`` or a dask scheduler's address: ``extract_run.scheduler`` and
    ``train.scheduler`` (:mod:`featcache.util.dask_client` connects to it).

    Raises
    ------
    ValueError
        Naming what is allowed and a close match.
    """
    if value not in SCHEDULERS and "://" not in value:
        raise ValueError("must be 'none', 'local' or a scheduler address like 'tcp://10.0.0.5:8786'."
                         + did_you_mean(value, SCHEDULERS))
    return value


#: The ``weights`` values that name no file (anything else is the path of a state dict).
WEIGHTS_NAMES = ("pretrained", "random")


def check_weights_name(value: str) -> str:
    """``value`` unless it is a misspelt ``pretrained`` or ``random``: a bare word that names no file.

    A path (with a folder or a suffix, or an existing file) is left to the extractor, which reports a
    missing file; only a word such as ``pretrianed`` is refused here, so ``featcache check`` catches it.

    Raises
    ------
    ValueError
        Naming the value, what ``weights`` takes and the close match.
    """
    if value in WEIGHTS_NAMES or "/" in value or "\\" in value or "." in value or Path(value).expanduser().exists():
        return value
    raise ValueError(f"weights {value!r} is neither {' nor '.join(map(repr, WEIGHTS_NAMES))} nor the path of a "
                     f"weights file.{did_you_mean(value, WEIGHTS_NAMES)} Hint: use one of those words, or a path "
                     "such as /path/to/state_dict.pth.")


class BackboneParams(Strict):
    """One backbone to extract: weights source and layers (``default``: the registry's default layer).

    ``model: timm/<name>[.<tag>]`` makes any timm model the backbone (the key is then only its name);
    ``pooling`` overrides ``extract.pooling`` for this backbone (``cls`` for a ViT beside CNNs).
    """

    model: str | None = Field(None, min_length=1, description="timm/<model>[.<pretrained tag>]: any timm model")
    weights: str = "pretrained"
    layers: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    pooling: Literal[POOLINGS] | None = None  # type: ignore[valid-type]

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        return check_weights_name(value)

    @field_validator("layers")
    @classmethod
    def _single_layers(cls, value: list[str]) -> list[str]:
        for layer in value:
            if LAYER_SEPARATOR in layer:
                parts = [part.strip() for part in layer.split(LAYER_SEPARATOR) if part.strip()]
                raise ValueError(f"{layer!r} is a fused layer name; a backbone extracts single layers (no layer "
                                 f"name has {LAYER_SEPARATOR!r}). Hint: extract {parts} here and fuse them under "
                                 f"features: ({{backbone: ..., layer: {layer}}}).")
        return value


def default_backbones() -> dict[str, BackboneParams]:
    """``backbones`` when params.yaml leaves it out: EfficientNet-Lite0, pretrained, its default layer."""
    return {"efficientnet_lite0": BackboneParams()}


def configured_backbone(params: Any, backbone: str) -> Any:
    """``params.backbones[backbone]``.

    Raises
    ------
    ConfigError
        If ``backbone`` is not a key of ``params.backbones`` (a ``--backbone`` the params file does not
        configure), naming the configured ones, the close match and how to add it.
    """
    if backbone not in params.backbones:
        configured = list(params.backbones)
        raise ConfigError(f"Backbone {backbone!r} is not configured in params.backbones (configured: "
                          f"{', '.join(configured) or 'none'}).{did_you_mean(backbone, configured)} Hint: pass one "
                          f"of those as --backbone, or add `{backbone}: {{weights: pretrained}}` under backbones: in "
                          "the params file (`featcache backbones` lists the registered models).")
    return params.backbones[backbone]


def extraction_config(params: Any, backbone: str) -> dict[str, Any]:
    """Every param that changes the features of one backbone, as the store's ``config`` records it.

    The extract stage adds what the plan resolved (``backend``, ``autocast``,
    a ``gpu`` decode path) and the backbone's preprocessing.

    Parameters
    ----------
    params : object with ``data``, ``extract`` and ``backbones``
        Validated sections (a stage's sections or the whole params).
    backbone : str
        A key of ``params.backbones``.
    """
    data, backbone_params = params.data, configured_backbone(params, backbone)
    knobs = params.extract.model_dump()
    for key in SPEED_ONLY:
        knobs.pop(key)
    # The decode path depends on the machine (auto): the plan records the resolved path, and only
    # when it is not the original CPU path. backend/autocast likewise are recorded resolved.
    for key in ("decode", "backend", "autocast"):
        knobs.pop(key)
    # Params added later enter the hash only when set to a non-default value, so feature files
    # extracted before they existed stay valid.
    if knobs.get("max_image_pixels") == DEFAULT_MAX_IMAGE_PIXELS:
        knobs.pop("max_image_pixels")
    if knobs["precision"] == "float32":  # the int8 knobs change nothing then
        for key in INT8_KNOBS:
            knobs.pop(key)
    data_part: dict[str, Any] = {"name": data.name, "task": data.task}
    if data.classes is not None:
        data_part["classes"] = list(data.classes)  # the label order
    if backbone_params.pooling is not None:
        knobs["pooling"] = backbone_params.pooling
    config = {
        "backbone": backbone,
        "weights": backbone_params.weights,
        "layers": list(backbone_params.layers),
        "extract": knobs,
        "data": data_part,
    }
    if backbone_params.model is not None:  # timm models only: the registry's backbones keep their configs
        config["model"] = backbone_params.model
    return config


def stored_choices(extract: ExtractParams, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The choices a store's config records, as these params ask for them, ``auto`` taken as the store resolved it.

    A store extracted with ``backend: auto`` on a GPU machine is valid for the
    same params on a CPU machine; an explicit setting must match the store.

    Parameters
    ----------
    extract : ExtractParams
    stored : mapping
        The ``extract`` section of the store's config.
    """
    backend = stored.get("backend") if extract.backend == "auto" else extract.backend
    # onnxruntime runs the float32 graph whatever autocast asks for (the plan records "none" there), and OpenVINO
    # runs it where the CPU has no native bf16/fp16.
    autocast = stored.get("autocast") if extract.autocast == "auto" or backend == "onnx" else extract.autocast
    if backend == "openvino" and stored.get("autocast") == "none":
        autocast = "none"
    choices: dict[str, Any] = {"backend": backend, "autocast": autocast}
    if "torch_threads" in stored:  # torch on the CPU: the thread count the store was made with (any is valid)
        choices["torch_threads"] = stored["torch_threads"]
    if stored.get("decode") == "gpu":  # features of either decode path are valid for the same params
        choices["decode"] = "gpu"
    if INT8_GRAPH in stored:  # int8: the graph the store's extraction quantized and gated (any is valid)
        choices[INT8_GRAPH] = stored[INT8_GRAPH]
    return choices


class _RunSection(StageParams):
    """The values of ``extract_run``, validated as ``ExtractParams`` fields (errors name ``extract_run.<key>``)."""

    extract_run: ExtractParams


def merge_run_section(raw: Any) -> Any:
    """``raw`` (a parsed params file) with the keys of ``extract_run`` moved under ``extract``.

    The pydantic models hold one :class:`ExtractParams`; this is how both
    sections of the file reach it. ``raw`` is returned unchanged when it has no
    ``extract_run`` (or is not a mapping: the model reports that).

    Raises
    ------
    ValueError
        For a key of ``extract_run`` that is not one of :data:`SPEED_ONLY` (a
        key that changes the features belongs under ``extract``), a key set in
        both sections, or an invalid value (named ``extract_run.<key>``).
    """
    if not isinstance(raw, Mapping) or RUN_SECTION not in raw:
        return raw
    run, extract = raw[RUN_SECTION] or {}, raw.get("extract") or {}
    if not isinstance(run, Mapping) or not isinstance(extract, Mapping):
        bad, value = (RUN_SECTION, run) if not isinstance(run, Mapping) else ("extract", extract)
        raise ValueError(f"{bad} must be a mapping of keys to values, got {value!r}.")
    for key in run:
        if key not in SPEED_ONLY:
            hint = (f" It changes the features, so it belongs under extract (extract.{key})."
                    if key in ExtractParams.model_fields else did_you_mean(str(key), SPEED_ONLY))
            raise ValueError(f"unknown key '{RUN_SECTION}.{key}'.{hint} Allowed keys here (they change how fast "
                             f"features are made, never their values): {', '.join(SPEED_ONLY)}")
        if key in extract:
            raise ValueError(f"{key} is set twice: extract.{key} = {extract[key]!r} and {RUN_SECTION}.{key} = "
                             f"{run[key]!r}. Hint: keep {RUN_SECTION}.{key} (an edit there reruns no extraction) "
                             f"and delete extract.{key}.")
    try:
        _RunSection.model_validate({RUN_SECTION: dict(run)})
    except ValidationError as error:
        raise ValueError(format_validation_error(error, _RunSection).removeprefix("Invalid params:\n- ")) from None
    merged = {key: value for key, value in raw.items() if key != RUN_SECTION}
    merged["extract"] = {**extract, **run}
    return merged


def speed_keys_under_extract(raw: Any) -> list[str]:
    """The :data:`SPEED_ONLY` keys a parsed params file sets under ``extract`` (tracked there: an edit reruns it)."""
    extract = raw.get("extract") if isinstance(raw, Mapping) else None
    return [key for key in SPEED_ONLY if isinstance(extract, Mapping) and key in extract]
