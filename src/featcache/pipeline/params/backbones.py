"""The sections the extracting commands read, with the registry checks of ``backbones``.

``extract``, ``export-onnx`` and ``onnx-parity`` read ``data``, ``extract`` and
``backbones`` (:class:`ExtractSections`); ``backbones`` is checked against the
backbone registry (known backbones, known layers, ``default`` resolved). The
train stage reads the same sections as plain values, without this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from featcache.extract.zoo.registry import BACKBONES, TIMM_PREFIX, get_backbone, pooling_problem, resolve_layer
from featcache.pipeline.params.base import StageParams, load_sections
from featcache.pipeline.params.data import DataParams
from featcache.pipeline.params.extract import BackboneParams, ExtractParams, default_backbones, merge_run_section

__all__ = ["ExtractSections", "check_backbones", "check_poolings", "load_extract_sections"]


def check_backbones(backbones: dict[str, BackboneParams]) -> dict[str, BackboneParams]:
    """Check every backbone and layer against the registry; ``default`` becomes the registry's default layer.

    A backbone with ``model`` is that timm model (its spec built from timm's facts); a layer of it that is
    no alias (a raw node, ``stages.2.blocks.1``) is checked against the model's graph, traced on the
    ``meta`` device (no weights), only then.

    Raises
    ------
    featcache.extract.zoo.registry.UnknownNameError
        For an unknown backbone, timm model, layer alias or timm graph node (with the valid names and a
        close match).
    ValueError
        For a layer listed twice.
    """
    for name, backbone in backbones.items():
        if backbone.model in BACKBONES:  # timm has models of these names too, with other weights
            raise ValueError(f"backbones.{name}.model: {backbone.model!r} names a backbone of featcache's registry, "
                             f"but model: takes a timm model (timm's own {backbone.model!r} has other weights). "
                             f"Hint: for the registry's, use the key {backbone.model!r} without model:; for timm's, "
                             f"write model: {TIMM_PREFIX}{backbone.model}")
        spec = get_backbone(name, backbone.model)  # raises with the list of valid names
        backbone.layers = [spec.default_layer if layer == "default" else layer for layer in backbone.layers]
        for layer in backbone.layers:
            if layer in spec.layers:
                continue
            if "." not in layer:
                resolve_layer(spec, layer)  # raises with the aliases and a hint
            elif spec.weights.startswith("timm:"):  # a raw node of a timm model: its graph, traced on meta
                from featcache.extract.zoo.timm_models import timm_graph_nodes

                resolve_layer(spec, layer, timm_graph_nodes(spec.arch))
        if len(set(backbone.layers)) != len(backbone.layers):
            raise ValueError(f"backbones.{name}.layers lists a layer twice: {backbone.layers}")
    return backbones


def check_poolings(backbones: dict[str, BackboneParams], pooling: str) -> None:
    """Each backbone's pooling (its own, else ``extract.pooling``) applies to its registry layers.

    ``cls`` needs a token map with a class token, ``avg2x2`` a conv map
    (raw graph nodes are checked by the extractor). Run after :func:`check_backbones`.

    Raises
    ------
    ValueError
        Naming the backbone, the layer, the poolings it takes and the params to change.
    """
    for name, backbone in backbones.items():
        spec = get_backbone(name, backbone.model)
        for layer in backbone.layers:
            problem = pooling_problem(spec, layer, backbone.pooling or pooling)
            if problem is not None:
                raise ValueError(problem)


class ExtractSections(StageParams):
    """``data``, ``extract`` (with ``extract_run``) and ``backbones`` (checked against the registry): what the
    extracting commands read."""

    data: DataParams = DataParams()
    extract: ExtractParams = ExtractParams()
    backbones: dict[str, BackboneParams] = Field(default_factory=default_backbones)

    @model_validator(mode="before")
    @classmethod
    def _run_section(cls, raw: Any) -> Any:
        return merge_run_section(raw)

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, value: dict[str, BackboneParams]) -> dict[str, BackboneParams]:
        return check_backbones(value)

    @model_validator(mode="after")
    def _poolings(self) -> "ExtractSections":
        check_poolings(self.backbones, self.extract.pooling)
        return self


def load_extract_sections(path: str | Path = "params.yaml") -> ExtractSections:
    """Read and validate the sections of ``path`` that the extracting commands read."""
    return load_sections(ExtractSections, path)
