"""`python -m dsvl serve` as API clients use it: the official `openai` client against a live server process
on the tiny random checkpoint. Random weights say nothing useful, so the assertions are about the protocol
and the plumbing: streamed and whole answers agree, images arrive, follow-ups reuse the prefix, limits and
errors come back in the API's shape, a client that leaves stops the engine."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from servehelpers import CAT, CUP, LONG_PROMPT, image_part, live_server, parse_line, request_lines, wait_idle

KEY = "test-key-123"
GREEDY = dict(temperature=0.0, seed=0)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with live_server(tiny_checkpoint, log, "--max-context-tokens", "2048", "--max-queue", "1",
                     "--allow-image-urls", "--max-images", "3", api_key=KEY) as url:
        yield url, log


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)


def ask(client, messages, **kw):
    return client.chat.completions.create(model="dsvl", messages=messages, **{**GREEDY, **kw})


def user(*parts):
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def test_models_and_health(server, client, tiny_checkpoint):
    assert [m.id for m in client.models.list().data] == [str(tiny_checkpoint)]
    assert httpx.get(server[0].removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_whole_and_streamed_answers_agree(client):
    messages = [user("Describe the weather in one line.")]
    whole = ask(client, messages, max_tokens=12)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 5
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(ask(client, messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it streamed
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_one_image_then_a_stateless_follow_up_reuses_the_prefix(client):
    messages = [user(image_part(CAT), "What is in this picture?")]
    first = ask(client, messages, max_tokens=8)
    assert first.usage.prompt_tokens > 576 and first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, user("And its colour?")]
    second = ask(client, messages, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Everything up to the new question came from the first turn's cache: image, question, answer.
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 2
    assert second.usage.prompt_tokens - cached < 20


def test_two_images(client):
    r = ask(client, [user(image_part(CAT), image_part(CUP), "Compare the two images.")], max_tokens=4)
    assert r.usage.prompt_tokens > 2 * 576


def test_max_tokens_and_max_completion_tokens(client):
    messages = [user(LONG_PROMPT)]
    r = ask(client, messages, max_tokens=3)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")
    r = ask(client, messages, max_completion_tokens=5)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (5, "length")


def test_stop_string_ends_the_answer_before_it(client):
    messages = [user(LONG_PROMPT)]
    text = ask(client, messages, max_tokens=24).choices[0].message.content
    k = next(i for i in range(4, len(text) - 2) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    r = ask(client, messages, max_tokens=24, stop=[text[k:k + 2]])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:k]


def test_a_client_that_leaves_stops_the_engine(server, client):
    url, log = server
    before = len(request_lines(log))
    stream = ask(client, [user(LONG_PROMPT)], max_tokens=1900, stream=True)
    got = 0
    for c in stream:
        got += bool(c.choices and c.choices[0].delta.content)
        if got == 3:
            break
    stream.close()
    wait_idle(url)
    line = parse_line(request_lines(log)[before])
    assert line["stop_reason"] == "cancelled" and line["new_tokens"] < 1900, line
    assert ask(client, [user("Hello")], max_tokens=2).usage.completion_tokens == 2  # the next one is served


def test_bad_image_is_a_400_with_a_message(client):
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [user(bad, "What is this?")])
    assert "not an image" in e.value.message
    not_b64 = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        ask(client, [user(not_b64, "What is this?")])


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "ftp://example.com/a.png"])
def test_a_file_path_is_never_an_image(client, url):
    with pytest.raises(openai.BadRequestError, match="file paths and other schemes are not accepted"):
        ask(client, [user({"type": "image_url", "image_url": {"url": url}}, "?")])


def test_an_image_url_to_this_machine_is_refused(server, client):
    for url in (f"{server[0].removesuffix('/v1')}/health", "http://localhost:1/x.png", "http://[::1]/x.png"):
        with pytest.raises(openai.BadRequestError, match="not a public internet address"):
            ask(client, [user({"type": "image_url", "image_url": {"url": url}}, "?")])


def test_too_long_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [user("sea " * 3000)], max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "context allows 2048" in e.value.message
    with pytest.raises(openai.BadRequestError, match="max_tokens=5000 is more than"):
        ask(client, [user("Hi")], max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="at most 3 per request"):
        ask(client, [user(*[image_part(CUP)] * 4, "?")])


def test_malformed_requests_get_the_error_shape(server):
    url, headers = server[0] + "/chat/completions", {"Authorization": f"Bearer {KEY}"}
    for body, expected in ((b"{not json", "not valid JSON"), (b'{"messages": []}', "messages"),
                           (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages.0.role"),
                           (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', "temperature"),
                           (b'{"messages": [{"role": "assistant", "content": "x"}]}', "nothing to answer")):
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 400 and expected in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(url, content=b"x" * (65 * 2**20), headers=headers)
    assert r.status_code == 413
    assert httpx.get(server[0] + "/nowhere", headers=headers).json()["error"]["type"] == "not_found_error"


def test_wrong_or_missing_key_is_a_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server[0], api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="dsvl", messages=[user("Hi")], max_tokens=2)
    r = httpx.get(server[0] + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_busy_server_refuses_beyond_the_queue_with_503(server, client):
    url, _ = server
    running = ask(client, [user(LONG_PROMPT)], max_tokens=1900, stream=True)
    next(iter(running))  # the first chunk: this one holds the engine
    waiting_started = threading.Event()

    def waiter():
        waiting_started.set()
        ask(client, [user("Hi")], max_tokens=2)

    t = threading.Thread(target=waiter)
    t.start()
    waiting_started.wait()
    root = url.removesuffix("/v1")
    deadline = time.monotonic() + 60
    while httpx.get(f"{root}/health").json()["waiting"] < 1:
        assert time.monotonic() < deadline and t.is_alive(), "the second request never queued"
    with pytest.raises(openai.InternalServerError) as e:
        ask(client, [user("Hi")], max_tokens=2)
    assert e.value.status_code == 503 and "busy" in e.value.message
    running.close()
    t.join(60)
    assert not t.is_alive()
    wait_idle(url)


def test_client_mistakes_leave_no_traceback_in_the_log(server):
    """Runs last in this module: every refusal above was logged, if at all, without a traceback."""
    text = server[1].read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
