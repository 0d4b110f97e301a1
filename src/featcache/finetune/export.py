"""Exports of a fine-tuned model: the backbone for the extract stage, and the classifier as ONNX.

:func:`export_backbone` writes the fine-tuned backbone in the registry's own
architecture (original classifier shape) so that
``load_backbone(name, weights=path)`` and therefore the extract stage accept
it; :func:`export_finetuned_onnx` writes the fine-tuned classifier (or
regressor) as ONNX, describing itself in ``metadata_props`` (:data:`MODEL_KEY`:
task, class order, input and the preprocessing that makes it) so that the file
alone is enough to deploy it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import featcache
from featcache.extract.decode.preprocess import preprocess_steps
from featcache.extract.onnx.format import MODEL_KEY, PREPROCESSED_INPUT, model_io
from featcache.extract.zoo.registry import BackboneSpec
from featcache.extract.zoo.weights import load_backbone
from featcache.finetune.model import original_head as head_of
from featcache.finetune.run import FinetuneResult, preprocessor, save_state
from featcache.finetune.saved import SavedRun
from featcache.store.schema import canonical_json
from featcache.util.atomic import atomic_path
from featcache.util.compute import torch_version

__all__ = ["EXPORTERS", "MODEL_KEY", "export_backbone", "export_finetuned_onnx", "model_description",
           "preprocess_steps"]

logger = logging.getLogger(__name__)

#: torch.onnx exporters: the ``torch.export``-based one, or the deprecated TorchScript one.
EXPORTERS: tuple[str, ...] = ("dynamo", "torchscript")

def export_backbone(model: nn.Module, spec: BackboneSpec, path: str | Path,
                    original_head: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the fine-tuned backbone as a state dict that ``load_backbone(name, weights=path)`` loads.

    :func:`~featcache.extract.zoo.weights.load_backbone` loads strictly into the
    registry's architecture, whose classifier has the original shape (1000
    ImageNet classes). The file therefore holds the fine-tuned trunk with the
    *source* classifier put back (``original_head``: the pretrained head for
    transferred weights, the seeded random one for ``scratch``), so every
    trunk alias (``pool``, ``pool5``, ``head``, ...) gives the fine-tuned
    features while the ``logits`` alias keeps meaning ImageNet logits. The
    fine-tuned K-class head lives in the checkpoint (``model.pt``) and the ONNX export.

    Parameters
    ----------
    model : nn.Module
        The fine-tuned model (new head).
    spec : BackboneSpec
        Its registry entry.
    path : path
        Output ``.pt`` file (written atomically).
    original_head : mapping, optional
        ``{"classifier.weight": ..., "classifier.bias": ...}`` in the
        architecture's shape (``FinetuneResult.original_head``); None takes the
        seeded random head of the architecture.

    Returns
    -------
    Path
    """
    head = spec.classifier + "."
    if original_head is None:
        logger.warning("export_backbone: no original head given; writing the architecture's random head.")
        original_head = head_of(spec, load_backbone(spec.name, "random").model)
    expected = {k[len(head):] for k in model.state_dict() if k.startswith(head)}
    given = {k[len(head):] for k in original_head}
    if given != expected:
        raise ValueError(f"original_head has tensors {sorted(original_head)}; expected {head}{sorted(expected)}.")
    state = {}
    for key, value in model.state_dict().items():
        state[key] = original_head[key] if key.startswith(head) else value
    return save_state(state, path)


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the given loggers to WARNING for the duration (the exporter logs every graph pass at INFO)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


class _Scores(nn.Module):
    """Normalised images -> probabilities (classification) or predictions (regression)."""

    def __init__(self, model: nn.Module, task: str, target_mean: float, target_std: float) -> None:
        super().__init__()
        self.model, self.task = model, task
        self.target_mean, self.target_std = float(target_mean), float(target_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if self.task == "classification":
            return out.softmax(dim=1)
        return out[:, 0] * self.target_std + self.target_mean


def model_description(result: FinetuneResult | SavedRun | None, task: str, input_size: int) -> dict[str, Any]:
    """What an exported model is, as its ONNX ``metadata_props[MODEL_KEY]`` records it.

    Parameters
    ----------
    result : FinetuneResult, SavedRun or None
        The run (backbone, weights, class order, preprocessing), in memory or read back from its folder; None
        for a bare model, whose description then holds only what :func:`export_finetuned_onnx` was told.
    task : {"classification", "regression"}
    input_size : int
        S of the (B, 3, S, S) input.

    Returns
    -------
    dict
        ``task``, ``input`` (name, shape, dtype), ``output`` (name, shape, meaning), and for a run
        ``classes`` (the order of the K probabilities; classification), ``backbone``, ``weights_id``,
        ``mode``, ``preprocess`` (resize, crop, interpolation, mean, std: the registry's
        preprocessing at S, as :class:`~featcache.extract.decode.preprocess.Preprocessor` applies it) and
        ``preprocess_steps`` (:func:`preprocess_steps`: how those keys are applied), plus
        ``featcache_version`` and ``torch_version``.
    """
    description: dict[str, Any] = {**model_io(task, input_size), "featcache_version": featcache.__version__,
                                   "torch_version": torch_version()}
    if result is not None:
        preprocess = preprocessor(result.spec, result.config).config()
        description.update(backbone=result.spec.name, weights_id=result.weights_id, mode=result.config.mode,
                           preprocess=preprocess, preprocess_steps=preprocess_steps(str(preprocess["resize_mode"])))
        description["input"]["meaning"] = PREPROCESSED_INPUT
        if task == "classification":
            description["classes"] = list(result.classes)
    return description


def export_finetuned_onnx(result_or_model: FinetuneResult | SavedRun | nn.Module, path: str | Path,
                          input_size: int | None = None, task: str = "classification", target_mean: float = 0.0,
                          target_std: float = 1.0, opset: int = 18, exporter: str = "dynamo") -> Path:
    """Export the fine-tuned classifier (or regressor) to ONNX with a dynamic batch axis.

    The graph takes ``images`` (B, 3, S, S) float32, normalised exactly as
    :class:`~featcache.extract.decode.preprocess.Preprocessor` does, and returns
    ``scores``: (B, K) probabilities, or (B,) predictions in target units.
    The file describes itself in ``metadata_props[MODEL_KEY]`` (:func:`model_description`: the
    class order, the preprocessing, the backbone and weights), readable with onnxruntime's
    ``session.get_modelmeta().custom_metadata_map`` or ``onnx.load(path).metadata_props``.

    Parameters
    ----------
    result_or_model : FinetuneResult, SavedRun or nn.Module
        A run (in memory, or :meth:`SavedRun.load` of its folder) carries task, input size and target scaling
        (and then ``input_size``, ``task``, ``target_mean`` and ``target_std`` are ignored); for a bare model
        pass them.
    path : path
        Output ``.onnx`` file (written atomically).
    input_size : int, optional
        S, the fixed spatial size of the input; needed for a bare model.
    task : {"classification", "regression"}
        Bare model only: ``classification`` applies a softmax to its (B, K)
        logits; ``regression`` takes its first output column (B,) and maps it
        back to target units.
    target_mean, target_std : float
        Bare model, regression only: the prediction is ``out * target_std +
        target_mean`` (the model was trained on standardised targets).
    opset : int
        ONNX opset (>= 18 for ``dynamo``).
    exporter : {"dynamo", "torchscript"}
        torch.onnx exporter: the ``torch.export``-based one (default), or the
        deprecated TorchScript one (faster to export, any opset).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        For a bare model without ``input_size``, or an unknown ``exporter``.
    """
    result: FinetuneResult | SavedRun | None = None
    if isinstance(result_or_model, (FinetuneResult, SavedRun)):
        result = result_or_model
        model, task, input_size = result.model, result.task, result.input_size
        target_mean, target_std = result.target_mean, result.target_std
    else:
        model = result_or_model
    if input_size is None:
        raise ValueError("input_size is needed to export a bare model (the spatial size is fixed at export).")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} is invalid; allowed: 'dynamo', 'torchscript'.")
    wrapper = _Scores(model, task, target_mean, target_std).eval()
    dummy = torch.zeros(2, 3, input_size, input_size)
    with atomic_path(path) as tmp, warnings.catch_warnings(), \
            _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, fallback notices)
        if exporter == "dynamo":
            program = torch.onnx.export(wrapper, (dummy,), dynamo=True, opset_version=opset, verbose=False,
                                        input_names=["images"], output_names=["scores"], optimize=True,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(str(tmp))
        else:
            torch.onnx.export(wrapper, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["scores"],
                              dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}})
        _describe(tmp, model_description(result, task, input_size))
    logger.info("Exported ONNX %s (%s, opset %d)", path, exporter, opset)
    return Path(path)


def _describe(path: Path, description: dict[str, Any]) -> None:
    """Write ``description`` into the ONNX file at ``path`` (``metadata_props[MODEL_KEY]`` and its doc string)."""
    import onnx

    model = onnx.load(str(path))
    props = {prop.key: prop.value for prop in model.metadata_props}
    props[MODEL_KEY] = canonical_json(description)
    onnx.helper.set_model_props(model, props)
    subject = description.get("backbone", "model")
    model.doc_string = f"featcache {featcache.__version__}: fine-tuned {subject} ({description['task']})"
    onnx.save(model, str(path))
