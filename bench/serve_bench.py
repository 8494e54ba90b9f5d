"""`dsvl serve` against the engine it wraps, in one run on one loaded engine:

1. follow-up time to first token for a *stateless* API client (it resends the whole conversation, image
   included) against its first turn: what automatic prefix reuse buys;
2. decode speed through HTTP (server-sent events, measured by the `openai` client as chunks arrive) against
   `engine.stream` called directly, alternating A/B to even out a shared machine's noise.

    python bench/serve_bench.py --preset mid --dtype bfloat16

The server runs in this process (uvicorn on a thread) so that both sides use the very same engine and
weights; the client is the official `openai` package."""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

IMAGE = ROOT / "assets" / "chelsea.png"
PROMPT = "Tell me a long story about the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine):
    import uvicorn

    from dsvl import openai_api as api
    from dsvl.serve import ServeOptions, build_app

    port = free_port()
    app = build_app(engine, ServeOptions("bench", limits=api.Limits(max_context_tokens=engine.max_context_tokens)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def timed_http(client, messages, max_tokens: int) -> dict:
    """Client-side: time to the first text chunk, decode tokens/s between first and last chunk."""
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    for c in client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
        if c.usage:
            usage = c.usage
        if c.choices and c.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text.append(c.choices[0].delta.content)
    n = usage.completion_tokens
    return {"ttft_s": first - t0, "tok_s": (n - 1) / (last - first) if n > 1 else None, "tokens": n,
            "text": "".join(text), "prompt": usage.prompt_tokens, "cached": usage.prompt_tokens_details.cached_tokens}


def timed_direct(engine, messages, max_tokens: int) -> dict:
    """`engine.stream` driven from a thread of its own, as the server (and the app) drive it: on a busy machine
    a stream driven from the main thread can decode far slower (its OpenMP team waits on preempted threads)."""
    out: list[dict] = []
    worker = threading.Thread(target=lambda: out.append(_direct(engine, messages, max_tokens)))
    worker.start()
    worker.join()
    return out[0]


def _direct(engine, messages, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    with engine.stream(messages, max_new_tokens=max_tokens, temperature=0) as s:
        for _ in s:
            now = time.perf_counter()
            first = first or now
            last = now
    n = s.stats.new_tokens
    return {"ttft_s": first - t0, "tok_s": (n - 1) / (last - first) if n > 1 else None, "tokens": n,
            "engine_tok_s": s.stats.decode_tokens_per_s}


def followup_ttft(engine, client, rounds: int) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    out = []
    for r in range(rounds):
        engine.clear_caches()  # every round's first turn starts cold (image features too)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": f"Describe this image. (round {r})"}]}]
        first = timed_http(client, messages, 16)
        messages += [{"role": "assistant", "content": first["text"]},
                     {"role": "user", "content": "What colour is the animal?"}]
        second = timed_http(client, messages, 16)
        out.append({"first_ttft_s": first["ttft_s"], "followup_ttft_s": second["ttft_s"],
                    "ratio": second["ttft_s"] / first["ttft_s"], "first_prompt": first["prompt"],
                    "followup_prompt": second["prompt"], "followup_cached": second["cached"]})
    return out


def decode_overhead(engine, client, rounds: int, tokens: int) -> dict:
    text_msgs = [{"role": "user", "content": PROMPT}]
    direct, http = [], []
    for _ in range(rounds):  # alternate: A B A B ...
        direct.append(timed_direct(engine, text_msgs, tokens))
        http.append(timed_http(client, text_msgs, tokens))
    d = statistics.median(x["tok_s"] for x in direct)
    h = statistics.median(x["tok_s"] for x in http)
    return {"direct_tok_s": [round(x["tok_s"], 2) for x in direct], "http_tok_s": [round(x["tok_s"], 2) for x in http],
            "tokens": [x["tokens"] for x in direct + http], "median_direct": d, "median_http": h,
            "http_over_direct": h / d, "overhead_pct": (1 - h / d) * 100}


def main() -> None:
    import openai

    import dsvl
    from bench import ensure_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["tiny", "mid"], default="mid")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    a = p.parse_args()
    ckpt = ensure_checkpoint(a.preset, a.checkpoint)
    engine = dsvl.load(str(ckpt), device="cpu", dtype=a.dtype, quantization="none")
    server, url = start_server(engine)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    timed_direct(engine, [{"role": "user", "content": "warm up"}], 4)
    result = {"preset": a.preset, "dtype": a.dtype, "followup": followup_ttft(engine, client, a.rounds),
              "decode": decode_overhead(engine, client, a.rounds, a.tokens)}
    result["followup_ratio_median"] = statistics.median(r["ratio"] for r in result["followup"])
    server.should_exit = True
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
