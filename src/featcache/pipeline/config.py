"""Typed, strict configuration: ``params.yaml`` parsed and checked before any work.

Every section is a pydantic model with ``extra="forbid"``, so an unknown or
mistyped key fails at once with the key, the allowed keys and a close match.
Cross-field checks (layers that exist, heads that exist, features that name
configured backbones) run here too. The library never reads ``params.yaml``:
stages call :func:`load_params` and pass plain values on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from featcache.errors import UserError
from featcache.extract.backends import AUTOCASTS, BACKENDS
from featcache.extract.decode.preprocess import DEFAULT_MAX_IMAGE_PIXELS, RESIZE_MODES
from featcache.extract.zoo.registry import UnknownNameError, get_backbone, list_backbones, resolve_layer
from featcache.finetune.config import MODES as FINETUNE_MODES
from featcache.finetune.config import PARAMS_DEFAULTS as FINETUNE_PARAMS_DEFAULTS
from featcache.finetune.config import FinetuneConfig
from featcache.store.schema import FEATURE_DTYPES, POOLINGS, TASKS
from featcache.util.compute import DEVICES
from featcache.util.names import did_you_mean

__all__ = ["Params", "FinetuneParams", "FINETUNE_MODES", "DataParams", "ExtractParams", "BackboneParams", "FeatureRef", "TrainParams",
           "ConfigError", "load_params", "parse_params", "extraction_config", "expected_config",
           "planned_decode", "resolved_choices"]


class ConfigError(UserError, ValueError):
    """``params.yaml`` is invalid; the message names the key, value and allowed values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SplitRatios(_Strict):
    """Fractions of rows per split (must sum to 1; ``val`` may be 0)."""

    train: float = Field(0.6, gt=0, le=1)
    val: float = Field(0.2, ge=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitRatios":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios train+val+test must sum to 1, got {total:g} "
                             f"({self.train:g}+{self.val:g}+{self.test:g})")
        return self


class DataParams(_Strict):
    """Where the images come from and how they are split."""

    name: str = Field("digits", pattern=r"^[A-Za-z0-9_.-]+$")
    source: Literal["folder", "csv"] = "folder"
    path: str = "data/digits"
    csv: str = "labels.csv"
    task: Literal[TASKS] = "classification"  # type: ignore[valid-type]
    split: SplitRatios = SplitRatios()
    seed: int = 0
    #: Explicit class list; its order defines the label indices. Labels outside it, and listed classes
    #: without images, are errors. None: every non-empty class folder / CSV label, sorted.
    classes: list[str] | None = Field(None, min_length=1)

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        stripped = [name.strip() for name in value]
        if any(not name for name in stripped):
            raise ValueError(f"data.classes has an empty class name: {value}")
        dupes = sorted({name for name in stripped if stripped.count(name) > 1})
        if dupes:
            raise ValueError(f"data.classes lists {dupes} more than once: {value}")
        return stripped

    @model_validator(mode="after")
    def _classes_need_classification(self) -> "DataParams":
        if self.classes is not None and self.task != "classification":
            raise ValueError(f"data.classes is only for classification (data.task is {self.task!r}); remove it")
        return self


class ExtractParams(_Strict):
    """How features are extracted (shared by every backbone)."""

    #: auto (params.yaml's default): torch on CUDA, onnxruntime on CPU (featcache.extract.backends).
    backend: Literal[BACKENDS] = "torch"  # type: ignore[valid-type]
    device: Literal[DEVICES] = "auto"  # type: ignore[valid-type]
    batch_size: int = Field(64, ge=1, le=4096)
    num_workers: int | Literal["auto"] = "auto"
    dtype: Literal[FEATURE_DTYPES] = "float16"  # type: ignore[valid-type]
    pooling: Literal[POOLINGS] = "avg"  # type: ignore[valid-type]
    resize_mode: Literal[RESIZE_MODES] = "crop"  # type: ignore[valid-type]
    channels_last: bool = True
    autocast: Literal[AUTOCASTS] = "none"  # type: ignore[valid-type]  # auto: fp16 on CUDA (torch), none on CPU
    #: Where JPEGs are decoded: ``auto`` = batched on the GPU when the runner is on CUDA, else PIL in
    #: the workers (``cpu``); ``gpu`` forces the device path (on a CPU device too). Stored resolved.
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    on_error: Literal["skip", "fail"] = "skip"
    block_rows: int = Field(512, ge=1)
    malloc_tuning: bool = True
    #: Decompression-bomb guard: images with more pixels (width x height) are reported as bad
    #: (checked from the header, in the decode workers); None disables it. Default: Pillow's limit.
    max_image_pixels: int | None = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    #: A run where every row, or more than this fraction of rows, is a bad image fails (no final store).
    max_bad_fraction: float = Field(0.5, ge=0, le=1)
    scheduler: str = Field("none", description="none | local | a dask scheduler address (tcp://host:8786)")
    n_workers: int | Literal["auto"] = Field("auto", description="workers of the local dask cluster "
                                             "(scheduler: local); auto: one per GPU on CUDA, else 2")
    onnx_cache: str = Field("auto", min_length=1, description="ONNX export cache: auto ($FEATCACHE_CACHE_DIR/onnx "
                            "or ~/.cache/featcache/onnx) | none | a folder")

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        if value not in ("none", "local") and "://" not in value:
            raise ValueError(f"extract.scheduler must be 'none', 'local' or a scheduler address like "
                             f"'tcp://10.0.0.5:8786', got {value!r}")
        return value

    @field_validator("n_workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError(f"extract.n_workers must be 'auto' or >= 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _distributed_decode(self) -> "ExtractParams":
        if self.scheduler != "none" and self.decode == "gpu":
            raise ValueError("extract.decode: gpu does not run under extract.scheduler (the dask workers decode "
                             "with PIL); set extract.decode: auto or cpu, or extract.scheduler: none")
        return self


class BackboneParams(_Strict):
    """One backbone to extract: weights source and layers."""

    weights: str = "pretrained"
    layers: list[str] = Field(default_factory=lambda: ["default"], min_length=1)


class FeatureRef(_Strict):
    """One (backbone, layer) pair that heads are trained on."""

    backbone: str
    layer: str


class TrainParams(_Strict):
    """Which heads run and how they are scored."""

    heads: list[str] = Field(default_factory=lambda: ["logreg", "lightgbm", "mlp"], min_length=1)
    n_boot: int = Field(1000, ge=0)
    seed: int = 0

    @field_validator("heads")
    @classmethod
    def _known_heads(cls, value: list[str]) -> list[str]:
        from featcache.heads.registry import head_names  # the one table of head names

        allowed = head_names()
        for name in value:
            if name not in allowed:
                raise ValueError(f"unknown head {name!r}; allowed: {', '.join(allowed)}.{did_you_mean(name, allowed)}")
        return value


class FinetuneParams(_Strict):
    """The optional end-to-end fine-tuning baseline (``finetune/dvc.yaml``).

    ``defaults`` apply to every mode; ``modes`` lists the modes that run (mode ->
    overrides of ``defaults``, any :class:`~featcache.finetune.config.FinetuneConfig`
    setting; ``defaults`` missing a setting take :data:`~featcache.finetune.config.PARAMS_DEFAULTS`,
    then the API's defaults).
    """

    backbone: str = "efficientnet_lite0"
    weights: str = "pretrained"
    export_onnx: bool = True
    cam_images: int = Field(4, ge=0, le=64)
    defaults: dict[str, Any] = Field(default_factory=dict)
    modes: dict[Literal[FINETUNE_MODES], dict[str, Any] | None] = Field(  # type: ignore[valid-type]
        default_factory=lambda: {"frozen": {"epochs": 10, "lr": 0.01, "random_resized_crop": False},
                                 "low_lr": {"epochs": 4}, "unfreeze": {"epochs": 5},
                                 "scratch": {"epochs": 6, "lr": 0.003, "freeze_bn": False}})

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        get_backbone(value)  # raises with the list of valid names
        return value

    @field_validator("defaults")
    @classmethod
    def _full_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        merged = {**FINETUNE_PARAMS_DEFAULTS, **value}
        _finetune_config(merged, "")
        return merged

    @model_validator(mode="after")
    def _valid_modes(self) -> "FinetuneParams":
        for mode in self.modes:
            self.settings(mode)
        return self

    def settings(self, mode: str) -> FinetuneConfig:
        """``defaults`` updated with ``modes[mode]``, as the one fine-tuning schema (validated)."""
        overrides = self.modes.get(mode) or {}  # type: ignore[call-overload]
        return _finetune_config({**self.defaults, **overrides, "mode": mode}, f"modes.{mode}")


def _finetune_config(values: Mapping[str, Any], where: str) -> FinetuneConfig:
    """:class:`~featcache.finetune.config.FinetuneConfig` of params values; errors name ``where``."""
    allowed = FinetuneConfig.setting_names()
    unknown = [key for key in values if key not in allowed and key != "mode"]
    if unknown:
        hints = ", ".join(f"{key!r}{did_you_mean(key, allowed, template=' (did you mean {!r}?)')}" for key in unknown)
        raise ValueError(f"{where}{': ' if where else ''}unknown setting(s) {hints}; allowed: {', '.join(allowed)}")
    try:
        return FinetuneConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{where}{': ' if where else ''}{error}") from None


class Params(_Strict):
    """The whole ``params.yaml``."""

    data: DataParams = DataParams()
    extract: ExtractParams = ExtractParams()
    backbones: dict[str, BackboneParams] = Field(default_factory=lambda: {"efficientnet_lite0": BackboneParams()})
    features: list[FeatureRef] = Field(default_factory=list)
    train: TrainParams = TrainParams()
    heads: dict[str, dict[str, Any]] = Field(default_factory=dict)
    finetune: FinetuneParams = FinetuneParams()

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, value: dict[str, BackboneParams]) -> dict[str, BackboneParams]:
        for name, backbone in value.items():
            spec = get_backbone(name)  # raises with the list of valid names
            backbone.layers = [spec.default_layer if layer == "default" else layer for layer in backbone.layers]
            for layer in backbone.layers:
                if layer not in spec.layers and "." not in layer:
                    resolve_layer(name, layer)  # raises with the aliases and a hint
            if len(set(backbone.layers)) != len(backbone.layers):
                raise ValueError(f"backbones.{name}.layers lists a layer twice: {backbone.layers}")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        for index, feature in enumerate(self.features):
            if feature.backbone not in self.backbones:
                raise ValueError(f"features[{index}].backbone {feature.backbone!r} is not configured under "
                                 f"backbones (configured: {list(self.backbones)})")
            layers = self.backbones[feature.backbone].layers
            if feature.layer not in layers:
                raise ValueError(f"features[{index}].layer {feature.layer!r} is not extracted for "
                                 f"{feature.backbone!r} (backbones.{feature.backbone}.layers = {layers}). "
                                 "Hint: add it to those layers or remove the feature.")
        from featcache.heads.registry import check_head_params, task_params

        for name, section in self.heads.items():  # one section serves both tasks' twins; no head is imported
            check_head_params(name, self.data.task, task_params(name, self.data.task, section))  # names bad keys
        return self


def _format_validation_error(error: ValidationError, raw: Mapping[str, Any]) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            parent = item["loc"][:-1]
            model = _model_at(parent)
            allowed = list(model.model_fields) if model is not None else []
            hint = did_you_mean(item["loc"][-1], allowed)
            lines.append(f"- unknown key {key!r}.{hint} Allowed keys here: {', '.join(allowed)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = f" (got {item.get('input')!r})" if item["loc"] else ""
            lines.append(f"- {key or 'params'}: {message}{got}")
    return "Invalid params:\n" + "\n".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` (to list its allowed keys)."""
    model: Any = Params
    skip_key = False
    for part in loc:
        if isinstance(part, int) or skip_key:  # list index or a dict key (backbone name)
            skip_key = False
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif args and isinstance(args[-1], type) and issubclass(args[-1], BaseModel):
            model = args[-1]  # dict[str, Model] or list[Model]
            skip_key = getattr(annotation, "__origin__", None) is dict
        else:
            return None
    return model


def parse_params(raw: Mapping[str, Any] | None) -> Params:
    """Validate a params mapping.

    Raises
    ------
    ConfigError
        Listing every invalid key with the value and the allowed values.
    """
    raw = dict(raw or {})
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, raw)) from None
    except (UnknownNameError, ValueError) as error:
        raise ConfigError(f"Invalid params: {error}") from None
    if not params.features:
        params.features = [FeatureRef(backbone=name, layer=layer)
                           for name, backbone in params.backbones.items() for layer in backbone.layers]
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Params file {str(path)!r} not found. Hint: run from the project root.")
    with open(path, encoding="utf-8") as handle:
        return parse_params(yaml.safe_load(handle))


def extraction_config(params: Params, backbone: str) -> dict[str, Any]:
    """Every param that changes the features of one backbone (stored in the HDF5 file)."""
    extract = params.extract.model_dump()
    # Speed-only knobs do not change the features' meaning and are left out of the hash.
    for key in ("batch_size", "num_workers", "block_rows", "device", "malloc_tuning", "scheduler", "n_workers",
                "max_bad_fraction", "onnx_cache"):
        extract.pop(key)
    # The decode path depends on the machine (auto): expected_config records the resolved path,
    # and only when it is not the original CPU path.
    extract.pop("decode")
    # Params added later enter the hash only when set to a non-default value, so feature files
    # extracted before they existed stay valid.
    if extract.get("max_image_pixels") == DEFAULT_MAX_IMAGE_PIXELS:
        extract.pop("max_image_pixels")
    data: dict[str, Any] = {"name": params.data.name, "task": params.data.task}
    if params.data.classes is not None:
        data["classes"] = list(params.data.classes)  # the label order
    return {
        "backbone": backbone,
        "weights": params.backbones[backbone].weights,
        "layers": list(params.backbones[backbone].layers),
        "extract": extract,
        "data": data,
    }


def expected_config(params: Params, backbone: str, decode: str | None = None,
                    stored: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The extraction config that ``params`` give for ``backbone``, as stored in its HDF5 file.

    :func:`extraction_config` plus the backbone's preprocessing, the resolved backend and
    autocast, and the decode path; the extract stage writes it and the train stage checks
    a store against it. ``auto`` backend and autocast are stored as what they resolve to
    (:func:`resolved_choices`), so a store says what ran and a store made by another
    runtime is never resumed or reused.

    Parameters
    ----------
    decode : {"cpu", "gpu"}, optional
        The decode path to record; default: :func:`planned_decode` on this machine (which
        may import torch). The train stage passes the store's own path: features of either
        path are valid for the same params.
    stored : mapping, optional
        The ``extract`` section of a store's config (the train stage): an ``auto`` backend or
        autocast is taken as the store resolved it, so a store extracted on a GPU machine is
        valid for the same params on a CPU machine (and nothing here imports torch).
    """
    from featcache.extract.decode.preprocess import Preprocessor

    config = extraction_config(params, backbone)
    knobs, stored = params.extract, stored or {}
    backend, autocast = knobs.backend, knobs.autocast
    if "auto" in (backend, autocast):
        if "backend" in stored and "autocast" in stored:
            backend = stored["backend"] if backend == "auto" else backend
            autocast = stored["autocast"] if autocast == "auto" else autocast
        else:
            _, backend, resolved_autocast = resolved_choices(knobs)
            autocast = resolved_autocast or "none"
    config["extract"].update(backend=backend, autocast=autocast)
    config["preprocess"] = Preprocessor.from_spec(get_backbone(backbone), params.extract.resize_mode).config()
    # A store never mixes blocks decoded by PIL and on the device; the CPU path is left out, as before
    # extract.decode existed.
    if (decode or planned_decode(params)) == "gpu":
        config["extract"]["decode"] = "gpu"
    return config


def planned_decode(params: Params) -> str:
    """Where the extract stage decodes JPEGs with these params on this machine: ``cpu`` or ``gpu``.

    ``extract.decode: auto`` is ``gpu`` when the torch runner is on CUDA (``extract.backend: auto``
    picks torch there); the ONNX runner and the dask scheduler take host batches, so ``cpu`` there.
    """
    knobs = params.extract
    if knobs.decode != "auto":
        return knobs.decode
    if knobs.scheduler != "none" or knobs.backend == "onnx":
        return "cpu"
    from featcache.extract.backends import resolve_backend, resolve_decode
    from featcache.util.compute import resolve_device

    # A plan, not a check: an explicit device is taken as it is (the extract stage validates it).
    device = resolve_device("auto") if knobs.device == "auto" else knobs.device
    backend = resolve_backend(knobs.backend, device)
    return "cpu" if backend != "torch" else resolve_decode("auto", device)


def resolved_choices(knobs: ExtractParams) -> tuple[str, str, str | None]:
    """(device, backend, autocast) that ``extract.device/backend/autocast`` (``auto`` included) give here."""
    from featcache.extract.backends import resolve_autocast, resolve_backend
    from featcache.util.compute import resolve_device

    device = resolve_device(knobs.device, setting="extract.device", error=ConfigError)
    backend = resolve_backend(knobs.backend, device)
    return device, backend, resolve_autocast(knobs.autocast, device, backend)


def known_backbones() -> list[str]:
    """Registry names (for messages)."""
    return list_backbones()
