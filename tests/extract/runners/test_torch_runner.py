"""TorchFeatureExtractor: in-place safety, eval/train state, truncation, pooling, argument checks."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
from torch import fx, nn

from _support.references import assert_close, input_size, random_batch, reference_activations
from featcache.extract.runners.torch_runner import (
    PoolingError,
    TorchFeatureExtractor,
    graph_node_names,
    make_inplace_safe,
    pool_features,
)
from featcache.extract.zoo.registry import BACKBONES
from featcache.extract.zoo.weights import load_backbone
from featcache.store.schema import MAP_POOLINGS, POOLINGS


def _extract(loaded, layers, x, **kwargs):
    kwargs.setdefault("channels_last", False)
    return TorchFeatureExtractor(loaded.model, loaded.spec, layers, **kwargs)(x)


# ------------------------------------------------------------- in-place safety
def test_vgg16_pre_relu_and_inplace_relu_together(random_backbone):
    """classifier.3 (Linear, pre-ReLU fc7) and fc7 = classifier.4 (ReLU(inplace=True)) in one pass."""
    loaded = random_backbone("vgg16")
    assert loaded.spec.layers["fc7"].node == "classifier.4"
    assert isinstance(loaded.model.classifier[4], nn.ReLU) and loaded.model.classifier[4].inplace
    x = random_batch(size=input_size("vgg16"))
    both = _extract(loaded, ["classifier.3", "fc7"], x, pooling="none")
    pre, post = both["classifier.3"], both["fc7"]
    assert (pre < 0).any(), "classifier.3 was overwritten by the in-place ReLU"
    np.testing.assert_array_equal(post, np.maximum(pre, 0))
    ref = reference_activations(loaded.model, ["classifier.3", "classifier.4"], x)
    assert_close(pre, ref["classifier.3"].numpy(), what="classifier.3")
    assert_close(post, ref["classifier.4"].numpy(), what="fc7")
    # Alone gives the same values as together.
    np.testing.assert_array_equal(_extract(loaded, ["classifier.3"], x, pooling="none")["classifier.3"], pre)
    np.testing.assert_array_equal(_extract(loaded, ["fc7"], x, pooling="none")["fc7"], post)


def test_alexnet_conv_and_inplace_relu_together(random_backbone):
    loaded = random_backbone("alexnet")
    x = random_batch(size=input_size("alexnet"))
    both = _extract(loaded, ["features.0", "conv1"], x, pooling="none")
    assert (both["features.0"] < 0).any()
    np.testing.assert_array_equal(both["conv1"], np.maximum(both["features.0"], 0))
    np.testing.assert_array_equal(_extract(loaded, ["features.0"], x, pooling="none")["features.0"],
                                  both["features.0"])


def test_resnet18_iadd_and_inplace_relu(random_backbone):
    """layer1.0: bn2 -> ``out += identity`` (iadd) -> relu(inplace): all three nodes come back intact."""
    loaded = random_backbone("resnet18")
    nodes = ["maxpool", "layer1.0.bn2", "layer1.0.add", "layer1.0.relu_1"]
    assert set(nodes) <= set(graph_node_names(loaded.model, loaded.spec))
    x = random_batch(size=input_size("resnet18"))
    together = _extract(loaded, nodes, x, pooling="none")
    identity, bn2, add, relu = (together[n] for n in nodes)
    assert (bn2 < 0).any(), "bn2 was overwritten in place by the residual add / ReLU"
    assert (add < 0).any(), "the residual sum was overwritten in place by the ReLU"
    np.testing.assert_allclose(add, bn2 + identity, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(relu, np.maximum(add, 0))
    # Independent reference: hooks on the unmodified model.
    ref = reference_activations(loaded.model, ["maxpool", "layer1.0.bn2", "layer1.0"], x)
    assert_close(bn2, ref["layer1.0.bn2"].flatten(1).numpy(), what="layer1.0.bn2")
    assert_close(relu, ref["layer1.0"].flatten(1).numpy(), what="layer1.0.relu_1")
    for node in nodes:
        np.testing.assert_array_equal(_extract(loaded, [node], x, pooling="none")[node], together[node], err_msg=node)


def test_make_inplace_safe_rewrites_everything(random_backbone):
    loaded = random_backbone("resnet18")
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["res3"], channels_last=False)
    module = extractor.module
    assert isinstance(module, fx.GraphModule)
    assert not any(getattr(sub, "inplace", False) for sub in module.modules())
    targets = [node.target for node in module.graph.nodes if node.op == "call_function"]
    assert operator.iadd not in targets and operator.add in targets
    # Idempotent: nothing left to rewrite.
    assert make_inplace_safe(module) == 0



class _DiscardedInplace(nn.Module):
    """In-place ops whose results are discarded: later reads must see the mutated value."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = x * 2
        self.act(y)  # module with inplace=True, result discarded
        z = y - 1
        z.relu_()  # in-place method, result discarded
        w = z * 3
        return torch.nn.functional.relu(w - 1, inplace=True)


def _discarded_inplace_eager(x):
    return torch.relu(torch.relu(torch.relu(x * 2) - 1) * 3 - 1)


def test_make_inplace_safe_keeps_eager_semantics():
    traced = fx.symbolic_trace(_DiscardedInplace())
    assert make_inplace_safe(traced) == 3  # module flag, relu_ method, inplace=True kwarg
    x = torch.randn(5, 4)
    kept = x.clone()
    torch.testing.assert_close(traced(x), _discarded_inplace_eager(kept))
    torch.testing.assert_close(x, kept)  # the input is not modified


class _AliasedInplace(nn.Module):
    """In-place ops whose input is read again afterwards (eager: it then holds the activated value)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = x * 2
        z = self.act(y)  # y is z
        b = z + y - 5
        c = b.relu_()  # b is c
        return torch.nn.functional.relu(c * b - 1, inplace=True)


def _aliased_inplace_eager(x):
    y = torch.relu(x * 2)
    c = torch.relu(y + y - 5)
    return torch.relu(c * c - 1)


def test_make_inplace_safe_keeps_requested_pre_activation_values():
    # create_feature_extractor (what the extractor uses) drops in-place calls whose result is
    # unused, so only the aliased pattern can reach make_inplace_safe through it.
    from torchvision.models.feature_extraction import create_feature_extractor

    x = torch.randn(5, 4)
    torch.testing.assert_close(fx.symbolic_trace(_AliasedInplace())(x.clone()), _aliased_inplace_eager(x))
    module = create_feature_extractor(_AliasedInplace(), return_nodes={"mul": "pre", "sub": "b", "relu": "out"})
    assert make_inplace_safe(module) == 3
    out = module(x)
    torch.testing.assert_close(out["pre"], x * 2)  # the value at the node, before the in-place ReLU
    torch.testing.assert_close(out["b"], 2 * torch.relu(x * 2) - 5)  # computed from the activated value
    torch.testing.assert_close(out["out"], _aliased_inplace_eager(x))
    assert (out["pre"] < 0).any() and (out["b"] < 0).any()


def test_make_inplace_safe_rewrites_iadd():
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(operator.mul, (x, 2))
    graph.call_function(operator.iadd, (y, x))  # y += x, result discarded
    graph.output(graph.call_function(operator.neg, (y,)))
    module = fx.GraphModule(nn.Module(), graph)
    assert make_inplace_safe(module) == 1
    assert operator.iadd not in [node.target for node in module.graph.nodes]
    x = torch.randn(3)
    torch.testing.assert_close(module(x), -(3 * x))


# --------------------------------------------------------- eval / train state
def _module_state(model: nn.Module):
    return (
        {name: sub.training for name, sub in model.named_modules()},
        {name: sub.inplace for name, sub in model.named_modules() if hasattr(sub, "inplace")},
        {key: value.detach().clone() for key, value in model.state_dict().items()},
    )


@pytest.mark.parametrize("name,layers", [("resnet18", ["res3", "pool5", "layer1.0.bn2"]), ("alexnet", ["fc6", "fc7"])])
def test_callers_model_is_not_modified(name, layers):
    loaded = load_backbone(name, "random")  # a fresh model: this test switches it to train mode
    model = loaded.model.train()
    training, inplace, state = _module_state(model)
    assert any(inplace.values())
    extractor = TorchFeatureExtractor(model, loaded.spec, layers, channels_last=True)
    extractor(random_batch(size=input_size(name)))
    extractor.layer_specs(input_size(name))
    after_training, after_inplace, after_state = _module_state(model)
    assert after_training == training and model.training
    assert after_inplace == inplace
    assert after_state.keys() == state.keys()
    for key in state:  # parameters and BatchNorm running stats / num_batches_tracked
        assert torch.equal(after_state[key], state[key]), key
    assert all(p.is_contiguous() for p in model.parameters())  # not converted to channels_last
    # The same holds for a model in eval mode.
    model.eval()
    TorchFeatureExtractor(model, loaded.spec, layers)(random_batch(size=input_size(name)))
    assert not any(sub.training for sub in model.modules())


def test_dropout_is_off_for_a_train_mode_model():
    loaded = load_backbone("alexnet", "random")
    model = loaded.model.train()
    x = random_batch(size=input_size("alexnet"))
    extractor = TorchFeatureExtractor(model, loaded.spec, ["fc6", "fc7", "fc8"], channels_last=False)
    first, second = extractor(x), extractor(x)
    for alias in first:
        np.testing.assert_array_equal(first[alias], second[alias])
    ref = reference_activations(model, ["classifier.2", "classifier.5"], x)  # eval-mode reference
    assert_close(first["fc6"], ref["classifier.2"].numpy(), what="fc6")
    assert_close(first["fc7"], ref["classifier.5"].numpy(), what="fc7")
    assert model.training


def test_batchnorm_uses_running_stats():
    loaded = load_backbone("resnet18", "random")
    model = loaded.model.train()
    # Non-trivial running statistics, so batch statistics would give different values.
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    extractor = TorchFeatureExtractor(model, loaded.spec, ["res2", "pool5"], channels_last=False)
    x = random_batch(batch=4, size=input_size("resnet18"), seed=5)
    batch = extractor(x)
    for row in range(4):
        single = extractor(x[row:row + 1])
        for alias in batch:
            np.testing.assert_allclose(single[alias][0], batch[alias][row], rtol=1e-5, atol=1e-5)
    ref = reference_activations(model, ["flatten"], x)["flatten"].numpy()
    assert_close(batch["pool5"], ref, what="pool5 vs eval-mode reference")
    assert model.training


# ---------------------------------------------------------------- truncation
def test_vgg16_pool5_does_not_run_the_classifier(random_backbone):
    loaded = random_backbone("vgg16")
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["pool5"], channels_last=False)
    names = [name for name, _ in extractor.module.named_modules()]
    assert not [n for n in names if n.startswith(("classifier", "avgpool"))], names
    graph_targets = [str(node.target) for node in extractor.module.graph.nodes]
    assert not [t for t in graph_targets if "classifier" in t or "avgpool" in t or "flatten" in t]
    assert "features.30" in graph_targets
    params = sum(p.numel() for p in extractor.module.parameters())
    assert params == sum(p.numel() for p in loaded.model.features.parameters())


def test_truncation_after_deepest_requested_node(random_backbone):
    loaded = random_backbone("resnet18")
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["res3", "conv1"], channels_last=False)
    names = {name for name, _ in extractor.module.named_modules()}
    assert "layer2" in names and not {"layer3", "layer4", "fc", "avgpool"} & names
    loaded = random_backbone("efficientnet_lite0")
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["block3"], channels_last=False)
    names = {name for name, _ in extractor.module.named_modules()}
    assert "blocks.2" in names and not {"blocks.3", "conv_head", "bn2", "classifier"} & names


# ------------------------------------------------------------------- pooling
def test_pool_features_on_a_known_map():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    torch.testing.assert_close(pool_features(x, "avg"), x.mean(dim=(2, 3)))
    torch.testing.assert_close(pool_features(x, "max"), x[:, :, 3, 3])
    torch.testing.assert_close(pool_features(x, "none"), x.reshape(2, 48))
    quadrants = torch.stack([x[:, :, :2, :2].mean((2, 3)), x[:, :, :2, 2:].mean((2, 3)),
                             x[:, :, 2:, :2].mean((2, 3)), x[:, :, 2:, 2:].mean((2, 3))], dim=2)
    torch.testing.assert_close(pool_features(x, "avg2x2"), quadrants.reshape(2, 12))
    flat = torch.randn(2, 7)
    for pooling in POOLINGS:
        torch.testing.assert_close(pool_features(flat, pooling), flat)
    with pytest.raises(ValueError, match="pooling"):
        pool_features(x, "sum")


def test_cls_pooling_of_a_conv_map_is_refused(random_backbone):
    loaded = random_backbone("resnet18")
    with pytest.raises(PoolingError, match="'cls' does not apply to layer 'res4'.*conv map.*backbones.resnet18.pool"):
        TorchFeatureExtractor(loaded.model, loaded.spec, ["res4", "pool5"], pooling="cls")
    with pytest.raises(PoolingError, match="'cls' does not apply to a conv map"):
        pool_features(torch.randn(2, 3, 4, 4), "cls")


@pytest.mark.parametrize("pooling", MAP_POOLINGS["conv"])
def test_extractor_pooling_modes(pooling, random_backbone):
    loaded = random_backbone("resnet18")
    x = random_batch(size=64)
    out = _extract(loaded, ["res4", "pool5"], x, pooling=pooling)
    ref = reference_activations(loaded.model, ["layer3", "avgpool"], x)
    conv = ref["layer3"]  # (2, 256, 4, 4) at 64 px
    expected = {"avg": conv.mean((2, 3)), "max": conv.amax((2, 3)), "none": conv.flatten(1),
                "avg2x2": nn.functional.adaptive_avg_pool2d(conv, 2).flatten(1)}[pooling]
    assert_close(out["res4"], expected.numpy(), what=f"res4 {pooling}")
    assert_close(out["pool5"], ref["avgpool"].flatten(1).numpy(), what="pool5 is already flat")
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["res4", "pool5"], pooling=pooling)
    specs = {s.alias: s for s in extractor.layer_specs(64)}
    assert specs["res4"].map_shape == (256, 4, 4)
    assert specs["res4"].dim == out["res4"].shape[1]
    assert specs["res4"].pooling == pooling
    assert specs["pool5"].pooling == "none" and specs["pool5"].dim == 512


# ------------------------------------------------------------ argument checks
def test_argument_checks(random_backbone):
    loaded = random_backbone("resnet18")
    with pytest.raises(ValueError, match="pooling"):
        TorchFeatureExtractor(loaded.model, loaded.spec, ["res5"], pooling="median")
    with pytest.raises(ValueError, match="No layers"):
        TorchFeatureExtractor(loaded.model, loaded.spec, [])
    with pytest.raises(ValueError, match="autocast"):
        TorchFeatureExtractor(loaded.model, loaded.spec, ["res5"], autocast="int8")
    with pytest.raises(ValueError, match="same node"):
        TorchFeatureExtractor(loaded.model, loaded.spec, ["res5", "layer4"])
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["pool5", "default", "pool5", "res2"])
    assert extractor.layer_names == ["pool5", "res2"]


def test_output_is_deterministic_and_memory_format_independent(random_backbone):
    loaded = random_backbone("resnet18")
    x = random_batch(size=input_size("resnet18"))
    extractor = TorchFeatureExtractor(loaded.model, loaded.spec, ["res3", "pool5"], channels_last=True)
    first = extractor(x)
    second = extractor(x.contiguous(memory_format=torch.channels_last))
    for alias in first:
        np.testing.assert_array_equal(first[alias], second[alias])
        assert first[alias].dtype == np.float32


def test_bf16_autocast_is_close(random_backbone):
    loaded = random_backbone("resnet18")
    x = random_batch(size=input_size("resnet18"))
    exact = _extract(loaded, ["pool5"], x)["pool5"]
    approx = _extract(loaded, ["pool5"], x, autocast="bf16")["pool5"]
    assert approx.dtype == np.float32
    scale = np.abs(exact).max()
    assert np.abs(approx - exact).max() <= 0.1 * scale
    assert not np.array_equal(approx, exact)  # autocast actually ran in bf16


def test_graph_node_names_lists_raw_nodes(random_backbone):
    for name, expected in [("vgg16", {"classifier.3", "features.30"}),
                           ("efficientnet_lite0", {"global_pool.flatten", "blocks.6.0.bn3", "classifier"})]:
        loaded = random_backbone(name)
        assert expected <= set(graph_node_names(loaded.model, loaded.spec))
    spec = BACKBONES["googlenet"]
    nodes = graph_node_names(random_backbone("googlenet").model, spec)
    assert not [n for n in nodes if n.startswith("aux")]
