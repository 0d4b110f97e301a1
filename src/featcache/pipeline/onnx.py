"""``featcache export-onnx`` and ``featcache onnx-parity``: the ONNX backend from params.

Export writes the truncated extractor (requested layers as named outputs,
pooling included, dynamic batch axis, chosen opset) with its export config in
the file's metadata. Parity runs one batch through torch and onnxruntime and
fails above the stated tolerance.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from featcache.extract.decode.loaders import ImageReader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.onnx.export import export_onnx
from featcache.extract.onnx.format import DEFAULT_OPSET
from featcache.extract.onnx.parity import format_parity, parity_check
from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.weights import load_backbone
from featcache.pipeline.params.backbones import ExtractSections
from featcache.pipeline.params.base import as_sections
from featcache.pipeline.params.extract import configured_backbone

__all__ = ["export_from_params", "parity_from_params"]

logger = logging.getLogger(__name__)


def _extractor(params: ExtractSections, backbone: str) -> TorchFeatureExtractor:
    chosen = configured_backbone(params, backbone)
    loaded = load_backbone(backbone, chosen.weights, model=chosen.model)
    # float32, NCHW: the reference the ONNX graph is exported from and compared with.
    return TorchFeatureExtractor(loaded.model, loaded.spec, chosen.layers,
                                 pooling=chosen.pooling or params.extract.pooling, channels_last=False)


def export_from_params(params: Any, backbone: str, out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``backbone``'s configured layers and pooling to ``out`` (.onnx).

    ``params``: a params file's path, a parsed mapping or validated sections (:func:`as_sections`).
    """
    params = as_sections(params, ExtractSections)
    path = export_onnx(_extractor(params, backbone), out, opset=opset)
    logger.info("Exported %s %s to %s (opset %d)", backbone, params.backbones[backbone].layers, path, opset)
    return path


def parity_from_params(params: Any, backbone: str, onnx_path: str | Path | None = None,
                       manifest_path: str | Path | None = None, batch_size: int = 8, atol: float = 1e-4,
                       rtol: float = 1e-3, min_cosine: float = 0.9999) -> str:
    """Compare torch and onnxruntime on one batch; return the parity table.

    The batch is the first ``batch_size`` images of the manifest when given,
    else a seeded random normal batch. Raises ``ParityError`` above tolerance.
    ``params``: a params file's path, a parsed mapping or validated sections (:func:`as_sections`).
    """
    params = as_sections(params, ExtractSections)
    extractor = _extractor(params, backbone)
    with tempfile.TemporaryDirectory(prefix="featcache-onnx-") as tmp:
        if onnx_path is None:
            onnx_path = export_onnx(extractor, Path(tmp) / f"{backbone}.onnx")
        runner = OnnxFeatureRunner(onnx_path)
        return format_parity(parity_check(extractor, runner, _batch(extractor, params, manifest_path, batch_size),
                                          atol=atol, rtol=rtol, min_cosine=min_cosine))


def _batch(extractor: TorchFeatureExtractor, params: ExtractSections, manifest_path: str | Path | None,
           batch_size: int) -> torch.Tensor:
    size = extractor.spec.input_size
    if manifest_path is not None:
        manifest = Manifest.read(manifest_path)
        preprocess = Preprocessor.from_spec(extractor.spec, params.extract.resize_mode,
                                            max_image_pixels=params.extract.max_image_pixels)
        rows = range(min(batch_size, len(manifest)))
        reader = ImageReader(manifest, preprocess)  # a file, a shard member or a URL
        return torch.stack([preprocess(preprocess.load(reader.source(row))) for row in rows])
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
