"""A live `python -m dsvl serve` process for the tests: started on a free port on 127.0.0.1 with the tiny
random checkpoint, ready once /health answers, its log kept in a file (the tests read the per-request
lines), stopped afterwards."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
CAT, CUP = ASSETS / "chelsea.png", ASSETS / "coffee.png"
LONG_PROMPT = "Tell me a long story about the sea."  # greedy on the tiny checkpoint: no EOS for many tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


@contextmanager
def live_server(checkpoint: Path, log_path: Path, *flags: str, api_key: str | None = None) -> Iterator[str]:
    """Base URL (ending in /v1) of a running server."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DSVL_API_KEY", None)
    if api_key:
        env["DSVL_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "dsvl", "serve", "--model", str(checkpoint), "--device", "cpu", "--dtype", "float32",
           "--quantization", "none", "--port", str(port), *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dsvl serve exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dsvl serve did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_idle(base_url: str, timeout: float = 30.0) -> None:
    """Until the server runs nothing and nobody waits (the engine is free)."""
    root = base_url.removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(f"{root}/health", timeout=2).json()
        if not h["busy"] and not h["waiting"]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy after {timeout} s: {h}")
        time.sleep(0.05)


def request_lines(log_path: Path) -> list[str]:
    """The server's one log line per finished request (session, tokens, stop reason)."""
    return [line for line in log_path.read_text().splitlines() if "prompt tokens (" in line]


def parse_line(line: str) -> dict:
    """A request line -> session, prompt_tokens, cached, new_tokens, stop_reason."""
    m = re.search(r"(\S+): (\d+) prompt tokens \((\d+) cached\), (\d+) new, first token [\d.]+ s, (\w+)$", line)
    assert m, line
    return {"session": m[1], "prompt_tokens": int(m[2]), "cached": int(m[3]), "new_tokens": int(m[4]),
            "stop_reason": m[5]}
