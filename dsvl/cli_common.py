"""What `python -m dsvl serve` and `python -m dsvl chat` share: the model flags (the app's names and
environment variables) and loading the engine with plain-words failures."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

_LOAD_ERRORS = ("CheckpointError", "ConfigError", "DeviceError", "QuantizationError")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--model", default=env("DSVL_MODEL", "deepseek-community/deepseek-vl-7b-chat"),
                   help="hub id, local checkpoint directory, or random:tiny|mid|7b [DSVL_MODEL] (default: %(default)s)")
    p.add_argument("--quantization", default=env("DSVL_QUANTIZATION", "auto"), metavar="MODE",
                   help="auto, none, int8-wo, int4-wo[-gN], bnb-int8, bnb-nf4 (old names int8, nf4); what each "
                        "costs: README 'Quantization' [DSVL_QUANTIZATION] (default: %(default)s)")
    p.add_argument("--device", default=env("DSVL_DEVICE", "auto"), help="[DSVL_DEVICE] (default: %(default)s)")
    p.add_argument("--dtype", default=env("DSVL_DTYPE", "auto"), help="[DSVL_DTYPE] (default: %(default)s)")
    p.add_argument("--max-context-tokens", type=int, default=int(env("DSVL_MAX_CONTEXT_TOKENS", 4096)),
                   help="prompt + answer budget [DSVL_MAX_CONTEXT_TOKENS] (default: %(default)s)")


def load_engine(args: argparse.Namespace) -> Any:
    """`dsvl.load` with the flags; a checkpoint/device problem ends the program with its message, on stderr."""
    import dsvl

    if args.max_context_tokens < 1:
        raise SystemExit("--max-context-tokens must be positive")
    print(f"Loading {args.model} …", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        engine = dsvl.load(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                           max_context_tokens=args.max_context_tokens)
    except Exception as exc:
        if type(exc).__name__ in _LOAD_ERRORS:
            raise SystemExit(f"Could not load the model: {exc}") from None
        raise
    print(f"Loaded in {time.perf_counter() - t0:.1f} s: {engine.device}, {str(engine.dtype).removeprefix('torch.')}, "
          f"quantization {engine.quantization}" + ("  [RANDOM WEIGHTS: answers are noise]" if engine.is_random else ""),
          file=sys.stderr, flush=True)
    return engine
