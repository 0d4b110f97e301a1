"""The whole ``params.yaml``: every section validated together (``featcache check`` and the Python API).

Each section has its own schema module under :mod:`featcache.pipeline.params`;
a stage validates only the sections it reads (its
:class:`~featcache.pipeline.params.base.StageParams`), so editing a head does
not touch what the extract stage imports. :class:`Params` adds the
cross-section checks (features that name extracted layers, head sections)
and is what :func:`load_params` returns; every stage function accepts it.

A feature's layer may be fused, ``pool+block6`` (:func:`featcache.store.schema.layer_parts`): heads train
on those layers of the backbone's store side by side, each of which must be in the backbone's
``layers``. Layers of different backbones are not fused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pydantic import Field, field_validator, model_validator

from featcache.errors import ParamError
from featcache.pipeline.params.backbones import check_backbones, check_poolings
from featcache.pipeline.params.base import Strict, read_params_file, validate_sections
from featcache.pipeline.params.data import DataParams
from featcache.pipeline.params.extract import BackboneParams, ExtractParams, default_backbones, merge_run_section
from featcache.pipeline.params.finetune import FinetuneParams, check_finetune_backbone_key
from featcache.pipeline.params.train import (
    FeatureRef,
    TrainParams,
    check_dask_heads,
    check_heads_sections,
    check_train_metric,
)
from featcache.store.schema import LAYER_SEPARATOR, layer_parts
from featcache.util.names import did_you_mean

__all__ = ["Params", "check_feature_layer", "load_params", "parse_params"]


def check_feature_layer(index: int, feature: FeatureRef, layers: list[str]) -> None:
    """``features[index].layer``, or each part of a fused ``a+b`` layer, is one of the backbone's ``layers``.

    Parameters
    ----------
    index : int
        The feature's position in ``features`` (for the message).
    feature : FeatureRef
        Its backbone and layer.
    layers : list of str
        ``backbones.<feature.backbone>.layers`` (``default`` already resolved).

    Raises
    ------
    ValueError
        Naming the layer (the missing part of a fused one), the backbone's layers and a close match.
    """
    try:
        parts = layer_parts(feature.layer)
    except ParamError as exc:
        raise ValueError(f"features[{index}].{exc}") from None
    missing = [part for part in parts if part not in layers]
    if not missing:
        return
    what = (f"features[{index}].layer {feature.layer!r} is not extracted for {feature.backbone!r}" if len(parts) == 1
            else f"features[{index}].layer {feature.layer!r} fuses {missing}, not extracted for "
                 f"{feature.backbone!r}")
    fused = (f" A fused layer joins layers of this one backbone with {LAYER_SEPARATOR!r}; layers of different "
             "backbones are not fused." if len(parts) > 1 else "")
    raise ValueError(f"{what} (backbones.{feature.backbone}.layers = {layers}).{did_you_mean(missing[0], layers)}"
                     f" Hint: add {'it' if len(missing) == 1 else 'them'} to those layers or remove the "
                     f"feature.{fused}")


class Params(Strict):
    """The whole ``params.yaml`` (``extract_run`` folded into :attr:`extract`: :func:`merge_run_section`)."""

    data: DataParams = DataParams()
    extract: ExtractParams = ExtractParams()
    backbones: dict[str, BackboneParams] = Field(default_factory=default_backbones)
    features: list[FeatureRef] = Field(default_factory=list)
    train: TrainParams = TrainParams()
    heads: dict[str, dict[str, Any]] = Field(default_factory=dict)
    finetune: FinetuneParams = FinetuneParams()

    @model_validator(mode="before")
    @classmethod
    def _run_section(cls, raw: Any) -> Any:
        return merge_run_section(check_finetune_backbone_key(raw))

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, value: dict[str, BackboneParams]) -> dict[str, BackboneParams]:
        return check_backbones(value)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        check_poolings(self.backbones, self.extract.pooling)
        for index, feature in enumerate(self.features):
            if feature.backbone not in self.backbones:
                raise ValueError(f"features[{index}].backbone {feature.backbone!r} is not configured under "
                                 f"backbones (configured: {list(self.backbones)})")
            check_feature_layer(index, feature, self.backbones[feature.backbone].layers)
        check_heads_sections(self.heads, self.data.task)
        check_train_metric(self.train.metric, self.data.task)
        check_dask_heads(self.heads, self.train, self.data.task)
        self.finetune.check_task(self.data.task)
        if not self.features:
            self.features = [FeatureRef(backbone=name, layer=layer)
                             for name, backbone in self.backbones.items() for layer in backbone.layers]
        return self


def parse_params(raw: Mapping[str, Any] | None) -> Params:
    """Validate a whole params mapping.

    Parameters
    ----------
    raw : mapping or None
        The parsed YAML of a ``params.yaml`` (None: an empty file).

    Returns
    -------
    Params
        The validated sections, defaults filled in.

    Raises
    ------
    ConfigError
        Listing every invalid key with the value and the allowed values.
    """
    return validate_sections(Params, raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole ``params.yaml``.

    Parameters
    ----------
    path : path
        The params file.

    Returns
    -------
    Params
        As :func:`parse_params`.

    Raises
    ------
    ConfigError
        For a file that is missing or not YAML, or as :func:`parse_params`.
    """
    return parse_params(read_params_file(path))
