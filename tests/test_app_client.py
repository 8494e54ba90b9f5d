"""The app as an API client uses it: a live server on 127.0.0.1 (in this process, on a free port) serving the
tiny random checkpoint through the real `dsvl.load`, driven with gradio_client.

Random weights say nothing useful, so the assertions are about the plumbing: answers arrive (streamed),
conversations continue per client session and stay apart, errors come back as errors and the next request
is served, cancelling stops the engine."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import dsvl
from dsvl_app import Settings, start_in_background

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CAT, CUP, SIGN = (str(ASSETS / n) for n in ("chelsea.png", "coffee.png", "sign.png"))
LONG_PROMPT = "Tell me a long story about the sea."  # greedy on the tiny checkpoint: no EOS for 2000 tokens
GREEDY = dict(temperature=0.0, top_p=0.95, top_k=0, repetition_penalty=1.1, seed=0)


def ask(client: Client, text: str, files=(), max_new_tokens: int = 24, **kw):
    params = {**GREEDY, **kw}
    return client.predict({"text": text, "files": [handle_file(f) for f in files]}, params["temperature"],
                          params["top_p"], params["top_k"], max_new_tokens, params["repetition_penalty"],
                          params["seed"], api_name="/chat")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return dsvl.load(str(tiny_checkpoint), device="cpu", quantization="none", max_context_tokens=4096)


@pytest.fixture(scope="module")
def server(engine, tiny_checkpoint):
    settings = Settings(model=str(tiny_checkpoint), max_images=4, concurrency=1, max_queue=16)
    demo, url = start_in_background(engine, settings)
    yield demo, url
    demo.close()


@pytest.fixture
def client(server):
    return Client(server[1], verbose=False)


def wait_idle(rt, timeout=5.0) -> float:
    """Seconds until no generation runs in the app; fails if that takes longer than `timeout`."""
    t0 = time.perf_counter()
    while rt.active_generations():
        assert time.perf_counter() - t0 < timeout, "the engine is still generating"
        time.sleep(0.02)
    return time.perf_counter() - t0


def test_api_lists_a_chat_endpoint(client):
    info = client.view_api(print_info=False, return_format="dict")
    chat = info["named_endpoints"]["/chat"]
    assert [p["parameter_name"] for p in chat["parameters"]] == [
        "message", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed", "history",
        "system_prompt"]  # appended last: positional calls written before it keep working
    assert chat["parameters"][-1]["parameter_has_default"]
    assert "/clear" in info["named_endpoints"]


def test_text_only(client, server):
    answer = ask(client, "Hello, who are you?")
    assert isinstance(answer, str) and answer
    stats = server[0].dsvl_runtime.last_stats[client.session_hash]
    assert stats["new_tokens"] >= 1 and stats["prompt_tokens"] < 576  # no image in the prompt


def test_one_image(client, server):
    assert ask(client, "What is in this picture?", [CAT])
    stats = server[0].dsvl_runtime.last_stats[client.session_hash]
    assert stats["prompt_tokens"] > 576


def test_two_images(client, server):
    assert ask(client, "What differs between Image 1 and Image 2?", [CAT, CUP])
    assert server[0].dsvl_runtime.last_stats[client.session_hash]["prompt_tokens"] > 2 * 576


def test_three_turn_conversation_continues_per_client(client, server):
    rt = server[0].dsvl_runtime
    prompts = []
    for text, files in [("Read this sign.", [SIGN]), ("What colour is it?", []), ("Thanks. Anything else?", [])]:
        assert ask(client, text, files)
        prompts.append(rt.last_stats[client.session_hash]["prompt_tokens"])
    # each turn's prompt holds the earlier ones, the image included (576 tokens), so it only grows
    assert 576 < prompts[0] < prompts[1] < prompts[2]
    stats = rt.last_stats[client.session_hash]
    assert stats["prefilled_tokens"] < stats["prompt_tokens"]  # the engine reused the session's cache
    client.predict(api_name="/clear")
    assert ask(client, "New topic.")
    assert rt.last_stats[client.session_hash]["prompt_tokens"] < 576  # the conversation started over


def test_answer_streams_in_partial_updates(client):
    job = client.submit({"text": LONG_PROMPT, "files": []}, 0.0, 0.95, 0, 200, 1.1, 0, api_name="/chat")
    updates = [u for u in job if u]
    final = job.outputs()[-1]
    assert len(set(updates)) >= 2, updates
    assert all(final.startswith(u) for u in updates)  # each update is the answer so far


def test_corrupt_upload_is_an_error_then_the_next_request_is_served(client, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(CAT).read_bytes()[:2000])  # a PNG cut short
    with pytest.raises(AppError, match="broken.png"):
        ask(client, "What is this?", [broken])
    not_image = tmp_path / "notes.png"
    not_image.write_text("just text")
    with pytest.raises(AppError, match="notes.png"):
        ask(client, "And this?", [not_image])
    assert ask(client, "Then describe this one.", [CAT])


def test_too_many_images_and_empty_message_are_refused(client):
    with pytest.raises(AppError, match="at most 4"):
        ask(client, "Five?", [CAT] * 5)
    with pytest.raises(AppError, match="Type a question"):
        ask(client, "   ")


def test_four_concurrent_clients_keep_their_own_conversations(server):
    url, rt = server[1], server[0].dsvl_runtime
    scripts = [[(f"Client {i}: " + "word " * (3 * i), [CAT] if i % 2 else []), (f"Follow-up from client {i}.", [])]
               for i in range(4)]

    def converse(script):
        c = Client(url, verbose=False)
        answers, prompts = [], []
        for text, files in script:
            answers.append(ask(c, text, files, max_new_tokens=12))
            prompts.append(rt.last_stats[c.session_hash]["prompt_tokens"])
        return answers, prompts

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(converse, scripts))
    alone = [converse(s) for s in scripts]  # the same conversations, one at a time
    # Same history -> same prompt and (greedy) same answers: nothing leaked between sessions.
    assert together == alone
    assert len({p for _, prompts in together for p in prompts}) == 8  # and the conversations differ


def test_cancel_stops_the_engine_and_frees_it(client, server):
    rt = server[0].dsvl_runtime
    job = client.submit({"text": LONG_PROMPT, "files": []}, 0.0, 0.95, 0, 2000, 1.1, 0, api_name="/chat")
    t0 = time.perf_counter()
    while not any(job.outputs()):  # wait for the first streamed words
        assert time.perf_counter() - t0 < 60
        time.sleep(0.02)
    job.cancel()
    wait_idle(rt, timeout=5.0)
    stats = dict(rt.last_stats[client.session_hash])
    assert stats["stop_reason"] == "cancelled" and stats["new_tokens"] < 2000
    other = Client(server[1], verbose=False)
    assert ask(other, "Quick one.", max_new_tokens=4)
    # served after the cancelled reply stopped, not after it ran on to 2000 tokens
    assert 0 < rt.last_stats[other.session_hash]["new_tokens"] <= 4
    assert rt.last_stats[client.session_hash] == stats


def test_auth_refuses_a_wrong_password_and_accepts_the_right_one(engine, tiny_checkpoint):
    settings = Settings(model=str(tiny_checkpoint), auth="ann:s3cret")
    demo, url = start_in_background(engine, settings)
    try:
        with pytest.raises(Exception):
            Client(url, auth=("ann", "wrong"), verbose=False)
        assert httpx.get(url + "config").status_code in (401, 403)
        c = Client(url, auth=("ann", "s3cret"), verbose=False)
        assert ask(c, "Hi", max_new_tokens=4)
    finally:
        demo.close()


def test_file_routes_serve_no_other_local_path(server, client, tmp_path):
    url = server[1]
    secret = tmp_path / "secret.png"
    secret.write_bytes(Path(CAT).read_bytes())
    for path in ["/etc/passwd", str(secret), str(Path(__file__).resolve()), str(ASSETS.parent / "app.py"),
                 "../../../../etc/passwd", "%2e%2e/%2e%2e/%2e%2e/etc/passwd"]:
        r = httpx.get(f"{url}gradio_api/file={path}")
        assert r.status_code in (403, 404), (path, r.status_code)
        assert b"root:" not in r.content
    # an API history may only point at files uploaded to this server
    with pytest.raises(AppError, match="uploaded"):
        client.predict({"text": "describe", "files": []}, 0.0, 0.95, 0, 4, 1.1, 0,
                       [{"role": "user", "content": [{"path": str(secret)}, "hi"]},
                        {"role": "assistant", "content": "ok"}], api_name="/chat")


def test_api_history_in_either_shape_replaces_the_session_history(client, server):
    rt = server[0].dsvl_runtime
    raw = [{"role": "user", "content": "My name is Ann."}, {"role": "assistant", "content": "Hello Ann."}]
    typed = [{"role": "user", "content": [{"type": "text", "text": "My name is Ann."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Hello Ann."}]}]
    prompts = []
    for shape in (raw, typed):
        client.predict({"text": "What is my name?", "files": []}, 0.0, 0.95, 0, 4, 1.1, 0, shape, api_name="/chat")
        prompts.append(rt.last_stats[client.session_hash]["prompt_tokens"])
    assert prompts[0] == prompts[1]


def test_oldest_turns_are_dropped_when_the_context_is_full(tiny_checkpoint):
    small = dsvl.load(str(tiny_checkpoint), device="cpu", quantization="none", max_context_tokens=1024)
    demo, url = start_in_background(small, Settings(model=str(tiny_checkpoint), max_context_tokens=1024))
    try:
        rt, c = demo.dsvl_runtime, Client(url, verbose=False)
        assert ask(c, "First picture.", [CAT], max_new_tokens=8)
        assert rt.last_stats[c.session_hash]["dropped_turns"] == 0
        assert ask(c, "Second picture.", [CUP], max_new_tokens=8)  # two images do not fit in 1024 tokens
        stats = rt.last_stats[c.session_hash]
        assert stats["dropped_turns"] >= 1 and stats["prompt_tokens"] <= 1024
    finally:
        demo.close()
