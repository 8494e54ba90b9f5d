"""What the chat shows of a text: Markdown (and maths) that cannot load anything.

Gradio's Chatbot renders every message as Markdown with raw HTML let through its sanitiser, so `<b>x</b>`
typed by a user comes out bold and `<img src=x>` or `![](http://…)` in an answer makes the browser fetch a
URL (a way for text planted in an image to leak the conversation). Outside code, a `<` becomes `&lt;` (raw
HTML shows as the text it is) and an image `![…](…)` becomes a plain link. Code spans and fenced blocks are
left alone: Markdown already shows them verbatim. `typed_text` undoes this for a message the user edits."""

from __future__ import annotations

import re

# A fenced block (to its closing fence, or to the end of a text still streaming) or an inline code span.
_CODE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})[^\n]*\n[\s\S]*?(?:^ {0,3}(?P=fence)[ \t]*$|\Z)"
                   r"|(?P<ticks>`+)[\s\S]*?(?<!`)(?P=ticks)(?!`)", re.MULTILINE)


def _outside_code(text: str, change) -> str:
    out, end = [], 0
    for m in _CODE.finditer(text):
        out += [change(text[end:m.start()]), m.group(0)]
        end = m.end()
    out.append(change(text[end:]))
    return "".join(out)


def _inert(prose: str) -> str:
    return prose.replace("<", "&lt;").replace("![", "!\\[")


def _typed(prose: str) -> str:
    return prose.replace("&lt;", "<").replace("!\\[", "![")


def inert_markdown(text: str) -> str:
    """`text` as the Chatbot should receive it: Markdown and maths render, nothing loads."""
    return _outside_code(text, _inert)


def typed_text(shown: str) -> str:
    """The inverse of `inert_markdown` (the Chatbot's edit box holds the shown form)."""
    return _outside_code(shown, _typed)
