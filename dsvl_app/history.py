"""The conversation as the app keeps it, and its conversions.

One canonical shape lives in each session's `gr.State` (a list of turns):

    {"role": "user", "text": str, "images": [path, ...]}
    {"role": "assistant", "text": str, "status": "pending" | "done" | "stopped", "stats": dict | None,
     "notice": str | None}

From it come the engine's messages (`engine_messages`), the Chatbot's value (`chatbot_messages`) and the
export file (`export_conversation`). `normalize_history` reads every shape Gradio uses for a chat history
(typed messages from the browser's Chatbot, the raw shape that reaches a chat function through the API,
the engine's own shape) back into turns.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import mimetypes
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from .rendering import inert_markdown

FORMAT = "dsvl-chat.conversation"
VERSION = 1

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ConversationFormatError(ValueError):
    """An imported conversation (or a history passed through the API) that cannot be read."""


def clean_text(text: Any) -> str:
    """User text as the model may see it: str, valid UTF-8, no control characters but tab and newlines."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = str(text).encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    return _CONTROL.sub("", text.replace("\r\n", "\n"))


# An answer's statistics, as the context line shows them: known keys with plausible values only (an imported
# file or an API history may carry anything; 1e308 tokens or NaN seconds must not reach the page).
_STAT_LIMITS: dict[str, tuple[type, float]] = {
    "prompt_tokens": (int, 10**7), "new_tokens": (int, 10**7), "prefilled_tokens": (int, 10**7),
    "dropped_turns": (int, 10**7), "ttft_s": (float, 10**6), "decode_tokens_per_s": (float, 10**6),
}
_STOP_REASONS = {"eos", "stop_string", "max_new_tokens", "cancelled", "error"}


def clean_stats(stats: Any) -> dict | None:
    """The statistics that can be trusted for display, or None."""
    if not isinstance(stats, dict):
        return None
    out: dict[str, Any] = {}
    for key, (kind, top) in _STAT_LIMITS.items():
        v = stats.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= top:
            out[key] = int(v) if kind is int else float(v)
    if stats.get("stop_reason") in _STOP_REASONS:
        out["stop_reason"] = stats["stop_reason"]
    return out or None


def user_turn(text: str, images: Iterable[str] = ()) -> dict:
    return {"role": "user", "text": clean_text(text), "images": [str(p) for p in images]}


def assistant_turn(text: str = "", status: str = "pending", stats: dict | None = None,
                   notice: str | None = None) -> dict:
    return {"role": "assistant", "text": text, "status": status, "stats": stats, "notice": notice}


def count_images(conv: list[dict]) -> int:
    return sum(len(t.get("images", ())) for t in conv if t["role"] == "user")


def last_user_index(conv: list[dict]) -> int | None:
    for i in range(len(conv) - 1, -1, -1):
        if conv[i]["role"] == "user":
            return i
    return None


# ---------------------------------------------------------------------------------------------------
# Reading every history shape


def _item_path(item: Any) -> str | None:
    """The file path of one content item, or None when the item is not a file."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], str):
        return item[0]  # legacy (path, alt_text) tuple
    if isinstance(item, dict):
        kind = item.get("type")
        if kind == "text":
            return None
        if kind == "file":
            f = item.get("file")
            return f.get("path") if isinstance(f, dict) else (f if isinstance(f, str) else None)
        if kind == "image":
            return item.get("path") or (item.get("image") if isinstance(item.get("image"), str) else None)
        if isinstance(item.get("path"), str):
            return item["path"]
        return None
    path = getattr(item, "path", None)  # gradio FileData
    return path if isinstance(path, str) else None


def _item_text(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and item.get("type") == "text":
        return str(item.get("text", ""))
    return None


def _split_content(content: Any) -> tuple[list[str], list[str]]:
    items = content if isinstance(content, list) else [content]
    texts, paths = [], []
    for item in items:
        if item is None:
            continue
        path = _item_path(item)
        if path is not None:
            paths.append(path)
            continue
        text = _item_text(item)
        if text is not None:
            texts.append(text)
        else:
            raise ConversationFormatError(f"unsupported message content: {str(item)[:80]!r}")
    return texts, paths


def normalize_history(history: Any) -> list[dict]:
    """Turns from any chat-history shape:

    * canonical turns (this module),
    * Gradio's typed messages (browser Chatbot value): content lists of ``{"type": "text", "text"}`` and
      ``{"type": "file", "file": {"path"}}``,
    * Gradio's raw messages (what a chat function gets through the API): content a str, a
      ``{"path": ...}`` dict, a ``(path,)`` tuple, or a list of those,
    * the engine's messages: ``{"type": "image", "path"}`` / ``{"type": "text", "text"}``.

    Consecutive messages of one role are merged into one turn (older Gradio shapes put each file in a
    message of its own). System messages and "thought" messages (metadata with a title) are skipped.
    """
    if history is None:
        return []
    if isinstance(history, dict) and "messages" in history:
        history = history["messages"]
    if not isinstance(history, list):
        raise ConversationFormatError("history must be a list of messages")
    turns: list[dict] = []
    texts_of: list[list[str]] = []  # per turn, its texts, joined once at the end (merging stays linear)
    for msg in history:
        if not isinstance(msg, dict):
            role, content, meta = getattr(msg, "role", None), getattr(msg, "content", None), getattr(msg, "metadata", None)
        else:
            role, meta = msg.get("role"), msg.get("metadata")
            content = msg["content"] if "content" in msg else None
        if role not in ("user", "assistant", "system"):
            raise ConversationFormatError(f"unknown role {role!r}")
        if role == "system" or (isinstance(meta, dict) and meta.get("title")):
            continue
        if content is None and isinstance(msg, dict) and ("text" in msg or "images" in msg):  # canonical
            texts, paths = [str(msg.get("text") or "")], list(msg.get("images") or [])
        else:
            texts, paths = _split_content(content)
        if role == "assistant" and paths:
            raise ConversationFormatError("assistant messages cannot carry files")
        text = "\n".join(t for t in texts if t)
        if turns and turns[-1]["role"] == role:
            texts_of[-1].append(clean_text(text))
            if role == "user":
                turns[-1]["images"].extend(str(p) for p in paths)
            continue
        if role == "user":
            turns.append(user_turn("", paths))
        else:
            status = msg.get("status", "done") if isinstance(msg, dict) else "done"
            stats = msg.get("stats") if isinstance(msg, dict) else None
            turns.append(assistant_turn("", "stopped" if status == "stopped" else "done", clean_stats(stats)))
        texts_of.append([clean_text(text) if role == "user" else str(text)])
    for turn, parts in zip(turns, texts_of):
        turn["text"] = "\n".join(t for t in parts if t)
    return turns


# ---------------------------------------------------------------------------------------------------
# Engine and display


def engine_messages(conv: list[dict]) -> list[dict]:
    """The engine's messages. When the conversation holds two images or more, each image is preceded by
    its label ("Image 1:", "Image 2:", … numbered across the whole conversation) so that the user can
    refer to them; a single-image chat keeps the model's native prompt exactly."""
    label = count_images(conv) >= 2
    out: list[dict] = []
    n = 0
    for turn in conv:
        if turn["role"] == "user":
            content: list[dict] = []
            for path in turn["images"]:
                n += 1
                if label:
                    content.append({"type": "text", "text": f"Image {n}:" if not content else f"\nImage {n}:"})
                content.append({"type": "image", "path": path})
            if turn["text"]:
                content.append({"type": "text", "text": ("\n" if label and content else "") + turn["text"]})
            if content:
                out.append({"role": "user", "content": content})
        elif turn["text"]:
            out.append({"role": "assistant", "content": [{"type": "text", "text": turn["text"]}]})
    return out


def image_labels(conv: list[dict]) -> list[list[str]]:
    """Per turn, the labels of its images (empty for assistant turns)."""
    n, out = 0, []
    for turn in conv:
        labels = []
        for _ in turn.get("images", ()) if turn["role"] == "user" else ():
            n += 1
            labels.append(f"Image {n}")
        out.append(labels)
    return out


def chatbot_messages(conv: list[dict]) -> list[dict]:
    """The Chatbot's value: one message per turn, so a Chatbot index is a turn index. A user turn shows
    its images inline, then their labels, then the text. A pending answer with no text yet is left out
    (the Chatbot shows its typing dots)."""
    out: list[dict] = []
    for turn, labels in zip(conv, image_labels(conv)):
        if turn["role"] == "user":
            content: list[Any] = []
            if labels:
                content.append(gallery_message(tuple(zip(turn["images"], labels))))
            if turn["text"]:
                content.append(inert_markdown(turn["text"]))
            out.append({"role": "user", "content": content or [""]})
        else:
            if turn["status"] == "pending" and not turn["text"]:
                continue
            text = inert_markdown(turn["text"])
            if turn["status"] == "stopped":
                text = (text + "\n\n" if text else "") + "*— stopped*"
            out.append({"role": "assistant", "content": text or "*(empty answer)*"})
    return out


def gallery(items: list[tuple[str, str]]):
    """A user turn's images as one captioned gallery (caption = the image's label)."""
    import gradio as gr

    return gr.Gallery(value=items, columns=4, height="auto", show_label=False, allow_preview=True,
                      object_fit="contain", buttons=[], render=False)


def gallery_message(items: tuple[tuple[str, str], ...]):
    """The gallery as the Chatbot's ready-made component message, built once per turn: building a Gallery
    hashes its files, and the Chatbot is re-rendered for every streamed update. Falls back to the plain
    component (which the Chatbot converts itself) if Gradio's internals differ."""
    try:
        return _gallery_message(items)
    except Exception:
        return gallery(list(items))


@lru_cache(maxsize=512)
def _gallery_message(items: tuple[tuple[str, str], ...]):
    from gradio.components.chatbot import ComponentMessage
    from gradio.context import LocalContext

    # Inside an event handler Gradio treats a new component as an update and skips most of __init__;
    # build it as the Chatbot's postprocess does, outside that mode (gradio 6.31).
    token = LocalContext.in_event_listener.set(False)
    try:
        g = gallery(list(items))
        config = g.get_config()
    finally:
        LocalContext.in_event_listener.reset(token)
    args = {k: v for k, v in g.constructor_args.items() if k != "value"}
    return ComponentMessage(component="gallery", value=config.get("value"), constructor_args=args, props=config)


def turn_index_for_chatbot_index(conv: list[dict], index: int) -> int:
    """Map a Chatbot message index back to a turn index (they differ only by skipped pending answers)."""
    shown = [i for i, t in enumerate(conv) if not (t["role"] == "assistant" and t["status"] == "pending" and not t["text"])]
    return shown[index]


# ---------------------------------------------------------------------------------------------------
# Export / import


def export_conversation(conv: list[dict], model: str | None = None) -> dict:
    """A self-contained JSON document: texts, images as base64, per-answer stats."""
    messages = []
    for turn in conv:
        if turn["role"] == "user":
            content: list[dict] = []
            for path in turn["images"]:
                p = Path(path)
                content.append({
                    "type": "image",
                    "name": p.name,
                    "mime_type": mimetypes.guess_type(p.name)[0] or "application/octet-stream",
                    "data": base64.b64encode(p.read_bytes()).decode("ascii"),
                })
            if turn["text"]:
                content.append({"type": "text", "text": turn["text"]})
            messages.append({"role": "user", "content": content})
        elif turn["status"] != "pending" or turn["text"]:
            msg: dict[str, Any] = {"role": "assistant", "content": [{"type": "text", "text": turn["text"]}]}
            if turn["status"] == "stopped":
                msg["status"] = "stopped"
            if turn.get("stats"):
                msg["stats"] = turn["stats"]
            messages.append(msg)
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model,
        "messages": messages,
    }


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def import_conversation(data: bytes | str, out_dir: Path, *, max_images: int = 64,
                        max_image_bytes: int = 20 * 1024 * 1024) -> tuple[list[dict], list[Path]]:
    """Read an exported conversation. Images come only from their base64 data (a path inside the file is
    never opened) and are written to `out_dir`. Returns (turns, written files); the caller checks that
    the files are images. Raises ConversationFormatError with a message meant for the user."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ConversationFormatError("the file is nested too deeply to be a conversation") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConversationFormatError(f"not a JSON file ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("messages"), list):
        raise ConversationFormatError(f'not a conversation exported by this app (expected "format": "{FORMAT}")')
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    turns: list[dict] = []
    try:
        for i, msg in enumerate(doc["messages"]):
            if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant") \
                    or not isinstance(msg.get("content"), list):
                raise ConversationFormatError(f"message {i + 1}: needs a role (user/assistant) and a content list")
            texts, images = [], []
            for item in msg["content"]:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text":
                    texts.append(clean_text(item.get("text", "")))
                elif kind == "image" and msg["role"] == "user":
                    if len(written) >= max_images:
                        raise ConversationFormatError(f"more than {max_images} images")
                    raw = item.get("data")
                    if not isinstance(raw, str) or len(raw) > max_image_bytes * 4 // 3 + 8:
                        raise ConversationFormatError(f"message {i + 1}: image data missing or too large")
                    try:
                        blob = base64.b64decode(raw, validate=True)
                    except (binascii.Error, ValueError):
                        raise ConversationFormatError(f"message {i + 1}: image data is not base64") from None
                    name = _SAFE_NAME.sub("_", Path(str(item.get("name") or "image")).name)[-80:] or "image"
                    path = out_dir / f"{len(written) + 1:03d}-{name}"
                    path.write_bytes(blob)
                    written.append(path)
                    images.append(str(path))
                else:
                    raise ConversationFormatError(f"message {i + 1}: unsupported content {kind!r}")
            text = "\n".join(t for t in texts if t)
            if msg["role"] == "user":
                turns.append(user_turn(text, images))
            else:
                turns.append(assistant_turn(text, "stopped" if msg.get("status") == "stopped" else "done",
                                            clean_stats(msg.get("stats"))))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return normalize_history(turns), written
