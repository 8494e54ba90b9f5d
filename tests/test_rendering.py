"""dsvl_app.rendering: what the Chatbot receives of a text (the browser side is in tests/test_app_looks.py)."""

from __future__ import annotations

import pytest

from dsvl_app.rendering import inert_markdown, typed_text
from dsvl_app.ui import plural

CASES = {
    "<b>x</b> <img src=x>": "&lt;b>x&lt;/b> &lt;img src=x>",
    "![pic](http://example.com/x.png)": "!\\[pic](http://example.com/x.png)",
    "keep `<b>` in code": "keep `<b>` in code",
    "```html\n<img src=x>\n```\nthen <i>": "```html\n<img src=x>\n```\nthen &lt;i>",
    "```\nstill streaming <x>": "```\nstill streaming <x>",
    "$E = mc^2$ and \\(a+b\\)": "$E = mc^2$ and \\(a+b\\)",
}


@pytest.mark.parametrize("text", CASES)
def test_inert_markdown_and_back(text):
    assert inert_markdown(text) == CASES[text]
    assert typed_text(inert_markdown(text)) == text


def test_plural():
    assert [plural(1, "image"), plural(2, "image"), plural(0, "message")] == ["1 image", "2 images", "0 messages"]
