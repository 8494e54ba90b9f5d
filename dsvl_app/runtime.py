"""What the UI needs from the engine, in one place: turning a conversation into a streamed reply,
cancelling a session's generation, and ending a session (caches and uploaded files).

The app talks to the core only through `engine.stream(...)`, `engine.end_session(...)` and engine
attributes. Every stream is closed in a `finally`, so however a reply ends (finished, Stop pressed,
client cancelled, tab closed, error) the engine stops within one token and is free for the next user."""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import anyio

from . import history, limits
from .settings import GenerationDefaults, Settings
from .uploads import SessionFiles

log = logging.getLogger("dsvl_app")

YIELD_INTERVAL_S = 0.06  # at most ~16 UI updates a second, however fast tokens come


class UserError(Exception):
    """A failure the user can act on; `title` and `message` go into the UI as they are."""

    def __init__(self, message: str, title: str = "Error"):
        super().__init__(message)
        self.title = title
        self.message = message


def failure_message(exc: BaseException) -> str:
    """What a person reads when the engine fails on their request (the traceback goes to the log)."""
    if "OutOfMemoryError" in type(exc).__name__ or "out of memory" in str(exc).lower():
        return ("The model ran out of memory on this request. Try fewer or smaller images, a shorter "
                "conversation (New chat) or fewer max new tokens; other conversations are not affected.")
    return f"The model failed on this request ({type(exc).__name__}: {exc})."


@dataclass
class Reply:
    text: str = ""
    status: str = "pending"  # pending -> done | stopped
    prompt_tokens: int = 0
    dropped_turns: int = 0
    new_tokens: int = 0
    stats: dict | None = None

    def turn(self) -> dict:
        stats = dict(self.stats or {})
        stats.setdefault("prompt_tokens", self.prompt_tokens)
        stats.setdefault("new_tokens", self.new_tokens)
        stats["dropped_turns"] = self.dropped_turns
        return history.assistant_turn(self.text, self.status, stats)


def generation_params(temperature: Any, top_p: Any, top_k: Any, max_new_tokens: Any, repetition_penalty: Any,
                      seed: Any, *, max_context_tokens: int, defaults: GenerationDefaults | None = None) -> dict:
    """Slider values (which arrive as floats, or None through the API) -> engine.stream keyword arguments;
    UserError for a value outside the sliders' ranges (limits.generation_settings)."""
    try:
        return limits.generation_settings(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
                                          max_context_tokens=max_context_tokens, defaults=defaults)
    except limits.LimitError as exc:
        raise UserError(str(exc), "Bad setting") from None


def _stats_dict(stats: Any) -> dict:
    if stats is None:
        return {}
    keys = ("prompt_tokens", "new_tokens", "ttft_s", "decode_tokens_per_s", "stop_reason", "prefilled_tokens")
    return {k: getattr(stats, k) for k in keys if getattr(stats, k, None) is not None}


def engine_events(engine, messages: list[dict], session_id: str, params: dict,
                  cancel: threading.Event | None) -> Iterator[tuple]:
    """All GPU work of one reply, as a generator of plain tuples (so that it can run under `spaces.GPU`):
    ("start", dropped_turns, prompt_tokens), ("delta", text)..., ("stats", dict)."""
    stream = engine.stream(messages, session_id=session_id, cancel=cancel, **params)
    try:
        yield ("start", int(getattr(stream, "dropped_turns", 0) or 0), int(getattr(stream, "prompt_tokens", 0) or 0))
        for delta in stream:
            yield ("delta", delta)
    finally:
        stream.close()
    yield ("stats", _stats_dict(getattr(stream, "stats", None)))


class Runtime:
    def __init__(self, engine, settings: Settings, *, upload_root: Path, gpu: Callable | None = None):
        self.engine = engine
        self.settings = settings
        self.upload_root = Path(upload_root)
        self.import_root = self.upload_root / "dsvl-imports"
        self.files = SessionFiles([self.upload_root])
        self._events = gpu(engine_events) if gpu else engine_events
        self._wrapped = gpu is not None
        self._lock = threading.Lock()
        self._active: dict[str, set[threading.Event]] = {}
        self._epoch: dict[str, int] = {}
        self.last_stats: dict[str, dict] = {}  # per session, the engine's stats of its latest reply (no text)
        self._janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsvl-end-session")
        import dsvl  # the core's public errors

        self._image_error = dsvl.ImageError
        self._overflow_error = dsvl.ContextOverflowError
        self._cancelled = dsvl.Cancelled

    # ---- sessions -----------------------------------------------------------------------------------
    def epoch(self, session: str) -> int:
        with self._lock:
            return self._epoch.get(session, 0)

    def cancel(self, session: str) -> int:
        """Tell every running generation of this session to stop; returns how many were told."""
        with self._lock:
            events = list(self._active.get(session, ()))
        for ev in events:
            ev.set()
        return len(events)

    def new_conversation(self, session: str) -> None:
        """Clear: stop what runs, make pending UI updates of the old conversation void, free the caches."""
        with self._lock:
            self._epoch[session] = self._epoch.get(session, 0) + 1
        self.cancel(session)
        self._end_engine_session(session)

    def end_session(self, session: str) -> None:
        """The browser tab closed (or the client went away): stop, free caches, delete uploads."""
        self.new_conversation(session)
        with self._lock:
            self._epoch.pop(session, None)
            self.last_stats.pop(session, None)
        deleted = self.files.release(session)
        log.info("session ended; %d uploaded file(s) deleted", deleted)

    def _end_engine_session(self, session: str) -> None:
        # On a thread of its own: end_session waits for the engine's lock, which a running reply (maybe
        # another user's) holds until it ends; the UI must not wait for that.
        self._janitor.submit(self._end_now, session)

    def _end_now(self, session: str) -> None:
        try:
            self.engine.end_session(session)
        except Exception:  # a cache that is already gone is fine
            log.exception("engine.end_session failed")

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the session ends asked for so far have reached the engine (for tests)."""
        self._janitor.submit(lambda: None).result(timeout)

    def active_generations(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._active.values())

    # ---- one reply ----------------------------------------------------------------------------------
    async def reply_async(self, session: str, conv: list[dict], params: dict,
                          system_prompt: str | None = None) -> AsyncIterator[Reply]:
        """`reply` for Gradio's async handlers. Gradio cancels a job (Stop, `job.cancel()`, a closed tab) by
        cancelling its task, which reaches this generator at once, even while the first step (reading the
        conversation and its images) still runs in a worker thread: the cancel event is set here, and that
        work stops at the next turn or image instead of running on outside the queue's limits."""
        cancel = threading.Event()
        steps = self.reply(session, conv, params, system_prompt, cancel=cancel)
        running = False
        try:
            while True:
                running = True
                reply = await anyio.to_thread.run_sync(next, steps, None)
                running = False
                if reply is None:
                    return
                yield reply
        finally:
            cancel.set()
            if not running:  # a step still running ends by itself once it sees the event
                steps.close()

    def reply(self, session: str, conv: list[dict], params: dict, system_prompt: str | None = None,
              cancel: threading.Event | None = None) -> Iterator[Reply]:
        """Stream the answer to the last user turn of `conv`. The first Reply comes once the engine has
        accepted the request (prompt built, images decoded); later ones as text arrives (throttled); the
        last one has status done/stopped and the stats. Raises UserError for what the user can fix.

        The engine is driven by a thread of its own for the whole reply: the engine's lock belongs to the
        thread that starts a stream, while Gradio runs each step of a generator on any thread of its pool.
        Closing this generator (Stop, client cancel, tab closed) sets the cancel event; the engine stops
        within one token and the thread then closes the stream, which frees the engine. `system_prompt`
        (None: the checkpoint's own) goes to the engine as a leading system message."""
        try:  # every path to the model passes here: the page, /chat, any handler called directly
            limits.check_conversation(conv, max_images=self.settings.max_images,
                                      max_images_per_chat=self.settings.max_images_per_chat)
        except limits.LimitError as exc:
            raise UserError(str(exc), "Too many images") from None
        messages = history.engine_messages(conv)
        if not messages or messages[-1]["role"] != "user":
            raise UserError("There is no question to answer.", "Nothing to send")
        if system_prompt is not None:
            messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, *messages]
        cancel = cancel or threading.Event()
        with self._lock:
            self._active.setdefault(session, set()).add(cancel)
            self.last_stats.pop(session, None)  # what is there from now on belongs to this reply
        box: queue.SimpleQueue = queue.SimpleQueue()
        ctx = contextvars.copy_context()  # spaces.GPU reads the request from the context
        worker = threading.Thread(target=ctx.run, args=(self._pump, box, messages, session, params, cancel),
                                  name=f"dsvl-reply-{session[:8]}", daemon=True)
        worker.start()
        reply = Reply()
        try:
            kind, *payload = box.get()
            if kind == "error":
                exc = payload[0]
                if isinstance(exc, self._cancelled):
                    return  # stopped while the conversation was being read: nothing was generated
                if isinstance(exc, self._image_error):
                    raise UserError(str(exc), "Image refused")
                if isinstance(exc, self._overflow_error):
                    raise UserError(
                        f"This message does not fit in the {self.max_context_tokens:,}-token context "
                        f"(each image takes {self.num_image_tokens} tokens): {str(exc).rstrip('.')}. "
                        "Send fewer images or shorter text, or start a new chat.", "Too long")
                raise exc
            if kind == "start":
                reply.dropped_turns, reply.prompt_tokens = payload
                yield reply
                last = time.perf_counter()
                while True:
                    kind, *payload = box.get()
                    if kind == "delta":
                        reply.text += payload[0]
                        reply.new_tokens += 1
                        now = time.perf_counter()
                        if now - last >= YIELD_INTERVAL_S or reply.new_tokens == 1:
                            last = now
                            yield reply
                    elif kind == "stats":
                        reply.stats = payload[0]
                    elif kind == "error":
                        raise payload[0]
                    else:  # "end"
                        break
            reason = (reply.stats or {}).get("stop_reason")
            reply.status = "stopped" if reason == "cancelled" or (reason is None and cancel.is_set()) else "done"
            yield reply
        finally:
            cancel.set()  # no-op when the reply is complete; otherwise the engine stops within a token

    def _pump(self, box: queue.SimpleQueue, messages: list[dict], session: str, params: dict,
              cancel: threading.Event) -> None:
        try:
            events = self._events(self.engine, messages, session, params, None if self._wrapped else cancel)
            with closing(events):
                dropped = 0
                for item in events:
                    if item[0] == "start":
                        dropped = item[1]
                    elif item[0] == "stats":
                        item[1]["dropped_turns"] = dropped
                        with self._lock:
                            self.last_stats[session] = item[1]
                    box.put(item)
                    if self._wrapped and cancel.is_set():
                        break  # under spaces.GPU the event cannot reach the engine: closing the stream stops it
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box.put(("error", exc))
        finally:
            box.put(("end",))
            with self._lock:
                active = self._active.get(session)
                if active is not None:
                    active.discard(cancel)
                    if not active:
                        del self._active[session]

    @property
    def num_image_tokens(self) -> int:
        return int(getattr(self.engine, "num_image_tokens", 576) or 576)

    @property
    def max_image_pixels(self) -> int:
        """`--max-image-pixels`, else the engine's own bound: the app's upload check applies the same limit."""
        from dsvl.images import DEFAULT_MAX_PIXELS

        processor = getattr(self.engine, "processor", None)
        return int(self.settings.max_image_pixels or getattr(processor, "max_image_pixels", 0) or DEFAULT_MAX_PIXELS)

    @property
    def max_context_tokens(self) -> int:
        return int(getattr(self.engine, "max_context_tokens", 0) or self.settings.max_context_tokens)
