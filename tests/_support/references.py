"""Independent references for the extract tests: forward hooks on the unmodified model (no featcache)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: Side of the random test input per backbone: the smallest convenient size
#: that every alias accepts. alexnet is the binding constraint (its pool5, a
#: 3x3/2 max pool after conv5, needs >= 63 px, so 64); vgg16 needs >= 32 (five
#: 2x2 pools); googlenet works from 15 px, the resnets and efficientnets from 8.
#: 32 keeps the deep maps at 1x1 (resnet res5, vgg16 pool5), shallower maps are
#: larger, so spatial pooling is still exercised.
INPUT_SIZES = {"alexnet": 64}
INPUT_SIZE = 64  # for tests that use one size for every backbone


def input_size(name: str) -> int:
    return INPUT_SIZES.get(name, 32)


BATCH = 2


def random_batch(batch: int = BATCH, size: int = INPUT_SIZE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def hooked_module_name(node: str, modules: dict[str, nn.Module]) -> tuple[str, bool]:
    """Module to hook for a graph node, and whether its output must be flattened.

    * a module name (``layer4``, ``blocks.5``, ``classifier.4``, ``inception3a``) -> that module;
    * ``flatten`` (torchvision resnet / googlenet call ``torch.flatten(x, 1)``) -> ``avgpool``, flattened;
    * ``<module>.flatten`` that is not a module (timm ``global_pool.flatten``) -> ``<module>``.
    """
    if node in modules:
        return node, False
    if node == "flatten":
        return "avgpool", True
    if node.endswith(".flatten") and node.rsplit(".", 1)[0] in modules:
        return node.rsplit(".", 1)[0], True
    raise AssertionError(f"no independent reference for node {node!r}; teach hooked_module_name about it")


@torch.no_grad()
def reference_activations(model: nn.Module, nodes: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Node -> activation from forward hooks on the unmodified model, in eval mode.

    The output is cloned inside the hook, so later in-place ops of the network
    cannot change it. Each hooked module must fire exactly once.
    """
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for node in nodes:
        name, flatten = hooked_module_name(node, modules)

        def hook(module, inputs, output, node=node, flatten=flatten):
            value = output.detach().clone()
            captured.setdefault(node, []).append(torch.flatten(value, 1) if flatten else value)

        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    for node in nodes:
        assert len(captured.get(node, [])) == 1, f"hook of {node!r} fired {len(captured.get(node, []))} times"
    return {node: captured[node][0] for node in nodes}


def mean_pool(activation: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) -> mean over H, W; (B, D) unchanged."""
    if activation.ndim == 4:
        activation = activation.mean(dim=(2, 3))
    return activation.flatten(1).numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-5, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|).

    An absolute tolerance for activations of order 1, relative to the tensor's
    scale for the large activations of deep random-weight networks.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(expected)), f"{what}: reference is not finite"
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(actual - expected).max())
    assert error <= tol * scale, f"{what}: max abs error {error:.3g} (scale {scale:.3g})"
