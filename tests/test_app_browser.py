"""The app as a person uses it: Debian's chromium driven by Playwright against a live server (tiny random
checkpoint, real `dsvl.load`). Upload two images, send, watch the answer stream in, press Stop mid-answer,
change a setting and Retry, Undo, send again, start a New chat, run an example, Export and Import, close
the tab. (The README's screenshots come from scripts/screenshot.py: tests never write tracked files.)

Chromium comes from $DSVL_CHROMIUM (default /usr/bin/chromium). When it cannot run, this test fails: it
never skips (scripts/test.sh installs chromium)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

import dsvl
from apphelpers import Paced
from dsvl_app import Settings, start_in_background
from dsvl_app.settings import GenerationDefaults

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
CHROMIUM = os.environ.get("DSVL_CHROMIUM", "/usr/bin/chromium")
QUESTION = "What differs between Image 1 and Image 2?"  # greedy on the tiny checkpoint: a long answer, no EOS

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    engine = Paced(dsvl.load(str(tiny_checkpoint), device="cpu", quantization="none", max_context_tokens=4096))
    settings = Settings(model=str(tiny_checkpoint),
                        generation=GenerationDefaults(temperature=0.0, seed=0, max_new_tokens=1500))
    demo, url = start_in_background(engine, settings)
    yield demo, url, engine
    demo.close()


@pytest.fixture(scope="module")
def page():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        ctx = browser.new_context(viewport={"width": 1280, "height": 1080}, device_scale_factor=1)
        ctx.set_default_timeout(30_000)
        yield ctx.new_page()
        browser.close()


def _wait(predicate, timeout=30.0, what="condition"):
    t0 = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def _finished_after(rt, session, before) -> bool:
    """A reply newer than the stats object `before` has finished (its stats are in, nothing runs)."""
    now = rt.last_stats.get(session)
    return now is not None and now is not before and rt.active_generations() == 0


def test_chat_stop_retry_undo_clear_in_a_real_browser(app, page, tmp_path):
    demo, url, engine = app
    rt = demo.dsvl_runtime
    page.goto(url)
    box = page.locator("#dsvl-input textarea")
    submit = page.locator("#dsvl-input [data-testid=submit-button]")
    stop = page.locator("#dsvl-input button.stop-button")
    bot = page.locator("#dsvl-chat [data-testid=bot]")
    user = page.locator("#dsvl-chat [data-testid=user]")
    expect(page.locator("#dsvl-random")).to_contain_text("RANDOM WEIGHTS")  # the loud warning
    expect(page.locator("#dsvl-banner")).to_contain_text("device: cpu")

    # Two images (the user's own files, not the examples') and a question.
    photos = [tmp_path / "my-cat.png", tmp_path / "my-coffee.png"]
    for src, dst in zip(("chelsea.png", "coffee.png"), photos):
        dst.write_bytes((ASSETS / src).read_bytes())
    page.set_input_files("#dsvl-input input[data-testid=file-upload]", [str(p) for p in photos])
    expect(page.locator("#dsvl-input img")).to_have_count(2)
    box.fill(QUESTION)
    box.press("Enter")

    # The question shows with its images labelled, and the answer streams in.
    expect(user.locator(".caption-label")).to_have_text(["Image 1", "Image 2"])
    expect(user.filter(has_text=QUESTION)).to_have_count(1)
    expect(bot).to_have_count(1, timeout=60_000)
    seen = {bot.first.inner_text()}
    _wait(lambda: seen.add(bot.first.inner_text()) or len(seen) >= 3, what="a streaming answer")
    expect(stop).to_be_visible()

    # Stop mid-answer: the engine stops (not only the display) and the input comes back.
    stop.click()
    expect(submit).to_be_visible()
    _wait(lambda: rt.active_generations() == 0, timeout=5, what="the engine to stop")
    (session,) = rt.last_stats
    assert rt.last_stats[session]["stop_reason"] == "cancelled"
    assert rt.last_stats[session]["new_tokens"] < 1500
    expect(bot.first).to_contain_text("stopped")
    stopped_text = bot.first.inner_text()
    time.sleep(0.5)
    assert bot.first.inner_text() == stopped_text  # nothing more arrives

    # Regenerate with other settings: a short answer this time.
    page.locator("#dsvl-settings").get_by_text("Generation settings").click()
    slider = page.locator("#dsvl-max-new-tokens input[type=range]")
    number = page.locator("#dsvl-max-new-tokens input[type=number]")
    expect(slider).to_be_visible()
    for _ in range(10):  # the accordion mounts its sliders as it opens; a value set meanwhile can be reset
        slider.fill("40")
        page.wait_for_timeout(200)
        if number.input_value() == "40" and slider.input_value() == "40":
            break
    expect(number).to_have_value("40")
    before = rt.last_stats[session]
    page.locator("#dsvl-retry").click()
    _wait(lambda: _finished_after(rt, session, before), timeout=60, what="the regenerated answer")
    assert rt.last_stats[session]["stop_reason"] != "cancelled"
    assert rt.last_stats[session]["new_tokens"] <= 40
    context = page.locator("#dsvl-context")
    expect(context).to_contain_text("tokens/s")  # the stats line of the new answer
    expect(context).not_to_contain_text("stopped")
    expect(submit).to_be_visible()
    expect(bot).to_have_count(1)
    expect(bot.first).not_to_contain_text("stopped")
    expect(context).to_contain_text("of 4,096 tokens used")
    page.locator("#dsvl-settings").get_by_text("Generation settings").click()  # fold the settings again

    # Undo: the turn leaves the chat and its text goes back into the input box.
    page.locator("#dsvl-undo").click()
    expect(bot).to_have_count(0)
    expect(user).to_have_count(0)
    expect(box).to_have_value(QUESTION)
    expect(page.locator("#dsvl-input img")).to_have_count(2)

    # Send it again, then start a new chat: the chat empties and the engine frees the session's cache.
    before = rt.last_stats[session]
    box.press("Enter")
    _wait(lambda: _finished_after(rt, session, before), timeout=60, what="the answer")
    expect(bot).to_have_count(1)
    expect(submit).to_be_visible()
    assert session in engine.sessions
    page.locator("#dsvl-clear").click()
    expect(bot).to_have_count(0)
    expect(user).to_have_count(0)
    rt.flush()
    assert session not in engine.sessions

    # An example card starts a conversation in one click (the settings still ask for 40 tokens).
    before = rt.last_stats.get(session)
    page.locator("#dsvl-chat button", has_text="Compare two images").click()
    _wait(lambda: _finished_after(rt, session, before), timeout=60, what="the example's answer")
    expect(user.locator(".caption-label")).to_have_text(["Image 1", "Image 2"])
    expect(bot).to_have_count(1)
    expect(submit).to_be_visible()

    # Export downloads the conversation with its images inside; Import brings it back.
    with page.expect_download() as download:
        page.locator("#dsvl-export").click()
    saved = tmp_path / "conversation.json"
    download.value.save_as(saved)
    doc = json.loads(saved.read_text())
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant"]
    assert [c["type"] for c in doc["messages"][0]["content"]] == ["image", "image", "text"]
    page.locator("#dsvl-clear").click()
    expect(bot).to_have_count(0)
    page.set_input_files("#dsvl-tools input[type=file]", str(saved))
    expect(bot).to_have_count(1)
    expect(user.locator(".caption-label")).to_have_text(["Image 1", "Image 2"])
    imported = list(rt.files._dirs.get(session, ()))
    assert len(imported) == 1 and len(list(imported[0].iterdir())) == 2

    # Closing the tab ends the session: its uploads and imported images are deleted from the server.
    uploads = [Path(p) for p in rt.files._by_session.get(session, ()) if Path(p).name.startswith("my-")]
    assert sorted(p.name for p in uploads) == ["my-cat.png", "my-coffee.png"] and all(p.exists() for p in uploads)
    page.close()
    _wait(lambda: not any(p.exists() for p in [*uploads, *imported]), timeout=20, what="uploads to be deleted")
    assert all((ASSETS / n).exists() for n in ("chelsea.png", "coffee.png"))
