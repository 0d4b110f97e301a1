"""extract/doctor.py: `featcache doctor` on a CPU machine and on a (monkeypatched) GPU machine."""

from __future__ import annotations

import importlib.metadata

import torch

from featcache.extract import doctor
from featcache.extract.doctor import doctor_report, gpu_decoder_line


def test_doctor_on_a_cpu_machine():
    text = "\n".join(doctor_report())
    assert f"torch {torch.__version__}" in text and "onnxruntime" in text
    assert "extract.backend: auto -> onnx" in text and "auto -> float32" in text
    assert "decode cpu, loader arrays" in text


def test_doctor_on_a_gpu_machine_with_both_onnxruntime_packages(fake_cuda, monkeypatch):
    real_version = importlib.metadata.version

    def version(name):
        return "1.20.0" if name == "onnxruntime-gpu" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(doctor, "gpu_decoder_line", lambda cuda: "GPU JPEG decode: (checked)")
    text = "\n".join(doctor_report())
    assert "CUDA: yes, 2 device(s): NVIDIA H200, NVIDIA H200" in text
    assert "both onnxruntime and onnxruntime-gpu are installed" in text and "pip install onnxruntime-gpu" in text
    assert ("extract_run.device: auto -> cuda; extract.backend: auto -> torch; extract.autocast: auto -> float16; "
            "extract.decode: auto -> gpu") in text


def test_the_openvino_line_says_what_bf16_runs(monkeypatch):
    from featcache.extract.onnx import openvino_runner

    status = {"version": "2026.4.1", "cpu": "Some CPU", "capabilities": []}
    monkeypatch.setattr(openvino_runner, "openvino_status", lambda: status)
    for native, expected in [({"bf16", "fp16"}, "native bf16, fp16: extract.autocast: bf16 runs OpenVINO's bf16"),
                             ({"fp16"}, "native fp16, no bf16: extract.autocast: bf16 runs float32 (onnxruntime)"),
                             (set(), "native float32 only, no bf16: extract.autocast: bf16 runs float32")]:
        monkeypatch.setattr(openvino_runner, "native_autocasts", lambda native=native: frozenset(native))
        assert doctor.openvino_line().startswith(f"openvino 2026.4.1 on Some CPU: {expected}")
    status["version"] = None
    assert "not installed" in doctor.openvino_line()


def test_the_gpu_decoder_line_really_checks_the_decoder(monkeypatch):
    """On CUDA the line comes from decoding a test JPEG there (decoders.gpu_decode_status), not from an import."""
    from featcache.extract.decode import decoders

    calls = []

    def status(device="cuda"):
        calls.append(device)
        return False, "No JPEG decoder works on 'cuda' (torchcodec: missing)"

    monkeypatch.setattr(decoders, "gpu_decode_status", status)
    assert gpu_decoder_line(True) == "GPU JPEG decode: NO: No JPEG decoder works on 'cuda' (torchcodec: missing)"
    assert calls == ["cuda"]
    assert "not available (no CUDA device)" in gpu_decoder_line(False) and calls == ["cuda"]


def test_doctor_command(capsys):
    from featcache.pipeline.cli import main

    assert main(["doctor"]) == 0
    assert "extract.backend: auto ->" in capsys.readouterr().out
