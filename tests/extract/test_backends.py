"""extract.backends: what `auto` picks (CUDA monkeypatched), the runner it builds, `featcache doctor`."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from featcache.extract import backends
from featcache.extract.backends import (
    build_runner, doctor_report, precision_name, resolve_autocast, resolve_backend, runner_attrs,
)
from featcache.errors import ExtractionError


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports two CUDA devices (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")


def test_auto_backend_is_torch_on_cuda_and_onnxruntime_on_cpu(monkeypatch):
    assert resolve_backend("auto", "cuda") == "torch" and resolve_backend("auto", "cuda:1") == "torch"
    assert resolve_backend("auto", "cpu") == "onnx"
    assert (resolve_backend("torch", "cpu"), resolve_backend("onnx", "cuda")) == ("torch", "onnx")
    monkeypatch.setattr(backends, "_onnxruntime_installed", lambda: False)
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


def test_build_runner_torch_and_onnx_on_cpu(random_backbone):
    from featcache.extract.onnx.runner import OnnxFeatureRunner
    from featcache.extract.runners.torch_runner import TorchFeatureExtractor

    loaded = random_backbone("resnet18")
    runner, attrs = build_runner(loaded, ["pool5"], backend="torch", autocast="auto")
    assert isinstance(runner, TorchFeatureExtractor) and runner.autocast is None
    assert attrs == {"backend": "torch", "provider": "cpu", "precision": "float32"}
    runner, attrs = build_runner(loaded, ["pool5"], backend="auto", input_size=64)
    assert isinstance(runner, OnnxFeatureRunner) and attrs["provider"] == runner.provider == "CPUExecutionProvider"


def test_onnx_on_cuda_without_its_provider_stops_with_the_fix(monkeypatch):
    from featcache.extract.onnx import runner as onnx_runner

    class CpuOnly:
        provider = "CPUExecutionProvider"

    monkeypatch.setattr(onnx_runner.OnnxFeatureRunner, "from_source", classmethod(lambda cls, *a, **k: CpuOnly()))
    with pytest.raises(ExtractionError, match="runs on CPUExecutionProvider.*backend: auto.*pip uninstall -y "
                                              "onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"):
        build_runner(object(), ["pool"], backend="onnx", device="cuda")


def test_doctor_on_a_cpu_machine():
    text = "\n".join(doctor_report())
    assert f"torch {torch.__version__}" in text and "onnxruntime" in text
    assert "extract.backend: auto -> onnx" in text and "auto -> float32" in text


def test_doctor_on_a_gpu_machine_with_both_onnxruntime_packages(fake_cuda, monkeypatch):
    real_version = importlib.metadata.version

    def version(name):
        return "1.20.0" if name == "onnxruntime-gpu" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(backends, "_gpu_decoder_line", lambda cuda: "GPU JPEG decode: (checked)")
    text = "\n".join(doctor_report())
    assert "CUDA: yes, 2 device(s): NVIDIA H200, NVIDIA H200" in text
    assert "both onnxruntime and onnxruntime-gpu are installed" in text and "pip install onnxruntime-gpu" in text
    assert "extract.device: auto -> cuda; extract.backend: auto -> torch; extract.autocast: auto -> float16" in text


def test_pipeline_stores_what_auto_resolved_to(fake_cuda, monkeypatch):
    """The config hash records the resolved backend/precision: auto on CPU == the explicit onnx/none config."""
    from featcache.pipeline.config import parse_params
    from featcache.pipeline.config import expected_config, resolved_choices
    from featcache.store.schema import canonical_json

    auto = parse_params({"extract": {"backend": "auto", "autocast": "auto"}})
    assert resolved_choices(auto.extract) == ("cuda", "torch", "fp16")
    on_gpu = expected_config(auto, "efficientnet_lite0")["extract"]
    assert (on_gpu["backend"], on_gpu["autocast"]) == ("torch", "fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    explicit = parse_params({"extract": {"backend": "onnx", "autocast": "none"}})
    assert canonical_json(expected_config(auto, "efficientnet_lite0")) == canonical_json(
        expected_config(explicit, "efficientnet_lite0"))


def test_doctor_command(capsys):
    from featcache.pipeline.cli import main

    assert main(["doctor"]) == 0
    assert "extract.backend: auto ->" in capsys.readouterr().out
