"""How `dsvl serve` feeds the engine: one request at a time (the model needs the whole device), a bounded
line of waiting requests (more are refused at once, not kept waiting for minutes), and each request's
stream driven by a thread of its own (the engine's lock belongs to the thread that starts a stream; the
event loop must stay free to serve other requests and notice disconnects)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any, Callable


log = logging.getLogger("dsvl.serve")


class Busy(Exception):
    """Every place in the waiting line is taken."""


class Gate:
    """One holder at a time, at most `max_waiting` waiting, in arrival order. Event-loop side only."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max(0, max_waiting)
        self.busy = False
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self, gone: asyncio.Event) -> bool:
        """True once this caller holds the gate; False if the client went away while waiting. Busy when full."""
        if not self.busy:
            self.busy = True
            return True
        if self.waiting >= self.max_waiting:
            raise Busy
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        left = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({turn, left}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._leave(turn)
            raise
        finally:
            left.cancel()
        if gone.is_set():
            self._leave(turn)
            return False
        return True

    def _leave(self, turn: asyncio.Future) -> None:
        if turn.done() and not turn.cancelled():
            self.release()  # handed over just as the client left: pass it on
        else:
            turn.cancel()  # take the place out of the line

    def release(self) -> None:
        """Hand the gate to the next waiter still waiting, or free it."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self.busy = False


class Job:
    """One request's run: `engine.stream(...)` on a thread of its own, its events delivered to the event loop
    as ("start", stream), ("delta", text)..., then ("end", stream) or ("error", exception). Setting `cancel`
    (the client went away) stops the engine within one token; `on_done` runs on the loop once the stream is
    closed and the engine is free."""

    def __init__(self, engine: Any, messages: list[dict], session_id: str, params: dict,
                 on_done: Callable[[], None]) -> None:
        self.engine, self.messages, self.session_id, self.params = engine, messages, session_id, params
        self.cancel = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._on_done = on_done

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"dsvl-serve-{self.session_id}", daemon=True).start()

    def _put(self, *item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel.set()

    def _run(self) -> None:
        stream = None
        try:
            stream = self.engine.stream(self.messages, session_id=self.session_id, cancel=self.cancel, **self.params)
            self._put("start", stream)
            for delta in stream:
                self._put("delta", delta)
            self._put("end", stream)
        except BaseException as exc:  # noqa: BLE001 - handed to the request's handler
            self._put("error", exc)
        finally:
            if stream is not None:
                stream.close()
                st = stream.stats  # one line per request, no content
                log.info("%s: %d prompt tokens (%d cached), %d new, first token %.2f s, %s", self.session_id,
                         st.prompt_tokens, st.reused_tokens, st.new_tokens, st.ttft_s or 0.0, st.stop_reason)
            try:
                self._loop.call_soon_threadsafe(self._on_done)
            except RuntimeError:
                pass
