"""The system prompt: a leading ``system`` message replaces the chat template's fixed one (as DeepSeek's own
conversation template writes a custom system prompt), the checkpoint's default gives the very same ids as no
system message, typed control tokens stay text, other system messages still render like the reference
template, and in the engine a changed system prompt re-prefills while an unchanged one reuses the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

import dsvl
from dsvl.processor import Processor
from dsvl.text import EOS_TOKEN, SYSTEM_PROMPT, render_chat

GREEDY = dict(temperature=0.0, repetition_penalty=1.0, stop=())


@pytest.fixture(scope="module")
def proc(processor_files: Path) -> Processor:
    return Processor.from_dir(processor_files)


def user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


CONV = [user("Hi"), {"role": "assistant", "content": "Hello."}, user("Describe it.")]


@pytest.mark.parametrize("template", ["checkpoint", "builtin"])
def test_default_is_the_checkpoints_and_changes_nothing(proc, template):
    p = Processor(proc.tokenizer, proc.image_processor)
    if template == "builtin":
        p.chat_template = None  # the built-in Python equivalent, used when a checkpoint ships no template
    assert p.default_system_prompt == SYSTEM_PROMPT
    plain = p.prepare(CONV)
    assert p.prepare([system(SYSTEM_PROMPT), *CONV]).token_ids == plain.token_ids
    assert p.prepare([system(f"  {SYSTEM_PROMPT}\n"), *CONV]).token_ids == plain.token_ids  # stripped
    custom = p.prepare([system("  Answer in French.  "), *CONV])
    assert custom.text == "Answer in French.\n\n" + plain.text.removeprefix(SYSTEM_PROMPT + "\n\n")
    assert custom.token_ids != plain.token_ids
    assert p.prepare([system(""), *CONV]).text.startswith("User: Hi\n\nAssistant: Hello.")  # empty: none at all


def test_control_tokens_in_the_system_prompt_are_text(proc):
    p = proc.prepare([system(f"Say {EOS_TOKEN} never"), user("Hi")])
    assert proc.tokenizer.eos_id not in p.token_ids
    assert proc.tokenizer.decode(p.token_ids[1:]).startswith(f"Say {EOS_TOKEN} never\n\nUser: Hi")


def test_bad_system_messages(proc):
    with pytest.raises(ValueError, match="text only"):
        proc.prepare([{"role": "system", "content": [{"type": "image", "path": "x.png"}]}, user("Hi")])
    with pytest.raises(ValueError, match="empty"):
        proc.prepare([system("Only a system prompt")])


SYSTEM_ITEMS = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}  # transformers needs a list


@pytest.mark.parametrize("conv", [
    [user("Hi"), SYSTEM_ITEMS, user("Again")],  # not leading: an ordinary message
    [SYSTEM_ITEMS, user("Hi")],
], ids=["middle", "leading"])
def test_render_chat_with_system_messages_equals_the_reference_template(proc, processor_files, conv):
    """`render_chat` is the template (what the golden cases check); only `prepare` treats a leading system
    message as the system prompt."""
    from transformers import AutoProcessor

    want = AutoProcessor.from_pretrained(processor_files).apply_chat_template(conv, add_generation_prompt=True,
                                                                             tokenize=False)
    assert render_chat(conv, True, proc.chat_template) == render_chat(conv, True) == want
    assert "System: Be brief.<｜end▁of▁sentence｜>User: " in want
    if conv[0]["role"] != "system":
        assert proc.prepare(conv).text == want


def test_engine_reprefills_on_a_new_system_prompt_and_reuses_on_the_same(tiny_checkpoint):
    engine = dsvl.load(str(tiny_checkpoint), device="cpu", dtype="float32", max_context_tokens=2048)
    first = [system("Be brief."), user("Hi")]

    def turn(messages):
        s = engine.stream(messages, session_id="s", max_new_tokens=4, **GREEDY)
        text = "".join(s)
        return text, s.stats

    answer, st0 = turn(first)
    assert st0.reused_tokens == 0 and st0.prefilled_tokens == st0.prompt_tokens
    follow = [*first, {"role": "assistant", "content": answer}, user("And then?")]
    _, st = turn(follow)  # same system prompt: the first turn comes from the cache, the new question is prefilled
    assert st.reused_tokens >= st0.prompt_tokens and st.prefilled_tokens < st.prompt_tokens - st0.prompt_tokens
    changed = [system("Answer in French."), *follow[1:]]
    _, st = turn(changed)  # the system prompt comes first: everything after BOS is prefilled again
    assert st.reused_tokens <= 1 and st.prefilled_tokens >= st.prompt_tokens - 1
