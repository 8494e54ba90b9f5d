"""Fault injection for tests: ``DSVL_FAULT_INJECT="oom_at_decode_step=3"`` (or ``oom_at_prefill=1``) makes that
step raise ``torch.OutOfMemoryError``, so recovery from out-of-memory is tested without filling a GPU."""

from __future__ import annotations

import os

import torch

FAULT_ENV = "DSVL_FAULT_INJECT"


def faults() -> dict[str, int]:
    spec = os.environ.get(FAULT_ENV, "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        out[name.strip()] = int(value or 1)
    return out


def inject(faults: dict[str, int], name: str, step: int) -> None:
    if faults.get(name) == step:
        raise torch.OutOfMemoryError(f"{FAULT_ENV}: injected out-of-memory ({name}={step})")
