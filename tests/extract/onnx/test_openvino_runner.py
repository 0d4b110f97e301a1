"""The OpenVINO runner: the same export as onnxruntime's, float32 parity, bf16 on real photos, its guards."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._support.similarity import row_cosines

import featcache.extract.onnx.runner as onnx_runner_module
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.onnx.openvino_runner import OpenVinoFeatureRunner, native_autocasts, openvino_status
from featcache.extract.onnx.runner import OnnxFeatureRunner
from featcache.extract.zoo.weights import load_backbone, resolve_weights
from featcache.store.schema import OPENVINO_PROVIDER

SIZE = 64
LAYERS = ["res4", "pool5"]
PHOTOS = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "photos").glob("*.jpg"))
#: bf16 keeps 8 bits of mantissa: on the 7 fixture photos Lite0's features measured a lowest cosine to float32 of
#: 0.9985 (pool, median 0.9990) and 0.9992 (block6) on the AVX512_BF16 VM (torch's bf16 autocast on an H200:
#: 0.997); float32 OpenVINO vs onnxruntime: 1 - 1e-12.
BF16_MIN_COSINE, F32_MIN_COSINE = 0.997, 0.99999


#: Builds two runners on one thread, drops them in the order they were made, then handles signals on that thread.
_TWO_RUNNERS = """
import ctypes, faulthandler, gc, json, os, signal, sys
faulthandler.enable()  # as pytest does: an alternate signal stack for the main thread
from featcache.extract.onnx.openvino_runner import OpenVinoFeatureRunner

class Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

def alternate_stack():
    stack = Stack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    return [stack.sp, stack.size]

seen = {"start": alternate_stack()}
first = OpenVinoFeatureRunner(sys.argv[1], intra_op_threads=1)
seen["first"] = alternate_stack()
second = OpenVinoFeatureRunner(sys.argv[1], intra_op_threads=1, autocast="bf16")
seen["second"] = alternate_stack()
del first; gc.collect()
del second; gc.collect()
seen["dropped"] = alternate_stack()
handled = []
signal.signal(signal.SIGUSR1, lambda *args: handled.append(1))  # CPython runs it on the alternate stack
for _ in range(20):
    os.kill(os.getpid(), signal.SIGUSR1)
print(json.dumps({"stacks": seen, "handled": len(handled)}))
"""


def _batch(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet_runners(tmp_path_factory):
    """onnxruntime and OpenVINO on the same exported file (random resnet18, 64 px)."""
    loaded = load_backbone("resnet18", "random")
    onnx = OnnxFeatureRunner.from_model(loaded.model, loaded.spec, LAYERS, input_size=SIZE, intra_op_threads=2,
                                        cache_dir=tmp_path_factory.mktemp("cache"))
    return onnx, OpenVinoFeatureRunner(onnx.path, intra_op_threads=2)


@pytest.fixture(scope="module")
def lite_photos():
    """Lite0 (pretrained, pool + block6) through the export cache, and the fixture photos preprocessed for it."""
    source = resolve_weights("efficientnet_lite0", "pretrained")
    onnx = OnnxFeatureRunner.from_source(source, ["pool", "block6"], intra_op_threads=2)
    preprocess = Preprocessor.from_spec(source.spec)
    pixels = np.stack([preprocess.pixels_array(preprocess.load(path)) for path in PHOTOS])
    return onnx, np.asarray(preprocess.normalize_batch(pixels), dtype=np.float32)


def test_float32_runs_the_same_file_as_onnxruntime(resnet_runners):
    onnx, openvino = resnet_runners
    assert (openvino.path, openvino.onnx_sha256, openvino.layer_names) == (onnx.path, onnx.onnx_sha256, LAYERS)
    assert openvino.layer_specs() == onnx.layer_specs(SIZE) and openvino.export_config == onnx.export_config
    assert (openvino.provider, openvino.precision, openvino.device) == (OPENVINO_PROVIDER, "float32", "cpu")
    batch = _batch(5)
    expected, got = onnx(batch), openvino(torch.from_numpy(batch))  # a torch tensor is taken as well
    for layer in LAYERS:
        assert got[layer].shape == expected[layer].shape and got[layer].dtype == np.float32
        np.testing.assert_allclose(got[layer], expected[layer], rtol=1e-3, atol=1e-4)
        assert row_cosines(got[layer], expected[layer]).min() >= F32_MIN_COSINE
    assert {layer: value.shape for layer, value in openvino(_batch(0)).items()} == {"res4": (0, 256),
                                                                                    "pool5": (0, 512)}


def test_runners_dropped_in_creation_order_leave_a_live_signal_stack(resnet_runners):
    """OpenVINO's CPU plugin swaps the thread's ``sigaltstack`` per Core and puts back the one it found when that
    Core dies: with a Core per runner, dropping two runners in the order they were made left the stack pointing at
    freed memory and the next signal handled killed the process (rc -11) or corrupted its heap (the suite crashed
    in a later, unrelated test). One process-wide Core installs one stack, once. In a child process: the stack
    state is process-wide."""
    onnx, _ = resnet_runners
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[3] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _TWO_RUNNERS, str(onnx.path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    result = json.loads(done.stdout.splitlines()[-1])
    stacks = result["stacks"]
    assert stacks["first"] == stacks["second"] == stacks["dropped"], stacks  # installed once, never freed
    assert result["handled"] == 20


def test_outputs_are_not_overwritten_by_the_next_batch(resnet_runners):
    _, openvino = resnet_runners
    first = openvino(_batch(3, seed=1))
    kept = {layer: value.copy() for layer, value in first.items()}
    openvino(_batch(3, seed=2))
    for layer in LAYERS:
        np.testing.assert_array_equal(first[layer], kept[layer])


def test_concurrent_callers_each_get_their_own_batch(resnet_runners):
    _, openvino = resnet_runners
    batches = [_batch(2, seed=seed) for seed in range(6)]
    expected = [openvino(batch)["pool5"] for batch in batches]
    got: dict[int, np.ndarray] = {}

    def call(index: int) -> None:
        for _ in range(3):
            got[index] = openvino(batches[index])["pool5"]

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, value in enumerate(expected):
        np.testing.assert_array_equal(got[index], value)


def test_bf16_on_real_photos_stays_close_to_float32(lite_photos, caplog):
    onnx, batch = lite_photos
    expected = onnx(batch)
    with caplog.at_level(logging.WARNING):
        bf16 = OpenVinoFeatureRunner(onnx.path, intra_op_threads=2, autocast="bf16")
    got = bf16(batch)
    if "bf16" in native_autocasts():
        assert bf16.precision == "bfloat16" and not caplog.records
        for layer in ("pool", "block6"):
            cosines = row_cosines(got[layer], expected[layer])
            assert cosines.min() >= BF16_MIN_COSINE, (layer, cosines)
            assert np.abs(got[layer] - expected[layer]).max() > 1e-3  # bf16 did run: float32 agrees to ~1e-5
    else:  # no native bf16 here: OpenVINO runs float32 and says so
        assert bf16.precision == "float32" and "does not compute it natively" in caplog.text
        np.testing.assert_allclose(got["pool"], expected["pool"], rtol=1e-3, atol=1e-4)


def test_from_source_opens_the_cached_export_without_exporting(lite_photos, monkeypatch):
    onnx, _ = lite_photos

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runner_module, "cached_export", no_export)
    runner = OpenVinoFeatureRunner.from_source(resolve_weights("efficientnet_lite0", "pretrained"),
                                               ["pool", "block6"], intra_op_threads=2, autocast="bf16")
    assert isinstance(runner, OpenVinoFeatureRunner) and runner.path == onnx.path
    assert runner.onnx_sha256 == onnx.onnx_sha256 and runner.autocast == "bf16"


def test_bad_settings_are_refused_with_a_hint(resnet_runners):
    onnx, _ = resnet_runners
    with pytest.raises(ValueError, match="'cuda'.*CPU plugin only.*extract_run.device: cpu"):
        OpenVinoFeatureRunner(onnx.path, device="cuda")
    with pytest.raises(ValueError, match="autocast 'int8' is not one of"):
        OpenVinoFeatureRunner(onnx.path, autocast="int8")


def test_status_reports_the_cpu_and_what_it_runs_natively():
    status = openvino_status()
    assert status["version"] and status["cpu"] and "FP32" in status["capabilities"]
    assert native_autocasts() <= {"bf16", "fp16"}
    assert ("bf16" in native_autocasts()) == ("BF16" in status["capabilities"])
