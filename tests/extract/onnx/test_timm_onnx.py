"""ONNX export, export cache and parity of timm backbones: a ConvNeXt (conv maps) and ViTs (token maps).

Weights are local state dicts (a file, so the export cache is keyed by the
file's sha256 as for pretrained weights); parity is per layer, cosine >= 0.9999
in float32, for ``cls`` and ``avg`` token pooling alike.
"""

from __future__ import annotations

import pytest
import torch

import featcache.extract.onnx.export as onnx_export
from featcache.extract.onnx.cache import lookup, source_key
from featcache.extract.onnx.parity import parity_check
from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.weights import load_backbone, resolve_weights
from featcache.util.hashing import file_sha256

CASES = [
    pytest.param("timm/test_convnext", ["pre_logits", "stages.3", "stages.1"], "avg", id="convnext-avg"),
    pytest.param("timm/test_vit", ["pre_logits", "blocks.5", "blocks.2"], "cls", id="vit-cls"),
    pytest.param("timm/test_vit", ["pre_logits", "blocks.5"], "avg", id="vit-avg"),
    pytest.param("timm/vit_xsmall_patch16_clip_224.tinyclip_yfcc15m", ["pre_logits", "blocks.7"], "avg",
                 id="clip-avg"),
    # pre_logits is the mean of the class and distillation tokens: a node after the classifier's inputs
    pytest.param("timm/deit_tiny_distilled_patch16_224", ["pre_logits", "logits"], "cls", id="deit-distilled",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model, layers, pooling", CASES)
def test_export_through_the_cache_and_parity(model, layers, pooling, tmp_path, monkeypatch):
    state = tmp_path / "weights.pth"
    torch.save(load_backbone("b", "random", seed=1, model=model).model.state_dict(), state)
    source = resolve_weights("b", str(state), model=model)
    runner = OnnxFeatureRunner.from_source(source, layers, pooling=pooling, cache_dir=tmp_path / "cache")
    key = source_key(source.spec, source.weights_sha256, layers, pooling, None, 18, "auto")
    assert key["weights_file_sha256"] == file_sha256(state)
    assert lookup(tmp_path / "cache", key)[0] == runner.path  # cached under the weights file's sha256

    reference = TorchFeatureExtractor(source.load().model, source.spec, layers, pooling=pooling, channels_last=False)
    assert runner.layer_specs() == reference.layer_specs()
    size = source.spec.input_size
    batch = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    results = parity_check(reference, runner, batch, min_cosine=0.9999)
    assert [result.layer for result in results] == layers
    assert min(result.cosine for result in results) >= 0.9999
    assert {layer: source.spec.layers[layer].dim for layer in layers} == \
        {spec.alias: spec.dim for spec in runner.layer_specs()}

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    again = OnnxFeatureRunner.from_source(resolve_weights("b", str(state), model=model), layers, pooling=pooling,
                                          cache_dir=tmp_path / "cache")
    assert again.onnx_sha256 == runner.onnx_sha256
