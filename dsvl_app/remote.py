"""`--backend openai`: the app as a front-end to any OpenAI-compatible vision server (`dsvl serve`, LMDeploy,
vLLM, SGLang). `OpenAIBackend` stands in for the engine: the same `stream(messages, *, session_id, cancel,
**params)` returning an iterator of text deltas with `.stats` and `.close()`, so the runtime and the UI do
not change. Images go up as base64 `data:` URLs (the server never needs to reach this machine's files);
the conversation stays here, in the browser session: the server gets the whole of it with every request.

Stop (and a closed tab) closes the upstream HTTP stream at once; a server that stops on disconnect (as
`dsvl serve` does) is then free within one token."""

from __future__ import annotations

import base64
import mimetypes
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .runtime import UserError

KEY_VARIABLES = ("DSVL_API_KEY", "OPENAI_API_KEY")
FINISH_TO_STOP = {"stop": "eos", "length": "max_new_tokens"}


@dataclass
class RemoteStats:
    """The engine's stats names, as far as a remote server lets us know them."""

    prompt_tokens: int | None = None
    prefilled_tokens: int | None = None
    new_tokens: int = 0
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None
    stop_reason: str | None = None


def api_key_from_env(env=os.environ) -> str:
    return next((env[k] for k in KEY_VARIABLES if env.get(k)), "none")  # the client insists on some string


def to_openai(messages: list[dict]) -> list[dict]:
    """Engine messages (text items, image items with a local `path`) -> chat-completions messages."""
    out = []
    for m in messages:
        parts = []
        for item in m["content"]:
            if item["type"] == "text":
                parts.append({"type": "text", "text": item["text"]})
            else:
                path = Path(item["path"])
                mime = mimetypes.guess_type(path.name)[0] or "image/png"
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
        if m["role"] == "assistant":  # plain text, as every server takes it
            parts = "".join(p["text"] for p in parts)
        out.append({"role": m["role"], "content": parts})
    return out


class RemoteStream:
    """One streamed answer from the server; iterate for text deltas."""

    def __init__(self, upstream: Any, cancel: threading.Event | None, t_call: float) -> None:
        self.stats = RemoteStats()
        self._upstream, self._chunks = upstream, iter(upstream)
        self._t_call, self._t_first, self._t_last = t_call, None, None
        self._cancel = cancel or threading.Event()
        self._closed = threading.Event()
        self.text = ""
        # Stop must not wait for the next chunk (the server may be reading images): close the HTTP stream now.
        threading.Thread(target=self._close_on_cancel, daemon=True, name="dsvl-remote-stop").start()

    def _close_on_cancel(self) -> None:
        while not self._closed.is_set():
            if self._cancel.wait(0.5):
                self.close()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            if self._closed.is_set() or self._cancel.is_set():
                self.close()
                raise StopIteration
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._finish()
                raise
            except Exception:
                if self._cancel.is_set() or self._closed.is_set():  # the stream was closed under us: stopped
                    self.close()
                    raise StopIteration from None
                raise
            self._take_usage(chunk)
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.finish_reason:
                self.stats.stop_reason = FINISH_TO_STOP.get(choice.finish_reason, "eos")
            delta = choice.delta.content if choice.delta else None
            if delta:
                self._count(delta)
                return delta

    def _count(self, delta: str) -> None:
        now = time.perf_counter()
        self._t_first = self._t_first or now
        self._t_last = now
        self.stats.new_tokens += 1  # one chunk per token on the servers we know; usage corrects it at the end
        self.stats.ttft_s = self.stats.ttft_s or now - self._t_call
        self.text += delta

    def _take_usage(self, chunk: Any) -> None:
        usage = getattr(chunk, "usage", None)
        if usage is None:
            return
        self.stats.prompt_tokens = usage.prompt_tokens
        self.stats.new_tokens = usage.completion_tokens or self.stats.new_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        if cached is not None:
            self.stats.prefilled_tokens = usage.prompt_tokens - cached

    def _finish(self) -> None:
        n, t0, t1 = self.stats.new_tokens, self._t_first, self._t_last
        if n > 1 and t0 is not None and t1 > t0:
            self.stats.decode_tokens_per_s = (n - 1) / (t1 - t0)
        self.stats.stop_reason = self.stats.stop_reason or "eos"
        self._close_upstream()

    def close(self) -> None:
        """Stop: close the upstream stream (the server sees the disconnect). Any thread, more than once."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self.stats.stop_reason is None:
            self.stats.stop_reason = "cancelled"
        self._close_upstream()

    def _close_upstream(self) -> None:
        self._closed.set()
        try:
            self._upstream.close()
        except Exception:  # noqa: BLE001 - already closed or broken: nothing left to stop
            pass


class OpenAIBackend:
    """An engine stand-in that streams from an OpenAI-compatible server."""

    quantization = "remote"
    dtype = ""
    weight_bytes = 0
    is_random = False
    num_image_tokens = 576  # the model's; only used for the context line under the chat

    def __init__(self, api_base: str, model: str | None = None, api_key: str | None = None,
                 max_context_tokens: int = 4096, timeout: float = 600.0) -> None:
        import openai

        self._openai = openai
        self.api_base = api_base.rstrip("/")
        self.client = openai.OpenAI(base_url=self.api_base, api_key=api_key or api_key_from_env(),
                                    timeout=timeout, max_retries=0)
        self.max_context_tokens = max_context_tokens
        self.model = model or self._first_model()
        self.device = self.api_base
        self.backend = f"OpenAI-compatible server {self.api_base} (model {self.model})"

    def _first_model(self) -> str:
        try:
            models = self.client.models.list().data
        except self._openai.APIError as e:
            raise SystemExit(f"Cannot list the models of {self.api_base}: {self._describe(e).rstrip('.')}. Check --api-base, "
                             f"the server, and the API key variable ({' or '.join(KEY_VARIABLES)}).") from None
        if not models:
            raise SystemExit(f"{self.api_base} serves no model; name one with --api-model.")
        return models[0].id

    @staticmethod
    def _describe(e: Exception) -> str:
        body = getattr(e, "body", None)
        if isinstance(body, dict):
            body = body.get("error", body)
        message = body.get("message") if isinstance(body, dict) else None
        return message or getattr(e, "message", None) or str(e)

    def stream(self, messages: list[dict], *, session_id: str | None = None, cancel: threading.Event | None = None,
               max_new_tokens: int = 512, temperature: float = 0.1, top_p: float = 0.95, top_k: int = 0,
               repetition_penalty: float = 1.1, seed: int | None = None) -> RemoteStream:
        """Send the request now (a refusal raises here, as the engine's checks do) and return the stream."""
        t_call = time.perf_counter()
        extra = {"repetition_penalty": repetition_penalty, **({"top_k": top_k} if top_k else {})}
        try:
            upstream = self.client.chat.completions.create(
                model=self.model, messages=to_openai(messages), stream=True, stream_options={"include_usage": True},
                max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, extra_body=extra)
        except self._openai.APIStatusError as e:
            title = "Too long" if "context" in str(getattr(e, "code", "") or "") else (
                "Image refused" if "image" in str(getattr(e, "code", "") or "") else "Refused by the model server")
            raise UserError(f"The model server refused the request: {self._describe(e)}", title) from None
        except self._openai.APIConnectionError as e:
            raise UserError(f"Cannot reach the model server at {self.api_base} ({self._describe(e)}).",
                            "Model server unreachable") from None
        return RemoteStream(upstream, cancel, t_call)

    def end_session(self, session_id: str) -> None:
        """Nothing to free: the server keeps no conversation for us (`dsvl serve` finds it again by content)."""
