"""The "System prompt" setting: what arrives from the settings field, from `/chat` or from an imported file,
checked as hostile input. The engine receives it as a leading ``system`` message, which takes the place of the
checkpoint's own system prompt (the field's default), so an unchanged field gives exactly the model's prompt."""

from __future__ import annotations

import json
from typing import Any

from . import history
from .runtime import UserError

MAX_CHARS = 4000  # a persona or a language rule fits easily; the context limit still applies on top


def default_for(engine) -> str | None:
    """The checkpoint's own system prompt ("" when its chat template has none); None when the engine does not
    say (a remote server, `--backend openai`, which keeps its own unless the user writes one)."""
    value = getattr(getattr(engine, "processor", None), "default_system_prompt", None)
    return value if isinstance(value, str) else None


def clean(value: Any, default: str | None) -> str | None:
    """None (an API call made without it) -> `default`; text -> the text as the model may see it, stripped; None
    (send no system message) for empty text when the default is unknown. Raises UserError for anything else or
    for text beyond MAX_CHARS."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise UserError("The system prompt must be text.", "Bad setting")
    text = history.clean_text(value).strip()
    if len(text) > MAX_CHARS:
        raise UserError(f"The system prompt has {len(text):,} characters; at most {MAX_CHARS:,} are allowed.",
                        "System prompt too long")
    return None if not text and default is None else text


def from_export(raw: bytes | str) -> str | None:
    """The system prompt saved in an exported conversation, or None when the file has none (older exports)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    value = doc.get("system_prompt") if isinstance(doc, dict) else None
    return None if value is None else clean(value, "")
