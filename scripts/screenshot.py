"""Screenshots of a real conversation for the README: docs/screenshot.png (light) and docs/screenshot-dark.png.

    python scripts/screenshot.py                     # a tiny test model (random weights: its answer is noise)
    python scripts/screenshot.py --model DIR_OR_HUB  # the real model, for a screenshot with a real answer

Starts the app on a free local port, sends one question about two of the bundled images in Debian's chromium
($DSVL_CHROMIUM, default /usr/bin/chromium) through Playwright, waits for the answer, and saves the page in the
light and the dark colour scheme."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUESTION = "What are the differences between Image 1 and Image 2?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="dsvl-screenshot-"))

    import dsvl
    from dsvl_app import Settings, start_in_background
    from dsvl_app.settings import GenerationDefaults
    from playwright.sync_api import expect, sync_playwright

    engine = dsvl.load(args.model, device="cpu" if args.model.startswith("random:") else "auto")
    settings = Settings(model=args.model, generation=GenerationDefaults(temperature=0.0, seed=0,
                                                                        max_new_tokens=args.max_new_tokens))
    demo, url = start_in_background(engine, settings)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=os.environ.get("DSVL_CHROMIUM", "/usr/bin/chromium"),
                                         headless=True, args=["--no-sandbox", "--disable-gpu"])
            for scheme, name in (("light", "screenshot.png"), ("dark", "screenshot-dark.png")):
                page = browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme=scheme)
                page.set_default_timeout(120_000)
                page.goto(url)
                page.set_input_files("#dsvl-input input[data-testid=file-upload]",
                                     [str(ROOT / "assets" / n) for n in ("chelsea.png", "coffee.png")])
                expect(page.locator("#dsvl-input img")).to_have_count(2, timeout=30_000)
                page.locator("#dsvl-input textarea").fill(QUESTION)
                page.locator("#dsvl-input textarea").press("Enter")
                expect(page.locator("#dsvl-context")).to_contain_text("tokens/s", timeout=600_000)  # answered
                page.evaluate("window.scrollTo(0, 0)")
                page.wait_for_timeout(500)
                page.screenshot(path=str(args.out / name))
                print(f"wrote {args.out / name}")
                page.close()
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
