"""Device and dtype auto-choice (CUDA / MPS availability is faked where this machine lacks it)."""

from __future__ import annotations

import pytest
import torch

import dsvl
from dsvl import device as D


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_mps_available", lambda: False)
    assert D.choose_device("auto") == torch.device("cpu")
    monkeypatch.setattr(D, "_mps_available", lambda: True)
    assert D.choose_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.choose_device("auto") == torch.device("cuda")


def test_auto_dtype_rules(monkeypatch):
    cpu = torch.device("cpu")
    assert D.choose_dtype(cpu, "auto", flags=frozenset({"avx2", "avx512_bf16"})) is torch.bfloat16
    assert D.choose_dtype(cpu, "auto", flags=frozenset({"avx2", "amx_bf16", "amx_tile"})) is torch.bfloat16
    assert D.choose_dtype(cpu, "auto", flags=frozenset({"avx2", "avx512f"})) is torch.float32
    assert D.choose_dtype(torch.device("mps"), "auto") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert D.choose_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert D.choose_dtype(torch.device("cuda"), "auto") is torch.float16  # T4 / V100


def test_this_machine_auto_choice_matches_its_cpu_flags():
    dev, dt = D.resolve("auto", "auto")
    if not torch.cuda.is_available():
        assert dev.type in ("cpu", "mps")
        if dev.type == "cpu":
            flags = open("/proc/cpuinfo").read() if D.cpu_flags() else ""
            fast = "avx512_bf16" in flags or "amx_bf16" in flags
            assert dt is (torch.bfloat16 if fast else torch.float32)


def test_flags_override():
    cpu = torch.device("cpu")
    assert D.choose_dtype(cpu, "float32", flags=frozenset({"avx512_bf16"})) is torch.float32
    assert D.choose_dtype(cpu, "bf16", flags=frozenset()) is torch.bfloat16
    assert D.choose_dtype(cpu, torch.float16) is torch.float16
    assert D.choose_device("CPU") == torch.device("cpu")


def test_unavailable_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(D.DeviceError, match="cuda.*requested but"):
        D.choose_device("cuda")
    with pytest.raises(D.DeviceError, match="cuda:1.*requested"):
        D.choose_device("cuda:1")
    monkeypatch.setattr(D, "_mps_available", lambda: False)
    with pytest.raises(D.DeviceError, match="MPS is not available"):
        D.choose_device("mps")
    with pytest.raises(D.DeviceError, match="unknown device|unsupported device"):
        D.choose_device("tpu")
    with pytest.raises(D.DeviceError, match="unsupported dtype"):
        D.choose_dtype(torch.device("cpu"), "int8")


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(D.DeviceError, match="T4 does not support"):
        D.choose_dtype(torch.device("cuda"), "bfloat16")


def test_load_uses_the_choice(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_mps_available", lambda: False)
    e = dsvl.load(str(tiny_checkpoint), device="auto", dtype="auto")
    assert e.device == torch.device("cpu")
    assert e.dtype is (torch.bfloat16 if D.cpu_has_fast_bf16() else torch.float32)
    assert e.model.dtype is e.dtype
    with pytest.raises(D.DeviceError):
        dsvl.load(str(tiny_checkpoint), device="cuda")
