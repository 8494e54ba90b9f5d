"""The OpenAI chat-completions protocol, as far as `dsvl serve` speaks it: the request schema, turning a
request into engine messages and sampling parameters, the response and stream-chunk objects, and errors in
the API's own shape (`{"error": {"message", "type", "param", "code"}}`).

Nothing here touches the network or the model: `serve.py` calls these with the limits it was started
with. Images come in as `image_url` parts: `data:` URLs always, http(s) URLs only when the server allows
them (and then only to public addresses, see `safe_fetch`), never a file path."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length"}
DEFAULT_MAX_TOKENS = 512


class ApiError(Exception):
    """An error the client gets as `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the request ----------------------------------------------------------------------------------------------

class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs=false, ...)


class ImageURL(_Loose):
    url: str
    detail: str | None = None


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class ImagePart(_Loose):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class Message(_Loose):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatRequest(_Loose):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    n: int = Field(1, ge=1, le=1)


def parse_request(raw: bytes) -> ChatRequest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}).") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise ApiError(400, f"Invalid request: {where}: {first['msg']}{more}.", param=where or None) from None


@dataclass
class Limits:
    max_context_tokens: int
    max_images: int = 8  # per request, over all messages
    image_tokens: int = 576  # context tokens per image (the engine's num_image_tokens)
    max_text_chars: int = 0  # 0 = 32 characters per context token (far beyond any text that fits)
    max_image_bytes: int = 20 * 1024 * 1024
    allow_image_urls: bool = False

    def text_chars(self) -> int:
        return self.max_text_chars or 32 * self.max_context_tokens


@dataclass
class Prepared:
    """A request ready for the engine."""

    messages: list[dict]  # engine messages: text parts and {"type": "image", "image": bytes}
    digests: list[str]  # per message, a hash of its canonical content (images by content)
    params: dict  # keyword arguments of Engine.stream (without session / cancel)
    include_usage: bool = False
    model: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def _image_bytes(url: str, where: str, limits: Limits, fetch: Callable[[str], bytes]) -> bytes:
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data URL must look like data:image/png;base64,...",
                           code="invalid_image", param=where)
        if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
            raise ApiError(400, f"{where}: the image is larger than {limits.max_image_bytes // 2**20} MiB",
                           code="invalid_image", param=where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL is not valid base64", code="invalid_image",
                           param=where) from None
    if url.startswith(("http://", "https://")):
        if not limits.allow_image_urls:
            raise ApiError(400, f"{where}: this server does not download images from URLs; send the image as a "
                           "data: URL (base64)", code="image_url_not_allowed", param=where)
        from .safe_fetch import FetchError

        try:
            return fetch(url)
        except FetchError as e:
            raise ApiError(400, f"{where}: the image URL was refused: {e}", code="invalid_image",
                           param=where) from None
    raise ApiError(400, f"{where}: an image must be a data: URL" + (" or an http(s) URL" if limits.allow_image_urls
                   else "") + "; file paths and other schemes are not accepted", code="invalid_image", param=where)


def digest(role: str, parts: list) -> str:
    """Hash of one message's canonical content (the prefix index's unit)."""
    return hashlib.sha256(json.dumps([role, parts], ensure_ascii=False).encode()).hexdigest()


def answer_digest(text: str) -> str:
    """The digest of the assistant message a client will send back for this answer."""
    return digest("assistant", [["text", text.strip()]])


def prepare(req: ChatRequest, limits: Limits, fetch: Callable[[str], bytes], model_name: str) -> Prepared:
    """Validate against the limits, decode the images, and build the engine's input. Blocking (downloads)."""
    messages, digests, n_images, n_chars = [], [], 0, 0
    for i, m in enumerate(req.messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        items, canon = [], []
        for j, part in enumerate(parts):
            where = f"messages.{i}.content.{j}"
            if isinstance(part, TextPart):
                n_chars += len(part.text)
                items.append({"type": "text", "text": part.text})
                # The template strips a reply's surrounding whitespace: a client echoing it back either way matches.
                canon.append(["text", part.text.strip() if m.role == "assistant" else part.text])
                continue
            if m.role != "user":
                raise ApiError(400, f"{where}: only user messages can hold images", param=where)
            n_images += 1
            if n_images > limits.max_images:
                raise ApiError(400, f"Too many images: at most {limits.max_images} per request "
                               f"({limits.image_tokens} context tokens each).", code="too_many_images", param=where)
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            data = _image_bytes(url, where, limits, fetch)
            items.append({"type": "image", "image": data, "name": f"image {n_images} ({where})"})
            canon.append(["image", hashlib.sha256(data).hexdigest()])
        messages.append({"role": m.role, "content": items})
        digests.append(digest(m.role, canon))
    if n_chars > limits.text_chars():
        raise ApiError(400, f"The messages hold {n_chars:,} characters of text; this server takes at most "
                       f"{limits.text_chars():,} (a {limits.max_context_tokens:,}-token context).",
                       code="context_length_exceeded", param="messages")
    if messages[-1]["role"] == "assistant":
        raise ApiError(400, "The last message must be a user (or system) message: there is nothing to answer.",
                       param="messages")
    return Prepared(messages, digests, sampling(req, limits), bool(req.stream_options and
                    req.stream_options.include_usage), req.model or model_name)


def sampling(req: ChatRequest, limits: Limits) -> dict:
    """Engine.stream keyword arguments. Defaults are the app's (DeepSeek-VL's own demo)."""
    max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
    if max_tokens > limits.max_context_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this server's {limits.max_context_tokens:,}-token "
                       "context.", code="context_length_exceeded", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(len(s) > 256 for s in stop):
        raise ApiError(400, "stop: at most 4 strings of at most 256 characters.", param="stop")
    top_p = 0.95 if req.top_p is None else req.top_p
    return {
        "max_new_tokens": max_tokens,
        "temperature": 0.1 if req.temperature is None else req.temperature,
        "top_p": top_p,
        "top_k": req.top_k or 0,
        "repetition_penalty": 1.1 if req.repetition_penalty is None else req.repetition_penalty,
        "seed": req.seed,
        "stop": ("User:", *stop),  # the chat format's own turn marker always ends a reply
    }


# ---- the response ---------------------------------------------------------------------------------------------

def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def usage(stats: Any) -> dict:
    prompt, completion = int(stats.prompt_tokens), int(stats.new_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(stats.reused_tokens)}}


def completion(p: Prepared, text: str, stats: Any) -> dict:
    return {"id": p.id, "object": "chat.completion", "created": p.created, "model": p.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(stats.stop_reason), "logprobs": None}],
            "usage": usage(stats)}


def chunk(p: Prepared, delta: dict, finish: str | None = None, usage_block: dict | None = None) -> str:
    """One server-sent event with a `chat.completion.chunk`."""
    obj: dict[str, Any] = {"id": p.id, "object": "chat.completion.chunk", "created": p.created, "model": p.model,
                           "choices": [] if usage_block else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                               "logprobs": None}]}
    if usage_block:
        obj["usage"] = usage_block
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(err: ApiError) -> str:
    return f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
