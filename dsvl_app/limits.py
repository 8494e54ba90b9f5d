"""The limits every caller meets, whatever route it takes (the page, `/chat`, a crafted `queue/join` of any
handler): what a message, a history and a conversation may hold, and which generation settings are valid.
One source for each bound; the UI's widgets use the same numbers."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .settings import GenerationDefaults

MAX_MESSAGE_CHARS = 200_000  # one message's text (the input box stops there too)
MAX_HISTORY_MESSAGES = 1_000  # an API `history`
MAX_HISTORY_CHARS = 2_000_000  # all texts of an API `history` together
MAX_EXPORT_BYTES = 64 * 1024 * 1024  # images inside one exported file (each reference counts)
MAX_SEED = 2**63 - 1

# The settings' ranges: those of the sliders in the page, for every caller.
RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.05, 1.0),
    "top_k": (0, 200),
    "repetition_penalty": (1.0, 2.0),
}
GREEDY_BELOW = 0.01  # a temperature under this samples like 0 (dividing logits by 1e-45 overflows float32)


class LimitError(ValueError):
    """A request beyond a limit; the message is meant for the person (or program) that sent it."""


def check_text(text: str, what: str = "The message") -> None:
    if len(text) > MAX_MESSAGE_CHARS:
        raise LimitError(f"{what} is {len(text):,} characters long; at most {MAX_MESSAGE_CHARS:,} are accepted.")


def check_conversation(conv: list[dict], *, max_images: int, max_images_per_chat: int) -> None:
    """Every turn holds at most `max_images` images and the conversation at most `max_images_per_chat`
    (each reference counts: the same upload twice is two images for the model and for Export)."""
    total = 0
    for turn in conv:
        if turn["role"] != "user":
            continue
        n = len(turn.get("images", ()))
        if n > max_images:
            raise LimitError(f"A message of this chat holds {n} images; at most {max_images} per message.")
        check_text(turn.get("text", ""), "A message of this chat")
        total += n
    if total > max_images_per_chat:
        raise LimitError(f"This chat holds {total} images; at most {max_images_per_chat} per chat. "
                         "Start a new chat to talk about more pictures.")


def check_history_size(value: Any) -> None:
    """Cheap bounds on an API `history` before it is read (the page never sends one)."""
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if isinstance(value, list) and len(value) > MAX_HISTORY_MESSAGES:
        raise LimitError(f"history has {len(value):,} messages; at most {MAX_HISTORY_MESSAGES:,} are accepted.")


def check_history_text(turns: list[dict]) -> None:
    total = sum(len(t.get("text", "")) for t in turns)
    if total > MAX_HISTORY_CHARS:
        raise LimitError(f"history holds {total:,} characters of text; at most {MAX_HISTORY_CHARS:,} are accepted.")


def is_upload(path: Any, upload_root: Path) -> bool:
    """True when `path` names a file inside this server's upload folder (after resolving links). Nothing
    else about the path is looked at, so a refusal says nothing about files elsewhere."""
    if not isinstance(path, str) or not path or "\x00" in path:
        return False
    root = Path(os.path.realpath(upload_root))
    real = Path(os.path.realpath(path))
    return root in real.parents


def export_bytes(conv: list[dict]) -> int:
    """Bytes of image data an Export of `conv` would hold (each reference counts); missing files count 0."""
    total = 0
    for turn in conv:
        for p in turn.get("images", ()) if turn["role"] == "user" else ():
            try:
                total += os.path.getsize(p)
            except OSError:
                pass
    return total


def generation_settings(temperature: Any, top_p: Any, top_k: Any, max_new_tokens: Any, repetition_penalty: Any,
                        seed: Any, *, max_context_tokens: int, defaults: GenerationDefaults | None = None) -> dict:
    """Slider values (floats from the page, anything through the API; None = the default) -> engine.stream
    keyword arguments. A value that is not a finite number, or lies outside its slider's range, is refused
    with a message that names the setting and the range; max_new_tokens is clamped to the slider's top."""
    d = defaults or GenerationDefaults()
    max_new_limit = max(1, min(4096, max_context_tokens))

    def num(name: str, v: Any, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
        if v is None or v == "":
            return default
        x: Any = None
        if isinstance(v, int) and not isinstance(v, bool):
            x = v  # exact, however large (a float would round a 64-bit seed)
        elif not isinstance(v, bool):
            try:
                x = float(v)
            except (TypeError, ValueError, OverflowError):
                pass
        label = name.replace("_", " ")
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            raise LimitError(f"The setting {label} must be a number; got {str(v)[:40]!r}.")
        if integer and x != int(x):
            raise LimitError(f"The setting {label} must be a whole number; got {x:g}.")
        if not lo <= x <= hi:
            shown = (lambda v: f"{int(v):,}" if v != math.inf else "∞") if integer else (lambda v: f"{v:g}")
            raise LimitError(f"The setting {label} must lie between {shown(lo)} and {shown(hi)}; got {shown(x)}.")
        return int(x) if integer else x

    t = num("temperature", temperature, d.temperature, *RANGES["temperature"])
    seed_v = num("seed", seed, d.seed, -1, MAX_SEED, integer=True)
    return {
        "temperature": 0.0 if t < GREEDY_BELOW else t,
        "top_p": num("top_p", top_p, d.top_p, *RANGES["top_p"]),
        "top_k": num("top_k", top_k, d.top_k, *RANGES["top_k"], integer=True),
        # The answer length is clamped rather than refused: "as long as allowed" is a fair request.
        "max_new_tokens": min(max_new_limit, num("max_new_tokens", max_new_tokens, d.max_new_tokens, 1, math.inf,
                                                 integer=True)),
        "repetition_penalty": num("repetition_penalty", repetition_penalty, d.repetition_penalty,
                                  *RANGES["repetition_penalty"]),
        "seed": None if seed_v < 0 else seed_v,
    }
