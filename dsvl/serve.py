"""`python -m dsvl serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    POST /v1/chat/completions   streamed (server-sent events) or whole; text and image_url parts
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"} (no key needed: for load balancers)

One answer runs at a time; up to `--max-queue` requests wait, more get 503 at once. A client that goes away
(closed connection) stops its answer within one token, or leaves the line if it was still waiting.
Stateless clients get the app's follow-up speed through `PrefixIndex` (see prefix_index.py)."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_api as api
from .cli_common import add_model_flags, load_engine
from .prefix_index import PrefixIndex
from .serve_queue import Busy, Gate, Job

log = logging.getLogger("dsvl.serve")


@dataclass
class ServeOptions:
    model_name: str
    api_key: str | None = None
    limits: api.Limits = field(default_factory=lambda: api.Limits(max_context_tokens=4096))
    max_queue: int = 16
    max_body_bytes: int = 64 * 1024 * 1024
    prefix_capacity: int = 1024


def engine_error(exc: BaseException) -> api.ApiError:
    """What the client reads when the engine refuses or fails a request."""
    import dsvl

    if isinstance(exc, dsvl.ImageError):
        return api.ApiError(400, str(exc), code="invalid_image")
    if isinstance(exc, dsvl.ContextOverflowError):
        return api.ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if "OutOfMemoryError" in type(exc).__name__:
        return api.ApiError(503, "The model ran out of memory on this request; try fewer or smaller images, a "
                            "shorter conversation or a smaller max_tokens.", type="server_error", code="out_of_memory")
    log.error("generation failed", exc_info=exc)
    return api.ApiError(500, f"The model failed on this request ({type(exc).__name__}).", type="server_error")


def _error_response(err: api.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_big = api.ApiError(413, f"The request body is larger than {limit // 2**20} MiB.", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def _watch_disconnect(request: Request, job: Job, gone: asyncio.Event) -> None:
    """The body is read: the next ASGI message is the client's disconnect (or the end of our response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()
    job.cancel.set()


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included (404, 405), in the API's error shape."""

    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, exc: api.ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(api.ApiError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(api.ApiError(400, f"Invalid request: {exc.errors()[0].get('msg', 'bad input')}."))


def build_app(engine: Any, options: ServeOptions, fetch=None) -> FastAPI:
    """The API for one loaded engine. `fetch(url) -> bytes` downloads http(s) images (default: safe_fetch)."""
    from .safe_fetch import fetch as safe_fetch

    fetch = fetch or safe_fetch
    app = FastAPI(title="dsvl", docs_url=None, redoc_url=None, openapi_url=None)
    gate, index = Gate(options.max_queue), PrefixIndex(options.prefix_capacity)
    app.state.gate, app.state.index = gate, index
    key = options.api_key.encode() if options.api_key else None

    def check_key(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise api.ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                               type="authentication_error", code="invalid_api_key")

    _install_error_handlers(app)
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "busy": gate.busy, "waiting": gate.waiting}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "dsvl"}]}

    def busy() -> api.ApiError:
        return api.ApiError(503, f"The server is busy: {gate.waiting} requests are already waiting. Try again "
                            "shortly.", type="server_error", code="server_busy", headers={"Retry-After": "2"})

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        if gate.busy and gate.waiting >= gate.max_waiting:
            raise busy()  # before reading and decoding a body that could not be served anyway
        req = api.parse_request(await _read_body(request, options.max_body_bytes))
        p = await run_in_threadpool(api.prepare, req, options.limits, fetch, options.model_name)
        session_id, _known = index.session_for(p.digests)
        job = Job(engine, p.messages, session_id, p.params, on_done=gate.release)
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, job, gone))
        try:
            if not await gate.acquire(gone):
                watcher.cancel()
                return Response(status_code=499)  # nobody is listening any more
        except Busy:
            watcher.cancel()
            raise busy() from None
        job.start()
        kind, payload = await job.events.get()
        if kind == "error":
            watcher.cancel()
            raise engine_error(payload)
        index.record(p.digests, session_id)  # the session holds this prompt (a retry of it reuses it too)
        events = _events(job, p, index, watcher)
        if req.stream:
            return StreamingResponse(_sse(events, p), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, end = [], None
        async for kind, payload in events:
            if kind == "delta":
                text.append(payload)
            elif kind == "error":
                raise payload
            else:
                end = payload
        return JSONResponse(api.completion(p, "".join(text), end.stats))

    return app


async def _events(job: Job, p: api.Prepared, index: PrefixIndex, watcher: asyncio.Task) -> AsyncIterator[tuple]:
    """("delta", text)... then ("end", stream) or ("error", ApiError). Whatever ends the consumer (finished,
    client gone, cancelled task), the engine is told to stop."""
    text = []
    try:
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                text.append(payload)
                yield kind, payload
            elif kind == "error":
                yield kind, engine_error(payload)
                return
            else:
                stats = payload.stats
                if stats.stop_reason != "cancelled":
                    index.record([*p.digests, api.answer_digest("".join(text))], job.session_id)
                yield kind, payload
                return
    finally:
        job.cancel.set()
        watcher.cancel()


async def _sse(events: AsyncIterator[tuple], p: api.Prepared) -> AsyncIterator[str]:
    yield api.chunk(p, {"role": "assistant", "content": ""})
    async for kind, payload in events:
        if kind == "delta":
            yield api.chunk(p, {"content": payload})
        elif kind == "error":
            yield api.sse_error(payload)
            return
        else:
            yield api.chunk(p, {}, api.finish_reason(payload.stats.stop_reason))
            if p.include_usage:
                yield api.chunk(p, {}, usage_block=api.usage(payload.stats))
    yield api.SSE_DONE


# ---- command line ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m dsvl serve", description="Serve the model over an OpenAI-compatible "
                                "API. Every flag can also be set through the environment variable in brackets.")
    add_model_flags(p)
    p.add_argument("--host", default=env("DSVL_HOST", "127.0.0.1"), help="[DSVL_HOST] (default: %(default)s)")
    p.add_argument("--port", type=int, default=int(env("DSVL_SERVE_PORT", 8000)),
                   help="[DSVL_SERVE_PORT] (default: %(default)s)")
    p.add_argument("--api-key", default=env("DSVL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' [DSVL_API_KEY; prefer the variable: flags show in `ps`]")
    p.add_argument("--served-model-name", default=None, help="the model id in /v1/models (default: --model)")
    p.add_argument("--max-images", type=int, default=int(env("DSVL_MAX_IMAGES", 8)),
                   help="images in one request, over all its messages [DSVL_MAX_IMAGES] (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=int(env("DSVL_MAX_QUEUE", 16)),
                   help="requests allowed to wait; more get 503 [DSVL_MAX_QUEUE] (default: %(default)s)")
    p.add_argument("--max-body-mb", type=int, default=int(env("DSVL_MAX_BODY_MB", 64)),
                   help="largest request body in MiB [DSVL_MAX_BODY_MB] (default: %(default)s)")
    p.add_argument("--allow-image-urls", action="store_true", default=env("DSVL_ALLOW_IMAGE_URLS", "") in ("1", "true"),
                   help="also download http(s) image URLs (public addresses only) [DSVL_ALLOW_IMAGE_URLS]")
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn


    args = build_parser().parse_args(argv)
    for name in ("max_context_tokens", "max_images", "max_body_mb"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = load_engine(args)
    options = ServeOptions(
        model_name=args.served_model_name or args.model, api_key=args.api_key or None,
        limits=api.Limits(max_context_tokens=engine.max_context_tokens, max_images=args.max_images,
                          image_tokens=engine.num_image_tokens, allow_image_urls=args.allow_image_urls),
        max_queue=max(0, args.max_queue), max_body_bytes=args.max_body_mb * 2**20)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", args.host)
    t0 = time.perf_counter()
    app = build_app(engine, options)
    log.info("serving %s at http://%s:%d/v1 (ready in %.1f s)", options.model_name, args.host, args.port,
             time.perf_counter() - t0)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
