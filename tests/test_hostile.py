"""Hostile callers: what an anonymous client can send to every registered handler, by raw HTTP to Gradio's
routes (`queue/join` with crafted data and event data, `/gradio_api/run/...`), and what it must not get:
server files, work outside the queue's limits, unbounded memory, raw exception text."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import dsvl.processor
from apphelpers import CAT, engine_is_free, live_app, load_tiny_engine, photo, sse_messages, wait_until
from dsvl_app import limits

FILEDATA = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load_tiny_engine(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(engine, tiny_checkpoint):
    with live_app(engine, tiny_checkpoint, max_queue=4, max_images_per_chat=6) as app:
        yield app


@pytest.fixture()
def http_client():
    with httpx.Client() as h:
        yield h


def _config(http, url) -> dict:
    return http.get(url + "config", timeout=10).json()


def _join(http, url, fn: int, data: list, session: str, event_data=None) -> httpx.Response:
    body = {"data": data, "fn_index": fn, "session_hash": session, "event_data": event_data, "trigger_id": None}
    return http.post(url + "gradio_api/queue/join", json=body, timeout=10)


def _outcome(http, url, fn: int, data: list, event_data=None, session: str | None = None) -> str:
    """Everything the caller gets back from one queued call (the HTTP refusal, or the stream's messages)."""
    session = session or uuid.uuid4().hex
    r = _join(http, url, fn, data, session, event_data)
    if r.status_code != 200:
        return f"HTTP {r.status_code} {r.text}"
    return json.dumps(list(sse_messages(http, url, session, timeout=60)), ensure_ascii=False)


def _upload(http, url, path: Path) -> str:
    with open(path, "rb") as f:
        r = http.post(url + "gradio_api/upload", files={"files": (path.name, f)}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()[0]


def _sha256_of_files(root: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


# ---- item 1: no server file through any handler --------------------------------------------------------

def test_no_handler_takes_a_server_file_from_data_or_event_data(server, http_client, tmp_path, engine,
                                                                monkeypatch):
    """Every registered handler, called with data and event data naming server files (a picture outside the
    upload folder, the password file, a shared library, a traversal), copies nothing into the upload folder,
    runs nothing on it, and says nothing about those paths."""
    demo, url = server
    root = Path(demo.dsvl_runtime.upload_root)
    secret = tmp_path / "server-secret-picture.png"
    photo((40, 30), seed=11).save(secret)
    secret_sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    libc = next(p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/etc/passwd")
                if Path(p).exists())  # a large non-image: its size was once in the reply
    paths = [str(secret), libc, f"{root}/../../../../..{secret}"]
    decoded = []
    real_load = dsvl.processor.load_image
    monkeypatch.setattr(dsvl.processor, "load_image", lambda *a, **k: decoded.append(a) or real_load(*a, **k))

    config = _config(http_client, url)
    fns = [d["id"] for d in config["dependencies"] if demo.fns[d["id"]].fn is not None]  # the rest: browser only
    assert len(fns) >= 15  # every handler of the page and the API
    for fn in fns:
        n_inputs = len(next(d for d in config["dependencies"] if d["id"] == fn)["inputs"])
        for path in paths:
            message = {"text": "x", "files": [path]}
            as_file = {"path": path, "meta": FILEDATA, "orig_name": "x.png"}
            for data, event in [
                ([message] * n_inputs, {"index": 0, "value": message}),
                ([path] * n_inputs, {"index": [0, 0], "value": path}),
                ([{"text": "x", "files": [as_file]}] * n_inputs, {"index": 0, "value": {"text": "x", "files": [as_file]}}),
            ]:
                # Gradio may echo the string the caller sent (that tells the caller nothing); anything more is a leak.
                out = _outcome(http_client, url, fn, data, event)
                for echo in (path, os.path.normpath(path)):
                    out = out.replace(json.dumps(echo)[1:-1], "<path>")
                # What the server knows about a path (existence, size, kind) never comes back; an echo of the
                # caller's own string (Gradio and pydantic quote it, maybe shortened) tells nothing.
                for leak in ("is empty", " MB", " KB", "bytes", "not an image", "could not be found", "No such file",
                             "does not exist", "ermission denied", "directory", "damaged", "megapixels", "pixels"):
                    assert leak not in out, (fn, path, leak, out[:400])
    assert secret_sha not in _sha256_of_files(root)
    assert not [a for a in decoded if str(a[0]) in paths or "secret" in str(a[0])]


def test_example_cards_are_taken_by_index_not_by_the_value_sent(server, http_client):
    demo, url = server
    config = _config(http_client, url)
    chatbot = next(c for c in config["components"] if c["props"].get("elem_id") == "dsvl-chat")
    select = next(d for d in config["dependencies"]
                  if any(t[0] == chatbot["id"] and t[1] == "example_select" for t in d["targets"]))
    out = _outcome(http_client, url, select["id"], [None], {"index": 99, "value": {"text": "x", "files": []}})
    assert "There is no such example" in out
    # a real card, whatever value comes with it: the server's own card (its picture, its text) is staged
    session = uuid.uuid4().hex
    out = _outcome(http_client, url, select["id"], [None], {"index": 0, "value": {"text": "x", "files": ["/etc/passwd"]}},
                   session=session)
    assert "passwd" not in out
    # The card is staged in the session's state (never sent back); the next step of the chain shows it.
    show = next(d["id"] for d in config["dependencies"] if demo.fns[d["id"]].name == "show_staged")
    r = http_client.post(url + "gradio_api/run/predict", json={"data": [None], "fn_index": show,
                                                               "session_hash": session}, timeout=30)
    assert r.status_code == 200, r.text
    assert "Describe this image in detail." in r.text and "chelsea" in r.text and "passwd" not in r.text


# ---- item 3: every path to the model through the queue and its limits ---------------------------------

def test_rest_routes_refuse_every_queued_handler(server, http_client, engine):
    """`/gradio_api/run/...` skips the queue: it is closed for every handler that is queued; the handlers it
    still reaches never run the model (they stop, undo, clear, finish, export, show the staged message)."""
    demo, url = server
    config = _config(http_client, url)
    r = http_client.post(url + "gradio_api/run/chat", json={"data": [{"text": "hi", "files": []}, 0, 0.9, 0, 4, 1.1,
                                                                       0, None, None]}, timeout=30)
    assert r.status_code == 404 and "join the queue" in r.text
    assert demo.dsvl_runtime.active_generations() == 0
    direct = set()
    for dep in config["dependencies"]:
        body = {"data": [None] * len(dep["inputs"]), "fn_index": dep["id"], "session_hash": uuid.uuid4().hex}
        r = http_client.post(url + "gradio_api/run/predict", json=body, timeout=30)
        if dep["queue"] is False or r.status_code != 404:
            direct.add(demo.fns[dep["id"]].name)
        if dep["queue"] is not False:
            assert r.status_code == 404, (demo.fns[dep["id"]].name, r.status_code)
    # show_staged only renders the message that the session's own (server-side) state holds
    assert direct <= {"finish", "undo", "new_chat", "do_export", "stop", "clear_api", "show_staged", None}, direct
    # /call/chat is the queue: it works and counts against --max-queue like the page
    r = http_client.post(url + "gradio_api/call/chat", json={"data": [{"text": "hi", "files": []}, 0, 0.9, 0, 4, 1.1,
                                                                        0, None]}, timeout=30)
    assert r.status_code == 200 and "event_id" in r.json()
    wait_until(lambda: engine_is_free(engine) and demo.dsvl_runtime.active_generations() == 0, 60, "call done")


def test_a_cancelled_job_stops_reading_its_images(server, tmp_path, monkeypatch, engine):
    """`job.cancel()` while the conversation's images are being read: the work stops at the next image
    instead of running on outside the queue's limits."""
    demo, url = server
    started, release = threading.Event(), threading.Event()
    decoded = []
    real_load = dsvl.processor.load_image

    def slow_load(*a, **k):
        decoded.append(a[0])
        started.set()
        release.wait(30)
        return real_load(*a, **k)

    monkeypatch.setattr(dsvl.processor, "load_image", slow_load)
    files = []
    for i in range(4):
        photo((64, 48), seed=100 + i).save(tmp_path / f"p{i}.png")
        files.append(handle_file(str(tmp_path / f"p{i}.png")))
    client = Client(url, verbose=False)
    job = client.submit({"text": "four", "files": files}, 0.0, 0.9, 0, 4, 1.1, 0, None, api_name="/chat")
    assert started.wait(60), "the images were never read"
    job.cancel()
    # The cancel event reaches the worker while it is still inside the first image.
    wait_until(lambda: any(e.is_set() for s in demo.dsvl_runtime._active.values() for e in s), 30,
               "the reply's cancel event was set")
    release.set()
    wait_until(lambda: demo.dsvl_runtime.active_generations() == 0, 30, "the reply ended")
    assert len(decoded) == 1, decoded  # abandoned before the second image
    assert engine_is_free(engine)
    client.close()


def test_history_image_limits_per_turn_and_per_chat(server, http_client, tmp_path):
    demo, url = server
    photo((32, 32), seed=3).save(tmp_path / "a.png")
    up = _upload(http_client, url, tmp_path / "a.png")
    client = Client(url, verbose=False)
    args = ({"text": "hi", "files": []}, 0.0, 0.9, 0, 4, 1.1, 0)
    six_in_one = [{"role": "user", "content": [{"path": up}] * 6 + ["look"]}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(AppError, match="holds 6 images; at most 4 per message"):
        client.predict(*args, six_in_one, api_name="/chat")
    seven_in_chat = []
    for n in (4, 3):
        seven_in_chat += [{"role": "user", "content": [{"path": up}] * n + ["look"]}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(AppError, match="holds 7 images; at most 6 per chat"):
        client.predict(*args, seven_in_chat, api_name="/chat")
    with pytest.raises(AppError, match="history has 1,001 messages"):
        client.predict(*args, [{"role": "user", "content": "x"}] * 1001, api_name="/chat")
    with pytest.raises(AppError, match="200,001 characters"):
        client.predict({"text": "y" * 200_001, "files": []}, *args[1:], None, api_name="/chat")
    assert demo.dsvl_runtime.active_generations() == 0
    client.close()


def test_a_long_history_is_fitted_at_the_cost_of_what_is_kept(server, monkeypatch):
    """400 turns of history: the oldest are dropped by count; the characters tokenized stay within a few times
    what the kept prompt holds (it was once every turn re-tokenized for every turn dropped)."""
    demo, url = server
    tok = demo.dsvl_runtime.engine.tokenizer
    encoded = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, add_bos=True: encoded.append(len(text)) or real(text, add_bos))
    hist = []
    for i in range(400):
        hist += [{"role": "user", "content": f"question {i} " + "about the sea " * 30},
                 {"role": "assistant", "content": f"answer {i} " + "waves " * 30}]
    client = Client(url, verbose=False)
    client.predict({"text": "and now?", "files": []}, 0.0, 0.9, 0, 4, 1.1, 0, hist, api_name="/chat")
    stats = demo.dsvl_runtime.last_stats[client.session_hash]
    kept_chars = encoded[-1]  # the last encode is the whole kept prompt
    assert stats["dropped_turns"] > 300
    assert sum(encoded) < 4 * kept_chars, (sum(encoded), kept_chars)
    client.close()


# ---- item 4: Export bounded ----------------------------------------------------------------------------

def test_export_is_bounded(server, http_client, tmp_path, monkeypatch):
    demo, url = server
    monkeypatch.setattr(limits, "MAX_EXPORT_BYTES", 50_000)
    photo((200, 200), seed=5).save(tmp_path / "big.png")
    size = (tmp_path / "big.png").stat().st_size
    assert 10_000 < size < 50_000
    up = _upload(http_client, url, tmp_path / "big.png")
    session = uuid.uuid4().hex
    config = _config(http_client, url)
    chat = next(d for d in config["dependencies"] if d.get("api_name") == "chat")
    hist = [{"role": "user", "content": [{"path": up}] * 4 + ["look"]}, {"role": "assistant", "content": "ok"}]
    out = _outcome(http_client, url, chat["id"], [{"text": "again", "files": []}, 0.0, 0.9, 0, 2, 1.1, 0, hist, None, None],
                   session=session)
    assert '"success": true' in out
    export = next(d for d in config["dependencies"]
                  if demo.fns[d["id"]].name == "do_export")
    r = http_client.post(url + "gradio_api/run/predict", json={"data": [None] * len(export["inputs"]), "fn_index": export["id"],
                                                               "session_hash": session}, timeout=30)
    assert r.status_code == 500 and "Export takes at most" in r.text and len(r.content) < 5000, r.text[:300]


# ---- item 5: settings, sessions, imports, streamed file items ------------------------------------------

@pytest.mark.parametrize("setting, value, says", [
    (5, "NaN", "repetition penalty must be a number"),
    (1, "NaN", "temperature must be a number"),
    (2, "NaN", "top p must be a number"),
    (6, 2**64, "seed must lie between"),
])
def test_bad_settings_are_refused_in_plain_words_before_the_model(server, http_client, engine, setting, value, says):
    demo, url = server
    config = _config(http_client, url)
    chat = next(d for d in config["dependencies"] if d.get("api_name") == "chat")
    data = [{"text": "hi", "files": []}, 0.0, 0.9, 0, 4, 1.1, 0, None, None, None]
    data[setting] = value
    body = json.dumps({"data": data, "fn_index": chat["id"], "session_hash": (s := uuid.uuid4().hex),
                       "event_data": None, "trigger_id": None}).replace('"NaN"', "NaN")
    r = http_client.post(url + "gradio_api/queue/join", content=body, timeout=10,
                         headers={"content-type": "application/json"})
    out = f"HTTP {r.status_code} {r.text}" if r.status_code != 200 else json.dumps(list(sse_messages(http_client, url, s)))
    assert says in out and "Traceback" not in out and "TypeError" not in out, out[:500]
    assert engine.sessions.count(s) == 0


def test_the_client_reads_a_bad_setting_in_plain_words(server):
    demo, url = server
    client = Client(url, verbose=False)
    with pytest.raises(Exception) as e:
        client.predict({"text": "hi", "files": []}, 0.0, 0.9, 0, 4, 1.1, 2**64, None, api_name="/chat")
    assert "The setting seed must lie between -1 and 9,223,372,036,854,775,807" in str(e.value)
    client.close()


def test_imports_refuse_in_plain_words_and_leave_no_file(server, http_client, tmp_path):
    demo, url = server
    root = Path(demo.dsvl_runtime.upload_root)
    config = _config(http_client, url)
    imp = next(d for d in config["dependencies"] if demo.fns[d["id"]].name == "do_import")
    good_msg = {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}
    cases = {
        "deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        "word-stat": ({"format": "dsvl-chat.conversation", "version": 1, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "q"}]},
            {**good_msg, "stats": {"ttft_s": "fast", "new_tokens": float("nan"), "prompt_tokens": 1e308}}]}, None),
    }
    before = {p for p in root.rglob("*")}
    for name, (doc, says) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        up = _upload(http_client, url, path)
        out = _outcome(http_client, url, imp["id"], [{"path": up, "meta": FILEDATA, "orig_name": path.name}])
        for raw in ("recursion", "Unknown format code", "cannot convert", "Traceback", "Infinity", "NaN", "1e+308"):
            assert raw not in out, (name, raw, out[:500])
        if says:
            assert says in out, out[:500]
        else:
            assert "Imported 2 messages" in out and "first token" not in out, out[:800]
    left = {p for p in root.rglob("*")} - before
    assert not [p for p in left if p.is_file()], left  # neither the JSON files nor any temp file


def test_a_streamed_http_file_item_fetches_nothing(server, http_client):
    demo, url = server
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_error(404)

        def log_message(self, *a):
            pass

    local = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=local.serve_forever, daemon=True).start()
    try:
        item = {"path": f"http://127.0.0.1:{local.server_address[1]}/x.png", "is_stream": True, "meta": FILEDATA,
                "orig_name": "x.png"}
        config = _config(http_client, url)
        chat = next(d for d in config["dependencies"] if d.get("api_name") == "chat")
        out = _outcome(http_client, url, chat["id"], [{"text": "x", "files": [item]}, 0.0, 0.9, 0, 4, 1.1, 0, None, None, None])
        assert '"success": false' in out and hits == [], (hits, out[:300])
    finally:
        local.shutdown()
        local.server_close()
