"""Left-padded batch generation: several conversations in one forward, without session caches.

Pads get attention mask 0 and position 0 (as transformers' ``generate``); each row ends on its own EOS / stop
string; finished rows keep running (on pad) until all are done. Greedy text equals one-by-one generation.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

import torch

from .sampling import SamplingParams, StopStringFilter, sample
from .sessions import Session
from .stream import GenerationStats, _Cancelled
from .text import StreamingDetokenizer

if TYPE_CHECKING:
    from .generation import Engine


def generate_batch(engine: "Engine", conversations: list, *, cancel: threading.Event | None = None,
                   session_id: str | None = None, stop: Sequence[str] | str | None = None, **params) -> list[str]:
    """One reply per conversation; sampling arguments as ``Engine.stream`` (``None`` = the checkpoint's)."""
    if session_id is not None:
        raise ValueError("session_id is for single conversations; a batch runs without session caches")
    p = engine.defaults.override(stop=stop, **params)
    cancel = cancel or threading.Event()
    prompts = [engine.processor.prepare(c, max_context_tokens=engine.max_context_tokens,
                                        reserve_new_tokens=min(p.max_new_tokens, engine.max_context_tokens // 2))
               for c in conversations]
    max_new = min(p.max_new_tokens, engine.max_context_tokens - max(len(pr.token_ids) for pr in prompts))
    L = max(len(pr.token_ids) for pr in prompts)
    engine._kv.check_fits(L + max_new, batch=len(prompts))  # refused before prefill
    try:
        with engine._locked(cancel):
            return _run(engine, prompts, p, max_new, cancel, GenerationStats())
    except _Cancelled:  # cancelled while queued
        return [""] * len(prompts)


def _run(engine: "Engine", prompts: list, p: SamplingParams, max_new: int, cancel, stats: GenerationStats
         ) -> list[str]:
    B = len(prompts)
    L = max(len(pr.token_ids) for pr in prompts)
    rows = Session(None)  # the batch's cache: reserved from the KV budget like a session's, freed at the end
    try:
        ids = torch.full((B, L), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L + max_new), dtype=torch.bool)
        mask[:, L:] = True  # generated positions are real in every row (finished rows' pads are ignored)
        for r, pr in enumerate(prompts):
            ids[r, L - len(pr.token_ids):] = torch.tensor(pr.token_ids)
            mask[r, L - len(pr.token_ids):L] = True
        ids, mask = ids.to(engine.device), mask.to(engine.device)
        all_keys = [k for pr in prompts for k in pr.image_keys]
        all_images = [im for pr in prompts for im in pr.images]
        features = engine._image_features(all_images, all_keys, stats, cancel)
        engine._kv.reserve(rows, L + max_new, batch=B)  # may evict idle sessions
        cache = rows.cache
        lm = engine.model.model.language_model
        embed = lm.embed_tokens
        pos = (mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)
        h = lm(engine.model.embed(ids, features), pos, cache=cache, cache_start=0, key_padding_mask=mask[:, :L])
        logits = engine._logits(h[:, -1])
        next_pos = pos[:, -1:] + 1
        generator = None
        if p.seed is not None and p.temperature > 0:
            generator = torch.Generator(device=engine.device).manual_seed(p.seed)
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(B, engine.vocab_limit, dtype=torch.bool, device=engine.device)
            seen.scatter_(1, ids.clamp(max=engine.vocab_limit - 1), mask[:, :L])
        detoks = [StreamingDetokenizer(engine.tokenizer) for _ in range(B)]
        filters = [StopStringFilter(p.stop) for _ in range(B)]
        texts = [""] * B
        done = [False] * B
        for step in range(max_new):
            tok = sample(logits, p, seen, generator)
            for r, t in enumerate(tok.tolist()):  # one host transfer per step for the whole batch
                if done[r]:
                    continue
                if t == engine.eos_id:
                    done[r] = True
                    continue
                texts[r] += filters[r].push(detoks[r].push(t))
                done[r] = filters[r].stopped
            if all(done) or step + 1 == max_new or cancel.is_set():
                break
            tok = torch.where(torch.tensor(done, device=engine.device), engine.pad_id, tok).view(B, 1)
            if seen is not None:
                seen.scatter_(1, tok, True)
            start = L + step
            h = lm(embed(tok), next_pos, cache=cache, cache_start=start,
                   key_padding_mask=mask[:, :start + 1])
            logits = engine._logits(h[:, -1])
            next_pos = next_pos + 1
        for r in range(B):
            if not filters[r].stopped:
                texts[r] += filters[r].push(detoks[r].flush()) + filters[r].finish()
        return texts
    except torch.OutOfMemoryError:
        engine._drop_all()  # the next request must find the memory free
        raise
    finally:
        engine._kv.release(rows)
