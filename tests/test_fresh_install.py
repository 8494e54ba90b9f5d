"""The README's trial command on a fresh machine: `bash scripts/run.sh --model random:tiny` in a new venv that
gets `requirements.txt` alone (no test extras, no system site-packages; pip's download cache may be reused),
then the page loads in a browser, `/chat` answers through gradio_client, and SIGTERM stops the server and
deletes its upload folder.

This is the only test that sees a runtime dependency missing from requirements.txt: every other test runs in
the dev venv, which has the test requirements too. It takes as long as the install (minutes)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from gradio_client import Client, handle_file
from playwright.sync_api import expect, sync_playwright

from apphelpers import CAT, REPO, app_env, serving, wait_until
from dsvl_app.ui import free_port

CHROMIUM = os.environ.get("DSVL_CHROMIUM", "/usr/bin/chromium")

pytestmark = [pytest.mark.install, pytest.mark.timeout(1500)]


def test_readme_trial_command_in_a_fresh_venv(tmp_path):
    port, tmp = free_port(), tmp_path / "tmp"
    tmp.mkdir()
    url = f"http://127.0.0.1:{port}/"
    env = app_env(VENV=str(tmp_path / "venv"), TMPDIR=str(tmp), DSVL_CACHE=str(tmp_path / "cache"))
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(REPO)))
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "scripts/run.sh", "--model", "random:tiny", "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: serving(url, proc, log), timeout=1200, what="the app to serve its page", interval=1)
        uploads = list(tmp.glob("dsvl-chat-uploads-*"))
        assert len(uploads) == 1, uploads

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#dsvl-random")).to_contain_text("test model", timeout=30_000)
            expect(page.locator("#dsvl-input textarea")).to_be_visible()
            browser.close()

        answer = Client(url, verbose=False).predict(
            {"text": "What is in this picture?", "files": [handle_file(CAT)]}, 0.0, 0.95, 0, 8, 1.1, 0,
            api_name="/chat")
        assert isinstance(answer, str) and answer.strip()
        assert any(uploads[0].rglob("*.png"))  # the image is on the server while the session lasts

        proc.send_signal(signal.SIGTERM)  # how Spaces, systemd and Docker stop a server
        assert proc.wait(timeout=30) == 0, log.read_text()[-4000:]
        assert not uploads[0].exists()  # the users' uploads left with the server
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
