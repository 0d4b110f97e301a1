"""extract/plan.py: what `auto` resolves to (CUDA monkeypatched), the plan's loader, the runner it builds."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace

import pytest
import torch

from featcache.errors import ExtractionError
from featcache.extract.plan import (
    ExtractionPlan,
    build_runner,
    plan_extraction,
    precision_name,
    resolve_autocast,
    resolve_backend,
    runner_attrs,
)


def test_auto_backend_is_torch_on_cuda_and_onnxruntime_on_cpu(monkeypatch):
    assert resolve_backend("auto", "cuda") == "torch" and resolve_backend("auto", "cuda:1") == "torch"
    assert resolve_backend("auto", "cpu") == "onnx"
    assert (resolve_backend("torch", "cpu"), resolve_backend("onnx", "cuda")) == ("torch", "onnx")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else
                        real_find_spec(name))
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="'tensorrt' is not one of"):
        resolve_backend("tensorrt", "cpu")


def test_auto_autocast_is_fp16_on_cuda_torch_only_and_never_bf16():
    assert resolve_autocast("auto", "cuda", "torch") == "fp16"
    assert resolve_autocast("auto", "cpu", "torch") is None
    assert resolve_autocast("auto", "cuda", "onnx") is None
    assert resolve_autocast("none", "cuda", "torch") is None and resolve_autocast(None, "cpu", "torch") is None
    assert resolve_autocast("bf16", "cuda", "torch") == "bf16"  # only when asked for
    assert resolve_autocast("bf16", "cpu", "onnx") is None  # the float32 ONNX graph
    assert [precision_name(a) for a in (None, "fp16", "bf16")] == ["float32", "float16", "bfloat16"]
    with pytest.raises(ValueError, match="autocast 'int8'"):
        resolve_autocast("int8", "cpu", "torch")


def test_runner_attrs_say_backend_provider_and_precision():
    assert runner_attrs("onnx", "cpu", None) == {"backend": "onnx", "provider": "CPUExecutionProvider",
                                                  "precision": "float32"}
    assert runner_attrs("torch", "cuda", "fp16") == {"backend": "torch", "provider": "cuda", "precision": "float16"}


def test_the_cpu_plan_runs_onnxruntime_on_numpy_batches():
    plan = plan_extraction(device="cpu")
    assert plan == ExtractionPlan(device="cpu", backend="onnx", autocast=None, decode="cpu", loader="arrays")
    assert plan.attrs() == {"backend": "onnx", "provider": "CPUExecutionProvider", "precision": "float32",
                            "decode": "cpu"}
    assert plan.config() == {"backend": "onnx", "autocast": "none"} and not plan.pin_memory
    # The store records what auto resolved to: the same config hash as the explicit settings.
    assert plan_extraction(device="cpu", backend="onnx", autocast="none").config() == plan.config()
    assert plan_extraction(device="cpu", num_workers=3).num_workers == 3
    assert plan_extraction(device="cpu", backend="torch", decode="gpu").loader == "device"  # the device path on CPU


def test_the_gpu_plan_decodes_on_the_device_in_fp16(fake_cuda):
    plan = plan_extraction()
    assert (plan.device, plan.backend, plan.autocast, plan.decode, plan.loader) == ("cuda", "torch", "fp16", "gpu",
                                                                                     "device")
    assert plan.config() == {"backend": "torch", "autocast": "fp16", "decode": "gpu"}
    assert plan.attrs()["precision"] == "float16" and "loader device" in plan.describe()
    pil = plan_extraction(decode="cpu")
    assert pil.loader == "torch" and pil.pin_memory and "decode" not in pil.config()
    onnx = plan_extraction(backend="onnx")  # onnxruntime takes host batches: PIL decode
    assert (onnx.decode, onnx.autocast, onnx.provider) == ("cpu", None, "CUDAExecutionProvider")
    dask = plan_extraction(scheduler="local")  # each dask worker decodes on its own GPU
    assert (dask.decode, dask.loader) == ("gpu", "device") and dask.distributed


def test_bad_settings_stop_before_any_work():
    with pytest.raises(ExtractionError, match="extract.decode 'nvjpeg'"):
        plan_extraction(device="cpu", decode="nvjpeg")
    with pytest.raises(ExtractionError, match="extract_run.device is 'tpu'"):
        plan_extraction(device="tpu")


def test_cuda_asked_for_on_a_cpu_machine_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExtractionError, match="^extract_run.device is 'cuda' but no CUDA device is visible"):
        plan_extraction(device="cuda")
    # predict's --device: the message names the flag the user set
    with pytest.raises(ExtractionError, match="^--device is 'cuda' but no CUDA device is visible"):
        plan_extraction(device="cuda", device_setting="--device")


def test_build_runner_torch_and_onnx_on_cpu(random_backbone):
    from featcache.extract.onnx.runner import OnnxFeatureRunner
    from featcache.extract.runners.torch_runner import TorchFeatureExtractor

    loaded = random_backbone("resnet18")
    runner, attrs = build_runner(loaded, ["pool5"], plan_extraction(device="cpu", backend="torch"))
    assert isinstance(runner, TorchFeatureExtractor) and runner.autocast is None
    assert attrs == {"backend": "torch", "provider": "cpu", "precision": "float32"}
    runner, attrs = build_runner(loaded, ["pool5"], plan_extraction(device="cpu"), input_size=64)
    assert isinstance(runner, OnnxFeatureRunner) and attrs["provider"] == runner.provider == "CPUExecutionProvider"
    assert attrs["onnx_sha256"] == runner.onnx_sha256


def test_onnx_on_cuda_without_its_provider_stops_with_the_fix(monkeypatch):
    from featcache.extract.onnx import runner as onnx_runner

    class CpuOnly:
        provider = "CPUExecutionProvider"

    monkeypatch.setattr(onnx_runner.OnnxFeatureRunner, "from_source", classmethod(lambda cls, *a, **k: CpuOnly()))
    plan = ExtractionPlan(device="cuda", backend="onnx", autocast=None, decode="cpu", loader="torch")
    with pytest.raises(ExtractionError, match="runs on CPUExecutionProvider.*backend: auto.*pip uninstall -y "
                                              "onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"):
        build_runner(object(), ["pool"], plan)


def test_the_dask_runner_spec_takes_the_plan_s_choices():
    from featcache.extract.runner_spec import RunnerSpec

    plan = ExtractionPlan(device="cuda", backend="torch", autocast="fp16", decode="cpu", loader="torch",
                          scheduler="local")
    spec = RunnerSpec.from_plan(plan, "resnet18", "random", ["pool5"], "avg", channels_last=False)
    assert (spec.device, spec.backend, spec.autocast, spec.layers, spec.channels_last) == (
        "cuda", "torch", "fp16", ("pool5",), False)


def test_the_plan_resolves_the_device():
    assert plan_extraction(device="cpu").device == "cpu"
    assert plan_extraction(device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_int8_plan_runs_onnxruntime_on_the_cpu_only():
    plan = plan_extraction(device="cpu", precision="int8")  # backend auto: onnxruntime on the CPU
    assert plan.int8 and plan.backend == "onnx" and plan.precision == "int8" and plan.attrs()["precision"] == "int8"
    assert "int8" in plan.describe()
    assert not plan_extraction(device="cpu").int8 and plan_extraction(device="cpu").precision == "float32"
    with pytest.raises(ExtractionError, match=r"int8 needs extract.backend onnx \(or auto\), got 'torch'"):
        plan_extraction(device="cpu", backend="torch", precision="int8")
    on_dask = plan_extraction(device="cpu", precision="int8", scheduler="local")  # the driver calibrates
    assert on_dask.int8 and on_dask.distributed and on_dask.backend == "onnx"
    with pytest.raises(ExtractionError, match=r"extract.precision 'int4' is not one of \('float32', 'int8'\)"):
        plan_extraction(device="cpu", precision="int4")


def test_int8_on_a_cuda_device_is_refused_before_any_work():
    from featcache.extract.plan import resolve_precision

    with pytest.raises(ValueError, match="runs onnxruntime's quantized graph on the CPU.*'cuda:1'"):
        resolve_precision("int8", "cuda:1", "onnx")


# ---------------------------------------------------------------------- OpenVINO: bf16 on the CPU
@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU runs bf16 natively (``native(frozenset())`` pretends it does not)."""
    from featcache.extract.onnx import openvino_runner

    def native(autocasts: frozenset[str] = frozenset({"bf16"})) -> None:
        monkeypatch.setattr(openvino_runner, "native_autocasts", lambda: autocasts)

    native()
    return native


def test_auto_backend_runs_bf16_on_the_cpu_with_openvino_where_the_cpu_has_it(native_bf16, caplog):
    plan = plan_extraction(device="cpu", autocast="bf16")
    assert (plan.backend, plan.autocast, plan.decode, plan.loader) == ("openvino", "bf16", "cpu", "arrays")
    assert plan.attrs() == {"backend": "openvino", "provider": "OpenVINO CPU", "precision": "bfloat16",
                            "decode": "cpu"}
    assert plan.config() == {"backend": "openvino", "autocast": "bf16"}
    assert plan_extraction(device="cpu").backend == "onnx"  # float32 stays onnxruntime's (the faster there)
    assert plan_extraction(device="cpu", autocast="fp16").backend == "onnx"  # no native fp16 in this CPU
    native_bf16(frozenset({"bf16", "fp16"}))  # native fp16 too (a Xeon with AVX512_FP16): auto still not OpenVINO
    with caplog.at_level(logging.WARNING):
        plan = plan_extraction(device="cpu", autocast="fp16")
    assert (plan.backend, plan.autocast) == ("onnx", None) and "float16 on the CPU measured slower" in caplog.text
    plan = plan_extraction(device="cpu", backend="openvino", autocast="fp16")  # asked for by name: it runs
    assert (plan.backend, plan.autocast, plan.precision) == ("openvino", "fp16", "float16")
    caplog.clear()
    native_bf16(frozenset())  # a CPU without bf16: onnxruntime's float32 graph, as before OpenVINO
    with caplog.at_level(logging.WARNING):
        plan = plan_extraction(device="cpu", autocast="bf16")
    assert (plan.backend, plan.autocast) == ("onnx", None) and "ignored by the onnx backend" in caplog.text


def test_explicit_openvino_without_native_bf16_runs_float32_and_says_so(native_bf16, caplog):
    native_bf16(frozenset())
    with caplog.at_level(logging.WARNING):
        plan = plan_extraction(device="cpu", backend="openvino", autocast="bf16")
    assert (plan.backend, plan.autocast, plan.precision) == ("openvino", None, "float32")
    assert "no native bf16" in caplog.text
    assert resolve_autocast("auto", "cpu", "openvino") is None


def test_openvino_is_refused_on_cuda_without_the_package_and_for_int8(native_bf16, fake_cuda, monkeypatch):
    with pytest.raises(ExtractionError, match="openvino runs OpenVINO's CPU plugin.*'cuda'.*extract_run.device: cpu"):
        plan_extraction(backend="openvino")
    assert plan_extraction(autocast="bf16").backend == "torch"  # auto on a GPU: torch, whatever the CPU has
    with pytest.raises(ExtractionError, match="int8 runs onnxruntime's quantized graph.*'openvino'.*autocast: none"):
        plan_extraction(device="cpu", autocast="bf16", precision="int8")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "openvino" else
                        real_find_spec(name))
    with pytest.raises(ExtractionError, match="needs the openvino package.*pip install openvino"):
        plan_extraction(device="cpu", backend="openvino")


def test_build_runner_openvino_opens_the_onnx_export(random_backbone):
    from featcache.extract.onnx.openvino_runner import OpenVinoFeatureRunner
    from featcache.extract.runner_spec import RunnerSpec

    plan = ExtractionPlan(device="cpu", backend="openvino", autocast=None, decode="cpu", loader="arrays")
    runner, attrs = build_runner(random_backbone("resnet18"), ["pool5"], plan, input_size=64, intra_op_threads=1)
    assert isinstance(runner, OpenVinoFeatureRunner) and runner.intra_op_threads == 1
    assert attrs == {"backend": "openvino", "provider": "OpenVINO CPU", "precision": "float32",
                     "onnx_sha256": runner.onnx_sha256}
    spec = RunnerSpec.from_plan(plan, "resnet18", "random", ["pool5"], "avg")
    worker_runner, worker_attrs = spec.build_with_attrs(64, 1)  # what a dask worker builds
    assert isinstance(worker_runner, OpenVinoFeatureRunner) and worker_attrs["backend"] == "openvino"


def test_an_int8_runner_spec_runs_the_driver_s_graph_bytes(random_backbone):
    """What an int8 dask worker builds: the graph the driver calibrated, from its bytes; no weights resolved."""
    import hashlib

    import numpy as np

    from featcache.extract.runner_spec import RunnerSpec

    driver = ExtractionPlan(device="cpu", backend="onnx", autocast=None, decode="cpu", loader="arrays",
                            scheduler="local", int8=True)
    # Any featcache ONNX file stands in for the driver's int8 graph here: the spec runs its bytes as they are.
    graph_runner, _ = build_runner(random_backbone("resnet18"), ["pool5"],
                                   ExtractionPlan(device="cpu", backend="onnx", autocast=None, decode="cpu",
                                                  loader="arrays"), input_size=64, intra_op_threads=1)
    graph = graph_runner.path.read_bytes()
    spec = RunnerSpec.from_plan(driver, "no-such-backbone", "pretrained", ["pool5"], "avg", int8_graph=graph)
    assert "int8_graph" not in repr(spec)
    runner, attrs = spec.build_with_attrs(64, 1)
    assert attrs == {"backend": "onnx", "provider": "CPUExecutionProvider", "precision": "int8",
                     "onnx_sha256": hashlib.sha256(graph).hexdigest()}
    batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(runner(batch)["pool5"], graph_runner(batch)["pool5"])
    assert spec.build(64, 1) is runner  # once per process
    with pytest.raises(ValueError, match="an int8 plan needs int8_graph"):
        RunnerSpec.from_plan(driver, "resnet18", "random", ["pool5"], "avg")
    with pytest.raises(ValueError, match="only an int8 plan takes one"):
        RunnerSpec.from_plan(replace(driver, int8=False), "resnet18", "random", ["pool5"], "avg", int8_graph=graph)
    with pytest.raises(ValueError, match="runs on onnxruntime's CPU provider.*backend 'torch'"):
        RunnerSpec("resnet18", "random", ("pool5",), "avg", backend="torch", int8_graph=graph)


def test_auto_runs_torch_on_the_cpu_for_a_model_over_what_one_onnx_file_holds(caplog):
    import onnx

    from featcache.extract.plan import PROTOBUF_LIMIT, onnx_size_limit

    limit = onnx_size_limit()
    assert limit == PROTOBUF_LIMIT == onnx.checker.MAXIMUM_PROTOBUF  # protobuf's 2 GiB, without importing onnx
    assert resolve_backend("auto", "cpu", None, weight_bytes=limit - 1) == "onnx"
    assert resolve_backend("auto", "cpu", None, weight_bytes=None) == "onnx"  # the built-in registry: not known
    with caplog.at_level(logging.INFO, logger="featcache"):
        assert resolve_backend("auto", "cpu", None, weight_bytes=limit) == "torch"
    assert "weights take 2.00 GiB in float32, over the 2 GiB one ONNX file holds" in caplog.text
    assert resolve_backend("onnx", "cpu", None, weight_bytes=limit) == "onnx"  # explicit: the export decides
    assert resolve_backend("auto", "cuda", None, weight_bytes=limit - 1) == "torch"
    assert plan_extraction(device="cpu", weight_bytes=5 * 2**30).backend == "torch"
    assert plan_extraction(device="cpu", precision="int8", weight_bytes=5 * 2**30).backend == "onnx"
