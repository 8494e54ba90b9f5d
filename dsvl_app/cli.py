"""`python app.py [flags]`: load the model, build the UI, serve it."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from .settings import Settings, parse_settings

log = logging.getLogger("dsvl_app")

NO_NETWORK_HELP = """\
Cannot get the model {model!r}: it is not in the Hugging Face cache and the hub ({endpoint}) cannot be
reached from here.

Options:
  * point at a local copy:             python app.py --model /path/to/deepseek-vl-7b-chat
  * try the interface with random weights (answers are noise):
        python app.py --model random:tiny
  * if the model is in another Hugging Face cache, point HF_HOME at it and set HF_HUB_OFFLINE=1.
"""

_LOAD_ERRORS = ("CheckpointError", "ConfigError", "DeviceError", "QuantizationError")


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except Exception:
        return "https://huggingface.co"


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:
        return False


def offline_problem(model: str) -> str | None:
    """The help text when `model` is a hub id that can be neither found in the cache nor downloaded; found
    in seconds instead of after the hub client's network retries. Every other case is the core's to judge
    (`dsvl.CheckpointError` names the file and the options)."""
    if Path(model).expanduser().exists() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    if _in_hf_cache(model) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None  # cached, or the hub client fails at once by itself
    endpoint = _hub_endpoint()
    return None if _hub_reachable(endpoint) else NO_NETWORK_HELP.format(model=model, endpoint=endpoint)


def load_engine(settings: Settings):
    import dsvl

    problem = offline_problem(settings.model)
    if problem:
        raise SystemExit(problem)
    print(f"Loading {settings.model} (quantization={settings.quantization}, device={settings.device}, "
          f"dtype={settings.dtype}) …", flush=True)
    t0 = time.perf_counter()
    try:
        engine = dsvl.load(model=settings.model, device=settings.device, dtype=settings.dtype,
                           quantization=settings.quantization, max_context_tokens=settings.max_context_tokens,
                           max_image_pixels=settings.max_image_pixels,
                           kv_cache_memory=settings.kv_cache_memory, compile=settings.compile)
    except Exception as exc:
        if type(exc).__name__ in _LOAD_ERRORS:
            raise SystemExit(f"Could not load the model: {exc}") from None
        raise
    dtype = str(engine.dtype).removeprefix("torch.")
    print(f"Loaded in {time.perf_counter() - t0:.1f} s: device {engine.device}, dtype {dtype}, "
          f"quantization {engine.quantization}, weights {engine.weight_bytes / 2**30:.2f} GiB"
          + ("  [RANDOM WEIGHTS]" if getattr(engine, "is_random", False) else ""), flush=True)
    if getattr(engine, "quantization_reason", ""):  # --quantization auto: what it chose and why
        print(f"Quantization auto: {engine.quantization_reason}", flush=True)
    if hasattr(engine, "kv_summary"):
        print(f"{engine.kv_summary()}; compiled decode step: {'on' if engine.compiled else 'off'}", flush=True)
    return engine


def startup_warnings(settings: Settings, on_spaces: bool) -> list[str]:
    out = []
    if settings.share and on_spaces:
        out.append("--share is ignored on Hugging Face Spaces (the Space already has a public URL).")
    elif settings.share and not settings.auth:
        out.append("WARNING: --share publishes this app on a public *.gradio.live link that anyone can open, "
                   "with no login. Add --auth USER:PASS (or DSVL_AUTH) to restrict it.")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.auth and not on_spaces:
        out.append(f"Note: listening on {settings.host}: reachable from other machines, without a login "
                   "(add --auth USER:PASS).")
    return out


def spaces_gpu():
    """On ZeroGPU hardware (`spaces` importable) the GPU work runs under spaces.GPU with a duration
    that grows with the requested answer length; elsewhere nothing changes."""
    try:
        import spaces  # noqa: F401  (only present on Hugging Face Spaces)
    except ImportError:
        return None

    def duration(engine, messages, session_id, params, cancel=None) -> int:
        images = sum(1 for m in messages for c in m["content"] if c.get("type") == "image")
        return int(min(300, 20 + 4 * images + params.get("max_new_tokens", 512) / 12))

    return lambda fn: spaces.GPU(duration=duration)(fn)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = parse_settings(argv)
    on_spaces = bool(os.environ.get("SPACE_ID"))
    for line in startup_warnings(settings, on_spaces):
        print(line, file=sys.stderr, flush=True)
    if on_spaces:
        settings.share = False
    if settings.backend == "openai":
        from .remote import OpenAIBackend

        engine = OpenAIBackend(settings.api_base, settings.api_model, max_context_tokens=settings.max_context_tokens)
        print(f"Answers come from {engine.backend}", flush=True)
    else:
        engine = load_engine(settings)
    # Each server gets its own upload folder (before gradio is imported: it reads the variable at import).
    # Two servers sharing /tmp/gradio would delete each other's identical uploads when a session ends.
    own_folder = None
    if "GRADIO_TEMP_DIR" not in os.environ:
        own_folder = os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="dsvl-chat-uploads-")
    # SIGTERM is how Spaces, systemd and Docker stop a server: treat it as Ctrl+C, so that Gradio closes the
    # server and the `finally` below deletes the users' uploads.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from .ui import build_app, launch_options

        demo = build_app(engine, settings, gpu=spaces_gpu() if settings.backend == "local" else None)
        demo.launch(**launch_options(settings))
    finally:
        if own_folder:
            shutil.rmtree(own_folder, ignore_errors=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
