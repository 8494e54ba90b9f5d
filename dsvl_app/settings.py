"""Command-line flags of the app; every flag can also come from a `DSVL_*` environment variable
(that is how a Hugging Face Space is configured). A flag on the command line wins over the environment."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field

DEFAULT_MODEL = "deepseek-community/deepseek-vl-7b-chat"
# dsvl.quantization's modes (not imported here: --help must not load torch). int8 / nf4: the old names of bnb-*.
QUANTIZATION_CHOICES = ["auto", "none", "int8-wo", "int4-wo", "int4-wo-g32", "int4-wo-g64", "int4-wo-g256",
                        "bnb-int8", "bnb-nf4", "int8", "nf4"]
# What each mode costs (7B weights; decode speed against 16-bit): the --help text and the banner's tooltip.
QUANTIZATION_COSTS = {
    "none": "16-bit weights, 14.7 GB",
    "int8-wo": "int8 weight-only, 8.2 GB; faster decode than 16-bit on CPU (fused kernel; on CUDA where PyTorch "
               "has one); logits ~0.9999 of 16-bit",
    "int4-wo": "4-bit weight-only in groups of 128 (-g32/-g64/-g256 to change), 5.3 GB; the fastest decode on CPU "
               "(fused kernel) and Ampere+ GPUs (tinygemm); logits ~0.99-0.995 of 16-bit",
    "bnb-int8": "bitsandbytes LLM.int8 (old name int8), 8.6 GB; 20-30x slower than 16-bit on CPU, slower on GPU",
    "bnb-nf4": "bitsandbytes NF4 (old name nf4), 5.7 GB; 8-12x slower than 16-bit on CPU, slower than bf16 on GPU",
}
QUANTIZATION_HELP = ("; ".join(f"{mode} = {cost}" for mode, cost in QUANTIZATION_COSTS.items()) +
                     "; auto = the fastest of these on this device that fits its free memory with a full-context "
                     "KV cache, and it says why. [DSVL_QUANTIZATION] (default: %(default)s)")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class GenerationDefaults:
    """Slider defaults: those of the original DeepSeek-VL Gradio demo."""

    temperature: float = 0.1
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 512
    repetition_penalty: float = 1.1
    seed: int = -1  # -1 = a fresh random seed for every answer


@dataclass
class Settings:
    model: str = DEFAULT_MODEL
    quantization: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: str | None = None  # "USER:PASS"
    max_images: int = 4  # per message
    max_images_per_chat: int = 32  # per conversation, every reference counted (bounds memory and Export)
    max_context_tokens: int = 4096
    concurrency: int = 1  # generations running at once
    max_queue: int = 32  # requests waiting; more are refused with "queue is full"
    max_file_size: int = 20 * 1024 * 1024  # bytes, per uploaded file
    max_image_pixels: int | None = None  # width x height; None = the core's limit (dsvl.images.DEFAULT_MAX_PIXELS)
    backend: str = "local"  # "local": load the model here; "openai": stream from an OpenAI-compatible server
    api_base: str | None = None  # that server's URL, e.g. http://gpu-box:23333/v1
    api_model: str | None = None  # its model id (default: the first it lists)
    kv_cache_memory: str = "auto"  # all conversations' KV cache: a size (6GB), a fraction of free memory, or auto
    compile: str = "auto"  # compiled decode step: auto (= on for CUDA), on, off
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    def auth_pairs(self) -> list[tuple[str, str]] | None:
        return [parse_auth(self.auth)] if self.auth else None


def parse_size(text: str | int) -> int:
    """'20MB', '500 kb', '1.5GB' or a plain byte count -> bytes (binary units, as Gradio counts them)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 20MB, 500kb, 1048576)")
    unit = (m.group(2) or "b").lower().rstrip("b").rstrip("i")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit]
    return int(float(m.group(1)) * scale)


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like USER:PASS")
    return user, password


def _env_bool(env, name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise SystemExit(f"{name}={value!r}: expected true or false")


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    d = Settings()

    def e(name: str, default):
        return env.get(name, default)

    p = argparse.ArgumentParser(
        prog="app.py",
        description="Chat with DeepSeek-VL (7B or 1.3B chat) about your images. Every flag can also be set through the "
        "environment variable named in brackets.",
    )
    p.add_argument("--model", default=e("DSVL_MODEL", d.model),
                   help="hub id (deepseek-community/deepseek-vl-7b-chat or deepseek-community/deepseek-vl-1.3b-chat), "
                        "local checkpoint directory, or random:tiny|mid|7b|1.3b-tiny|1.3b (random weights, to try "
                        "the UI) [DSVL_MODEL] (default: %(default)s)")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, metavar="MODE",
                   default=e("DSVL_QUANTIZATION", d.quantization), help=QUANTIZATION_HELP)
    p.add_argument("--device", default=e("DSVL_DEVICE", d.device),
                   help="auto, cpu, cuda, cuda:1, mps … [DSVL_DEVICE] (default: %(default)s)")
    p.add_argument("--dtype", default=e("DSVL_DTYPE", d.dtype),
                   help="auto, bfloat16, float16, float32 [DSVL_DTYPE] (default: %(default)s)")
    p.add_argument("--host", default=e("DSVL_HOST", e("GRADIO_SERVER_NAME", d.host)),
                   help="address to listen on [DSVL_HOST] (default: %(default)s; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=int(e("DSVL_PORT", e("GRADIO_SERVER_PORT", d.port))),
                   help="[DSVL_PORT] (default: %(default)s)")
    p.add_argument("--share", action=argparse.BooleanOptionalAction,
                   default=_env_bool(env, "DSVL_SHARE", d.share),
                   help="also publish a public *.gradio.live link; use together with --auth [DSVL_SHARE]")
    p.add_argument("--auth", default=e("DSVL_AUTH", None), metavar="USER:PASS",
                   help="require this login [DSVL_AUTH; prefer the variable: flags show up in `ps`]")
    p.add_argument("--max-images", type=int, default=int(e("DSVL_MAX_IMAGES", d.max_images)),
                   help="images allowed in one message [DSVL_MAX_IMAGES] (default: %(default)s; 576 tokens each)")
    p.add_argument("--max-images-per-chat", type=int,
                   default=int(e("DSVL_MAX_IMAGES_PER_CHAT", d.max_images_per_chat)),
                   help="images allowed in one conversation, history and imports included "
                        "[DSVL_MAX_IMAGES_PER_CHAT] (default: %(default)s)")
    p.add_argument("--max-context-tokens", type=int,
                   default=int(e("DSVL_MAX_CONTEXT_TOKENS", d.max_context_tokens)),
                   help="prompt + answer budget; older turns are dropped beyond it "
                        "[DSVL_MAX_CONTEXT_TOKENS] (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=int(e("DSVL_CONCURRENCY", d.concurrency)),
                   help="answers generated at the same time [DSVL_CONCURRENCY] (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=int(e("DSVL_MAX_QUEUE", d.max_queue)),
                   help="requests allowed to wait; more get 'queue is full' [DSVL_MAX_QUEUE] (default: %(default)s)")
    p.add_argument("--max-file-size", default=e("DSVL_MAX_FILE_SIZE", "20MB"),
                   help="largest accepted upload, e.g. 20MB [DSVL_MAX_FILE_SIZE] (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=e("DSVL_MAX_IMAGE_PIXELS", None),
                   help="largest image accepted, in pixels (width x height), checked on the declared size before "
                        "decoding (a decompression bomb is refused unread) [DSVL_MAX_IMAGE_PIXELS] "
                        "(default: the core's limit, 40 MP)")
    p.add_argument("--backend", choices=["local", "openai"], default=e("DSVL_BACKEND", d.backend),
                   help="local: load the model in this process; openai: stream from the OpenAI-compatible server "
                        "at --api-base (key in DSVL_API_KEY or OPENAI_API_KEY) [DSVL_BACKEND] (default: %(default)s)")
    p.add_argument("--api-base", default=e("DSVL_API_BASE", None), metavar="URL",
                   help="with --backend openai, e.g. http://127.0.0.1:23333/v1 [DSVL_API_BASE]")
    p.add_argument("--api-model", default=e("DSVL_API_MODEL", None), metavar="NAME",
                   help="with --backend openai: the model id (default: the first the server lists) [DSVL_API_MODEL]")
    p.add_argument("--kv-cache-memory", default=e("DSVL_KV_CACHE_MEMORY", d.kv_cache_memory),
                   help="memory for all conversations' KV caches: a size like 6GB, a fraction like 0.5 of the "
                        "memory left after the weights, or auto (CUDA: all of it; CPU: half); idle conversations "
                        "are evicted when it is full [DSVL_KV_CACHE_MEMORY] (default: %(default)s)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=e("DSVL_COMPILE", d.compile),
                   help="compile the decode step with torch.compile (CUDA graphs on a GPU); auto = on for CUDA "
                        "[DSVL_COMPILE] (default: %(default)s)")
    return p


def parse_settings(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    parser = build_parser(env)
    a = parser.parse_args(argv)
    try:
        max_file_size = parse_size(a.max_file_size)
        if a.auth:
            parse_auth(a.auth)
        from dsvl.kvpool import parse_budget  # the core's parser: one definition of what a budget may be

        parse_budget(a.kv_cache_memory)
    except ValueError as exc:
        parser.error(str(exc))
    if a.max_image_pixels is not None and a.max_image_pixels < 1:
        parser.error("--max-image-pixels must be positive")
    if a.backend == "openai" and not a.api_base:
        parser.error("--backend openai needs --api-base URL (the server's /v1 address)")
    for name in ("max_images", "max_images_per_chat", "max_context_tokens", "concurrency", "max_queue", "port"):
        if getattr(a, name) < (0 if name == "port" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return Settings(
        model=a.model, quantization=a.quantization, device=a.device, dtype=a.dtype, host=a.host,
        port=a.port, share=bool(a.share), auth=a.auth or None, max_images=a.max_images,
        max_images_per_chat=a.max_images_per_chat,
        max_context_tokens=a.max_context_tokens, concurrency=a.concurrency, max_queue=a.max_queue,
        max_file_size=max_file_size, max_image_pixels=a.max_image_pixels, kv_cache_memory=a.kv_cache_memory,
        compile=a.compile, backend=a.backend, api_base=a.api_base, api_model=a.api_model,
    )
