"""``Engine``: streaming generation, sampling, stop strings, KV / image caches, cancellation.

One engine owns one model. Requests are serialised by one lock (held from the first token of a stream to its
end), so concurrent callers queue and never touch each other's caches. Each ``session_id`` owns a static KV
cache sized for ``max_context_tokens`` plus the token ids (and image keys) whose keys/values it holds; a new
request reuses the longest common prefix and prefills only what is new. Image features are cached by image
content, so a follow-up question neither re-encodes an image nor re-runs the prompt.

The decode loop is gpt-fast style: a static cache, attention over the live length only, sampling on the device,
and one host transfer per token (the id the detokenizer needs).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DsvlConfig
from .llama import KVCache, apply_rotary, build_attention_mask
from .text import StreamingDetokenizer

log = logging.getLogger(__name__)

STOP_REASONS = ("eos", "stop_string", "max_new_tokens", "cancelled", "error")
FAULT_ENV = "DSVL_FAULT_INJECT"  # tests only, e.g. "oom_at_decode_step=3" or "oom_at_prefill=1"


# ---- public data ------------------------------------------------------------------------------------------------

@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens of the prompt the model actually saw
    prefilled_tokens: int = 0  # of those, how many were run now (the rest came from the session's KV cache)
    new_tokens: int = 0  # sampled tokens, including the EOS / stop-string token that ended the reply
    ttft_s: float | None = None  # from the stream() call to the first sampled token (queue + images + prefill)
    decode_tokens_per_s: float | None = None  # tokens after the first, over the time since the first
    stop_reason: str | None = None  # one of STOP_REASONS
    images_encoded: int = 0  # images run through the vision towers for this request
    images_from_cache: int = 0  # images whose features came from the feature cache
    reused_tokens: int = 0  # prompt tokens served from the session's KV cache
    queue_s: float = 0.0  # waiting for the engine lock
    image_encode_s: float = 0.0
    prefill_s: float = 0.0
    token_times: list[float] = field(default_factory=list, repr=False)  # seconds after the call, per token


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.1  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.1  # 1 = off; transformers' definition
    seed: int | None = None
    stop: tuple[str, ...] = ("User:",)

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


# ---- caches -----------------------------------------------------------------------------------------------------

@dataclass
class _Reply:
    start: int  # index in the session's sequence where the reply begins (right after "Assistant:")
    ids: list[int]  # generated ids whose text is the emitted text (no EOS, no stop-string tail)
    text: str


@dataclass
class _Session:
    cache: KVCache
    ids: list[int] = field(default_factory=list)  # tokens whose keys/values are in `cache`, in order
    keys: list[str | None] = field(default_factory=list)  # image key per position (None = text)
    replies: list[_Reply] = field(default_factory=list)

    def reset(self) -> None:
        self.ids, self.keys, self.replies = [], [], []


class _LRU(OrderedDict):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(0, capacity)

    def get_touch(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value):
        """Insert; returns the evicted values (oldest first)."""
        self[key] = value
        self.move_to_end(key)
        evicted = []
        while len(self) > self.capacity:
            evicted.append(self.popitem(last=False)[1])
        return evicted


def image_runs(ids: Sequence[int], image_id: int, per_image: int) -> list[int]:
    """Start positions of each image's run of ``per_image`` placeholder ids (adjacent images split evenly)."""
    starts, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == image_id:
            j = i
            while j < n and ids[j] == image_id:
                j += 1
            if (j - i) % per_image:
                raise ValueError(f"a run of {j - i} image tokens at {i} is not a multiple of {per_image}")
            starts.extend(range(i, j, per_image))
            i = j
        else:
            i += 1
    return starts


def position_keys(ids: Sequence[int], image_keys: Sequence[str], image_id: int, per_image: int) -> list[str | None]:
    """Per-position image identity: the 576 placeholders of every image are the same ids, so prefix reuse must
    compare (id, key) pairs or a different image at the same place would be served from a stale cache."""
    keys: list[str | None] = [None] * len(ids)
    starts = image_runs(ids, image_id, per_image)
    if len(starts) != len(image_keys):
        raise ValueError(f"{len(starts)} image runs but {len(image_keys)} image keys")
    for s, k in zip(starts, image_keys):
        keys[s:s + per_image] = [k] * per_image
    return keys


def splice_replies(ids: list[int], keys: list[str | None], session: _Session, eos_id: int,
                   decode) -> tuple[list[int], list[str | None], list[_Reply]]:
    """Put the ids the model generated back in place of the re-tokenised text of its replies.

    The new prompt tokenises each earlier assistant reply from its text, which may split differently from the ids
    the model produced (and holds in the KV cache). Walking the session's replies in order, each one whose
    preceding tokens match the session's sequence exactly and whose text matches (up to surrounding whitespace,
    which the chat template strips) is replaced by the stored ids + EOS. Returns the new (ids, keys) and the
    replies that still apply."""
    out, out_keys, kept = [], [], []
    p = 0
    for rep in session.replies:
        need = rep.start - len(out)
        if need < 0 or p + need > len(ids):
            break
        if ids[p:p + need] != session.ids[len(out):rep.start] or keys[p:p + need] != session.keys[len(out):rep.start]:
            break
        try:
            e = ids.index(eos_id, p + need)
        except ValueError:
            break
        if decode(ids[p + need:e]).strip() != rep.text.strip():
            break
        out += ids[p:p + need] + rep.ids + [eos_id]
        out_keys += keys[p:p + need] + [None] * (len(rep.ids) + 1)
        kept.append(rep)
        p = e + 1
    return out + ids[p:], out_keys + keys[p:], kept


def reusable_prefix(ids: Sequence[int], keys: Sequence[str | None], session: _Session, runs: Sequence[int],
                    per_image: int) -> int:
    """Length of the cached prefix to keep: the longest common prefix of (id, image key) pairs, at most
    ``len(ids) - 1`` (the last prompt token must run to produce logits) and never inside an image."""
    n = min(len(ids) - 1, len(session.ids))
    i = 0
    while i < n and ids[i] == session.ids[i] and keys[i] == session.keys[i]:
        i += 1
    for s in runs:
        if s < i < s + per_image:
            return s
    return i


# ---- fault injection (tests) ------------------------------------------------------------------------------------

def _release_heap() -> None:
    """Give freed heap pages back to the OS (glibc only). The vision towers' transient activations (~0.2 GB for
    SAM at 1024 px) are freed in fragments that glibc keeps; without this every later allocation stacks on them and
    the process's peak and steady memory stay that much higher."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _faults() -> dict[str, int]:
    spec = os.environ.get(FAULT_ENV, "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        out[name.strip()] = int(value or 1)
    return out


def _inject(faults: dict[str, int], name: str, step: int) -> None:
    if faults.get(name) == step:
        raise torch.OutOfMemoryError(f"{FAULT_ENV}: injected out-of-memory ({name}={step})")


# ---- the engine -------------------------------------------------------------------------------------------------

class Engine:
    """What ``dsvl.load`` returns. Thread-safe; see the module docstring."""

    def __init__(self, model: nn.Module, processor, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, quantization: str = "none", max_context_tokens: int = 4096,
                 max_sessions: int = 4, image_cache_size: int = 32, prefill_chunk: int = 2048,
                 compile: bool = False, slice_lm_head: bool = True, fuse: bool = True, quantization_reason: str = "",
                 checkpoint_dir: Path | None = None) -> None:
        from .quantization import weight_bytes

        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config: DsvlConfig = model.config
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype or model.dtype
        self.quantization = quantization
        self.quantization_reason = quantization_reason
        self.weight_bytes = weight_bytes(model)
        self.is_random = bool(self.config.random_weights)
        self.checkpoint_dir = checkpoint_dir
        limit = self.config.text.max_position_embeddings
        if max_context_tokens > limit:
            log.warning("max_context_tokens %d > the model's %d positions; using %d", max_context_tokens, limit,
                        limit)
        self.max_context_tokens = min(max_context_tokens, limit)
        self.num_image_tokens = self.config.num_image_tokens
        self.prefill_chunk = max(1, prefill_chunk)
        self.eos_id: int = self.tokenizer.eos_id
        self.pad_id: int = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.eos_id
        self.image_id: int = self.config.image_token_id
        vocab = self.config.text.vocab_size
        # Ids >= the tokenizer's size can never be decoded (7B: 102400 rows, 100016 tokens): their logits must be
        # masked. Computing only the first `size` rows of lm_head is the same mask without the wasted work.
        self.vocab_limit = min(self.tokenizer.size, vocab)
        lm = model.model.language_model
        self._decoder: nn.Module | FusedDecoder = lm
        self._head: _Fused | None = None  # lm_head rows [:vocab_limit] as a fused/packed product, when sliced
        dense = all(type(m) is nn.Linear for n, m in lm.named_modules() if n.endswith("_proj"))
        if fuse and dense:
            pack = self.device.type == "cpu" and self.dtype is torch.bfloat16 and _onednn_packing_works()
            self._decoder = FusedDecoder(lm, pack)
        if slice_lm_head and type(model.lm_head) is nn.Linear and self.vocab_limit < vocab:
            self._head = _fuse_head(model, self.vocab_limit)
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._sessions: _LRU = _LRU(max(1, max_sessions))
        self._spare: KVCache | None = None  # a freed cache kept for reuse (allocating 2 GB per request is slow)
        self._features: _LRU = _LRU(image_cache_size)
        self._pending_end: set[str] = set()  # end_session() calls that arrived while a request held the lock
        self._decode_fn = self._decode_eager
        self.compiled = False
        if compile:
            self._setup_compile()

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        quantization: str = "none", max_context_tokens: int = 4096, revision: str | None = None,
                        **options: Any) -> "Engine":
        """Resolve device/dtype/quantization, load the checkpoint shard by shard and build the processor."""
        from . import device as dev_mod
        from . import quantization as q_mod
        from .loading import CheckpointError, load_model, resolve_checkpoint
        from .processor import Processor

        mode = q_mod.check_mode(quantization)
        dev, dt = dev_mod.resolve(device, dtype)
        path = resolve_checkpoint(model, revision=revision) if revision else resolve_checkpoint(model)
        try:
            config = DsvlConfig.from_file(path / "config.json")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        reason = ""
        if mode == "auto":
            choice = q_mod.choose_auto(config, dev, dt, max_context_tokens)
            mode, reason = choice.mode, choice.reason
        if mode != "none" and dev.type not in ("cpu", "cuda"):
            raise q_mod.QuantizationError(f"quantization={mode!r} runs on CPU and CUDA only, not on {dev.type}. "
                                          f"Use quantization='none'.")
        t0 = time.perf_counter()
        try:  # before the weights: a missing tokenizer must not cost a 15 GB load first
            processor = Processor.from_dir(path)
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on a corrupt tokenizer.json)
            raise CheckpointError(f"{path}: cannot read the tokenizer/processor files ({e})") from None
        if processor.image_processor.hybrid != config.hybrid:
            raise CheckpointError(f"{path}: config.json describes a {config.model_type} model but the image processor "
                                  "files are for the other DeepSeek-VL family")
        net, info = load_model(path, device=dev, dtype=dt, quantization=mode, config=config)
        engine = cls(net, processor, device=dev, dtype=dt, quantization=mode, max_context_tokens=max_context_tokens,
                     quantization_reason=reason, checkpoint_dir=path, **options)
        log.info("dsvl: loaded %s on %s as %s, quantization=%s%s, weights %.2f GB in %.1f s%s", path,
                 dev_mod.describe(dev), str(dt).removeprefix("torch."), mode, f" ({reason})" if reason else "",
                 engine.weight_bytes / 1e9, time.perf_counter() - t0,
                 " [RANDOM WEIGHTS: answers are meaningless]" if engine.is_random else "")
        return engine

    # ---- public API -----------------------------------------------------------------------------------------

    def stream(self, messages: Sequence[Mapping[str, Any]], *, session_id: str | None = None,
               max_new_tokens: int = 512, temperature: float = 0.1, top_p: float = 0.95, top_k: int = 0,
               repetition_penalty: float = 1.1, seed: int | None = None, stop: Sequence[str] | str = ("User:",),
               cancel: threading.Event | None = None) -> "TextStream":
        """Prepare the prompt now (raises ImageError / ContextOverflowError here) and return an iterator of text
        deltas; generation starts on the first ``next()``."""
        t_call = time.perf_counter()
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, tuple(stop)
                                if not isinstance(stop, str) else (stop,))
        # Images whose features are cached are not decoded here (a follow-up question re-reads none); `cancel`
        # abandons a long preparation between turns and images (processor.Cancelled).
        prompt = self.processor.prepare(messages, max_context_tokens=self.max_context_tokens,
                                        reserve_new_tokens=min(max_new_tokens, self.max_context_tokens // 2),
                                        cancel=cancel, have_features=self._features.__contains__)
        return TextStream(self, prompt, params, session_id, cancel, t_call)

    def generate(self, messages_or_batch, **params: Any) -> str | list[str]:
        """Whole reply for one conversation; for a list of conversations, a list of replies generated as one
        left-padded batch (same greedy text as one by one)."""
        is_batch = bool(messages_or_batch) and not isinstance(messages_or_batch[0], Mapping)
        if not is_batch:
            with self.stream(messages_or_batch, **params) as s:
                return "".join(s)
        return self._generate_batch(list(messages_or_batch), **params)

    def end_session(self, session_id: str) -> None:
        """Free a session's KV cache (the buffer is kept for the next session). Never waits: while a request is
        running, the session is dropped when it finishes."""
        self._pending_end.add(session_id)
        if self._lock.acquire(blocking=False):
            try:
                self._end_pending()
            finally:
                self._lock.release()

    def _end_pending(self) -> None:
        """Called with the lock held."""
        while self._pending_end:
            s = self._sessions.pop(self._pending_end.pop(), None)
            if s is not None:
                self._recycle(s.cache)

    def clear_caches(self) -> None:
        """Drop every session and cached image feature (and return GPU memory to the driver)."""
        with self._locked():
            self._drop_all()

    @property
    def sessions(self) -> list[str]:
        """Ids of the sessions that hold a KV cache (least recently used first)."""
        return list(self._sessions)

    # ---- locking --------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, cancel: "_AnyEvent | None" = None) -> Iterator[None]:
        """Hold the model. A request that is cancelled while it waits in the queue gives up (``_Cancelled``)
        instead of running once its turn comes."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("this thread already has an open stream on this engine; finish or close() it "
                               "before starting another (it would wait for itself forever)")
        while not self._lock.acquire(timeout=0.05 if cancel is not None else -1):
            if cancel.is_set():
                raise _Cancelled
        self._owner = me
        try:
            yield
        finally:
            try:
                self._end_pending()
            finally:
                self._owner = None
                self._lock.release()

    # ---- caches ---------------------------------------------------------------------------------------------

    def _new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        max_len = max_len or self.max_context_tokens
        if batch_size == 1 and max_len == self.max_context_tokens and self._spare is not None:
            cache, self._spare = self._spare, None
            return cache
        return self._alloc_cache(batch_size, max_len)

    def _alloc_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A static KV cache. Eager attention reads only the live length, which is always written first, so the
        buffers can stay uninitialised: pages are then only touched (and counted in RSS) as the context grows,
        instead of 268 MB (mid) / 2 GB (7B) being zeroed up front. The compiled step attends over a masked bucket
        that includes unwritten slots (0 x NaN would poison it), so there they are zeroed."""
        cache = KVCache(self.config.text, batch_size, max_len, self.dtype, "meta")
        alloc = torch.zeros if self.compiled else torch.empty
        cache.k = alloc(cache.k.shape, dtype=self.dtype, device=self.device)
        cache.v = alloc(cache.v.shape, dtype=self.dtype, device=self.device)
        if self.compiled:  # the compiled step writes into these buffers in place: keep them graph-static
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        return cache

    def _recycle(self, cache: KVCache) -> None:
        if cache.batch_size == 1 and cache.max_len == self.max_context_tokens:
            self._spare = cache

    def _session(self, session_id: str | None) -> tuple[_Session, bool]:
        """The session's state (created on first use); anonymous requests get a fresh, unsaved one."""
        if session_id is None:
            return _Session(self._new_cache()), False
        s = self._sessions.get_touch(session_id)
        if s is None:
            s = _Session(self._new_cache())
            for old in self._sessions.put(session_id, s):
                self._recycle(old.cache)
        return s, True

    def _drop_all(self) -> None:
        self._sessions.clear()
        self._features.clear()
        self._spare = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- model calls ----------------------------------------------------------------------------------------

    def _logits(self, hidden: Tensor) -> Tensor:
        """(B, D) -> float32 (B, vocab_limit): ids the tokenizer cannot decode never get a logit."""
        logits = self._head(hidden) if self._head is not None else self.model.lm_head(hidden)
        return logits.float()[:, :self.vocab_limit]

    def _image_features(self, images: Sequence, keys: Sequence[str], stats: GenerationStats,
                        cancel: threading.Event) -> Tensor | None:
        """(N, 576, D) features for the given images, from the content-keyed cache or the vision towers (one
        image at a time: the SAM tower's activations at 1024 px are the memory peak)."""
        if not keys:
            return None
        feats = []
        for image, key in zip(images, keys):
            f = self._features.get_touch(key)
            if f is None:
                if cancel.is_set():
                    raise _Cancelled
                t0 = time.perf_counter()
                pv, hpv = self.processor.image_processor([image])
                hpv = None if hpv is None else hpv.to(self.device, self.dtype)  # None: SigLIP-only model
                f = self.model.get_image_features(pv.to(self.device, self.dtype), hpv)[0]
                stats.image_encode_s += time.perf_counter() - t0
                stats.images_encoded += 1
                self._features.put(key, f)
            else:
                stats.images_from_cache += 1
            feats.append(f)
        if stats.images_encoded and self.device.type == "cpu":
            _release_heap()
        return torch.stack(feats)

    def _prefill(self, ids: Sequence[int], features: Tensor | None, cache: KVCache, start: int,
                 cancel: threading.Event, faults: dict[str, int]) -> Tensor:
        """Run ``ids`` (positions start..) into ``cache``; return the last position's logits (1, V)."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        embeds = self.model.embed(x, features)
        hidden = None
        for i, c0 in enumerate(range(0, len(ids), self.prefill_chunk)):
            if cancel.is_set():
                raise _Cancelled
            _inject(faults, "oom_at_prefill", i + 1)
            chunk = embeds[:, c0:c0 + self.prefill_chunk]
            pos = torch.arange(start + c0, start + c0 + chunk.shape[1], device=self.device)
            hidden = self._decoder(chunk, pos, cache=cache, cache_start=start + c0)
        return self._logits(hidden[:, -1])

    def _decode_eager(self, tok: Tensor, pos: int, cache: KVCache) -> Tensor:
        """One token (B, 1) at position ``pos`` -> logits (B, V)."""
        embed = self.model.model.language_model.embed_tokens
        h = self._decoder(embed(tok), torch.full((tok.shape[0], 1), pos, device=self.device), cache=cache,
                          cache_start=pos)
        return self._logits(h[:, -1])

    # ---- single-stream generation ---------------------------------------------------------------------------

    def _run(self, ts: "TextStream") -> Iterator[str]:
        """The body of a TextStream (a generator run in the consumer's thread)."""
        stats, params = ts.stats, ts.params
        t_wait = time.perf_counter()
        try:
            with self._locked(ts.cancel):
                stats.queue_s = time.perf_counter() - t_wait
                yield from self._run_session(ts)
        except _Cancelled:
            stats.stop_reason = "cancelled"

    def _run_session(self, ts: "TextStream") -> Iterator[str]:
        stats = ts.stats
        session, keep = self._session(ts.session_id)
        gen, filt = ts.generated_ids, StopStringFilter(ts.params.stop)
        ok = False
        try:
            yield from self._run_locked(ts, session, gen, filt)
            ok = True
        except _Cancelled:
            ok = True
            raise
        except GeneratorExit:
            stats.stop_reason = stats.stop_reason or "cancelled"
            ok = True
            raise
        except BaseException as e:
            stats.stop_reason = "error"
            self._on_error(session, ts.session_id, e)
            raise
        finally:
            if ok:
                self._remember_reply(session, ts, gen, filt)
            if not keep:
                self._recycle(session.cache)
            if stats.token_times and stats.new_tokens > 1:
                dt = stats.token_times[-1] - stats.token_times[0]
                stats.decode_tokens_per_s = (stats.new_tokens - 1) / dt if dt > 0 else None

    def _run_locked(self, ts: "TextStream", session: _Session, gen: list[int], filt: StopStringFilter) -> Iterator[str]:
        stats, p, prompt, cancel = ts.stats, ts.params, ts.prompt, ts.cancel
        faults = _faults()
        per = self.num_image_tokens
        keys = position_keys(prompt.token_ids, prompt.image_keys, self.image_id, per)
        ids, keys, kept = splice_replies(prompt.token_ids, keys, session, self.eos_id, self.tokenizer.decode)
        if len(ids) + 1 > session.cache.max_len:  # spliced ids can be a little longer than the re-tokenised ones
            ids, keys, kept = list(prompt.token_ids), position_keys(prompt.token_ids, prompt.image_keys,
                                                                    self.image_id, per), []
        runs = image_runs(ids, self.image_id, per)
        reuse = reusable_prefix(ids, keys, session, runs, per)
        # From here on the session holds exactly `ids[:reuse]` until the prefill below succeeds.
        session.ids, session.keys, session.replies = session.ids[:reuse], session.keys[:reuse], kept
        stats.prompt_tokens, stats.reused_tokens, stats.prefilled_tokens = len(ids), reuse, len(ids) - reuse
        ts.token_ids = ids

        new_runs = [s for s in runs if s >= reuse]
        features = self._image_features([prompt.image_for(keys[s]) for s in new_runs], [keys[s] for s in new_runs],
                                        stats, cancel)
        t0 = time.perf_counter()
        logits = self._prefill(ids[reuse:], features, session.cache, reuse, cancel, faults)
        session.ids, session.keys = list(ids), list(keys)
        stats.prefill_s = time.perf_counter() - t0
        ts.reply_start = len(ids)

        max_new = min(p.max_new_tokens, session.cache.max_len - len(ids))
        generator = None
        if p.seed is not None and p.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(p.seed)
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.vocab_limit, dtype=torch.bool, device=self.device)
            seen[0, torch.tensor([i for i in ids if i < self.vocab_limit], device=self.device)] = True
        detok = StreamingDetokenizer(self.tokenizer)
        step = 0
        while True:
            tok = sample(logits, p, seen, generator)  # (1,) on the device
            t = int(tok.item())  # the one host sync per token: the detokenizer needs the id
            stats.token_times.append(time.perf_counter() - ts.t_call)
            stats.new_tokens += 1
            if stats.ttft_s is None:
                stats.ttft_s = stats.token_times[0]
            if t == self.eos_id:
                stats.stop_reason = "eos"
                break
            gen.append(t)
            delta = filt.push(detok.push(t))
            if delta:
                yield delta
            if filt.stopped:
                stats.stop_reason = "stop_string"
                break
            if len(gen) >= max_new:
                stats.stop_reason = "max_new_tokens"
                break
            if cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            step += 1
            _inject(faults, "oom_at_decode_step", step)
            if seen is not None:
                seen[0, t] = True
            logits = self._decode_fn(tok.view(1, 1), len(session.ids), session.cache)
            session.ids.append(t)
            session.keys.append(None)
        if stats.stop_reason != "stop_string":
            tail = filt.push(detok.flush())
            tail += filt.finish()
            if tail:
                yield tail

    def _remember_reply(self, session: _Session, ts: "TextStream", gen: list[int], filt: StopStringFilter) -> None:
        """Record the reply so the next turn can splice the generated ids back in (see ``splice_replies``)."""
        if ts.reply_start is None:
            return
        text = filt.text
        ids = list(gen)
        # Drop ids whose text was not emitted (a stop string, or bytes held back at a cancel).
        for _ in range(16):
            if self.tokenizer.decode(ids).strip() == text.strip():
                session.replies.append(_Reply(ts.reply_start, ids, text))
                return
            if not ids:
                break
            ids.pop()

    def _on_error(self, session: _Session, session_id: str | None, e: BaseException) -> None:
        """After a failure the session's cache may be half-written: forget it. Out of memory: free everything."""
        session.reset()
        if session_id is not None:
            self._sessions.pop(session_id, None)
        if isinstance(e, torch.OutOfMemoryError):
            log.warning("out of memory during generation; dropping all caches: %s", e)
            self._drop_all()

    # ---- batch ----------------------------------------------------------------------------------------------

    def _generate_batch(self, conversations: list, max_new_tokens: int = 512, temperature: float = 0.1,
                        top_p: float = 0.95, top_k: int = 0, repetition_penalty: float = 1.1,
                        seed: int | None = None, stop: Sequence[str] | str = ("User:",),
                        cancel: threading.Event | None = None, session_id: str | None = None) -> list[str]:
        """Left-padded batch: pads get attention mask 0 and position 0 (as transformers' generate), each row ends
        on its own EOS / stop string; finished rows keep running (on pad) until all are done."""
        if session_id is not None:
            raise ValueError("session_id is for single conversations; a batch runs without session caches")

        p = SamplingParams(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                           (stop,) if isinstance(stop, str) else tuple(stop))
        cancel = cancel or threading.Event()
        prompts = [self.processor.prepare(c, max_context_tokens=self.max_context_tokens,
                                          reserve_new_tokens=min(max_new_tokens, self.max_context_tokens // 2))
                   for c in conversations]
        max_new = min(p.max_new_tokens, self.max_context_tokens - max(len(pr.token_ids) for pr in prompts))
        stats = GenerationStats()
        try:
            with self._locked(cancel):
                return self._batch_locked(prompts, p, max_new, cancel, stats)
        except _Cancelled:  # cancelled while queued
            return [""] * len(prompts)

    def _batch_locked(self, prompts: list, p: SamplingParams, max_new: int, cancel, stats: GenerationStats) -> list[str]:
        B = len(prompts)
        L = max(len(pr.token_ids) for pr in prompts)
        try:
            ids = torch.full((B, L), self.pad_id, dtype=torch.long)
            mask = torch.zeros((B, L + max_new), dtype=torch.bool)
            mask[:, L:] = True  # generated positions are real in every row (finished rows' pads are ignored)
            for r, pr in enumerate(prompts):
                ids[r, L - len(pr.token_ids):] = torch.tensor(pr.token_ids)
                mask[r, L - len(pr.token_ids):L] = True
            ids, mask = ids.to(self.device), mask.to(self.device)
            all_keys = [k for pr in prompts for k in pr.image_keys]
            all_images = [im for pr in prompts for im in pr.images]
            features = self._image_features(all_images, all_keys, stats, cancel)
            cache = self._alloc_cache(B, L + max_new)
            lm, embed = self._decoder, self.model.model.language_model.embed_tokens
            pos = (mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)
            h = lm(self.model.embed(ids, features), pos, cache=cache, cache_start=0, key_padding_mask=mask[:, :L])
            logits = self._logits(h[:, -1])
            next_pos = pos[:, -1:] + 1
            generator = None
            if p.seed is not None and p.temperature > 0:
                generator = torch.Generator(device=self.device).manual_seed(p.seed)
            seen = None
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(B, self.vocab_limit, dtype=torch.bool, device=self.device)
                seen.scatter_(1, ids.clamp(max=self.vocab_limit - 1), mask[:, :L])
            detoks = [StreamingDetokenizer(self.tokenizer) for _ in range(B)]
            filters = [StopStringFilter(p.stop) for _ in range(B)]
            texts = [""] * B
            done = [False] * B
            for step in range(max_new):
                tok = sample(logits, p, seen, generator)
                for r, t in enumerate(tok.tolist()):  # one host transfer per step for the whole batch
                    if done[r]:
                        continue
                    if t == self.eos_id:
                        done[r] = True
                        continue
                    texts[r] += filters[r].push(detoks[r].push(t))
                    done[r] = filters[r].stopped
                if all(done) or step + 1 == max_new or cancel.is_set():
                    break
                tok = torch.where(torch.tensor(done, device=self.device), self.pad_id, tok).view(B, 1)
                if seen is not None:
                    seen.scatter_(1, tok, True)
                start = L + step
                h = lm(embed(tok), next_pos, cache=cache, cache_start=start,
                       key_padding_mask=mask[:, :start + 1])
                logits = self._logits(h[:, -1])
                next_pos = next_pos + 1
            for r in range(B):
                if not filters[r].stopped:
                    texts[r] += filters[r].push(detoks[r].flush()) + filters[r].finish()
            return texts
        except torch.OutOfMemoryError:
            self._drop_all()  # the next request must find the memory free
            raise

    # ---- CUDA: compiled decode step -------------------------------------------------------------------------

    def _setup_compile(self) -> None:
        """``compile=True``: on CUDA, compile a static-shape decode step (CUDA graphs via torch.compile's
        reduce-overhead mode). Attention runs over a length bucket (a power of two >= the live length, masked)
        so that one graph serves many steps; eager everywhere else."""
        if self.device.type != "cuda":
            log.warning("compile=True is for CUDA only; running eager on %s", self.device.type)
            return
        if not isinstance(self._decoder, FusedDecoder):
            log.warning("compile=True is not used with quantized weights (the compiled step is the dense fused one)")
            return
        for fused in [f for ws in self._decoder.weights for f in ws] + ([self._head] if self._head else []):
            torch._dynamo.mark_static_address(fused.weight)  # weights are not module parameters here
        self._static_step = torch.compile(static_decode_step, mode="reduce-overhead", fullgraph=True)
        self._decode_fn = self._decode_static
        self.compiled = True

    def _decode_static(self, tok: Tensor, pos: int, cache: KVCache) -> Tensor:
        bucket = min(cache.max_len, max(256, 1 << pos.bit_length()))
        pos_t = torch.full((tok.shape[0], 1), pos, dtype=torch.long, device=self.device)
        h = self._static_step(self._decoder, tok, pos_t, cache, bucket)
        return self._logits(h[:, -1])


def static_decode_step(dec: "FusedDecoder", tok: Tensor, pos: Tensor, cache: KVCache, bucket: int) -> Tensor:
    """The decode step with every shape static (for CUDA graphs): position as a tensor, K/V written with
    ``index_copy_`` and attention over the first ``bucket`` slots with a mask ``slot <= pos``. Numerically the
    same as ``FusedDecoder.__call__`` with T=1 (checked on CPU by the tests)."""
    lm = dec.lm
    B = tok.shape[0]
    h = lm.embed_tokens(tok)
    cos, sin = lm.rotary_emb(pos, h.dtype)
    visible = (torch.arange(bucket, device=tok.device)[None, :] <= pos)[:, None, None, :]  # (B, 1, 1, bucket)
    idx = pos[0]  # same position for every row (batch decode of equal-length rows)
    for i, (layer, (qkv, o, gate_up, down)) in enumerate(zip(lm.layers, dec.weights)):
        a = layer.self_attn
        q, k, v = dec.qkv(a, qkv, layer.input_layernorm(h), B, 1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.k[i].index_copy_(2, idx, k)  # module buffers: static addresses for CUDA graphs
        cache.v[i].index_copy_(2, idx, v)
        y = F.scaled_dot_product_attention(q, cache.k[i, :, :, :bucket], cache.v[i, :, :, :bucket],
                                           attn_mask=visible, enable_gqa=a.n_kv_heads != a.n_heads)
        h = h + o(y.transpose(1, 2).reshape(B, 1, a.n_heads * a.head_dim))
        h = h + dec.mlp(gate_up, down, layer.post_attention_layernorm(h))
    return lm.norm(h)


# ---- fused / packed decoder weights -----------------------------------------------------------------------------

class _Fused:
    """One matrix product over a fused weight: plain ``F.linear``, or oneDNN's pre-packed bf16 GEMM on CPU."""

    def __init__(self, weight: Tensor, bias: Tensor | None, pack: bool) -> None:
        self.out_features, self.in_features = weight.shape
        self.pack = pack
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if pack else weight
        self.bias = bias

    def __call__(self, x: Tensor) -> Tensor:
        if not self.pack:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none",
                                               [None], "")
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class _FusedSlice(nn.Module):
    """Stands in for one of the Linears that were fused, so ``model(...)`` keeps working unchanged (it computes the
    whole fused product and keeps its rows: slower, but only the engine's own path is hot). The first slice of a
    fused matrix registers the packed weight as a (non-persistent) buffer so that memory accounting sees it."""

    def __init__(self, fused: _Fused, lo: int, hi: int) -> None:
        super().__init__()
        self.fused, self.lo, self.hi = fused, lo, hi
        self.in_features, self.out_features = fused.in_features, hi - lo
        if lo == 0:
            self.register_buffer("packed_weight", fused.weight, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fused(x)[..., self.lo:self.hi]


def _fuse(parent: nn.Module, names: Sequence[str], pack: bool) -> _Fused:
    """Concatenate the named Linears' weights into one matrix. Dense: the Linears become views into it (no extra
    memory, ``model(...)`` unchanged). Packed: they are replaced by ``_FusedSlice``s over the packed matrix; the
    separate weights are dropped before packing, so at most two copies of one group exist at any time (peak
    memory of the whole load stays within the 16-bit weights + one group)."""
    mods = [getattr(parent, n) for n in names]
    sizes = [m.out_features for m in mods]
    weight = torch.cat([m.weight.data for m in mods]) if len(mods) > 1 else mods[0].weight.data
    bias = None
    if mods[0].bias is not None:
        bias = torch.cat([m.bias.data for m in mods]) if len(mods) > 1 else mods[0].bias.data
    if pack:
        for name in names:
            setattr(parent, name, nn.Identity())  # frees the separate weights (the cat above copied them)
        del mods
        fused = _Fused(weight, bias, True)
        del weight
        lo = 0
        for name, size in zip(names, sizes):
            setattr(parent, name, _FusedSlice(fused, lo, lo + size))
            lo += size
        return fused
    fused = _Fused(weight, bias, False)
    if len(mods) > 1:
        lo = 0
        for m in mods:
            hi = lo + m.out_features
            m.weight = nn.Parameter(weight[lo:hi], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[lo:hi], requires_grad=False)
            lo = hi
    return fused


def _fuse_head(model: nn.Module, rows: int) -> _Fused:
    """The engine's lm_head product over its first ``rows`` rows (the ids the tokenizer can decode): a view, no
    copy. Not packed: oneDNN packing brought nothing measurable for this wide matrix and costs seconds at load."""
    head = model.lm_head
    return _Fused(head.weight.data[:rows], None if head.bias is None else head.bias.data[:rows], False)


def _onednn_packing_works() -> bool:
    """oneDNN bf16 weight packing (what inductor's CPU freezing uses) exists and gives F.linear's numbers here."""
    try:
        w = torch.randn(48, 32, dtype=torch.bfloat16)
        x = torch.randn(3, 32, dtype=torch.bfloat16)
        return torch.allclose(_Fused(w, None, True)(x).float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)
    except Exception:  # noqa: BLE001  (missing op, unsupported CPU: use plain F.linear)
        return False


class FusedDecoder:
    """Runs the model's ``LlamaModel`` with fused projections: q|k|v as one matrix and gate|up as one, so each
    layer does 4 matrix products instead of 7. At batch 1 a product streams its weight once, and on CPU a
    12288x4096 product runs at ~18 GB/s where three 4096x4096 ones manage ~13. On CPU in bfloat16 the weights are
    also pre-packed for oneDNN: PyTorch's plain bf16 matrix-vector path reaches only 6-9 GB/s on AVX512-BF16
    CPUs, the packed one ~14 (performance-notes §8). Same call signature and numerics as ``LlamaModel.forward``
    (norms, RoPE, masks and the KV cache are the model's own)."""

    def __init__(self, lm: nn.Module, pack: bool) -> None:
        self.lm, self.pack = lm, pack
        self.weights: list[tuple[_Fused, _Fused, _Fused, _Fused]] = []
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            self.weights.append((_fuse(a, ["q_proj", "k_proj", "v_proj"], pack), _fuse(a, ["o_proj"], pack),
                                 _fuse(m, ["gate_proj", "up_proj"], pack), _fuse(m, ["down_proj"], pack)))

    @staticmethod
    def qkv(a: nn.Module, qkv: _Fused, x: Tensor, B: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
        nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        q, k, v = qkv(x).split([nq, nkv, nkv], dim=-1)
        return (q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2),
                k.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2),
                v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2))

    @staticmethod
    def mlp(gate_up: _Fused, down: _Fused, x: Tensor) -> Tensor:
        g, u = gate_up(x).chunk(2, dim=-1)
        return down(F.silu(g) * u)

    def __call__(self, inputs_embeds: Tensor, position_ids: Tensor, cache: KVCache | None = None,
                 cache_start: int = 0, key_padding_mask: Tensor | None = None) -> Tensor:
        lm = self.lm
        B, T, _ = inputs_embeds.shape
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, T)
        cos, sin = lm.rotary_emb(position_ids, inputs_embeds.dtype)
        mask, is_causal = build_attention_mask(T, cache_start, key_padding_mask, inputs_embeds.device)
        h = inputs_embeds
        for i, (layer, (qkv, o, gate_up, down)) in enumerate(zip(lm.layers, self.weights)):
            a = layer.self_attn
            q, k, v = self.qkv(a, qkv, layer.input_layernorm(h), B, T)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if cache is not None:
                k, v = cache.update(i, cache_start, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=a.n_kv_heads != a.n_heads)
            h = h + o(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))
            h = h + self.mlp(gate_up, down, layer.post_attention_layernorm(h))
        return lm.norm(h)


class _Cancelled(Exception):
    """The cancel event fired while the request was queued, encoding images or prefilling."""


class TextStream:
    """Iterator of text deltas for one request. ``stats`` fill in as it runs and are final once it ends.
    ``close()`` (from any thread), closing the generator, or the ``cancel`` event stop it within one decode step
    and release the engine."""

    def __init__(self, engine: Engine, prompt, params: SamplingParams, session_id: str | None,
                 cancel: threading.Event | None, t_call: float) -> None:
        self.engine, self.prompt, self.params, self.session_id = engine, prompt, params, session_id
        self.t_call = t_call
        self.stats = GenerationStats(prompt_tokens=len(prompt.token_ids))
        self.dropped_turns: int = prompt.dropped_turns
        self.prompt_tokens: int = len(prompt.token_ids)
        self.token_ids: list[int] | None = None  # the ids the model saw (generated replies spliced back in)
        self.generated_ids: list[int] = []  # sampled ids, without the EOS that ended the reply
        self.reply_start: int | None = None
        self.cancel = _AnyEvent(cancel)
        self._guard = threading.Lock()
        self._running = False
        self._finished = False
        self._text = ""
        self._gen = engine._run(self)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        with self._guard:
            if self._finished:
                raise StopIteration
            self._running = True
        try:
            delta = next(self._gen)
            self._text += delta
            return delta
        except BaseException:
            with self._guard:
                self._finished = True
            raise
        finally:
            with self._guard:
                self._running = False

    def close(self) -> None:
        """Stop generating and free the engine. Safe from any thread, and more than once."""
        self.cancel.own.set()
        with self._guard:
            if self._running or self._finished:
                return  # a running step sees the event before its next decode step
            self._finished = True
        self._gen.close()
        if self.stats.stop_reason is None:
            self.stats.stop_reason = "cancelled"

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AnyEvent:
    """Set when either the stream's own event or the caller's event is set."""

    def __init__(self, other: threading.Event | None) -> None:
        self.own = threading.Event()
        self.other = other

    def is_set(self) -> bool:
        return self.own.is_set() or (self.other is not None and self.other.is_set())
