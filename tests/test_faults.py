"""Faults: an out-of-memory error inside generation, a client that disconnects mid-stream, and a
broken checkpoint at start-up.

OOM is injected through the engine's test-only variable `DSVL_FAULT_INJECT` (read per request, so setting it in
this process reaches the in-process server). Disconnects are real: the HTTP connections are closed under a
streaming answer. Start-up faults run `python app.py --model DIR` as a subprocess."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from apphelpers import (CAT, CUP, LONG_PROMPT, ask, chat_args, chat_data, engine_is_free, fn_index, join, live_app,
                        load_tiny_engine, queue_drained, run_app, wait_until)
from dsvl.faults import FAULT_ENV
from dsvl_app import history


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load_tiny_engine(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(engine, tiny_checkpoint):
    with live_app(engine, tiny_checkpoint, max_images=4, concurrency=1, max_queue=16) as app:
        yield app


# ---- out of memory --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["oom_at_decode_step=2", "oom_at_prefill=1"])
def test_oom_is_reported_to_that_user_caches_are_freed_and_the_next_request_succeeds(fault, server, engine,
                                                                                      monkeypatch):
    demo, url = server
    rt = demo.dsvl_runtime
    bystander, victim = Client(url, verbose=False), Client(url, verbose=False)
    assert ask(bystander, "Describe this.", [CAT])  # fills a session cache and the image cache
    first = ask(victim, "And this one?", [CUP])
    assert bystander.session_hash in engine.sessions and len(engine._features) >= 2

    monkeypatch.setenv(FAULT_ENV, fault)
    with pytest.raises(AppError, match="(?i)out of memory|out-of-memory|OutOfMemoryError"):
        ask(victim, "Tell me more.", max_new_tokens=16)
    monkeypatch.delenv(FAULT_ENV)

    assert engine_is_free(engine) and rt.active_generations() == 0
    # "caches are freed": every session's KV cache and every cached image feature is dropped
    assert engine.sessions == [] and len(engine._features) == 0

    # the next requests succeed, for the bystander and for the user who hit the fault
    assert ask(bystander, "Still there?")
    assert ask(victim, "Tell me more.")
    stats = rt.last_stats[victim.session_hash]
    assert stats["stop_reason"] != "error" and stats["prefilled_tokens"] == stats["prompt_tokens"]  # cache rebuilt
    # the failed turn is not part of the conversation: the retry's prompt is the earlier turn + the same question
    # (tokenised from text: the session's cache, and the generated ids in it, went with the fault)
    turns = [history.user_turn("And this one?", [CUP]), history.assistant_turn(first, "done"),
             history.user_turn("Tell me more.")]
    expected = engine.processor.prepare(history.engine_messages(turns), max_context_tokens=None, reserve_new_tokens=0)
    assert stats["prompt_tokens"] == len(expected.token_ids)
    assert wait_until(lambda: queue_drained(demo), 5, "queue drained") < 5


# ---- a client that goes away mid-stream -----------------------------------------------------------------

def _stream_until_text(http: httpx.Client, url: str, session: str, timeout: float = 60) -> tuple[httpx.Response, str]:
    """Open the queue's event stream and read it until the answer has some text; returns the open response."""
    r = http.send(http.build_request("GET", url + "gradio_api/queue/data", params={"session_hash": session}),
                  stream=True)
    assert r.status_code == 200
    t0 = time.perf_counter()
    for line in r.iter_lines():
        assert time.perf_counter() - t0 < timeout, "no streamed text in time"
        if line.startswith("data:"):
            msg = json.loads(line[5:])
            assert msg.get("msg") != "process_completed", msg  # must still be generating
            if msg.get("msg") == "process_generating" and msg["output"]["data"][0]:
                return r, msg["output"]["data"][0]
    raise AssertionError("the event stream ended before any text")


def record_streams(engine, monkeypatch) -> list:
    """Every TextStream the engine hands out from now on (to read its final stats)."""
    streams, original = [], engine.stream

    def stream(*args, **kwargs):
        streams.append(original(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(engine, "stream", stream)
    return streams


def test_client_disconnect_mid_stream_stops_generation_and_frees_the_engine(server, engine, monkeypatch):
    """A browser tab closed mid-answer: its event stream and its heartbeat connection drop. The engine must stop
    within a token (not run on to max_new_tokens), its lock must be free, and the session's caches must go."""
    demo, url = server
    rt = demo.dsvl_runtime
    streams = record_streams(engine, monkeypatch)
    session = uuid.uuid4().hex
    http = httpx.Client(timeout=httpx.Timeout(60))
    try:
        beat = http.send(http.build_request("GET", f"{url}gradio_api/heartbeat/{session}"), stream=True)
        assert beat.status_code == 200
        r = join(http, url, chat_data({"text": LONG_PROMPT, "files": []}, 2000), fn=fn_index(url, client=http),
                 session_hash=session)
        assert r.status_code == 200, r.text
        stream, text = _stream_until_text(http, url, session)
        assert text and rt.active_generations() == 1
        assert session in engine.sessions
        t0 = time.perf_counter()
        stream.close()
        beat.close()
    finally:
        http.close()  # drops the TCP connections
    wait_until(lambda: rt.active_generations() == 0 and engine_is_free(engine), 10, "engine stopped and free")
    stopped_in = time.perf_counter() - t0
    assert len(streams) == 1
    stats = streams[0].stats
    assert stats.stop_reason == "cancelled" and stats.new_tokens < 2000, stats
    stopped_at = stats.new_tokens
    wait_until(lambda: session not in engine.sessions, 10, "the session's KV cache released (unload)")
    wait_until(lambda: queue_drained(demo), 10, "queue drained")
    print(f"engine free {stopped_in:.2f} s after the disconnect, after {stats.new_tokens} of 2000 tokens")

    # the next user is served at once (not after the 2000 tokens the gone client asked for)
    assert ask(Client(url, verbose=False), "Quick one.", max_new_tokens=4)
    assert len(streams) == 2 and 0 < streams[1].stats.new_tokens <= 4
    assert streams[0].stats.new_tokens == stopped_at  # the gone client's reply did not run on


def test_disconnect_while_queued_never_runs(server, engine):
    """A client that leaves while waiting behind another request is dropped from the queue, and the one ahead of
    it finishes normally."""
    demo, url = server
    rt = demo.dsvl_runtime
    busy = Client(url, verbose=False)
    job = busy.submit(*chat_args(LONG_PROMPT, max_new_tokens=600), api_name="/chat")  # a few seconds of work
    wait_until(lambda: rt.active_generations() == 1, 30, "the first request running")
    session = uuid.uuid4().hex
    with httpx.Client(timeout=httpx.Timeout(30)) as http:
        r = join(http, url, chat_data({"text": "queued " + session, "files": []}), fn=fn_index(url, client=http),
                 session_hash=session)
        assert r.status_code == 200
        with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}) as s:
            for line in s.iter_lines():
                if '"estimation"' in line:
                    break  # we are in the queue: leave
    assert rt.active_generations() == 1 and not job.done()  # it really waited behind the first one
    answer = job.result(timeout=120)
    assert answer and job.status().success
    wait_until(lambda: queue_drained(demo), 15, "queue drained")
    assert session not in rt.last_stats and session not in engine.sessions  # never generated


# ---- start-up faults ------------------------------------------------------------------------------------

def _break(kind: str, d: Path) -> str:
    """Damage the checkpoint copy `d`; returns the file name the error message must mention."""
    if kind == "missing shard":
        shard = sorted(d.glob("model-*.safetensors"))[-1]
        shard.unlink()
        return shard.name
    if kind == "corrupt shard":
        shard = sorted(d.glob("model-*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        data[8:40] = b"\x00" * 32  # the JSON header
        shard.write_bytes(bytes(data))
        return shard.name
    if kind == "truncated shard":
        shard = sorted(d.glob("model-*.safetensors"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return shard.name
    if kind == "config not JSON":
        (d / "config.json").write_text('{"text_config": {', encoding="utf-8")
        return "config.json"
    if kind == "config wrong values":
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        cfg["text_config"]["num_key_value_heads"] = 3  # does not divide the heads
        (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        return "config.json"
    if kind == "config of another size":
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        cfg["text_config"]["hidden_size"] *= 2  # valid on its own, but the weights do not match it
        (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        return "config.json"
    if kind == "missing tokenizer":
        (d / "tokenizer.json").unlink()
        return "tokenizer.json"
    if kind == "corrupt tokenizer":
        (d / "tokenizer.json").write_text("{not json", encoding="utf-8")
        return "tokenizer.json"
    raise AssertionError(kind)


STARTUP_FAULTS = ["missing shard", "corrupt shard", "truncated shard", "config not JSON", "config wrong values",
                  "config of another size", "missing tokenizer", "corrupt tokenizer"]


def test_startup_faults_exit_nonzero_quickly_with_one_clear_message(tiny_checkpoint, tmp_path):
    cases = {}
    for kind in STARTUP_FAULTS:
        d = tmp_path / kind.replace(" ", "_")
        shutil.copytree(tiny_checkpoint, d)
        cases[kind] = (d, _break(kind, d))

    def start(kind):
        d, _ = cases[kind]
        t0 = time.perf_counter()
        # a free port is not needed: the app must fail before it listens (a server that starts hits the timeout,
        # which fails the test; the time taken is only printed)
        result = run_app("--model", str(d), "--port", "7", timeout=90)
        return result, time.perf_counter() - t0

    with ThreadPoolExecutor(2) as pool:  # two cores
        results = dict(zip(STARTUP_FAULTS, pool.map(start, STARTUP_FAULTS)))
    for kind, (result, seconds) in results.items():
        d, filename = cases[kind]
        err = result.stderr
        print(f"{kind}: rc={result.returncode} in {seconds:.1f} s: {err.strip().splitlines()[-1]}")
        assert result.returncode != 0, (kind, result.stdout, err)
        assert "Traceback" not in err, (kind, err)
        assert "Running on" not in result.stdout, kind
        message = [line for line in err.splitlines() if "Could not" in line or "rror" in line]
        assert len(message) == 1, (kind, err)  # one clear message ...
        assert filename in message[0] and str(d) in message[0], (kind, message)  # ... naming the file


def test_startup_with_a_missing_model_directory_fails_fast(tmp_path):
    result = run_app("--model", str(tmp_path / "nowhere"), timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "nowhere" in result.stderr
