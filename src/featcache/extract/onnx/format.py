"""What a featcache ONNX file is: its opsets, exporters, input name, metadata keys and code version, and how a
self-contained model (images in, scores out) describes its input and outputs.

The facts :mod:`~featcache.extract.onnx.export` writes by and that
:mod:`~featcache.extract.onnx.cache` and
:mod:`~featcache.extract.onnx.runner` read by, in a module that imports
neither torch nor onnx, so reusing a cached export needs neither.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEFAULT_OPSET",
    "DYNAMO_MIN_OPSET",
    "EXPORTERS",
    "EXPORT_CODE_VERSION",
    "EXPORT_KEY",
    "INPUT_NAME",
    "LAYERS_KEY",
    "MIN_OPSET",
    "MODEL_KEY",
    "PREPROCESSED_INPUT",
    "model_io",
    "resolve_exporter",
]

#: Default ONNX opset: the lowest one the torch.export-based exporter emits natively.
DEFAULT_OPSET = 18

#: Lowest opset accepted by :func:`~featcache.extract.onnx.export.export_onnx`.
MIN_OPSET = 13

#: Lowest opset the torch.export-based ("dynamo") exporter can produce.
DYNAMO_MIN_OPSET = 18

#: Allowed values of the ``exporter`` argument.
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")

#: Name of the graph input.
INPUT_NAME = "images"

#: ``metadata_props`` keys written by :func:`~featcache.extract.onnx.export.export_onnx`.
EXPORT_KEY = "featcache_export"
LAYERS_KEY = "featcache_layers"

#: ``metadata_props`` key of a self-contained model's description (canonical JSON): a fine-tuned classifier
#: (:func:`~featcache.finetune.export.model_description`) or a backbone with a trained head
#: (:mod:`~featcache.extract.onnx.serve`).
MODEL_KEY = "featcache_model"

#: The input's meaning in a description that records its ``preprocess`` and ``preprocess_steps``.
PREPROCESSED_INPUT = ("RGB images, preprocessed as `preprocess_steps` say with the values in `preprocess` (in Python: "
                      "featcache.extract.decode.preprocess.Preprocessor.from_config(preprocess))")

#: Version of the graph :func:`~featcache.extract.onnx.export.export_onnx` writes for given inputs: part of
#: the export cache's key (:mod:`featcache.extract.onnx.cache`). Bump it with any change to the export, the
#: truncation of the backbone or the loading of its weights that changes the exported file.
EXPORT_CODE_VERSION = 1


def resolve_exporter(exporter: str, opset: int) -> str:
    """The exporter that ``exporter`` (one of :data:`EXPORTERS`) means for ``opset``; raises ValueError if none."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {EXPORTERS}. Hint: 'auto' picks 'dynamo' for "
                         f"opset >= {DYNAMO_MIN_OPSET} and 'torchscript' below.")
    if exporter == "auto":
        return "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ValueError(f"exporter 'dynamo' cannot produce opset {opset}; it emits opset >= {DYNAMO_MIN_OPSET} "
                         f"(its down-conversion fails on ReduceMean). Hint: use opset >= {DYNAMO_MIN_OPSET} or "
                         "exporter='torchscript'.")
    return exporter


def model_io(task: str, input_size: int) -> dict[str, Any]:
    """The ``task``, ``input`` and ``output`` of a self-contained model's :data:`MODEL_KEY` description.

    Parameters
    ----------
    task : {"classification", "regression"}
    input_size : int
        S of the (B, 3, S, S) float32 input ``images``.

    Returns
    -------
    dict
        ``input`` (name, shape, dtype, meaning), ``output`` (``scores``: (B, K) class probabilities in
        ``classes`` order, or (B,) predictions in target units).
    """
    if task == "classification":
        output = {"name": "scores", "shape": ["batch", "K"], "meaning": "class probabilities, in `classes` order"}
    else:
        output = {"name": "scores", "shape": ["batch"], "meaning": "predictions in target units"}
    return {"task": task,
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, input_size, input_size], "dtype": "float32",
                      "meaning": "RGB images, preprocessed as the model was trained (not recorded for a bare model)"},
            "output": output}
