"""What a server leaves behind when it stops or fails to start: nothing. Its upload folder (a fresh
`dsvl-chat-uploads-*` under $TMPDIR) goes when SIGTERM stops it (how Spaces, systemd and Docker stop a
process), and a start that fails leaves no folder at all. And what a user's mistake leaves in the log: one
line, no traceback."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from apphelpers import CAT, REPO, app_env, ask, live_app, load_tiny_engine, run_app, serving, wait_until
from dsvl_app.ui import free_port


def test_sigterm_deletes_the_upload_folder(tiny_checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model", str(tiny_checkpoint), "--port",
                             str(port)], cwd=REPO, env=app_env(TMPDIR=str(tmp_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: serving(url, proc), timeout=120, what="the app to serve", interval=0.5)
        (folder,) = tmp_path.glob("dsvl-chat-uploads-*")
        Client(url, verbose=False).predict({"text": "Hi", "files": [handle_file(CAT)]}, 0.0, 0.95, 0, 4, 1.1, 0,
                                           api_name="/chat")
        assert any(folder.rglob("*.png"))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert not folder.exists(), out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_failed_starts_leave_no_upload_folder(tiny_checkpoint, tmp_path):
    missing = run_app("--model", str(tmp_path / "nowhere"), env=app_env(TMPDIR=str(tmp_path)), timeout=60)
    assert missing.returncode != 0 and "nowhere" in missing.stderr
    with socket.socket() as taken:  # the model loads, then the port is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run_app("--model", str(tiny_checkpoint), "--port", str(taken.getsockname()[1]),
                       env=app_env(TMPDIR=str(tmp_path)), timeout=90)
    assert busy.returncode != 0
    assert not list(tmp_path.glob("dsvl-chat-uploads-*")), busy.stderr


def test_a_users_mistake_is_one_log_line_without_traceback(tiny_checkpoint, tmp_path, capfd, caplog):
    engine = load_tiny_engine(tiny_checkpoint)
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"not a picture\n" * 100)
    with live_app(engine, tiny_checkpoint) as (demo, url):
        client = Client(url, verbose=False)
        capfd.readouterr()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dsvl_app"):
            for text, files, reason in (("", [], "Type a question"), ("look", [junk], "not an image"),
                                        ("four", [CAT] * 5, "at most 4")):
                with pytest.raises(AppError, match=reason):
                    ask(client, text, files)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    lines = [r.getMessage() for r in caplog.records if r.name == "dsvl_app"]
    assert lines == ["refused a request: Nothing to send"] + ["refused a request: Image refused"] * 2, lines
