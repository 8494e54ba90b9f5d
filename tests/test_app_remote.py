"""The app as a front-end (`--backend openai`) to a live `dsvl serve` process: two processes, the server on the
tiny random checkpoint. Through gradio_client: an image question, streaming, Stop (the server's engine stops:
its log says so), a refusal passed on in plain words. In Chromium: the banner names the backend, an answer
streams in, Stop."""

from __future__ import annotations

import os

import pytest
from apphelpers import chat_args, live_app, wait_until
from gradio_client import Client
from gradio_client.exceptions import AppError
from playwright.sync_api import expect, sync_playwright
from servehelpers import CAT, CUP, LONG_PROMPT, live_server, parse_line, request_lines, wait_idle

from dsvl_app.remote import OpenAIBackend
from dsvl_app.settings import GenerationDefaults, parse_settings

KEY = "remote-test-key"
CHROMIUM = os.environ.get("DSVL_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def upstream(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("upstream") / "server.log"
    with live_server(tiny_checkpoint, log, "--max-context-tokens", "4096", api_key=KEY) as url:
        yield url, log


@pytest.fixture(scope="module")
def app(upstream, tiny_checkpoint):
    backend = OpenAIBackend(upstream[0], api_key=KEY, max_context_tokens=4096)
    # Answers as long as the context allows: on a loaded machine the browser may take a thousand tokens of the
    # tiny model's time to press Stop, and an answer that ends first leaves no Stop button to press.
    defaults = GenerationDefaults(temperature=0.0, seed=0, max_new_tokens=4000)
    with live_app(backend, tiny_checkpoint, backend="openai", api_base=upstream[0], generation=defaults) as (demo, url):
        yield demo, url, backend


def test_flags_choose_the_backend():
    s = parse_settings(["--backend", "openai", "--api-base", "http://gpu:23333/v1", "--api-model", "dsvl"], env={})
    assert (s.backend, s.api_base, s.api_model) == ("openai", "http://gpu:23333/v1", "dsvl")
    with pytest.raises(SystemExit):
        parse_settings(["--backend", "openai"], env={})
    assert parse_settings([], env={"DSVL_BACKEND": "openai", "DSVL_API_BASE": "http://x/v1"}).backend == "openai"


def test_backend_takes_the_servers_model_and_a_wrong_key_is_a_plain_error(upstream, tiny_checkpoint):
    assert OpenAIBackend(upstream[0], api_key=KEY).model == str(tiny_checkpoint)
    with pytest.raises(SystemExit, match="Cannot list the models"):
        OpenAIBackend(upstream[0], api_key="wrong")


def test_an_image_question_streams_through_the_server(app, upstream):
    demo, url, _ = app
    client = Client(url, verbose=False)
    before = len(request_lines(upstream[1]))
    job = client.submit(*chat_args("What is in this picture?", [CAT, CUP], max_new_tokens=24), api_name="/chat")
    final = job.result(timeout=120)
    partials = job.outputs()
    assert final and len(partials) >= 2  # streamed in several updates
    assert parse_line(request_lines(upstream[1])[before])["prompt_tokens"] > 2 * 576  # both images got there
    # A follow-up through the app: the server finds the conversation again and prefills only the new turn.
    client.predict(*chat_args("And the colours?", max_new_tokens=4), api_name="/chat")
    follow = parse_line(request_lines(upstream[1])[before + 1])
    assert follow["prompt_tokens"] - follow["cached"] < 40, follow
    stats = demo.dsvl_runtime.last_stats[next(iter(demo.dsvl_runtime.last_stats))]
    assert stats["new_tokens"] >= 1 and stats["ttft_s"] > 0


def test_stop_closes_the_upstream_stream_and_the_server_stops(app, upstream):
    demo, url, _ = app
    client = Client(url, verbose=False)
    before = len(request_lines(upstream[1]))
    job = client.submit(*chat_args(LONG_PROMPT, max_new_tokens=1900), api_name="/chat")
    wait_until(lambda: len(job.outputs()) >= 3, 120, "a streaming answer")
    job.cancel()
    wait_until(lambda: demo.dsvl_runtime.active_generations() == 0, 30, "the app's reply to end")
    wait_idle(upstream[0])
    assert parse_line(request_lines(upstream[1])[before])["stop_reason"] == "cancelled"


def test_a_refusal_upstream_is_a_plain_error(app):
    _, url, _ = app
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="refused the request"):
        client.predict(*chat_args("sea " * 5000, max_new_tokens=4), api_name="/chat")


@pytest.mark.browser
def test_banner_names_the_backend_and_stop_works_in_a_browser(app, upstream):
    demo, url, backend = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.locator("#dsvl-banner")).to_contain_text(f"backend: OpenAI-compatible server {upstream[0]}")
            before = len(request_lines(upstream[1]))
            page.locator("#dsvl-input textarea").fill(LONG_PROMPT)
            page.locator("#dsvl-input textarea").press("Enter")
            bot = page.locator("#dsvl-chat [data-testid=bot]")
            expect(bot).to_have_count(1)
            seen = set()
            wait_until(lambda: seen.add(bot.first.inner_text()) or len(seen) >= 3, 60, "a streaming answer")
            page.locator("#dsvl-input button.stop-button").click()
            expect(page.locator("#dsvl-input [data-testid=submit-button]")).to_be_visible()
            expect(bot.first).to_contain_text("stopped")
            wait_idle(upstream[0])
            assert parse_line(request_lines(upstream[1])[before])["stop_reason"] == "cancelled"
        finally:
            browser.close()
