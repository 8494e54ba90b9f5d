"""Tokenizer wrapper, chat-template rendering, streaming detokenizer and the tiny-tokenizer builder.

Everything here works from the checkpoint's own files (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``/``chat_template.json``); special ids are looked up by their token strings, never
hard-coded (the 7B tokenizer uses bos 100000, eos 100001, image 100015; the tiny one has its own ids).
"""

from __future__ import annotations

import codecs
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
IMAGE_TOKEN = "<image_placeholder>"


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (e.g. invalid UTF-8 decoded with surrogateescape, or "\\ud800" in JSON) as
    U+FFFD: the `tokenizers` backend refuses such strings with an opaque TypeError."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

# The HF conversion script's CHAT_TEMPLATE (convert_deepseek_vl_hybrid_weights_to_hf.py), byte for byte.
# It is what `deepseek-community/deepseek-vl-7b-chat` ships (as chat_template.jinja in transformers 5).
CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}"
    "{% set i = 0 %}"
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.\n\n"
    "{% for message in messages %}"
    "{% if message['role']|lower == 'user' %}"
    "User: "
    "{% elif message['role']|lower == 'assistant' %}"
    "Assistant:{% if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='') %} {% endif %}"
    "{% else %}"
    "{{ message['role'].capitalize() }}: "
    "{% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "<image_placeholder>"
    "{% elif content['type'] == 'text' %}"
    "{% set text = content['text'] %}"
    "{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0-1]['type'] == 'text' %}"
    "{{ ' ' + text }}"
    "{% else %}"
    "{{ text }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}"
    "{% if message['role']|lower == 'user' %}"
    "{{ seps[0] }}"
    "{% else %}"
    "{{ seps[1] }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


Message = Mapping[str, Any]


def _token_str(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a plain string or a serialized AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_chat_template(model_dir: Path, tokenizer_config: Mapping[str, Any] | None = None) -> str | None:
    """The checkpoint's chat template, looked up where transformers saves it (newest layout first):
    `chat_template.jinja`, `chat_template.json` ({"chat_template": ...}), then `tokenizer_config.json`
    (a string, or a list of named templates of which "default" is used)."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if template is None:
        cfg = tokenizer_config if tokenizer_config is not None else _read_json(model_dir / "tokenizer_config.json")
        template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by the ByteLevel pre-tokenizer/decoder."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """`tokenizers`-backed tokenizer with the special tokens of the checkpoint's config files."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        image_token: str | None = IMAGE_TOKEN,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token  # pad = eos, as in the HF conversion and the DS processor
        self.chat_template = chat_template

        def tid(token: str | None) -> int | None:
            return None if token is None else backend.token_to_id(token)

        self.bos_id, self.eos_id, self.pad_id = tid(bos_token), tid(eos_token), tid(self.pad_token)
        self.image_token_id = tid(image_token)
        self.image_token = image_token if self.image_token_id is not None else None
        vocab = backend.get_vocab(with_added_tokens=True)
        # Ids >= size can never be decoded (the 7B model has 102400 embedding rows but 100016 tokens).
        self.size: int = max(vocab.values()) + 1
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self.special_tokens = tuple(t.content for t in backend.get_added_tokens_decoder().values() if t.special)
        # Byte-level BPE decodes token by token into bytes; this enables the exact streaming path.
        self.byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._bytes_cache: dict[int, bytes] = {}
        self._plain: HFTokenizer | None = None  # copy that encodes special-token strings as text

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `special_tokens_map.json`, chat template files;
        `processor_config.json`'s `image_tag` for the original DeepSeek layout)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception that names no file)
            raise ValueError(f"{path / 'tokenizer.json'}: not a valid tokenizer file ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        smap = _read_json(path / "special_tokens_map.json")

        def special(key: str) -> str | None:
            for source in (cfg, cfg.get("extra_special_tokens") or {}, cfg.get("model_specific_special_tokens") or {}, smap):
                if isinstance(source, Mapping) and _token_str(source.get(key)) is not None:
                    return _token_str(source.get(key))
            return None

        image_token = special("image_token") or _read_json(path / "processor_config.json").get("image_tag") or IMAGE_TOKEN
        return cls(
            backend,
            bos_token=special("bos_token"),
            eos_token=special("eos_token"),
            pad_token=special("pad_token"),
            image_token=image_token,
            chat_template=read_chat_template(path, cfg),
        )

    # ---- encoding / decoding ------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in `text` become their ids. BOS is prepended here rather
        than by the file's post-processor so that exactly one BOS is added whatever the post-processor does
        (for the DeepSeek files the two agree: the post-processor prepends just BOS)."""
        ids = self.backend.encode(valid_unicode(text), add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with special-token strings encoded as ordinary text (for untrusted input)."""
        if self._plain is None:
            plain = HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(valid_unicode(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are skipped."""
        return self.backend.decode([i for i in ids if 0 <= i < self.size], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """Raw bytes that `token_id` contributes to a decode (byte-level tokenizers only). Mirrors the
        `tokenizers` ByteLevel decoder: a token whose every char is in the byte table maps to those bytes,
        any other token (e.g. "<｜end▁of▁sentence｜>") contributes its UTF-8 text."""
        if not self.byte_level:
            raise ValueError("token_bytes needs a byte-level tokenizer")
        if not 0 <= token_id < self.size or (skip_special_tokens and token_id in self._special_ids):
            return b""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            token = self.backend.id_to_token(token_id) or ""
            table = _byte_decoder()
            if all(c in table for c in token):
                cached = bytes(table[c] for c in token)
            else:
                cached = token.encode("utf-8")
            self._bytes_cache[token_id] = cached
        return cached


# --------------------------------------------------------------------------------------------------
# Chat rendering
# --------------------------------------------------------------------------------------------------


def normalize_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Copy of `messages` with every `content` as a list of typed items (a plain string becomes one text item).
    Image items keep their source under "image" / "url" / "path"."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with a 'role' and a 'content'")
        content = message.get("content")
        if content is None:
            items: list[dict[str, Any]] = []
        elif isinstance(content, str):
            items = [{"type": "text", "text": content}]
        else:
            items = []
            for item in content:
                if isinstance(item, str):
                    items.append({"type": "text", "text": item})
                elif isinstance(item, Mapping) and "type" in item:
                    items.append(dict(item))
                else:
                    raise ValueError(f"message {i}: content items must be dicts with a 'type', got {item!r}")
        out.append({**message, "content": items})
    return out


def split_system(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(system prompt, the other messages) of normalized messages. A leading ``system`` message is the system
    prompt: text only, stripped as DeepSeek's own conversation template strips messages; None without one.
    A system message further down is an ordinary message (the template writes it as "System: ...")."""
    if not messages or str(messages[0]["role"]).lower() != "system":
        return None, messages
    items = messages[0]["content"]
    if any(item.get("type") != "text" or not isinstance(item.get("text"), str) for item in items):
        raise ValueError("the system message may hold text only")
    return " ".join(item["text"].strip() for item in items).strip(), messages[1:]


def with_system_prompt(rendered: str, preamble: str, system: str) -> str | None:
    """DeepSeek-VL's template starts every prompt with a fixed system prompt + blank line (``preamble``, what it
    renders for no messages). The system prompt replaces it as DeepSeek's conversation template writes a
    custom one: ``system + "\n\n"``, nothing when empty. None when ``rendered`` does not start with the
    preamble (another template: it must then render the system message itself)."""
    if not preamble or not rendered.startswith(preamble):
        return None
    return (system + "\n\n" if system else "") + rendered[len(preamble):]


def _render_builtin(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """Python equivalent of CHAT_TEMPLATE (used when a checkpoint ships no template)."""
    seps = ("\n\n", EOS_TOKEN)
    parts = [SYSTEM_PROMPT, "\n\n"]
    for i, message in enumerate(messages):
        last = i == len(messages) - 1
        role = str(message["role"])
        content = message["content"]
        if role.lower() == "user":
            parts.append("User: ")
        elif role.lower() == "assistant":
            # A final, empty assistant message without generation prompt renders as "Assistant:" (no space),
            # i.e. the prompt of a continuation.
            empty_final = (
                last and not add_generation_prompt and (not content or (content[0]["type"] == "text" and content[0]["text"] == ""))
            )
            parts.append("Assistant:" if empty_final else "Assistant: ")
        else:
            parts.append(role.capitalize() + ": ")
        for j, item in enumerate(content):
            if item["type"] == "image":
                parts.append(IMAGE_TOKEN)
            elif item["type"] == "text":
                text = item["text"]
                if j == 0:
                    text = text.lstrip()
                if j == len(content) - 1:
                    text = text.rstrip()
                # A text that follows another text item is joined with one space.
                parts.append(" " + text if j > 0 and content[j - 1]["type"] == "text" else text)
        if not last or add_generation_prompt:
            parts.append(seps[0] if role.lower() == "user" else seps[1])
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


@lru_cache(maxsize=8)
def _compile_template(template: str):  # -> jinja2.Template
    """Compile like transformers does: immutable sandbox, trim/lstrip blocks, loopcontrols, same helpers."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


def render_chat(
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    template: str | None = None,
    **template_vars: Any,
) -> str:
    """Prompt text of a conversation. `template` is the checkpoint's Jinja chat template (rendered in a
    sandbox, as transformers does, with `template_vars` such as bos_token/eos_token available); None uses the
    built-in equivalent of the DeepSeek-VL template. Content may be a string or a list of typed items."""
    msgs = normalize_messages(messages)
    if template is None:
        return _render_builtin(msgs, add_generation_prompt)
    return _compile_template(template).render(messages=msgs, add_generation_prompt=add_generation_prompt, **template_vars)


# --------------------------------------------------------------------------------------------------
# Streaming detokenizer
# --------------------------------------------------------------------------------------------------


class StreamingDetokenizer:
    """Turns generated ids into text deltas. A delta never ends inside a multi-byte character: incomplete
    UTF-8 is held back until it completes, and U+FFFD appears only where the bytes are truly invalid (or
    still incomplete at `flush`). ''.join(deltas) == tokenizer.decode(all ids).

    Byte-level tokenizers (DeepSeek) use an incremental UTF-8 decoder over each token's bytes: O(1) per push.
    Other decoders fall back to re-decoding a short window of ids (prefix/read offsets)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.byte_level else None
        # Window fallback state: ids since the last emitted prefix, and how many of them are already emitted.
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly '')."""
        if self._utf8 is not None:
            return self._utf8.decode(self.tokenizer.token_bytes(token_id, self.skip_special_tokens))
        self._ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, self.skip_special_tokens)  # noqa: E731
        # Decoding with a little left context keeps decoders that depend on it (leading-space rules) exact.
        seen = decode(self._ids[self._prefix : self._read])
        text = decode(self._ids[self._prefix :])
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete character: wait for more ids
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 0:  # keep the list short: only the context window is needed from now on
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return text[len(seen) :]

    def flush(self) -> str:
        """Return whatever is still held back (incomplete bytes become U+FFFD) and reset."""
        if self._utf8 is not None:
            out = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return out
        decode = lambda ids: self.tokenizer.decode(ids, self.skip_special_tokens)  # noqa: E731
        out = decode(self._ids[self._prefix :])[len(decode(self._ids[self._prefix : self._read])) :]
        self._ids, self._prefix, self._read = [], 0, 0
        return out

# --------------------------------------------------------------------------------------------------
# Tiny tokenizer (test checkpoints)
# --------------------------------------------------------------------------------------------------

# Built-in training corpus: English (incl. the chat scaffolding so prompts stay short), Chinese and emoji.
# Many CJK characters and every emoji stay un-merged, so they decode from 2-4 byte-level pieces: this is what
# exercises partial-UTF-8 handling in the streaming detokenizer.
_TINY_CORPUS: tuple[str, ...] = (
    SYSTEM_PROMPT,
    "User: Describe this image.\n\nAssistant: The image shows a cat standing on snow.",
    "User: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "User: What's the difference between these two pictures?\n\nAssistant: The first one is a dog, "
    "the second one is a cat. Both are sitting in the garden.",
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.",
    "There is a red car parked next to a blue house, and a small tree in front of the window.",
    "In the photo, two people are walking along the beach at sunset while birds fly over the water.",
    "Please describe the colors, the objects and the text that you can see in this picture.",
    "It is a chart with numbers: 1, 2, 3, 10, 42, 100, 2024 and 3.14 percent.",
    "请描述这张图片。图片中有一只猫站在雪地上。这是一个美丽的花园，里面有很多花和树。",
    "你好！我是一个有用的助手。我可以理解图片的内容，并用自然语言回答你的问题。",
    "图片里有两个人在海边散步，天空是蓝色的。",
    "Emoji: 😀 😂 🐱 🐶 🌸 🚗 ❤️ 👍 🎉 — café naïve résumé Søren Ünïcödé.",
)
_TINY_VOCAB_SIZE = 700


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """DeepSeek-LLM-style pre-tokenizer: isolate newlines, words, punctuation runs, CJK runs, single
    digits; then byte-level mapping without its own regex (the splits above replace it)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\r\n]"), "isolated"),
            pre_tokenizers.Split(Regex(r"\s?\p{L}+"), "isolated"),
            pre_tokenizers.Split(Regex(r"\s?[!-/:-~！-／：-～‘-‟　-。]+"), "isolated"),
            pre_tokenizers.Split(Regex(r"\s+$"), "isolated"),
            pre_tokenizers.Split(Regex(r"[一-龥ࠀ-一가-퟿]+"), "isolated"),
            pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_tiny_tokenizer() -> HFTokenizer:
    """Train the tiny byte-level BPE and add the real special tokens after the learned vocabulary."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        special_tokens=[],
    )
    tok.train_from_iterator(list(_TINY_CORPUS) * 2, trainer=trainer)
    # Same order as the real vocabulary: BOS, EOS, ..., image token. (The real one also has 13 non-special
    # single Latin-1 characters between EOS and the image token; they are left out here because byte-level
    # BPE already holds those characters as byte symbols, so adding them would only make text lossy.)
    tok.add_special_tokens([AddedToken(BOS_TOKEN, special=True, normalized=False)])
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    bos_id = tok.token_to_id(BOS_TOKEN)
    # add_bos_token=true: the real tokenizer prepends BOS through its post-processor.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def tokenizer_config(chat_template_inline: bool = False) -> dict[str, Any]:
    """`tokenizer_config.json` as transformers 5 writes it for the converted checkpoint."""
    cfg: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "model_max_length": 16384,
        "tokenizer_class": "TokenizersBackend",
    }
    if chat_template_inline:
        cfg["chat_template"] = CHAT_TEMPLATE
    return cfg


def write_tiny_tokenizer(out_dir: Path) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` for a tiny tokenizer
    with the real special tokens (the chat template is written by `dsvl.processor.write_processor_files`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "image_token": IMAGE_TOKEN},
    )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
