"""``Engine``: one model, its caches and the generation loop.

One engine owns one model. Requests are serialised by one lock (held from the first token of a stream to its
end), so concurrent callers queue and never touch each other's caches. Each ``session_id`` keeps a KV cache and
the ids it holds (``sessions.py``: prefix reuse); image features are cached by image content, so a follow-up
question neither re-encodes an image nor re-runs the prompt. Sampling and stop strings are in ``sampling.py``,
the iterator a caller holds in ``stream.py``, left-padded batches in ``batch.py``.

The decode loop is gpt-fast style: a static cache, attention over the live length only, sampling on the device,
and one host transfer per token (the id the detokenizer needs).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import faults as fault_injection
from .batch import generate_batch
from .config import DsvlConfig
from .sampling import SamplingParams, StopStringFilter, sample
from .kvpool import KVPool, resolve_budget
from .llama import KVCache
from .sessions import LRU, Reply, Session, image_runs, position_keys, reusable_prefix, splice_replies
from .stream import GenerationStats, TextStream, _Cancelled, _AnyEvent
from .text import StreamingDetokenizer

log = logging.getLogger(__name__)

__all__ = ["Engine", "GenerationStats", "SamplingParams", "TextStream"]


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

COMPILE_MODES = ("auto", "on", "off")


def compile_mode(value: str | bool, device: torch.device) -> bool:
    """``compile``: "on" / True, "off" / False, or "auto" = on for CUDA (where the per-token launch overhead that
    CUDA graphs remove is large), off elsewhere (CPU decode is bound by reading the weights)."""
    if isinstance(value, bool):
        return value
    if value not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value == "on" or (value == "auto" and device.type == "cuda")


class Engine:
    """What ``dsvl.load`` returns. Thread-safe; see the module docstring."""

    def __init__(self, model: nn.Module, processor, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, quantization: str = "none", max_context_tokens: int = 4096,
                 kv_cache_memory: str | int | float | None = None, image_cache_size: int = 32, prefill_chunk: int = 2048,
                 slice_lm_head: bool = True, quantization_reason: str = "", checkpoint_dir: Path | None = None,
                 defaults: SamplingParams | None = None, compile: str | bool = "auto") -> None:
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
        # The core's sampling defaults are the checkpoint's (plain greedy where it says nothing); apps set their own.
        self.defaults = defaults or SamplingParams.from_generation_config(checkpoint_dir)
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
        # masked. Computing only the first `size` rows of lm_head is the same mask without the wasted work (a view
        # of the head's weight, no copy).
        self.vocab_limit = min(self.tokenizer.size, vocab)
        head = model.lm_head
        self._head_rows: tuple[Tensor, Tensor | None] | None = None
        if slice_lm_head and type(head) is nn.Linear and self.vocab_limit < vocab:
            self._head_rows = (head.weight[:self.vocab_limit],
                               None if head.bias is None else head.bias[:self.vocab_limit])
        self.lm_head_rows = vocab if self._head_rows is None else self.vocab_limit  # computed per decoded token
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._kv = KVPool(self.config.text, self.dtype, self.device, 0, self.max_context_tokens)
        self._kv.budget_bytes = resolve_budget(kv_cache_memory, self.device, self.weight_bytes,
                                               self._kv.context_bytes)
        self._features: LRU = LRU(image_cache_size)
        self._pending_end: set[str] = set()  # end_session() calls that arrived while a request held the lock
        self._decode_fn = self._decode_eager
        # bitsandbytes' kernels break the graph: "auto" leaves them eager.
        bnb = quantization.startswith("bnb")
        self.compiled = compile_mode(compile, self.device) and not (compile == "auto" and bnb)
        if self.compiled:
            self._setup_compile()

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        quantization: str = "none", max_context_tokens: int = 4096, revision: str | None = None,
                        max_image_pixels: int | None = None, **options: Any) -> "Engine":
        """Resolve device/dtype/quantization, load the checkpoint shard by shard and build the processor.
        `max_image_pixels`: images declaring more pixels are refused before decoding (None: the default, 40 MP)."""
        from . import device as dev_mod
        from . import quantization as q_mod
        from .loading import CheckpointError, load_model, resolve_checkpoint
        from .processor import Processor

        mode = q_mod.check_mode(quantization)
        dev, dt = dev_mod.resolve(device, dtype)
        if compile_mode(options.get("compile", "auto"), dev) and dev.type == "cpu":
            options.setdefault("pack", False)  # inductor packs weights its own way; it cannot trace oneDNN's
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
            processor = Processor.from_dir(path, **({"max_image_pixels": max_image_pixels} if max_image_pixels else {}))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on a corrupt tokenizer.json)
            raise CheckpointError(f"{path}: cannot read the tokenizer/processor files ({e})") from None
        if processor.image_processor.hybrid != config.hybrid:
            raise CheckpointError(f"{path}: config.json describes a {config.model_type} model but the image processor "
                                  "files are for the other DeepSeek-VL family")
        net, info = load_model(path, device=dev, dtype=dt, quantization=mode, config=config,
                               pack=options.pop("pack", None))
        engine = cls(net, processor, device=dev, dtype=dt, quantization=mode, max_context_tokens=max_context_tokens,
                     quantization_reason=reason, checkpoint_dir=path, **options)
        log.info("dsvl: %s", engine.kv_summary())
        log.info("dsvl: loaded %s on %s as %s, quantization=%s%s, weights %.2f GB in %.1f s%s", path,
                 dev_mod.describe(dev), str(dt).removeprefix("torch."), mode, f" ({reason})" if reason else "",
                 engine.weight_bytes / 1e9, time.perf_counter() - t0,
                 " [RANDOM WEIGHTS: answers are meaningless]" if engine.is_random else "")
        return engine

    # ---- public API -----------------------------------------------------------------------------------------

    def stream(self, messages: Sequence[Mapping[str, Any]], *, session_id: str | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = None,
               stop: Sequence[str] | str | None = None, cancel: threading.Event | None = None) -> "TextStream":
        """Prepare the prompt now (raises ImageError / ContextOverflowError here) and return an iterator of text
        deltas; generation starts on the first ``next()``. Sampling arguments left out (``None``) take the
        checkpoint's defaults (``self.defaults``)."""
        t_call = time.perf_counter()
        params = self.defaults.override(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        # Images whose features are cached are not decoded here (a follow-up question re-reads none); `cancel`
        # abandons a long preparation between turns and images (processor.Cancelled).
        prompt = self.processor.prepare(messages, max_context_tokens=self.max_context_tokens,
                                        reserve_new_tokens=min(params.max_new_tokens, self.max_context_tokens // 2),
                                        cancel=cancel, have_features=self._features.__contains__)
        self._kv.check_fits(self._kv_need(len(prompt.token_ids), params.max_new_tokens))  # refused before prefill
        return TextStream(self, prompt, params, session_id, cancel, t_call)

    def generate(self, messages_or_batch, **params: Any) -> str | list[str]:
        """Whole reply for one conversation; for a list of conversations, a list of replies generated as one
        left-padded batch (same greedy text as one by one)."""
        is_batch = bool(messages_or_batch) and not isinstance(messages_or_batch[0], Mapping)
        if not is_batch:
            with self.stream(messages_or_batch, **params) as s:
                return "".join(s)
        return generate_batch(self, list(messages_or_batch), **params)

    def end_session(self, session_id: str) -> None:
        """Free a session's KV cache. Never waits: while a request is running, the session is dropped when it
        finishes."""
        self._pending_end.add(session_id)
        if self._lock.acquire(blocking=False):
            try:
                self._end_pending()
            finally:
                self._lock.release()

    def _end_pending(self) -> None:
        """Called with the lock held."""
        while self._pending_end:
            self._kv.drop(self._pending_end.pop())

    def clear_caches(self) -> None:
        """Drop every session's KV cache and every cached image feature (and return GPU memory to the driver)."""
        with self._locked():
            self._drop_all()

    @property
    def sessions(self) -> list[str]:
        """Ids of the sessions that hold a KV cache (least recently used first)."""
        return [sid for sid, s in self._kv.sessions.items() if s.cache is not None]

    @property
    def kv_budget_bytes(self) -> int:
        """The memory all sessions' KV caches share (``kv_cache_memory``)."""
        return self._kv.budget_bytes

    @property
    def kv_conversations(self) -> float:
        """The budget in full-length conversations (``max_context_tokens`` each)."""
        return self._kv.budget_bytes / self._kv.context_bytes

    def kv_stats(self) -> dict[str, int]:
        """KV memory now: ``kv_reserved_bytes`` (never above the budget), ``kv_budget_bytes``, ``sessions_cached``,
        ``kv_evictions`` (idle sessions evicted to make room, since loading)."""
        return self._kv.stats()

    def kv_summary(self) -> str:
        """One line for logs and banners: the budget in GB and in full-length conversations."""
        return (f"KV cache memory {self._kv.budget_bytes / 1e9:.2f} GB = {self.kv_conversations:.1f} full-length "
                f"conversations of {self.max_context_tokens:,} tokens")

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

    def _kv_need(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Positions a request may fill: its prompt and its whole reply, within the context."""
        return min(prompt_tokens + max_new_tokens, self.max_context_tokens)

    def _drop_all(self) -> None:
        self._kv.drop_all()
        self._features.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- model calls ----------------------------------------------------------------------------------------

    def _logits(self, hidden: Tensor) -> Tensor:
        """(B, D) -> float32 (B, vocab_limit): ids the tokenizer cannot decode never get a logit."""
        if self._head_rows is not None:
            logits = F.linear(hidden, *self._head_rows)
        else:
            logits = self.model.lm_head(hidden)
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
            fault_injection.inject(faults, "oom_at_prefill", i + 1)
            chunk = embeds[:, c0:c0 + self.prefill_chunk]
            pos = torch.arange(start + c0, start + c0 + chunk.shape[1], device=self.device)
            hidden = self.model.model.language_model(chunk, pos, cache=cache, cache_start=start + c0)
        return self._logits(hidden[:, -1])

    def _setup_compile(self) -> None:
        """The decode step as ``torch.compile`` of the decoder's own forward with static shapes (``cache_start`` as
        a tensor; see ``LlamaModel.forward``). On CUDA with CUDA graphs ("reduce-overhead"): one graph per cache size,
        so the KV pool keeps few sizes and zeroes its buffers."""
        lm = self.model.model.language_model
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self._step = torch.compile(lm, mode=mode, dynamic=False)
        self._kv.static = True
        self._decode_fn = self._decode_compiled

    def _decode_compiled(self, tok: Tensor, pos: int, cache: KVCache) -> Tensor:
        p = torch.full((1,), pos, dtype=torch.long, device=self.device)
        embed = self.model.model.language_model.embed_tokens
        h = self._step(embed(tok), p.expand(tok.shape[0], 1), cache=cache, cache_start=p)
        return self._logits(h[:, -1])

    def _decode_eager(self, tok: Tensor, pos: int, cache: KVCache) -> Tensor:
        """One token (B, 1) at position ``pos`` -> logits (B, V)."""
        embed = self.model.model.language_model.embed_tokens
        h = self.model.model.language_model(embed(tok), torch.full((tok.shape[0], 1), pos, device=self.device), cache=cache,
                          cache_start=pos)
        return self._logits(h[:, -1])

    # ---- single-stream generation ---------------------------------------------------------------------------

    def _run(self, ts: "TextStream") -> Iterator[str]:
        """The body of a TextStream (a generator run in the consumer's thread)."""
        stats = ts.stats
        t_wait = time.perf_counter()
        try:
            with self._locked(ts.cancel):
                stats.queue_s = time.perf_counter() - t_wait
                yield from self._run_session(ts)
        except _Cancelled:
            stats.stop_reason = "cancelled"

    def _run_session(self, ts: "TextStream") -> Iterator[str]:
        stats = ts.stats
        session, keep = self._kv.session(ts.session_id)
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
                self._kv.release(session)
            if stats.token_times and stats.new_tokens > 1:
                dt = stats.token_times[-1] - stats.token_times[0]
                stats.decode_tokens_per_s = (stats.new_tokens - 1) / dt if dt > 0 else None

    def _run_locked(self, ts: "TextStream", session: Session, gen: list[int], filt: StopStringFilter) -> Iterator[str]:
        stats, p, prompt, cancel = ts.stats, ts.params, ts.prompt, ts.cancel
        faults = fault_injection.faults()
        per = self.num_image_tokens
        keys = position_keys(prompt.token_ids, prompt.image_keys, self.image_id, per)
        ids, keys, kept = splice_replies(prompt.token_ids, keys, session, self.eos_id, self.tokenizer.decode)
        if len(ids) + 1 > self.max_context_tokens:  # spliced ids can be a little longer than the re-tokenised ones
            ids, keys, kept = list(prompt.token_ids), position_keys(prompt.token_ids, prompt.image_keys,
                                                                    self.image_id, per), []
        # Room for the prompt and the whole reply; an evicted (or given-up) prefix is simply recomputed.
        self._kv.reserve(session, self._kv_need(len(ids), p.max_new_tokens))
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
            fault_injection.inject(faults, "oom_at_decode_step", step)
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

    def _remember_reply(self, session: Session, ts: "TextStream", gen: list[int], filt: StopStringFilter) -> None:
        """Record the reply so the next turn can splice the generated ids back in (see ``splice_replies``)."""
        if ts.reply_start is None:
            return
        text = filt.text
        ids = list(gen)
        # Drop ids whose text was not emitted (a stop string, or bytes held back at a cancel).
        for _ in range(16):
            if self.tokenizer.decode(ids).strip() == text.strip():
                session.replies.append(Reply(ts.reply_start, ids, text))
                return
            if not ids:
                break
            ids.pop()

    def _on_error(self, session: Session, session_id: str | None, e: BaseException) -> None:
        """After a failure the session's cache may be half-written: forget it. Out of memory: free everything."""
        if session_id is not None:
            self._kv.drop(session_id)
        else:
            self._kv.release(session)
        if isinstance(e, torch.OutOfMemoryError):
            log.warning("out of memory during generation; dropping all caches: %s", e)
            self._drop_all()

