"""Shared helpers for the tests that drive a live app: an in-process server on 127.0.0.1 (free port,
`prevent_thread_lock=True`, as tests/test_app_client.py does), the /chat call through gradio_client, a raw
HTTP client for the queue protocol (for what gradio_client cannot send, and for real disconnects), and
crafted bad images."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
from gradio_client import Client, handle_file
from PIL import Image

import dsvl
from dsvl_app import Settings, start_in_background

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
CAT, CUP, SIGN = (str(ASSETS / n) for n in ("chelsea.png", "coffee.png", "sign.png"))
GREEDY = dict(temperature=0.0, top_p=0.95, top_k=0, repetition_penalty=1.1, seed=0)
LONG_PROMPT = "Tell me a long story about the sea."  # greedy on the tiny checkpoint: no EOS for many tokens


# ---- the server -----------------------------------------------------------------------------------------

def load_tiny_engine(checkpoint: Path, **options: Any):
    return dsvl.load(str(checkpoint), device="cpu", quantization="none", **{"max_context_tokens": 4096, **options})


@contextmanager
def live_app(engine, checkpoint: Path, **settings: Any) -> Iterator[tuple[Any, str]]:
    """(demo, url) of the app serving `engine` on 127.0.0.1, closed afterwards.

    The server gets an upload folder of its own (GRADIO_TEMP_DIR, read by Gradio at launch and on each upload):
    Gradio names cached uploads by content hash, so servers sharing /tmp/gradio (other test runs on this machine)
    would delete each other's copies of the same asset when their sessions end."""
    old = os.environ.get("GRADIO_TEMP_DIR")
    upload_dir = tempfile.mkdtemp(prefix="dsvl-test-uploads-")
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    try:
        demo, url = start_in_background(engine, Settings(model=str(checkpoint), **settings))
        assert url.startswith("http://127.0.0.1:")
        assert str(demo.dsvl_runtime.upload_root) == upload_dir
        try:
            yield demo, url
        finally:
            demo.close()
    finally:
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old
        shutil.rmtree(upload_dir, ignore_errors=True)


class Paced:
    """The engine at a real model's pace (about 50 tokens/s; the tiny one writes hundreds a second), so that an
    answer is still running when a test presses Stop or sends from a second tab."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, *args, **kwargs):
        return PacedStream(self._engine.stream(*args, **kwargs))


class PacedStream:
    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __iter__(self):
        for delta in self._stream:
            time.sleep(0.02)
            yield delta


def chat_args(text: str, files=(), max_new_tokens: int = 8, **kw) -> tuple:
    p = {**GREEDY, **kw}
    return ({"text": text, "files": [handle_file(str(f)) for f in files]}, p["temperature"], p["top_p"], p["top_k"],
            max_new_tokens, p["repetition_penalty"], p["seed"])


def ask(client: Client, text: str, files=(), max_new_tokens: int = 8, **kw) -> str:
    return client.predict(*chat_args(text, files, max_new_tokens, **kw), api_name="/chat")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> float:
    """Seconds until `predicate()` is true; fails the test (naming `what`) after `timeout`."""
    t0 = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - t0 < timeout, f"timed out after {timeout} s waiting for: {what}"
        time.sleep(interval)
    return time.perf_counter() - t0


def engine_is_free(engine) -> bool:
    """True when no stream holds the engine's lock (it is taken for a whole reply)."""
    if engine._lock.acquire(blocking=False):
        engine._lock.release()
        return True
    return False


def queue_drained(demo) -> bool:
    """Nothing waiting or running in Gradio's queue."""
    q = demo._queue
    waiting = sum(len(eq.queue) for eq in q.event_queue_per_concurrency_id.values())
    running = sum(eq.current_concurrency for eq in q.event_queue_per_concurrency_id.values())
    return waiting == 0 and running == 0 and not any(q.active_jobs)


# ---- raw queue protocol ---------------------------------------------------------------------------------

def fn_index(url: str, api_name: str = "chat", client: httpx.Client | None = None) -> int:
    config = (client or httpx).get(url + "config", timeout=10).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def join(http: httpx.Client, url: str, data: list, *, fn: int, session_hash: str) -> httpx.Response:
    """POST /gradio_api/queue/join (the first half of what a browser or gradio_client sends)."""
    body = {"data": data, "fn_index": fn, "session_hash": session_hash, "event_data": None, "trigger_id": None}
    return http.post(url + "gradio_api/queue/join", content=json.dumps(body), timeout=10,
                     headers={"content-type": "application/json"})


def sse_messages(http: httpx.Client, url: str, session_hash: str, *, timeout: float = 60) -> Iterator[dict]:
    """The queue's server-sent messages for a session (heartbeats left out), until the stream closes."""
    t0 = time.perf_counter()
    with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session_hash},
                     timeout=httpx.Timeout(timeout)) as r:
        assert r.status_code == 200, r.status_code
        for line in r.iter_lines():
            assert time.perf_counter() - t0 < timeout, "the queue stream did not end in time"
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "heartbeat":
                continue
            yield msg
            if msg.get("msg") in ("process_completed", "close_stream", "unexpected_error"):
                return


def chat_data(message: dict, max_new_tokens: int = 8) -> list:
    """The /chat endpoint's data list as the queue receives it (message, settings, history, system prompt,
    session state; None = the model's own system prompt)."""
    p = GREEDY
    return [message, p["temperature"], p["top_p"], p["top_k"], max_new_tokens, p["repetition_penalty"], p["seed"],
            None, None, None]


def raw_chat(url: str, message: dict, *, max_new_tokens: int = 8, timeout: float = 60,
             session_hash: str | None = None) -> dict:
    """One /chat call over plain HTTP; returns the final `process_completed` message."""
    session = session_hash or uuid.uuid4().hex
    with httpx.Client() as http:
        r = join(http, url, chat_data(message, max_new_tokens), fn=fn_index(url, client=http), session_hash=session)
        assert r.status_code == 200, (r.status_code, r.text)
        last = None
        for msg in sse_messages(http, url, session, timeout=timeout):
            last = msg
        assert last is not None and last["msg"] == "process_completed", last
        return last


# ---- memory ---------------------------------------------------------------------------------------------

def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss


def live_rss_bytes() -> int:
    """This process's RSS without the memory glibc keeps cached after `free` (its per-thread arenas hold on to
    freed blocks, e.g. after image preprocessing on many worker threads): garbage-collect, `malloc_trim(0)`,
    then measure. What is left is memory in use, so growth here across rounds of requests is a leak."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc (Linux); fails loudly elsewhere
    return rss_bytes()


# ---- crafted files --------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares `width`x`height` (a decompression bomb's header; the
    pixel data is a few bytes, so nothing here allocates the image)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def photo(size=(96, 64), seed: int = 0) -> Image.Image:
    """A small RGB image with structure (a gradient and a block), different per seed."""
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([((x * 255 // max(1, w - 1) + 37 * seed) % 256, (y * 255 // max(1, h - 1) + 91 * seed) % 256,
                  (x * y + 53 * seed) % 256) for y in range(h) for x in range(w)])
    return img


def bad_inputs(tmp: Path) -> dict[str, Path]:
    """The bad-input battery's files, written under `tmp`; keys are the case names."""
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        out[name.split(".")[0]] = tmp / name
        (tmp / name).write_bytes(data)

    base = photo((240, 160), seed=3)
    jpeg, png = encoded(base, "JPEG", quality=90), encoded(base, "PNG")
    put("not_an_image.png", b"%PDF-1.4\nthis is a text file renamed to .png\n" * 20)
    put("truncated_jpeg.jpg", jpeg[: len(jpeg) // 2])
    put("truncated_png.png", png[: len(png) // 2])
    put("zero_bytes.png", b"")
    put("one_pixel.png", encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    put("bomb_20000x20000.png", png_declaring(20000, 20000))
    frames = [photo((64, 64), seed=s) for s in range(3)]
    put("animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0))
    put("cmyk.jpg", encoded(base.convert("CMYK"), "JPEG", quality=90))
    sixteen = Image.new("I;16", (80, 40))
    sixteen.putdata([(x * 800 + y * 40) % 65536 for y in range(40) for x in range(80)])
    put("sixteen_bit.png", encoded(sixteen, "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    put("exif_rotated.jpg", encoded(photo((120, 60), seed=5), "JPEG", exif=exif.tobytes()))
    return out


# ---- the app as a subprocess ----------------------------------------------------------------------------

def app_env(**extra: str) -> dict[str, str]:
    """The environment for `python app.py`: no DSVL_*/GRADIO_* settings leak in from outside, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSVL_", "GRADIO_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", **extra)
    return env


def serving(url: str, proc: subprocess.Popen, log: Path | None = None) -> bool:
    """True once the app started as `proc` answers at `url`; fails the test (with the log's end) if it exited."""
    if proc.poll() is not None:
        out = log.read_text()[-4000:] if log else (proc.stdout.read() if proc.stdout else "")
        raise AssertionError(f"the app exited ({proc.returncode}):\n{out}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_app(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python app.py ARGS` to completion (for start-up failures; a server that starts is a test failure:
    the timeout kills it)."""
    return subprocess.run([sys.executable, str(REPO / "app.py"), *args], cwd=REPO, env=env or app_env(),
                          capture_output=True, text=True, timeout=timeout)
