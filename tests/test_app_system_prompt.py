"""The "System prompt" setting in the app: in a real browser (the field in the settings, its default, what the
engine receives, Export and Import), through `/chat` (a last optional parameter; older positional calls keep
working) and its checks on hostile values. Tiny random checkpoint; Chromium from $DSVL_CHROMIUM, failing (never
skipping) when it cannot run."""

from __future__ import annotations

import json
import os
import time

import pytest
from gradio_client import Client
from playwright.sync_api import expect, sync_playwright

from apphelpers import chat_args, live_app, load_tiny_engine
from dsvl.text import SYSTEM_PROMPT
from dsvl_app import system_prompt as sysprompt
from dsvl_app.runtime import UserError

CHROMIUM = os.environ.get("DSVL_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def recorded(tiny_checkpoint):
    """(engine, list of the message lists the engine was asked to answer)."""
    engine = load_tiny_engine(tiny_checkpoint, dtype="float32")
    seen: list[list[dict]] = []
    stream = engine.stream

    def recording(messages, **kw):
        seen.append(messages)
        return stream(messages, **kw)

    engine.stream = recording
    return engine, seen


def _system_of(messages: list[dict]) -> str | None:
    first = messages[0]
    return first["content"][0]["text"] if first["role"] == "system" else None


def _wait(predicate, timeout=60.0, what="condition"):
    t0 = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.browser
def test_system_prompt_field_in_a_real_browser(recorded, tiny_checkpoint, tmp_path):
    engine, seen = recorded
    with live_app(engine, tiny_checkpoint) as (demo, url), sync_playwright() as p:
        rt = demo.dsvl_runtime
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            expect(page).to_have_title("DeepSeek-VL 7B chat")  # the model loaded (tiny hybrid)
            page.locator("#dsvl-settings").get_by_text("Generation settings").click()
            field = page.locator("#dsvl-system-prompt textarea")
            expect(field).to_have_value(SYSTEM_PROMPT)  # the checkpoint's own

            box = page.locator("#dsvl-input textarea")
            n = len(seen)
            box.fill("Hi")
            box.press("Enter")
            _wait(lambda: len(seen) > n and rt.active_generations() == 0, what="the first answer")
            assert _system_of(seen[-1]) == SYSTEM_PROMPT

            field.fill("Answer in French, in one sentence.")
            n = len(seen)
            page.locator("#dsvl-retry").click()
            _wait(lambda: len(seen) > n and rt.active_generations() == 0, what="the regenerated answer")
            assert _system_of(seen[-1]) == "Answer in French, in one sentence."
            (session,) = rt.last_stats
            stats = rt.last_stats[session]
            assert stats["prefilled_tokens"] >= stats["prompt_tokens"] - 1  # a new system prompt: all but BOS again

            with page.expect_download() as download:
                page.locator("#dsvl-export").click()
            saved = tmp_path / "conversation.json"
            download.value.save_as(saved)
            assert json.loads(saved.read_text())["system_prompt"] == "Answer in French, in one sentence."

            field.fill("")
            page.locator("#dsvl-clear").click()
            page.set_input_files("#dsvl-tools input[type=file]", str(saved))
            expect(field).to_have_value("Answer in French, in one sentence.")
        finally:
            browser.close()


def test_chat_api_takes_the_system_prompt_last(recorded, tiny_checkpoint):
    engine, seen = recorded
    with live_app(engine, tiny_checkpoint) as (demo, url):
        client = Client(url, verbose=False)
        client.predict(*chat_args("Hi", max_new_tokens=2), api_name="/chat")  # an older positional call
        assert _system_of(seen[-1]) == SYSTEM_PROMPT
        client.predict(*chat_args("Hi", max_new_tokens=2), [], "Be terse.", api_name="/chat")
        assert _system_of(seen[-1]) == "Be terse."
        client.predict(*chat_args("Again", max_new_tokens=2), system_prompt="", api_name="/chat")
        assert _system_of(seen[-1]) == ""  # explicitly none
        n = len(seen)
        with pytest.raises(Exception, match="at most"):
            client.predict(*chat_args("Hi"), None, "x" * (sysprompt.MAX_CHARS + 1), api_name="/chat")
        assert len(seen) == n  # refused before the engine


def test_clean_rejects_what_is_not_a_system_prompt():
    assert sysprompt.clean(None, "default") == "default"
    assert sysprompt.clean("  be brief\x00\r\n ", "d") == "be brief"
    for bad in (123, ["a"], {"text": "a"}):
        with pytest.raises(UserError, match="must be text"):
            sysprompt.clean(bad, "d")
    assert sysprompt.from_export(b"{}") is None and sysprompt.from_export(b"not json") is None
    assert sysprompt.from_export(json.dumps({"system_prompt": " hi "})) == "hi"
    with pytest.raises(UserError):
        sysprompt.from_export(json.dumps({"system_prompt": 5}))


def test_unknown_default_sends_no_system_message():
    """A remote server (`--backend openai`) keeps its own system prompt unless the user writes one."""
    assert sysprompt.default_for(object()) is None
    assert sysprompt.clean(None, None) is None and sysprompt.clean("  ", None) is None
    assert sysprompt.clean("Be brief.", None) == "Be brief."
    assert sysprompt.clean("", SYSTEM_PROMPT) == ""  # a known default: empty means no system prompt at all
