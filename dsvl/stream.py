"""What a caller holds while a reply is generated: ``TextStream`` (an iterator of text deltas that can be closed
from any thread) and its ``GenerationStats``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

STOP_REASONS = ("eos", "stop_string", "max_new_tokens", "cancelled", "error")


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


class _Cancelled(Exception):
    """The cancel event fired while the request was queued, encoding images or prefilling."""


class TextStream:
    """Iterator of text deltas for one request. ``stats`` fill in as it runs and are final once it ends.
    ``close()`` (from any thread), closing the generator, or the ``cancel`` event stop it within one decode step
    and release the engine."""

    def __init__(self, engine, prompt, params, session_id: str | None,
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
