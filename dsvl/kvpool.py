"""One memory budget for every session's KV cache.

A session's cache holds exactly the positions its requests need (prompt + reply, rounded up to a block of
``BLOCK_TOKENS``), never a full context up front, and grows when a later turn needs more. Before a request runs,
``KVPool.reserve`` makes room: idle sessions are evicted least recently used first (the running request never), and a
request that cannot fit even alone is refused before any prefill. The bytes reserved never exceed the budget, also
while a cache grows (the old and the new buffer are both counted until the copy is done).

Why a budget: one full-length cache of the 7B is 30 layers x K,V x 32 heads x 128 x 4096 positions x 2 bytes =
2.0 GB; a count of sessions (each a full context) runs a 24 GB card with 14.7 GB of bf16 weights out of memory at
the fourth or fifth conversation, and CUDA takes the memory at allocation, not as pages are touched.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict

import torch

from .config import TextConfig
from .llama import KVCache
from .processor import ContextOverflowError
from .sessions import Session

log = logging.getLogger(__name__)

BLOCK_TOKENS = 256  # caches grow in steps of this many positions: few reallocations, at most one block unused
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class KVMemoryError(ContextOverflowError):
    """A request needs more KV cache memory than the whole budget holds (even with every other session evicted)."""


def parse_budget(spec: str | int | float | None) -> int | float | None:
    """``"6GB"`` / ``"512MiB"`` / bytes -> int bytes; a number in (0, 1] -> that fraction of the device memory left
    after the weights and a working headroom; ``None`` / ``"auto"`` -> None (the default)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return None
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value, unit = float(spec), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(spec))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"KV cache memory {spec!r}: expected a size like 6GB or 512MiB, a fraction like 0.5, "
                             "or auto")
        value, unit = float(m.group(1)), m.group(2).upper()
    if value <= 0:
        raise ValueError(f"KV cache memory {spec!r} must be more than 0")
    if not unit and value <= 1:
        return value
    return int(value * _UNITS[unit])


def headroom_bytes(weight_bytes: int) -> int:
    """Working memory a request needs beside weights and KV: vision activations (SAM at 1024 px), prefill
    activations, logits and allocator slack. The same rule ``quantization.choose_auto`` uses (10% of the weights
    + 1 GiB)."""
    return int(0.10 * weight_bytes + (1 << 30))


def available_bytes(device: torch.device) -> int:
    """Memory still free on ``device`` now (CUDA: within ``set_per_process_memory_fraction``, if one is set)."""
    from .device import free_memory_bytes

    free = free_memory_bytes(device)
    if device.type == "cuda":
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _d: 1.0)(device)
        total = torch.cuda.get_device_properties(device).total_memory
        free = min(free, int(fraction * total) - torch.cuda.memory_reserved(device))
    return max(0, free)


def resolve_budget(spec: str | int | float | None, device: torch.device, weight_bytes: int,
                   context_bytes: int) -> int:
    """The budget in bytes. Default (auto): on CUDA all the memory left after the weights and the headroom; on
    CPU half of it (the host's RAM is shared with everything else). Never less than one full context."""
    value = parse_budget(spec)
    if isinstance(value, int):
        return value
    left = available_bytes(device) - headroom_bytes(weight_bytes)
    fraction = value if value is not None else (1.0 if device.type == "cuda" else 0.5)
    budget = int(fraction * max(0, left))
    if value is None and budget < context_bytes:
        log.warning("only %.2f GB left for the KV cache after the weights; budgeting one full context (%.2f GB) "
                    "anyway", budget / 1e9, context_bytes / 1e9)
        budget = context_bytes
    return budget


class KVPool:
    """The sessions (``session_id -> Session``, least recently used first) and their KV memory."""

    def __init__(self, config: TextConfig, dtype: torch.dtype, device: torch.device, budget_bytes: int,
                 max_len: int) -> None:
        self.config, self.dtype, self.device, self.max_len = config, dtype, device, max_len
        self.budget_bytes = int(budget_bytes)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.reserved_bytes = 0
        self.evictions = 0
        # For the compiled decode step: zeroed buffers (it attends over the whole buffer under a mask, and 0 x NaN
        # from uninitialised memory would poison it) in few distinct sizes (each size is one compiled graph).
        self.static = False

    @property
    def context_bytes(self) -> int:
        """One full-length conversation."""
        return self.max_len * self.token_bytes

    def stats(self) -> dict[str, int]:
        return {"kv_reserved_bytes": self.reserved_bytes, "kv_budget_bytes": self.budget_bytes,
                "sessions_cached": sum(s.cache is not None for s in self.sessions.values()),
                "kv_evictions": self.evictions}

    def check_fits(self, tokens: int, batch: int = 1) -> None:
        """Refuse (``KVMemoryError``) a request that could not fit even with every other session evicted."""
        need = batch * self._rounded(tokens) * self.token_bytes
        if need > self.budget_bytes:
            fits = self.budget_bytes // (batch * self.token_bytes) // BLOCK_TOKENS * BLOCK_TOKENS
            raise KVMemoryError(f"this request needs {batch * tokens:,} tokens of KV cache ({need / 1e9:.2f} GB) but "
                                f"the server's KV cache memory is {self.budget_bytes / 1e9:.2f} GB, room for "
                                f"{fits:,} tokens")

    def session(self, session_id: str | None) -> tuple[Session, bool]:
        """The session's state (created on first use, marked most recently used); anonymous requests get a
        fresh, unsaved one. Returns (session, kept)."""
        if session_id is None:
            return Session(None), False
        s = self.sessions.get(session_id)
        if s is None:
            s = self.sessions[session_id] = Session(None)
        self.sessions.move_to_end(session_id)
        return s, True

    def reserve(self, session: Session, tokens: int, batch: int = 1) -> bool:
        """Make ``session.cache`` hold at least ``tokens`` positions, evicting idle sessions as needed. Returns
        False when the session's cached positions had to be given up to fit (its prefix is then recomputed)."""
        self.check_fits(tokens, batch)
        have = session.cache
        if have is not None and have.max_len >= tokens and have.batch_size == batch:
            return True
        size = self._rounded(tokens)
        need = batch * size * self.token_bytes
        keep = have is not None and have.batch_size == batch and bool(session.ids)
        self._evict_for(need, session)
        if keep and self.reserved_bytes + need > self.budget_bytes:
            keep = False  # old + new do not fit side by side: drop the old and recompute the prefix
        if not keep:
            self._free(session)
        cache = self._alloc(batch, size)
        self.reserved_bytes += cache.nbytes
        if keep:
            live = len(session.ids)
            cache.k[:, :, :, :live] = have.k[:, :, :, :live]
            cache.v[:, :, :, :live] = have.v[:, :, :, :live]
            self.reserved_bytes -= have.nbytes
        session.cache = cache
        return keep or have is None

    def release(self, session: Session) -> None:
        """Free a session's cache (an anonymous request's when it ends)."""
        self._free(session)

    def drop(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            self._free(s)

    def drop_all(self) -> None:
        for s in self.sessions.values():
            self._free(s)
        self.sessions.clear()

    def _rounded(self, tokens: int) -> int:
        blocks = -(-max(1, tokens) // BLOCK_TOKENS)
        if self.static:
            blocks = 1 << (blocks - 1).bit_length()  # powers of two: log2(max_len / block) + 1 graphs at most
        return max(tokens, min(self.max_len, blocks * BLOCK_TOKENS))

    def _evict_for(self, need: int, running: Session) -> None:
        """Evict idle sessions, least recently used first, until ``need`` more bytes fit."""
        for sid in list(self.sessions):
            if self.reserved_bytes + need <= self.budget_bytes:
                return
            s = self.sessions[sid]
            if s is running or s.cache is None:
                continue
            log.info("KV cache memory full: evicting idle session %s (%.2f GB)", sid[:8], s.cache.nbytes / 1e9)
            self.drop(sid)
            self.evictions += 1

    def _free(self, session: Session) -> None:
        """Give the session's cache back; the positions it held are forgotten with it."""
        if session.cache is not None:
            self.reserved_bytes -= session.cache.nbytes
            session.cache = None
        session.reset()

    def _alloc(self, batch: int, size: int) -> KVCache:
        """Eager attention reads only positions already written, so the buffers may stay uninitialised."""
        cache = KVCache(self.config, batch, size, self.dtype, "meta")
        new = torch.zeros if self.static else torch.empty
        cache.k = new(cache.k.shape, dtype=self.dtype, device=self.device)
        cache.v = new(cache.v.shape, dtype=self.dtype, device=self.device)
        if self.static and self.device.type == "cuda":  # CUDA graphs then read them in place, without copies
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        return cache
