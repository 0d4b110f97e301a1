"""Model surgery: a registry backbone with a new output layer, and the weight-copy report.

The classifier that is replaced is the registry's
:attr:`~featcache.extract.zoo.registry.BackboneSpec.classifier`. Weights are copied
with :func:`load_weights_with_report` (the Chainer ``copy_model`` lesson): a
tensor is copied only when its name and shape match, and everything that is
not copied is listed, so a 1000-class head that meets a 10-class model is
reported and left freshly initialised, never half-loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcache.extract.zoo.registry import BackboneSpec, get_backbone
from featcache.extract.zoo.weights import load_backbone
from featcache.util.atomic import write_json
from featcache.util.checks import check_int

__all__ = [
    "WeightCopyReport",
    "build_model",
    "build_with_original_head",
    "load_checkpoint",
    "load_weights_with_report",
    "original_head",
    "replace_head",
]

logger = logging.getLogger(__name__)


def replace_head(model: nn.Module, spec: BackboneSpec, n_outputs: int) -> tuple[nn.Module, list[str]]:
    """Swap the classifier for a new, freshly initialised ``nn.Linear`` with ``n_outputs`` outputs.

    Parameters
    ----------
    model : nn.Module
        A registry architecture (changed in place).
    spec : BackboneSpec
        Its registry entry (``spec.classifier`` names the layer).
    n_outputs : int
        K classes, or 1 for regression.

    Returns
    -------
    model : nn.Module
        The same object, with the new head.
    head_param_names : list of str
        Names of the new head's parameters (``["fc.weight", "fc.bias"]``).
    """
    check_int("n_outputs", n_outputs, 1)
    name = spec.classifier
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{spec.name}: expected nn.Linear at {name!r}, found {type(old).__name__}.")
    new = nn.Linear(old.in_features, n_outputs, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if hasattr(model, "num_classes"):
        model.num_classes = n_outputs  # timm bookkeeping
    return model, [f"{name}.{param}" for param, _ in new.named_parameters()]


@dataclass
class WeightCopyReport:
    """What :func:`load_weights_with_report` copied and what it left alone.

    Attributes
    ----------
    copied : list of str
        Model tensors overwritten from the source (name and shape matched).
    skipped_shape_mismatch : dict
        name -> ``{"source": shape, "model": shape}``; the model keeps its own tensor.
    skipped_module_mismatch : list of str
        Tensors whose name and shape match but whose module has a mismatched
        sibling (e.g. a head with the same width but another class count): the
        whole module keeps its initialisation, so nothing is half-loaded.
    skipped_name_missing : list of str
        Source tensors with no tensor of that name in the model.
    missing_in_source : list of str
        Model tensors the source lacks (kept as initialised).
    source : str
        Where the weights came from (a weights id).
    """

    copied: list[str] = field(default_factory=list)
    skipped_shape_mismatch: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    skipped_module_mismatch: list[str] = field(default_factory=list)
    skipped_name_missing: list[str] = field(default_factory=list)
    missing_in_source: list[str] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (with counts)."""
        out = dataclasses.asdict(self)
        out["counts"] = {key: len(value) for key, value in out.items() if isinstance(value, (list, dict))}
        return out

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return write_json(path, self.to_dict())

    @property
    def not_copied(self) -> list[str]:
        """Every model tensor that kept its initialisation."""
        return sorted([*self.skipped_shape_mismatch, *self.skipped_module_mismatch, *self.missing_in_source])

    def __str__(self) -> str:
        summary = (f"Weight copy from {self.source or 'state dict'}: {len(self.copied)} tensors copied, "
                   f"{len(self.skipped_shape_mismatch)} shape-mismatched, "
                   f"{len(self.skipped_module_mismatch)} skipped with a mismatched module, "
                   f"{len(self.skipped_name_missing)} not in the model, "
                   f"{len(self.missing_in_source)} not in the source.")
        lines = [summary]
        for name, shapes in self.skipped_shape_mismatch.items():
            lines.append(f"  shape mismatch (kept new): {name}: source {tuple(shapes['source'])} "
                         f"-> model {tuple(shapes['model'])}")
        for title, names in (("module mismatch (kept new)", self.skipped_module_mismatch),
                             ("not in the model", self.skipped_name_missing),
                             ("not in the source (kept new)", self.missing_in_source)):
            shown = ", ".join(names[:8]) + (f", ... (+{len(names) - 8})" if len(names) > 8 else "")
            if names:
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)


def load_weights_with_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                             source: str = "") -> WeightCopyReport:
    """Copy every source tensor whose name and shape match a model tensor; report the rest.

    A module (the prefix before the last ``.``) is copied all or nothing: if any
    of its tensors has a shape mismatch, none of them is copied, so a layer is
    never half-loaded (Chainer's ``copy_model`` lesson).

    Parameters
    ----------
    model : nn.Module
        Target, changed in place (parameters and buffers).
    state_dict : mapping of str to torch.Tensor
        Source tensors (e.g. a pretrained 1000-class backbone's state dict).
    source : str
        Description stored in the report.

    Returns
    -------
    WeightCopyReport
    """
    target = model.state_dict()
    report = WeightCopyReport(source=source)
    bad_modules = set()
    for name, tensor in target.items():
        if name in state_dict and tuple(state_dict[name].shape) != tuple(tensor.shape):
            report.skipped_shape_mismatch[name] = {"source": list(state_dict[name].shape),
                                                   "model": list(tensor.shape)}
            bad_modules.add(name.rpartition(".")[0])
    with torch.no_grad():
        for name, tensor in target.items():
            if name in report.skipped_shape_mismatch:
                continue
            if name not in state_dict:
                report.missing_in_source.append(name)
            elif name.rpartition(".")[0] in bad_modules:
                report.skipped_module_mismatch.append(name)
            else:
                tensor.copy_(state_dict[name])
                report.copied.append(name)
    report.skipped_name_missing = [name for name in state_dict if name not in target]
    logger.info("%s", report)
    return report


def build_model(backbone: str, n_outputs: int, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The registry architecture (random weights) with a new ``n_outputs`` head.

    Returns
    -------
    model : nn.Module
    head_param_names : list of str
    """
    model, head_names, _ = build_with_original_head(get_backbone(backbone), n_outputs, seed)
    return model, head_names


def build_with_original_head(spec: BackboneSpec, n_outputs: int, seed: int
                             ) -> tuple[nn.Module, list[str], dict[str, torch.Tensor]]:
    """Random architecture + new head; also returns the architecture's own (seeded random) head."""
    loaded = load_backbone(spec.name, "random", seed=seed)
    head = original_head(spec, loaded.model)
    model, head_names = replace_head(loaded.model, spec, n_outputs)
    if spec.arch == "googlenet":
        model.transform_input = True  # as load_backbone sets for any non-random weights file
    return model, head_names, head


def load_checkpoint(path: str | Path, backbone: str, n_outputs: int) -> nn.Module:
    """Rebuild a fine-tuned model from its state-dict checkpoint (``weights_only=True``), in eval mode."""
    model, _ = build_model(backbone, n_outputs)
    model.load_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def original_head(spec: BackboneSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the classifier tensors of ``model`` (``{"fc.weight": ..., "fc.bias": ...}``)."""
    prefix = spec.classifier + "."
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}
