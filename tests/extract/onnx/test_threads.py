"""onnxruntime's features do not depend on its intra-op thread count (what lets dask workers match one process).

A single-process run gives onnxruntime one thread per physical core; a dask
worker runs ``threads_per_worker`` of them. An ONNX store records no thread
count, so its bytes must not depend on it: the shipped backbone's layers are
bitwise equal for 1, 2 and 3 threads, on a full batch and on a short one.
(torch's CPU kernels are not: on the 2-core VM, 1 and 2 threads differ by up to
8.7e-6 on this batch, so a torch store on the CPU records its thread count,
``tests/pipeline/test_distributed_stage.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest

from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.extract.zoo.weights import resolve_weights

BACKBONE, LAYERS = "efficientnet_lite0", ["pool", "block6"]
THREADS = (1, 2, 3)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """(16, 3, 224, 224) float32 images, normalised like the shipped preprocessing (mean 0.5, std 0.5)."""
    return np.random.default_rng(0).uniform(-1.0, 1.0, size=(16, 3, 224, 224)).astype(np.float32)


def _assert_bitwise_equal(outputs: dict[int, dict[str, np.ndarray]]) -> None:
    first = outputs[THREADS[0]]
    for threads, features in outputs.items():
        for layer in LAYERS:
            difference = float(np.abs(features[layer] - first[layer]).max())
            assert features[layer].tobytes() == first[layer].tobytes(), (
                f"{layer}: {threads} threads differ from {THREADS[0]} by up to {difference:g}")


def test_onnxruntime_features_do_not_depend_on_threads(batch):
    source = resolve_weights(BACKBONE, "pretrained")
    outputs = {}
    for threads in THREADS:
        runner = OnnxFeatureRunner.from_source(source, LAYERS, intra_op_threads=threads)
        assert runner.intra_op_threads == threads
        full, short = runner(batch), runner(batch[:5])
        outputs[threads] = {layer: np.concatenate([full[layer], short[layer]]) for layer in LAYERS}
    _assert_bitwise_equal(outputs)
