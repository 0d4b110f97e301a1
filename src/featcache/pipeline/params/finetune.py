"""The ``finetune`` section: the optional end-to-end baseline (``finetune/dvc.yaml``)."""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field, field_validator, model_validator

from featcache.extract.zoo.registry import TIMM_PREFIX, UnknownNameError, get_backbone
from featcache.finetune.config import MODES, PARAMS_DEFAULTS, FinetuneConfig
from featcache.heads.metrics import SELECTION_METRICS
from featcache.pipeline.params.base import Strict
from featcache.pipeline.params.extract import check_weights_name
from featcache.util.names import did_you_mean

__all__ = ["FinetuneParams", "check_finetune_backbone_key"]


def _finetune_config(values: Mapping[str, Any], where: str) -> FinetuneConfig:
    """:class:`~featcache.finetune.config.FinetuneConfig` of params values; errors name ``where``."""
    allowed = FinetuneConfig.setting_names()
    unknown = [key for key in values if key not in allowed and key != "mode"]
    prefix = f"{where}: " if where else ""
    if unknown:
        hints = ", ".join(f"{key!r}{did_you_mean(key, allowed, template=' (did you mean {!r}?)')}" for key in unknown)
        raise ValueError(f"{prefix}unknown setting(s) {hints}; allowed: {', '.join(allowed)}")
    try:
        return FinetuneConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{prefix}{error}") from None


class FinetuneParams(Strict):
    """The optional end-to-end fine-tuning baseline.

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
    modes: dict[Literal[MODES], dict[str, Any] | None] = Field(  # type: ignore[valid-type]
        default_factory=lambda: {"frozen": {"epochs": 10, "lr": 0.01, "random_resized_crop": False},
                                 "low_lr": {"epochs": 4}, "unfreeze": {"epochs": 5},
                                 "scratch": {"epochs": 6, "lr": 0.003, "freeze_bn": False}})

    @classmethod
    def misplaced_key_hint(cls, key: str) -> str:
        """Where an unknown key of this section goes when it is a fine-tuning setting (``finetune.epochs``)."""
        if key in FinetuneConfig.setting_names():
            return (f" {key!r} is a fine-tuning setting: put it under finetune.defaults (every mode) or "
                    f"finetune.modes.<mode> (one mode).")
        return ""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        try:
            get_backbone(value)  # a registry name or timm/<model>
        except UnknownNameError as error:
            raise ValueError(f"{error} Fine-tuning takes a registry name or a timm model by its name: "
                             f"finetune.backbone: {TIMM_PREFIX}<model>.") from None
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        return check_weights_name(value)

    @field_validator("modes", mode="before")
    @classmethod
    def _known_modes(cls, value: Any) -> Any:
        for mode in value if isinstance(value, Mapping) else ():
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}.{did_you_mean(str(mode), MODES)} Allowed: "
                                 f"{', '.join(MODES)} (featcache.finetune.config.MODES).")
        return value

    @field_validator("defaults")
    @classmethod
    def _full_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        merged = {**PARAMS_DEFAULTS, **value}
        _finetune_config(merged, "")
        return merged

    @model_validator(mode="after")
    def _valid_modes(self) -> "FinetuneParams":
        for mode in self.modes:
            self.settings(mode)
        return self

    def check_task(self, task: str) -> None:
        """Fail on a mode whose ``selection_metric`` is not a metric of ``task`` (the data's).

        Raises
        ------
        ValueError
            ``"finetune.modes.low_lr: selection_metric 'rmse' is not a classification metric; ..."``.
        """
        allowed = SELECTION_METRICS[task]
        for mode in self.modes:
            metric = self.settings(mode).selection_metric
            if metric is not None and metric not in allowed:
                raise ValueError(f"finetune.modes.{mode}: selection_metric {metric!r} is not a {task} metric; "
                                 f"allowed: {', '.join(allowed)} or null (train.metric). Hint: set it in "
                                 "finetune.defaults or the mode to one of them, or leave it out.")

    def settings(self, mode: str) -> FinetuneConfig:
        """``defaults`` updated with ``modes[mode]``, as the one fine-tuning schema (validated)."""
        overrides = self.modes.get(mode) or {}  # type: ignore[call-overload]
        return _finetune_config({**self.defaults, **overrides, "mode": mode}, f"modes.{mode}")


def check_finetune_backbone_key(raw: Any) -> Any:
    """Name the fix when ``finetune.backbone`` is a ``backbones`` key of a timm model (raw params, unchanged).

    Fine-tuning builds its backbone by name, a registry name or ``timm/<model>``, not from the ``backbones``
    section: a key such as ``convnext`` (``backbones.convnext.model: timm/convnext_tiny``) is refused with the
    value to write instead.

    Raises
    ------
    ValueError
        ``"finetune.backbone 'convnext' is the backbones key of timm model 'timm/convnext_tiny' ..."``.
    """
    if not isinstance(raw, Mapping):
        return raw
    section, backbones = raw.get("finetune"), raw.get("backbones")
    name = section.get("backbone") if isinstance(section, Mapping) else None
    entry = backbones.get(name) if isinstance(backbones, Mapping) and isinstance(name, str) else None
    model = entry.get("model") if isinstance(entry, Mapping) else None
    if isinstance(model, str) and model.startswith(TIMM_PREFIX) and not name.startswith(TIMM_PREFIX):
        raise ValueError(f"finetune.backbone {name!r} is the backbones key of timm model {model!r}; fine-tuning "
                         f"takes the model by its name (the key's weights are not used: finetune.weights are). "
                         f"Hint: set finetune.backbone: {model}")
    return raw
