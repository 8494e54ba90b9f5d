"""What a person sees, in Debian's chromium through Playwright (a live server on the tiny random checkpoint):
refused input leaves the conversation in view, what the chat renders (user text as typed, answers' HTML inert,
maths), the colours of light and dark mode, a phone and a desktop screen, Stop on screen, and what is left on
the server once the tab closes."""

from __future__ import annotations

import base64
import glob
import json
import os
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from apphelpers import ASSETS, Paced, encoded, live_app, load_tiny_engine, photo, wait_until
from dsvl_app.settings import GenerationDefaults

CHROMIUM = os.environ.get("DSVL_CHROMIUM", "/usr/bin/chromium")
LONG = "Tell me a long story about the sea."  # greedy on the tiny checkpoint: no EOS for many tokens

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    engine = Paced(load_tiny_engine(tiny_checkpoint))
    gen = GenerationDefaults(temperature=0.0, seed=0, max_new_tokens=1500)
    with live_app(engine, tiny_checkpoint, generation=gen) as (demo, url):
        yield demo, url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def open_page(browser, url, *, width=1280, height=900, scheme="light"):
    page = browser.new_page(viewport={"width": width, "height": height}, color_scheme=scheme)
    page.set_default_timeout(30_000)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    expect(page.locator("#dsvl-input textarea")).to_be_visible(timeout=60_000)
    return page, requests


def conversation_json(answer: str, question: str = "What is in the picture?") -> str:
    image = base64.b64encode((ASSETS / "chelsea.png").read_bytes()).decode()
    return json.dumps({"format": "dsvl-chat.conversation", "version": 1, "messages": [
        {"role": "user", "content": [{"type": "image", "name": "cat.png", "data": image},
                                     {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})


def import_file(page, path: Path) -> None:
    page.set_input_files("#dsvl-tools input[type=file]", str(path))


def chat_in_view(page) -> bool:
    """The last answer is on top at its own centre: nothing (an error badge) covers the conversation."""
    return page.evaluate("""() => {
        const bots = document.querySelectorAll('#dsvl-chat [data-testid=bot]');
        if (!bots.length) return false;
        const r = bots[bots.length - 1].getBoundingClientRect();
        const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
        return !!top && bots[bots.length - 1].contains(top);
    }""")


def uploaded(rt, name: str) -> list[str]:
    """Files called `name` in the server's upload folder (glob skips folders that vanish meanwhile)."""
    return glob.glob(str(rt.upload_root / "**" / name), recursive=True)


def notice(page, text: str):
    expect(page.locator(".toast-body").filter(has_text=text).first).to_be_visible()


def test_refused_input_keeps_the_conversation_in_view(app, browser, tmp_path):
    demo, url = app
    rt = demo.dsvl_runtime
    page, _ = open_page(browser, url)
    bot, user = page.locator("#dsvl-chat [data-testid=bot]"), page.locator("#dsvl-chat [data-testid=user]")
    box = page.locator("#dsvl-input textarea")
    upload = "#dsvl-input input[data-testid=file-upload]"
    saved = tmp_path / "conversation.json"
    saved.write_text(conversation_json("It is a cat."))
    import_file(page, saved)
    expect(bot).to_have_text("It is a cat.")

    # 1. an empty send
    box.press("Enter")
    notice(page, "Type a question")
    assert chat_in_view(page)
    # 2. a text file renamed .png: refused, text and file stay in the box
    fake = tmp_path / "notes.png"
    fake.write_bytes(b"these are my notes, not a picture\n" * 10)
    page.set_input_files(upload, str(fake))
    expect(page.locator("#dsvl-input .thumbnail-item, #dsvl-input .file-preview, #dsvl-input img")).not_to_have_count(0)
    wait_until(lambda: list(uploaded(rt, "notes.png")), timeout=20, what="the upload")
    box.fill("Look at this")
    box.press("Enter")
    notice(page, "notes.png")
    assert chat_in_view(page)
    expect(box).to_have_value("Look at this")
    # The refused file is deleted from the server at once (it stays listed in the box: the user removes it).
    assert not list(uploaded(rt, "notes.png"))
    # 3. a fifth image
    pictures = []
    for i in range(5):
        pictures.append(tmp_path / f"pic{i}.png")
        pictures[-1].write_bytes(encoded(photo(seed=i), "PNG"))
    page.set_input_files(upload, [str(p) for p in pictures])
    box.fill("Compare them")
    box.press("Enter")
    notice(page, "at most 4 per message")
    assert chat_in_view(page)
    expect(box).to_have_value("Compare them")
    # 4. a bad Import file
    bad = tmp_path / "bad.json"
    bad.write_text("{this is not json")
    import_file(page, bad)
    notice(page, "Could not import")
    assert chat_in_view(page)
    expect(bot).to_have_text("It is a cat.")
    expect(user.filter(has_text="What is in the picture?")).to_be_visible()
    assert page.locator("#dsvl-chat .error").count() == 0

    # The images of the refused message go when the tab closes, with the rest of the session's uploads.
    assert list(uploaded(rt, "pic4.png"))
    page.close()
    wait_until(lambda: not list(uploaded(rt, "pic4.png")), timeout=20, what="the uploads to be deleted")


def test_user_text_as_typed_answers_inert_and_maths_rendered(app, browser, tmp_path):
    demo, url = app
    page, requests = open_page(browser, url)
    answer = ("Energy: $E = mc^2$, also \\(a+b\\) and\n\n$$\\int_0^1 x\\,dx$$\n\n"
              "Raw <img src=/answer-img> and ![pic](/answer-md-img) and <b>bold?</b>\n\n"
              "```html\n<img src=/in-code>\n```")
    saved = tmp_path / "conversation.json"
    saved.write_text(conversation_json(answer, question="<b>x</b> <img src=/user-img> $E = mc^2$"))
    import_file(page, saved)
    bot, user = page.locator("#dsvl-chat [data-testid=bot]"), page.locator("#dsvl-chat [data-testid=user]")
    expect(bot.locator(".katex")).to_have_count(3)
    # The user's text as typed: tags are text, nothing of it loads.
    expect(user.filter(has_text="<b>x</b> <img src=/user-img>")).to_have_count(1)
    assert user.locator("b").count() == 0
    # The answer: Markdown renders, raw HTML is text, no element loads anything; code shows verbatim.
    expect(bot).to_contain_text("<img src=/answer-img>")
    expect(bot.locator("pre")).to_contain_text("<img src=/in-code>")
    assert bot.locator("img").count() == 0 and bot.locator("b").count() == 0
    page.wait_for_timeout(500)
    assert not [r for r in requests if "img" in r.rsplit("/", 1)[-1] and "gradio_api" not in r], requests
    page.close()


def contrast(fg: str, bg: str) -> float:
    def lum(css: str) -> float:
        r, g, b = [int(float(v)) for v in css[css.index("(") + 1:css.index(")")].split(",")[:3]]
        c = [x / 255 for x in (r, g, b)]
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    hi, lo = sorted((lum(fg), lum(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_colours_of_the_warning_and_the_buttons(app, browser, scheme):
    page, _ = open_page(browser, app[1], scheme=scheme)
    colours = page.evaluate("""() => {
        const s = (sel) => getComputedStyle(document.querySelector(sel));
        return {bg: s('#dsvl-random').backgroundColor, fg: s('#dsvl-random').color,
                code: s('#dsvl-random code').color, page: s('body').backgroundColor};
    }""")
    bg = colours["bg"] if not colours["bg"].endswith(", 0)") else colours["page"]
    assert contrast(colours["fg"], bg) >= 4.5, colours
    assert contrast(colours["code"], bg) >= 4.5, colours
    if scheme == "dark":
        assert contrast(bg, "rgb(255, 255, 255)") > 3, colours  # not a light box on a dark page
    submit = page.locator("#dsvl-input .submit-button")
    expect(submit).to_have_attribute("aria-label", "Send")
    # Example cards look like cards: a visible border.
    card = page.locator("#dsvl-chat .example").first
    assert float(card.evaluate("e => getComputedStyle(e).borderTopWidth")[:-2]) >= 1
    page.close()


def test_phone_opens_at_the_top_with_title_warning_and_input_in_view(app, browser):
    page, _ = open_page(browser, app[1], width=390, height=844)
    page.wait_for_timeout(500)
    assert page.evaluate("window.scrollY") == 0
    for sel in ("#dsvl-banner", "#dsvl-random", "#dsvl-input textarea"):
        box = page.locator(sel).bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 844, (sel, box)
    lines = page.locator("#dsvl-random").evaluate("""e => { const s = getComputedStyle(e);
        return (e.clientHeight - 2 * parseFloat(s.paddingTop)) / parseFloat(s.lineHeight); }""")
    assert lines <= 5.2, lines  # it was 8 lines
    page.close()


def test_desktop_tools_in_view_and_buttons_apart(app, browser, tmp_path):
    page, _ = open_page(browser, app[1], width=1280, height=900)
    for sel in ("#dsvl-tools", "#dsvl-settings"):
        box = page.locator(sel).bounding_box()
        assert box["y"] + min(box["height"], 40) <= 900, (sel, box)
    saved = tmp_path / "conversation.json"
    saved.write_text(conversation_json("Here is code: `x = 1`\n\n```python\nprint(1)\n```"))
    import_file(page, saved)
    bot = page.locator("#dsvl-chat [data-testid=bot]")
    expect(bot.locator("pre")).to_have_count(1)
    size = lambda sel: bot.locator(sel).first.evaluate("e => getComputedStyle(e).fontSize")  # noqa: E731
    assert size("pre code") == size("p") and size("p code") == size("p")
    # A user message's copy/edit buttons do not overlap the chat's delete / copy-all buttons.
    page.locator("#dsvl-chat [data-testid=user]").last.hover()
    boxes = page.evaluate("""() => [...document.querySelectorAll('#dsvl-chat button')]
        .filter(b => b.offsetParent).map(b => { const r = b.getBoundingClientRect();
            return [r.left, r.top, r.right, r.bottom, b.getAttribute('aria-label') || b.title || ''] })""")
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = min(a[2], b[2]) - max(a[0], b[0]) > 1 and min(a[3], b[3]) - max(a[1], b[1]) > 1
            assert not overlap, (a, b)
    page.close()


def test_stop_freezes_the_answer_on_screen_at_once(app, browser):
    demo, url = app
    page, _ = open_page(browser, url)
    box = page.locator("#dsvl-input textarea")
    box.fill(LONG)
    box.press("Enter")
    bot = page.locator("#dsvl-chat [data-testid=bot]")
    wait_until(lambda: len(bot.first.inner_text()) > 40 if bot.count() else False, timeout=90, what="streaming")
    stop = page.locator("#dsvl-input .stop-button")
    expect(stop).to_have_attribute("aria-label", "Stop")
    expect(stop).to_have_attribute("title", "Stop")
    # Record, in the page, when the answer's text last changed (the "stopped" mark aside) after the click.
    page.evaluate("""() => {
        window.dsvlChanges = [];
        const chat = document.querySelector('#dsvl-chat');
        const text = () => { const b = chat.querySelectorAll('[data-testid=bot]'); return b.length ?
            b[b.length - 1].innerText.replace(/—\\s*stopped\\s*$/, '').trim() : ''; };
        let last = text();
        new MutationObserver(() => { const t = text(); if (t !== last) { last = t;
            window.dsvlChanges.push(performance.now()); } })
            .observe(chat, {childList: true, subtree: true, characterData: true});
        document.querySelector('#dsvl-input .stop-button').addEventListener('click',
            () => { window.dsvlClick = performance.now(); }, {capture: true});
    }""")
    stop.click()
    expect(bot.first).to_contain_text("stopped")
    wait_until(lambda: demo.dsvl_runtime.active_generations() == 0, timeout=10, what="the engine to stop")
    page.wait_for_timeout(1000)
    late = page.evaluate("window.dsvlChanges.filter(t => t > window.dsvlClick).map(t => t - window.dsvlClick)")
    assert all(ms <= 200 for ms in late), late
    page.close()


def test_the_answer_bubble_says_what_happens_before_the_first_token(app, browser):
    demo, url = app
    rt = demo.dsvl_runtime
    first, _ = open_page(browser, url)
    second, _ = open_page(browser, url)
    first.locator("#dsvl-input textarea").fill(LONG)
    first.locator("#dsvl-input textarea").press("Enter")
    expect(first.locator("#dsvl-input .stop-button")).to_be_visible()
    wait_until(lambda: rt.active_generations() == 1, timeout=60, what="the first answer to run")
    # A second user waits: their bubble says so, with how many answers are ahead.
    second.set_input_files("#dsvl-input input[data-testid=file-upload]", str(ASSETS / "chelsea.png"))
    expect(second.locator("#dsvl-input img")).to_have_count(1)
    second.evaluate("""() => { window.dsvlBubbles = [];  // every text the answer's bubble shows, in order
        const chat = document.querySelector('#dsvl-chat');
        new MutationObserver(() => { const b = chat.querySelectorAll('[data-testid=bot]');
            const t = b.length ? b[b.length - 1].innerText.trim() : '';
            if (t && t !== window.dsvlBubbles.at(-1)) window.dsvlBubbles.push(t); })
            .observe(chat, {childList: true, subtree: true, characterData: true}); }""")
    second.locator("#dsvl-input textarea").fill("What is this?")
    second.locator("#dsvl-input textarea").press("Enter")
    bot = second.locator("#dsvl-chat [data-testid=bot]")
    expect(bot).to_contain_text("Waiting for my turn: 1 answer ahead of yours")
    # Their turn comes: the bubble shows that it is at work until the first token replaces it.
    first.locator("#dsvl-input .stop-button").click()
    expect(bot).not_to_contain_text("Waiting", timeout=30_000)
    expect(bot).not_to_contain_text("Looking at", timeout=60_000)
    bubbles = second.evaluate("window.dsvlBubbles")
    at_work = [i for i, t in enumerate(bubbles) if "Looking at 1 image and thinking" in t]
    assert "Waiting for my turn" in bubbles[0] and at_work and at_work[0] < len(bubbles) - 1, bubbles
    second.evaluate("document.querySelector('#dsvl-input .stop-button')?.click()")  # unless it has ended
    expect(second.locator("#dsvl-input .submit-button")).to_be_visible(timeout=60_000)
    first.close()
    second.close()
