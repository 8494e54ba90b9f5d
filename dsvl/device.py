"""Device and dtype choice.

``auto`` rules (why: docs/PERFORMANCE.md, "CPUs differ").
CUDA -> bfloat16 (float16 on GPUs without bf16, e.g. T4/V100); Apple MPS -> float16;
CPU -> bfloat16 where the CPU has native bf16 arithmetic (``avx512_bf16`` or AMX in /proc/cpuinfo flags), else
float32 (PyTorch's bf16 kernels are emulated and slow without them). Explicit flags always win; asking for a
device that is not there is a clear ``DeviceError``, never a silent fallback.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# CPU flags that make bf16 matmuls native (Zen 4 / Sapphire Rapids and later).
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class DeviceError(ValueError):
    """The requested device or dtype is not available on this machine."""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it does not exist, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in FAST_BF16_FLAGS)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def choose_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu. An explicit device must exist (``DeviceError`` says why not)."""
    if isinstance(device, torch.device):
        device = str(device)
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {device!r} (expected auto, cpu, cuda, cuda:N or mps): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise DeviceError(f"device {device!r} requested but {why}; use device='cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA "
                              f"device(s) exist")
    elif dev.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {device!r} requested but Apple MPS is not available here; use 'cpu' or "
                              f"'auto'")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device {device!r} (expected auto, cpu, cuda, cuda:N or mps)")
    return dev


def choose_dtype(device: torch.device, dtype: str | torch.dtype = "auto",
                 flags: frozenset[str] | None = None) -> torch.dtype:
    """``auto`` per the rules in the module docstring; explicit names: float32/bfloat16/float16 (and short forms)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"unsupported dtype {dtype} (expected float32, bfloat16 or float16)")
        chosen = dtype
    elif dtype.strip().lower() == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16(flags) else torch.float32
    else:
        try:
            chosen = DTYPES[dtype.strip().lower()]
        except KeyError:
            raise DeviceError(f"unsupported dtype {dtype!r} (expected auto, float32, bfloat16 or float16)") from None
    if chosen is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"bfloat16 requested but {torch.cuda.get_device_name(device)} does not support it; "
                          f"use dtype='float16' or 'auto'")
    return chosen


def resolve(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """The (device, dtype) pair ``dsvl.load`` runs with."""
    dev = choose_device(device)
    return dev, choose_dtype(dev, dtype)


def free_memory_bytes(device: torch.device) -> int:
    """Memory a model could still use on ``device``: free GPU memory on CUDA, available RAM otherwise (MPS shares
    system RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def describe(device: torch.device) -> str:
    """One line for logs and the app badge."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {'native' if cpu_has_fast_bf16() else 'no native'} bf16)"
    return device.type
