"""The KV cache memory budget, emulated on CPU with a budget of three blocks on the tiny checkpoint: many sessions,
reserved bytes never above the budget, recent sessions reuse their prefix, evicted ones recompute correctly, a
request that cannot fit even alone is refused before prefill."""

from __future__ import annotations

import pytest

import dsvl
import dsvl.kvpool
from dsvl.kvpool import KVMemoryError, KVPool, parse_budget

GREEDY = dict(temperature=0.0, repetition_penalty=1.0, stop=(), max_new_tokens=8)
BLOCK = 128  # tokens per cache block in these tests (smaller than the real one: short prompts, quick tests)
BUDGET = 3 * BLOCK * 1024  # three blocks of the tiny model (1 KiB per token)


def user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.mark.parametrize("spec, want", [("6GB", 6 * 10**9), ("512MiB", 512 * 2**20), (" 1.5 gb ", 1.5e9),
                                        ("0.5", 0.5), (1.0, 1.0), (4096, 4096), ("auto", None), (None, None)])
def test_parse_budget(spec, want):
    assert parse_budget(spec) == want


@pytest.mark.parametrize("spec", ["-1GB", "0", "lots", "6 parsecs", "1e9"])
def test_parse_budget_refuses_nonsense(spec):
    with pytest.raises(ValueError, match="KV cache memory"):
        parse_budget(spec)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return dsvl.load(str(tiny_checkpoint), device="cpu", dtype="float32")  # default budget: room for everything


@pytest.fixture()
def small(tiny_checkpoint, monkeypatch):
    """An engine whose KV budget holds three blocks; every allocation is checked against the budget."""
    monkeypatch.setattr(dsvl.kvpool, "BLOCK_TOKENS", BLOCK)
    e = dsvl.load(str(tiny_checkpoint), device="cpu", dtype="float32", kv_cache_memory=BUDGET)
    pool: KVPool = e._kv
    assert pool.token_bytes == 1024  # tiny: 2 layers x K,V x 4 heads x 16 x 4 bytes
    alloc = pool._alloc

    def checked(batch, size):
        assert pool.reserved_bytes + batch * size * pool.token_bytes <= pool.budget_bytes
        return alloc(batch, size)

    monkeypatch.setattr(pool, "_alloc", checked)
    return e


def test_many_sessions_stay_within_the_budget(small, reference):
    convs = {f"s{i}": [user(f"Question number {i}: what is {i} plus {i}?")] for i in range(8)}
    replies = {}
    for sid, conv in convs.items():
        replies[sid] = small.generate(conv, session_id=sid, **GREEDY)
        st = small.kv_stats()
        assert st["kv_reserved_bytes"] <= st["kv_budget_bytes"] == BUDGET
        assert st["sessions_cached"] <= 3
    assert small.sessions == ["s5", "s6", "s7"]  # least recently used evicted first
    assert small.kv_stats()["kv_evictions"] == 5

    # A recent session reuses its prefix (and the ids it generated), as a session of an unconstrained engine does;
    # an evicted one recomputes the conversation from its text, as a fresh request does.
    for sid, reused in (("s7", True), ("s0", False)):
        follow = convs[sid] + [assistant(replies[sid]), user("And why is that?")]
        s = small.stream(follow, session_id=sid, **GREEDY)
        text = "".join(s)
        assert (s.stats.reused_tokens > 0) is reused
        if reused:
            assert reference.generate(convs[sid], session_id="ref", **GREEDY) == replies[sid]
            assert text == reference.generate(follow, session_id="ref", **GREEDY)
            reference.end_session("ref")
        else:
            assert text == reference.generate(follow, **GREEDY)
    assert small.kv_stats()["kv_reserved_bytes"] <= small.kv_budget_bytes


def test_a_session_grows_its_cache_and_keeps_its_prefix(small, reference):
    conv = [user("Tell me a long story.")]
    first = small.generate(conv, session_id="g", **GREEDY)
    assert reference.generate(conv, session_id="ref", **GREEDY) == first
    assert small._kv.sessions["g"].cache.max_len == BLOCK
    follow = conv + [assistant(first), user("Go on.")]
    long = dict(GREEDY, max_new_tokens=48)
    s = small.stream(follow, session_id="g", **long)
    assert BLOCK < s.prompt_tokens + 48 <= 2 * BLOCK  # needs a second block
    text = "".join(s)
    assert s.stats.reused_tokens > 0 and small._kv.sessions["g"].cache.max_len == 2 * BLOCK
    assert text == reference.generate(follow, session_id="ref", **long)
    reference.end_session("ref")


def test_a_request_that_cannot_fit_alone_is_refused_before_prefill(small):
    small.generate([user("Hello")], session_id="keep", **GREEDY)
    with pytest.raises(KVMemoryError, match=r"KV cache memory is 0\.00 GB, room for 384 tokens"):
        small.stream([user("Hello")], session_id="big", **dict(GREEDY, max_new_tokens=3 * BLOCK + 1))
    assert small.sessions == ["keep"]  # nothing was evicted for it
    with pytest.raises(KVMemoryError):
        small.generate([[user("a")], [user("b")]], **dict(GREEDY, max_new_tokens=BLOCK + 10))
    assert small.generate([user("Hello")], session_id="keep", **GREEDY)  # still serving
    assert isinstance(KVMemoryError("x"), dsvl.ContextOverflowError)  # apps show it as a plain-words refusal


def test_summary_names_the_budget(small):
    assert small.kv_summary() == ("KV cache memory 0.00 GB = 0.1 full-length conversations of 4,096 tokens")
