"""dsvl.text: tiny tokenizer files (loadable by transformers with identical ids), Tokenizer wrapper,
chat rendering (golden cases, Jinja and built-in paths) and the streaming detokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from dsvl.text import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IMAGE_TOKEN,
    StreamingDetokenizer,
    Tokenizer,
    render_chat,
    write_tiny_tokenizer,
)

# Golden prompts: the reference chat template's renderings, copied into tests/data.
CASES = json.loads((Path(__file__).parent / "data" / "chat-format-cases.json").read_text(encoding="utf-8"))
assert len(CASES) >= 9

TEXTS = [
    "Describe this image.",
    "请描述这张图片。图片中有一只猫站在雪地上。",
    "Emoji 😀🐱 and ❤️ plus 🦜 (never seen in training) 𝔘𝔫𝔦",
    "  leading and trailing   \n\n spaces\t",
    "Numbers 1234567 and café naïve Søren",
    f"{BOS_TOKEN}special{EOS_TOKEN} inside {IMAGE_TOKEN}text",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(processor_files: Path) -> Path:
    return processor_files


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_files(tok_dir: Path):
    assert {p.name for p in tok_dir.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
    }
    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert 256 < raw.get_vocab_size() <= 1100
    added = {t.content: (i, t.special) for i, t in raw.get_added_tokens_decoder().items()}
    assert {BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN} <= set(added) and all(s for _, s in added.values())
    bos = added[BOS_TOKEN][0]
    assert raw.encode("hi").ids[0] == bos  # BOS from the post-processor, like add_bos_token: true
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] == BOS_TOKEN and cfg["eos_token"] == cfg["pad_token"] == EOS_TOKEN
    assert cfg["add_bos_token"] is True
    assert (tok_dir / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    # deterministic: two writes give identical files
    other = tok_dir.parent / "again"
    write_tiny_tokenizer(other)
    assert (other / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_transformers_tokenizer_gives_same_ids(tok_dir: Path, tok: Tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.eos_id)
    assert hf.convert_tokens_to_ids(hf.image_token) == tok.image_token_id
    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == raw.encode(text).ids == tok.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_special_ids_come_from_files(tok_dir: Path, tok: Tokenizer):
    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.bos_id == raw.token_to_id(BOS_TOKEN)
    assert tok.eos_id == tok.pad_id == raw.token_to_id(EOS_TOKEN)
    assert tok.image_token == IMAGE_TOKEN and tok.image_token_id == raw.token_to_id(IMAGE_TOKEN)
    assert tok.size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.chat_template == CHAT_TEMPLATE


def test_tokenizer_config_variants(tok_dir: Path, tmp_path: Path):
    """AddedToken dicts, template inside tokenizer_config / chat_template.json, original `image_tag`."""
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    cfg = {
        "bos_token": {"__type": "AddedToken", "content": BOS_TOKEN},
        "eos_token": {"__type": "AddedToken", "content": EOS_TOKEN},
        "chat_template": [{"name": "default", "template": "{{ messages[0]['role'] }}"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_tag": IMAGE_TOKEN}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.bos_token == BOS_TOKEN and t.pad_id == t.eos_id and t.image_token == IMAGE_TOKEN
    assert t.chat_template == "{{ messages[0]['role'] }}"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json-template"}))
    assert Tokenizer.from_dir(tmp_path).chat_template == "json-template"
    for name in ("chat_template.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    assert Tokenizer.from_dir(tmp_path).chat_template is None


def test_encode_decode(tok: Tokenizer):
    ids = tok.encode("Describe this image.")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.encode("Describe this image.", add_bos=False) == ids[1:]
    assert tok.decode(ids) == "Describe this image."
    assert tok.decode(ids, skip_special_tokens=False) == BOS_TOKEN + "Describe this image."
    assert tok.decode([*ids, tok.size, tok.size + 5000]) == "Describe this image."  # undecodable ids skipped
    assert tok.encode(IMAGE_TOKEN, add_bos=False) == [tok.image_token_id]
    plain = tok.encode_plain(IMAGE_TOKEN)
    assert tok.image_token_id not in plain and tok.decode(plain) == IMAGE_TOKEN


def test_multibyte_characters_split_into_byte_tokens(tok: Tokenizer):
    """The tiny vocabulary leaves emoji/rare CJK as partial UTF-8 pieces: the streaming tests rely on it."""
    for text in ("😀", "请描述", "🦜"):
        pieces = [tok.token_bytes(i) for i in tok.encode(text, add_bos=False)]
        assert any(_invalid_utf8(p) for p in pieces), text


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# ---------------------------------------------------------------------------------------------------
# Chat rendering
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("path", ["jinja", "builtin"])
def test_golden_chat_cases(case, path, tok: Tokenizer):
    template = tok.chat_template if path == "jinja" else None
    assert template is not None or path == "builtin"
    rendered = render_chat(case["messages"], case["add_generation_prompt"], template)
    assert rendered == case["rendered"]


EXTRA_CONVERSATIONS = [
    ([{"role": "user", "content": "plain string  "}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": ""}]}], False),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Partial answer"}], False),
    (
        [
            {"role": "user", "content": [{"type": "image", "url": "x"}, {"type": "text", "text": " a "},
                                         {"type": "text", "text": " b "}, {"type": "image", "path": "y"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "USER", "content": "again"},
        ],
        True,
    ),
]


@pytest.mark.parametrize("messages,gen", EXTRA_CONVERSATIONS)
def test_builtin_equals_jinja(messages, gen, tok: Tokenizer):
    assert render_chat(messages, gen) == render_chat(messages, gen, tok.chat_template)


def test_render_details():
    assert render_chat([{"role": "user", "content": "Hi"}]) == render_chat(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    )
    # final empty assistant message without generation prompt: "Assistant:" with no space (a continuation)
    end = render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], False)
    assert end.endswith("User: Hi\n\nAssistant:")
    assert "System: Be brief.<｜end▁of▁sentence｜>User:" in render_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]
    )
    with pytest.raises(ValueError):
        render_chat([{"content": "no role"}])


def test_jinja_is_sandboxed():
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        render_chat([{"role": "user", "content": "x"}], template="{{ messages.__class__.__mro__ }}")
    assert render_chat([{"role": "user", "content": "x"}], template="{{ bos_token }}", bos_token="B") == "B"


# ---------------------------------------------------------------------------------------------------
# Streaming detokenizer
# ---------------------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    det = StreamingDetokenizer(tok, **kw)
    return [det.push(i) for i in ids] + [det.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_reassembles_exactly(tok: Tokenizer, text: str):
    ids = tok.encode(text) + [tok.eos_id]
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text.replace(BOS_TOKEN, "").replace(EOS_TOKEN, "").replace(IMAGE_TOKEN, "")
    assert not any("\ufffd" in d for d in deltas)  # valid text: no replacement char ever
    joined = "".join(_stream(tok, ids, skip_special_tokens=False))
    assert joined == tok.decode(ids, skip_special_tokens=False)


def test_stream_holds_back_partial_characters(tok: Tokenizer):
    ids = tok.encode("a😀", add_bos=False)
    det = StreamingDetokenizer(tok)
    deltas = [det.push(i) for i in ids]
    assert deltas[0] == "a" and "".join(deltas) == "a😀"
    assert "" in deltas  # at least one id was held back because it ended inside the emoji
    assert det.flush() == ""


def test_stream_invalid_bytes(tok: Tokenizer):
    byte_id = {b: next(i for i in range(tok.size) if tok.token_bytes(i) == bytes([b])) for b in (0xF0, 0x9F, 0xFF, 0x61)}
    # truncated 4-byte sequence at the end: held back, U+FFFD only at flush
    ids = [byte_id[0x61], byte_id[0xF0], byte_id[0x9F]]
    det = StreamingDetokenizer(tok)
    assert [det.push(i) for i in ids] == ["a", "", ""]
    assert det.flush() == "\ufffd"
    assert "a\ufffd" == tok.decode(ids)
    # a truly invalid byte in the middle shows up as U+FFFD, exactly as in the full decode
    ids = [byte_id[0x61], byte_id[0xFF], byte_id[0x61], byte_id[0xF0], byte_id[0x61]]
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "a\ufffda\ufffda"


def test_stream_is_incremental(tok: Tokenizer, monkeypatch):
    """Byte-level path: push never re-decodes the sequence (O(1) per token)."""
    ids = tok.encode("请描述这张图片。😀 " * 50)

    def no_full_decode(*args, **kwargs):
        raise AssertionError("push must not decode the whole sequence")

    det = StreamingDetokenizer(tok)
    monkeypatch.setattr(tok, "decode", no_full_decode)
    text = "".join(det.push(i) for i in ids) + det.flush()
    monkeypatch.undo()
    assert text == tok.decode(ids)


def test_stream_window_fallback_for_other_decoders(tok_dir: Path):
    """A tokenizer whose decoder is not plain ByteLevel uses the re-decode window: same guarantees."""
    backend = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    backend.decoder = decoders.Sequence([decoders.ByteLevel()])
    t = Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    assert not t.byte_level
    for text in TEXTS:
        ids = t.encode(text) + [t.eos_id]
        deltas = _stream(t, ids)
        assert "".join(deltas) == t.decode(ids)
        assert not any("\ufffd" in d for d in deltas)
    det = StreamingDetokenizer(t)
    long_ids = t.encode("请描述这张图片。😀 " * 30)
    for i in long_ids:
        det.push(i)
        assert len(det._ids) <= 8  # only a short window is kept
