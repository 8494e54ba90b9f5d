"""dsvl: DeepSeek-VL 7B chat ("hybrid": SigLIP + SAM) and DeepSeek-VL 1.3B chat (SigLIP only) in plain PyTorch.

    engine = dsvl.load("deepseek-community/deepseek-vl-7b-chat")
    for delta in engine.stream([{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                                             {"type": "text", "text": "Describe it."}]}]):
        print(delta, end="")

Submodules are imported lazily so that ``import dsvl`` stays cheap and the app starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

DEFAULT_MODEL = "deepseek-community/deepseek-vl-7b-chat"

_EXPORTS = {
    "DsvlConfig": "dsvl.config",
    "ConfigError": "dsvl.config",
    "ImageError": "dsvl.images",
    "ContextOverflowError": "dsvl.processor",
    "Cancelled": "dsvl.processor",
    "CheckpointError": "dsvl.loading",
    "Engine": "dsvl.generation",
    "GenerationStats": "dsvl.stream",
    "TextStream": "dsvl.stream",
    "KVMemoryError": "dsvl.kvpool",
}

if TYPE_CHECKING:
    from dsvl.generation import Engine


def load(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", quantization: str = "none",
         **options: Any) -> "Engine":
    """Load a checkpoint (hub id or local directory) and return a ready ``Engine``."""
    from dsvl.generation import Engine

    return Engine.from_pretrained(model, device=device, dtype=dtype, quantization=quantization, **options)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsvl' has no attribute {name!r}")


__all__ = ["load", "DEFAULT_MODEL", *_EXPORTS]
