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


# /proc/cpuinfo excerpts (one processor each; the real files repeat the block per core).
CPUINFO = {
    "sapphire_rapids": "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                       "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n",
    "zen4": "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n",
    "skylake": "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: fpu sse2 avx2 avx512f\n",
    "graviton": "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha1 sha2 crc32 atomics\n",
}


def _fake_cpuinfo(monkeypatch, text: str | None) -> None:
    """Make `cpu_flags` read `text` as /proc/cpuinfo (None: the file does not exist, as on macOS)."""
    class FakePath:
        def __init__(self, path):
            assert str(path) == "/proc/cpuinfo"

        def read_text(self):
            if text is None:
                raise FileNotFoundError("/proc/cpuinfo")
            return text

    monkeypatch.setattr(D, "Path", FakePath)
    D.cpu_flags.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_mps_available", lambda: False)


@pytest.mark.parametrize("cpu, want", [("sapphire_rapids", torch.bfloat16), ("zen4", torch.bfloat16),
                                       ("skylake", torch.float32), ("graviton", torch.float32),
                                       ("no_cpuinfo", torch.float32)])
def test_auto_choice_on_a_cpu_follows_its_cpuinfo_flags(monkeypatch, cpu, want):
    _fake_cpuinfo(monkeypatch, CPUINFO.get(cpu))
    try:
        assert D.resolve("auto", "auto") == (torch.device("cpu"), want)
        assert ("avx2" in D.cpu_flags()) == (cpu in ("sapphire_rapids", "zen4", "skylake"))
    finally:
        D.cpu_flags.cache_clear()  # the next test reads this machine's own file again


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


@pytest.mark.parametrize("cpu, want", [("zen4", torch.bfloat16), ("skylake", torch.float32)])
def test_load_uses_the_choice(tiny_checkpoint, monkeypatch, cpu, want):
    _fake_cpuinfo(monkeypatch, CPUINFO[cpu])
    try:
        e = dsvl.load(str(tiny_checkpoint), device="auto", dtype="auto")
    finally:
        D.cpu_flags.cache_clear()
    assert e.device == torch.device("cpu")
    assert e.dtype is want and e.model.dtype is want
    with pytest.raises(D.DeviceError):
        dsvl.load(str(tiny_checkpoint), device="cuda")
