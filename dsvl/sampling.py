"""Sampling (transformers' definitions and order) and stop strings."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """One request's sampling. The defaults are plain greedy decoding: what a checkpoint without a
    ``generation_config.json`` gets (``from_generation_config`` reads the checkpoint's own)."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; transformers' definition
    seed: int | None = None
    stop: tuple[str, ...] = ("User:",)  # the chat format's next turn: a reply that starts one has ended

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in (self.stop or ()) if s)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_generation_config(cls, checkpoint_dir: Path | None) -> "SamplingParams":
        """The checkpoint's defaults, read as transformers reads ``generation_config.json``: without
        ``do_sample: true`` decoding is greedy whatever the temperature says; with it, keys left out take
        transformers' defaults (temperature 1, top-p 1, top-k 50). No file: plain greedy."""
        path = None if checkpoint_dir is None else Path(checkpoint_dir) / "generation_config.json"
        if path is None or not path.is_file():
            return cls()
        try:
            g = json.loads(path.read_text(encoding="utf-8"))
            p = cls(repetition_penalty=float(g.get("repetition_penalty") or 1.0))
            if g.get("max_new_tokens"):
                p.max_new_tokens = int(g["max_new_tokens"])
            if g.get("do_sample"):
                p.temperature = float(g.get("temperature", 1.0))
                p.top_p = float(g.get("top_p", 1.0))
                p.top_k = int(g.get("top_k", 50) or 0)
            p.__post_init__()  # the file's values are checked like a caller's
            return p
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("%s: ignoring an unreadable generation config (%s); decoding greedily", path, e)
            return cls()

    def override(self, **given) -> "SamplingParams":
        """These defaults with the arguments that were given (``None`` = keep the default)."""
        if isinstance(given.get("stop"), str):
            given["stop"] = (given["stop"],)
        return replace(self, **{k: v for k, v in given.items() if v is not None})


# ---- sampling (transformers' definitions and order) -------------------------------------------------------------

def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: logits of already-seen ids are divided by ``penalty`` when
    positive and multiplied when negative. ``seen`` is a (B, V) bool mask kept on the device (no sync)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def sample(logits: Tensor, p: SamplingParams, seen: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """(B, V) float32 logits -> (B,) ids. Order as transformers: repetition penalty, temperature, top-k, top-p."""
    if p.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature == 0:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p.top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    # Exponential race (gpt-fast): argmax(p / Exp(1)) is a draw from p without multinomial's host sync.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


class StopStringFilter:
    """Holds back text that could still become a stop string; never lets a stop string's text out."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.buf = ""
        self.emitted = 0
        self.stopped = False

    def push(self, text: str) -> str:
        """Add decoded text; return what is safe to emit now. Sets ``stopped`` when a stop string appeared."""
        if self.stopped or not text:
            return ""
        self.buf += text
        if not self.stops:
            return self._emit(len(self.buf))
        search_from = max(0, self.emitted - self.longest + 1)
        hits = [i for i in (self.buf.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        # Keep back the longest suffix that is a prefix of some stop string.
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf) - self.emitted), keep, -1):
                if self.buf.endswith(s[:n]):
                    keep = n
                    break
        return self._emit(len(self.buf) - keep)

    def finish(self) -> str:
        """End of generation: whatever is held back is not a stop string, emit it."""
        return "" if self.stopped else self._emit(len(self.buf))

    def _emit(self, upto: int) -> str:
        out = self.buf[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out

    @property
    def text(self) -> str:
        return self.buf[:self.emitted]
