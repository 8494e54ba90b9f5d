"""Engine: streaming, sampling, stop strings, cancellation, concurrency, follow-up turns from the session cache,
batches and fault recovery, on the tiny random checkpoint (float32, CPU).

Random weights produce gibberish, but deterministic gibberish: greedy ids are compared exactly against a plain
full-recompute loop and against transformers' ``generate`` on the same checkpoint.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

import dsvl
from dsvl.generation import Engine
from dsvl.sampling import SamplingParams, StopStringFilter, sample
from dsvl.sessions import Reply, Session, image_runs, position_keys, reusable_prefix, splice_replies

GREEDY = dict(temperature=0.0, repetition_penalty=1.0, stop=())


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> Engine:
    return dsvl.load(str(tiny_checkpoint), device="cpu", dtype="float32", max_context_tokens=2048)


@pytest.fixture(scope="module")
def images() -> tuple[Image.Image, Image.Image]:
    a = Image.new("RGB", (64, 48), (200, 30, 30))
    b = Image.linear_gradient("L").convert("RGB").resize((80, 60))
    return a, b


def user(text: str, image: Image.Image | None = None) -> dict:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


_FEATURES: dict[int, torch.Tensor] = {}


def plain_greedy(engine: Engine, ids: list[int], imgs: list[Image.Image], n: int) -> list[int]:
    """Reference: recompute the whole sequence every step, no cache; mask ids the tokenizer cannot decode."""
    model = engine.model
    feats = None
    if imgs:
        for im in imgs:
            if id(im) not in _FEATURES:
                _FEATURES[id(im)] = model.get_image_features(*engine.processor.image_processor([im]))[0]
        feats = torch.stack([_FEATURES[id(im)] for im in imgs])
    x = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            h = model.model.language_model(model.embed(x, feats), torch.arange(x.shape[1])[None])
            logits = model.lm_head(h[:, -1]).float()
            logits[:, engine.tokenizer.size:] = float("-inf")
            t = int(logits.argmax(-1))
            out.append(t)
            if t == engine.eos_id:
                break
            x = torch.cat([x, torch.tensor([[t]])], 1)
    return out


# ---- streaming basics --------------------------------------------------------------------------------------------

def test_stream_deltas_join_to_generate_and_stats(engine, images):
    conv = [user("Describe this image.", images[0])]
    s = engine.stream(conv, max_new_tokens=12, **GREEDY)
    assert s.prompt_tokens > 576 and s.dropped_turns == 0  # prepared eagerly, before iterating
    deltas = list(s)
    text = "".join(deltas)
    assert text == engine.generate(conv, max_new_tokens=12, **GREEDY)
    assert text == engine.tokenizer.decode(s.generated_ids)
    st = s.stats
    assert st.stop_reason == "max_new_tokens" and st.new_tokens == 12 == len(s.generated_ids)
    assert st.prompt_tokens == s.prompt_tokens == st.prefilled_tokens and st.reused_tokens == 0
    assert st.images_encoded + st.images_from_cache == 1
    assert 0 < st.ttft_s and st.decode_tokens_per_s > 0 and len(st.token_times) == 12
    assert all(0 <= t < engine.tokenizer.size for t in s.generated_ids)


def test_greedy_equals_full_recompute_loop(engine, images):
    conv = [user("Describe this image.", images[0])]
    s = engine.stream(conv, max_new_tokens=16, **GREEDY)
    list(s)
    prompt = engine.processor.prepare(conv)
    assert s.token_ids == prompt.token_ids
    assert s.generated_ids == plain_greedy(engine, prompt.token_ids, [images[0]], 16)


def test_greedy_equals_transformers_generate(engine, images, tiny_checkpoint):
    import transformers
    ref = transformers.DeepseekVLHybridForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    ref.eval()
    size = engine.tokenizer.size

    class MaskUndecodable(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, size:] = float("-inf")
            return scores

    conv = [user("What is in the picture?", images[0])]
    prompt = engine.processor.prepare(conv)
    pv, hpv = engine.processor.image_processor(prompt.images)
    for penalty in (1.0, 1.3):
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([prompt.token_ids]), pixel_values=pv, high_res_pixel_values=hpv,
                               attention_mask=torch.ones(1, len(prompt.token_ids), dtype=torch.long),
                               max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                               logits_processor=[MaskUndecodable()], eos_token_id=engine.eos_id,
                               pad_token_id=engine.pad_id)
        want = out[0, len(prompt.token_ids):].tolist()
        s = engine.stream(conv, max_new_tokens=12, temperature=0.0, repetition_penalty=penalty, stop=())
        list(s)
        got = s.generated_ids + ([engine.eos_id] if s.stats.stop_reason == "eos" else [])
        assert got == want, f"repetition_penalty={penalty}"


def test_stop_string_stops_and_is_never_emitted(engine):
    conv = [user("What is the capital of France?")]
    kw = dict(max_new_tokens=24, temperature=0.0, repetition_penalty=1.3)
    full = engine.generate(conv, stop=(), **kw)
    # A 3-character stop string that first occurs well inside the reply.
    stop = next(full[i:i + 3] for i in range(6, len(full) - 3) if full.find(full[i:i + 3]) == i)
    s = engine.stream(conv, stop=(stop, "never-seen"), **kw)
    deltas = list(s)
    assert "".join(deltas) == full[:full.find(stop)]
    assert s.stats.stop_reason == "stop_string" and s.stats.new_tokens < 24
    assert not any(stop in d for d in deltas)


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(["User:"])
    assert f.push("Hello U") == "Hello "
    assert f.push("s") == ""
    assert f.push("ual") == "Usual"  # the held-back prefix turned out not to be a stop string
    assert f.push(" text\nUse") == " text\n"
    assert f.push("r: more") == "" and f.stopped and f.text == "Hello Usual text\n"
    g = StopStringFilter(["User:"])
    assert g.push("ends with Us") == "ends with " and g.finish() == "Us"


def test_eos_stops_the_reply(engine):
    conv = [user("What is the capital of France?")]
    s = engine.stream(conv, max_new_tokens=10, **GREEDY)
    list(s)
    ids = s.generated_ids
    third = ids[2]
    first = ids.index(third)  # the earliest occurrence is where the "EOS" will hit
    eos = engine.eos_id
    engine.eos_id = third  # make greedy produce the engine's EOS id at a known step
    try:
        s2 = engine.stream(conv, max_new_tokens=10, **GREEDY)
        text = "".join(s2)
    finally:
        engine.eos_id = eos
    assert s2.stats.stop_reason == "eos" and s2.stats.new_tokens == first + 1
    assert s2.generated_ids == ids[:first] and text == engine.tokenizer.decode(ids[:first])


def test_seed_reproducible_sampling(engine):
    conv = [user("Tell me a story.")]
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1, stop=())
    a = engine.generate(conv, seed=1234, **kw)
    assert a == engine.generate(conv, seed=1234, **kw)
    assert a != engine.generate(conv, seed=4321, **kw)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    top_k = {int(sample(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0), None,
                        g)) for _ in range(200)}
    assert top_k == {0, 1}
    # softmax([4,3,2,...]) = .64, .24, .09, ...: top_p 0.8 keeps exactly the first two.
    top_p = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.0), None, g))
             for _ in range(200)}
    assert top_p == {0, 1}
    seen = torch.tensor([[True, False, False, False, False, True]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert int(sample(torch.tensor([[4.0, 3.0, 0, 0, 0, -1.0]]), p, seen, None)) == 1  # 4/2 < 3


# ---- cancellation --------------------------------------------------------------------------------------------------

def _lock_free(engine: Engine) -> bool:
    if engine._lock.acquire(timeout=5):
        engine._lock.release()
        return True
    return False


def test_close_stops_within_one_step_and_frees_engine(engine):
    conv = [user("Describe a long story.")]
    s = engine.stream(conv, max_new_tokens=200, **GREEDY)
    next(s)
    n = s.stats.new_tokens
    s.close()
    assert s.stats.stop_reason == "cancelled" and s.stats.new_tokens == n
    assert list(s) == [] and _lock_free(engine)
    _assert_next_request_runs(engine, conv, 3)


def _assert_next_request_runs(engine: Engine, conv, n: int) -> None:
    """A new request on the engine runs to its full length (stop strings off, so only EOS could end it early)."""
    nxt = engine.stream(conv, max_new_tokens=n, **GREEDY)
    "".join(nxt)
    assert nxt.stats.stop_reason in ("max_new_tokens", "eos"), nxt.stats
    assert nxt.stats.new_tokens == n or nxt.stats.stop_reason == "eos", nxt.stats


def test_cancel_event_from_another_thread(engine):
    cancel = threading.Event()
    conv = [user("Describe a long story.")]
    s = engine.stream(conv, max_new_tokens=400, cancel=cancel, **GREEDY)
    counts = []

    def consume():
        for _ in s:
            if not counts:
                counts.append(s.stats.new_tokens)
                cancel.set()  # as the app's Stop handler would, from its own thread
                counts.append(s.stats.new_tokens)

    t = threading.Thread(target=consume)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert s.stats.stop_reason == "cancelled"
    assert s.stats.new_tokens <= counts[1] + 1  # at most the step that was already running
    assert _lock_free(engine)


def test_generator_close_from_another_thread_runs_finally_and_frees(engine):
    """Gradio closes the app's generator on Stop; its ``finally`` closes the stream."""
    conv = [user("Describe a long story.")]
    streams = []

    def chat_fn():
        s = engine.stream(conv, max_new_tokens=400, **GREEDY)
        streams.append(s)
        try:
            text = ""
            for delta in s:
                text += delta
                yield text
        finally:
            s.close()

    gen = chat_fn()
    next(gen)
    closer = threading.Thread(target=gen.close)
    closer.start()
    closer.join(10)
    s = streams[0]
    assert s.stats.stop_reason == "cancelled" and s.stats.new_tokens < 400
    assert _lock_free(engine)
    _assert_next_request_runs(engine, conv, 2)


def test_close_while_a_step_runs_in_another_thread(engine):
    conv = [user("Describe a long story.")]
    s = engine.stream(conv, max_new_tokens=400, **GREEDY)
    started = threading.Event()

    def consume():
        for _ in s:
            started.set()
            time.sleep(0.01)

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(30)
    s.close()  # the consumer is inside next() at times: the event stops it at the next step
    n = s.stats.new_tokens
    t.join(30)
    assert not t.is_alive() and s.stats.stop_reason == "cancelled"
    assert s.stats.new_tokens <= n + 1 and _lock_free(engine)


def test_same_thread_second_stream_is_refused_not_deadlocked(engine):
    conv = [user("Hi")]
    s1 = engine.stream(conv, max_new_tokens=50, **GREEDY)
    next(s1)
    s2 = engine.stream(conv, max_new_tokens=5, **GREEDY)
    with pytest.raises(RuntimeError, match="already has an open stream"):
        next(s2)
    s1.close()
    assert "".join(engine.stream(conv, max_new_tokens=5, **GREEDY))


# ---- concurrency -----------------------------------------------------------------------------------------------

def test_concurrent_streams_equal_sequential(engine, images):
    convs = [[user("What is the capital of France?")], [user("Describe this image.", images[0])],
             [user("Tell me about the garden.")]]
    seq = [engine.generate(c, session_id=f"seq{i}", max_new_tokens=10, **GREEDY) for i, c in enumerate(convs)]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = "".join(engine.stream(convs[i], session_id=f"par{i}", max_new_tokens=10, **GREEDY))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(convs))] == seq
    for i in range(len(convs)):
        engine.end_session(f"seq{i}")
        engine.end_session(f"par{i}")


# ---- follow-up turns ---------------------------------------------------------------------------------------------

def test_follow_up_with_given_history_equals_cold_run(engine, images):
    """Prefix reuse (lower-right causal mask over the cached prefix) gives the cold run's greedy output."""
    first = [user("Describe this image.", images[0])]
    list(engine.stream(first, session_id="given", max_new_tokens=4, **GREEDY))
    conv = first + [assistant("The image shows a cat standing on snow."), user("What color is it?")]
    warm = engine.stream(conv, session_id="given", max_new_tokens=12, **GREEDY)
    text = "".join(warm)
    cold = engine.stream(conv, max_new_tokens=12, **GREEDY)
    assert text == "".join(cold) and warm.generated_ids == cold.generated_ids
    assert warm.stats.images_encoded == 0 and warm.stats.images_from_cache == 0
    assert warm.stats.reused_tokens > 600 and warm.stats.prefilled_tokens == warm.stats.prompt_tokens - \
        warm.stats.reused_tokens < 40
    assert cold.stats.prefilled_tokens == cold.stats.prompt_tokens  # anonymous requests start cold
    engine.end_session("given")


def test_follow_up_after_generated_reply_prefills_only_new_tokens(engine, images):
    first = [user("Describe this image.", images[0])]
    s1 = engine.stream(first, session_id="gen", max_new_tokens=10, **GREEDY)
    reply = "".join(s1)
    conv = first + [assistant(reply), user("And the colors?")]
    s2 = engine.stream(conv, session_id="gen", max_new_tokens=10, **GREEDY)
    list(s2)
    st1, st2 = s1.stats, s2.stats
    # The generated ids (not a re-tokenisation of the reply) are in the sequence: nothing before them re-runs.
    assert s2.token_ids[:st1.prompt_tokens + len(s1.generated_ids)] == s1.token_ids + s1.generated_ids
    # Cached: prompt + every generated token but the last sampled one (never fed back).
    assert st2.reused_tokens == st1.prompt_tokens + st1.new_tokens - 1
    assert st2.prefilled_tokens == st2.prompt_tokens - st2.reused_tokens
    new_text_tokens = len(engine.tokenizer.encode("User: And the colors?\n\nAssistant:", add_bos=False))
    assert st2.prefilled_tokens <= new_text_tokens + 3  # + the reply's last token and its EOS
    assert st2.images_encoded == 0 and st2.images_from_cache == 0
    # Same ids, computed from scratch: identical greedy output.
    assert s2.generated_ids == plain_greedy(engine, s2.token_ids, [images[0]], 10)
    engine.end_session("gen")


def test_different_image_at_same_place_is_not_served_from_stale_cache(engine, images):
    a, b = images
    first = [user("Describe this image.", a)]
    reply = "".join(engine.stream(first, session_id="swap", max_new_tokens=6, **GREEDY))
    conv = [user("Describe this image.", b), assistant(reply), user("And now?")]
    warm = engine.stream(conv, session_id="swap", max_new_tokens=10, **GREEDY)
    list(warm)
    assert warm.stats.reused_tokens == warm.token_ids.index(engine.config.image_token_id)  # text before the image
    assert warm.stats.images_encoded + warm.stats.images_from_cache == 1
    cold = engine.stream(conv, max_new_tokens=10, **GREEDY)
    list(cold)
    assert warm.generated_ids == cold.generated_ids
    assert warm.generated_ids == plain_greedy(engine, warm.token_ids, [b], 10)
    engine.end_session("swap")


def test_image_features_are_cached_across_requests(engine, images):
    conv = [user("Describe this image.", images[1])]
    list(engine.stream(conv, max_new_tokens=2, **GREEDY))
    s = engine.stream([user("Another question about it.", images[1])], max_new_tokens=2, **GREEDY)
    list(s)
    assert s.stats.images_encoded == 0 and s.stats.images_from_cache == 1


def test_prefix_helpers():
    img = 9
    ids = [1, 2] + [img] * 4 + [3, 4] + [img] * 8 + [5]
    keys = position_keys(ids, ["A", "B", "C"], img, 4)
    assert image_runs(ids, img, 4) == [2, 8, 12] and keys[2] == "A" and keys[8] == "B" and keys[12] == "C"
    sess = Session(cache=None, ids=list(ids), keys=list(keys))
    other = position_keys(ids, ["A", "B", "X"], img, 4)
    assert reusable_prefix(ids, keys, sess, image_runs(ids, img, 4), 4) == len(ids) - 1
    assert reusable_prefix(ids, other, sess, image_runs(ids, img, 4), 4) == 12  # stops at the changed image
    sess.ids, sess.keys = ids[:10], keys[:10]  # cache ends inside image B: restart at its first token
    assert reusable_prefix(ids, keys, sess, image_runs(ids, img, 4), 4) == 8


def test_splice_replaces_retokenised_reply_by_generated_ids():

    eos = 0
    sess = Session(cache=None, ids=[1, 2, 3, 7, 8], keys=[None] * 5, replies=[Reply(3, [7, 8], "ab")])
    decode = {(78,): "ab", (78, 9): "ab c"}.get
    ids = [1, 2, 3, 78, eos, 4, 5]
    out, keys, kept = splice_replies(ids, [None] * 7, sess, eos, lambda x: decode(tuple(x), "?"))
    assert out == [1, 2, 3, 7, 8, eos, 4, 5] and len(keys) == len(out) and len(kept) == 1
    ids2 = [1, 2, 3, 78, 9, eos, 4]  # the history's reply text differs: keep the new prompt as is
    out2, _, kept2 = splice_replies(ids2, [None] * 7, sess, eos, lambda x: decode(tuple(x), "?"))
    assert out2 == ids2 and kept2 == []


# ---- batch -------------------------------------------------------------------------------------------------------

def test_batch_equals_one_by_one(engine, images):
    convs = [[user("What is the capital of France?")],
             [user("Describe this image.", images[0])],
             [user("Hi"), assistant("Hello! How can I help?"), user("Describe the garden in detail.")]]
    one = [engine.generate(c, max_new_tokens=10, **GREEDY) for c in convs]
    batch = engine.generate(convs, max_new_tokens=10, **GREEDY)
    assert batch == one


# ---- failures ----------------------------------------------------------------------------------------------------

def test_oom_fault_injection_recovers(engine, monkeypatch):
    conv = [user("What is the capital of France?")]
    want = engine.generate(conv, session_id="oom", max_new_tokens=8, **GREEDY)
    monkeypatch.setenv("DSVL_FAULT_INJECT", "oom_at_decode_step=3")
    s = engine.stream(conv + [assistant(want), user("More?")], session_id="oom", max_new_tokens=8, **GREEDY)
    with pytest.raises(torch.OutOfMemoryError):
        list(s)
    assert s.stats.stop_reason == "error" and s.stats.new_tokens == 3
    assert "oom" not in engine.sessions and _lock_free(engine)
    monkeypatch.delenv("DSVL_FAULT_INJECT")
    assert engine.generate(conv, session_id="oom", max_new_tokens=8, **GREEDY) == want


def test_errors_raise_at_call_time(engine):
    from dsvl import ContextOverflowError, ImageError

    with pytest.raises(ContextOverflowError):
        engine.stream([user("word " * 3000)], max_new_tokens=10)
    with pytest.raises(ImageError):
        engine.stream([{"role": "user", "content": [{"type": "image", "path": "/nonexistent/x.png"},
                                                    {"type": "text", "text": "hi"}]}])
    assert _lock_free(engine)


def test_engine_attributes(engine, tiny_checkpoint):
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.quantization == "none" and engine.is_random is True
    assert engine.max_context_tokens == 2048 and engine.num_image_tokens == 576
    n = sum(t.numel() for t in [*engine.model.parameters(), *engine.model.buffers()])
    assert engine.weight_bytes == 4 * n
    assert engine.tokenizer is engine.processor.tokenizer and engine.config.text.vocab_size > engine.tokenizer.size


# ---- one decoder forward: fused projections, oneDNN packing ----------------------------------------------------

def _checkpoint_tensors(checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names (what ``state_dict()`` must give back), in ``dtype``."""
    from safetensors.torch import load_file

    from dsvl.loading import detect_layout, from_layout_name, weight_files

    raw = {k: v for f in weight_files(checkpoint) for k, v in load_file(f).items()}
    layout = detect_layout(list(raw))
    out = {}
    for name, t in raw.items():
        for target in from_layout_name(name, layout) or []:
            out[target.name] = t.to(dtype) if t.is_floating_point() else t
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_dict_gives_the_checkpoints_names_and_values(tiny_checkpoint, dtype):
    """q|k|v and gate|up are one Linear each inside the decoder, yet ``state_dict()`` has exactly the checkpoint's
    tensors (names, shapes, values; bf16 on CPU: unpacked from oneDNN's layout), and loads back into a fresh model."""
    from dsvl.model import DeepseekVLHybrid

    e = dsvl.load(str(tiny_checkpoint), device="cpu", dtype=dtype)
    layer = e.model.model.language_model.layers[0]
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "gate_proj")
    want = _checkpoint_tensors(tiny_checkpoint, e.dtype)
    got = e.model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]
    fresh = DeepseekVLHybrid(e.config).to(e.dtype)
    fresh.load_state_dict(got, strict=True)
    assert torch.equal(fresh.model.language_model.layers[0].self_attn.qkv_proj.weight,
                       torch.cat([want[f"model.language_model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"]))


def test_fused_forward_matches_separate_projections(engine):
    """The fused q|k|v and gate|up products give the separate Linears' results (float32, CPU)."""
    layer = engine.model.model.language_model.layers[1]
    sd = layer.state_dict()
    x = torch.randn(1, 5, engine.config.text.hidden_size)
    a, m = layer.self_attn, layer.mlp
    q = torch.nn.functional.linear(x, sd["self_attn.q_proj.weight"])
    torch.testing.assert_close(a.qkv_proj(x)[..., :q.shape[-1]], q)
    g = torch.nn.functional.linear(x, sd["mlp.gate_proj.weight"])
    u = torch.nn.functional.linear(x, sd["mlp.up_proj.weight"])
    torch.testing.assert_close(m(x), m.down_proj(torch.nn.functional.silu(g) * u))


def test_packed_bf16_path(tiny_checkpoint):
    """CPU bfloat16: the decoder's Linears are oneDNN-packed at load and give the plain path's logits and greedy
    replies; ``pack=False`` keeps plain Linears."""
    from dsvl.packing import PackedLinear, packing_works

    if not packing_works():
        pytest.skip("this torch build / CPU has no oneDNN bf16 weight packing")
    plain = dsvl.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", pack=False)
    packed = dsvl.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    kinds = {type(m) for m in packed.model.model.language_model.modules()}
    assert PackedLinear in kinds and torch.nn.Linear not in kinds
    assert PackedLinear not in {type(m) for m in plain.model.modules()}
    ids = torch.tensor([plain.tokenizer.encode("What is the capital of France? Paris.")])
    with torch.no_grad():
        a, b = plain.model(ids).logits.float(), packed.model(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    assert packed.weight_bytes == plain.weight_bytes
    conv = [user("What is the capital of France?")]
    s = packed.stream(conv, session_id="p", max_new_tokens=6, **GREEDY)
    list(s)
    s2 = packed.stream(conv + [assistant(s.text), user("Why?")], session_id="p", max_new_tokens=6, **GREEDY)
    list(s2)
    assert s2.stats.new_tokens == 6 and s2.stats.reused_tokens > 0


def test_end_session_during_a_stream_does_not_block(engine):
    conv = [user("Tell me about the garden.")]
    list(engine.stream(conv, session_id="bye", max_new_tokens=3, **GREEDY))
    s = engine.stream(conv, session_id="other", max_new_tokens=50, **GREEDY)
    next(s)  # holds the engine
    t = threading.Thread(target=engine.end_session, args=("bye",))
    t.start()
    t.join(5)
    assert not t.is_alive()  # returned at once
    assert "bye" in engine.sessions  # dropped when the running request finishes
    s.close()
    assert "bye" not in engine.sessions and "other" in engine.sessions
    engine.end_session("other")
    assert "other" not in engine.sessions


class _WatchedLock:
    """The engine's lock, with an event set once a caller has tried to take it and found it held."""

    def __init__(self, lock):
        self.lock, self.contended = lock, threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self.lock.acquire(blocking, timeout)
        if not got:
            self.contended.set()
        return got

    def release(self) -> None:
        self.lock.release()


def test_cancel_while_queued_gives_up_without_running(engine, monkeypatch):
    conv = [user("Tell me about the garden.")]
    s1 = engine.stream(conv, max_new_tokens=50, **GREEDY)
    next(s1)  # holds the engine
    watched = _WatchedLock(engine._lock)
    monkeypatch.setattr(engine, "_lock", watched)
    cancel = threading.Event()
    s2 = engine.stream(conv, max_new_tokens=50, cancel=cancel, **GREEDY)
    out: list = []
    t = threading.Thread(target=lambda: out.extend(s2))
    t.start()
    assert watched.contended.wait(30)  # s2 tried the lock and found s1 holding it
    assert t.is_alive()  # queued behind s1
    cancel.set()
    t.join(5)
    assert not t.is_alive() and out == []
    assert s2.stats.stop_reason == "cancelled" and s2.stats.new_tokens == 0
    s1.close()
    assert _lock_free(engine)


# ---- sampling defaults: the checkpoint's ------------------------------------------------------------------------

def test_core_greedy_is_the_reference_greedy(engine):
    """Without sampling arguments beyond temperature=0 the core decodes plain greedy (no repetition penalty): the
    tiny checkpoint has no generation_config.json, and the demo's defaults belong to the app."""
    assert engine.defaults == SamplingParams()
    conv = [user("Tell me a story about a red fox.")]
    ids = engine.processor.prepare(conv, max_context_tokens=2048, reserve_new_tokens=10).token_ids
    want = [t for t in plain_greedy(engine, ids, [], 10) if t != engine.eos_id]
    assert engine.generate(conv, temperature=0, max_new_tokens=10, stop=()) == engine.tokenizer.decode(want)


@pytest.mark.parametrize("config, want", [
    ({"do_sample": False, "temperature": 0.7, "top_p": 0.9}, SamplingParams()),  # transformers: greedy
    ({"do_sample": True, "temperature": 0.7, "repetition_penalty": 1.2, "max_new_tokens": 64},
     SamplingParams(max_new_tokens=64, temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.2)),
    ({"do_sample": True, "top_p": 1.5}, SamplingParams()),  # invalid: ignored with a warning, greedy
    ([1, 2], SamplingParams()),
])
def test_defaults_come_from_generation_config(tmp_path, config, want):
    (tmp_path / "generation_config.json").write_text(__import__("json").dumps(config))
    assert SamplingParams.from_generation_config(tmp_path) == want
    assert SamplingParams.from_generation_config(tmp_path / "missing") == SamplingParams()
    assert want.override(temperature=None, top_k=3).top_k == 3


# ---- the compiled decode step -------------------------------------------------------------------------------------

@pytest.mark.compile
def test_compiled_step_gives_eager_greedy_tokens(engine, tiny_checkpoint):
    """``compile="on"`` on CPU: inductor compiles the decoder's own forward with static shapes (the CUDA-graph
    step's shapes) and decodes the same greedy tokens as eager, on a first turn and a follow-up from the cache."""
    compiled = dsvl.load(str(tiny_checkpoint), device="cpu", dtype="float32", compile="on", max_context_tokens=2048)
    assert compiled.compiled and compiled._decode_fn == compiled._decode_compiled
    conv = [user("What is the capital of France?")]
    kw = dict(GREEDY, max_new_tokens=6)
    eager = engine.stream(conv, session_id="e", **kw)
    first = compiled.stream(conv, session_id="c", **kw)
    assert "".join(first) == "".join(eager) and first.generated_ids == eager.generated_ids
    follow = conv + [assistant(first.text), user("Why?")]
    eager2 = engine.stream(follow, session_id="e", **kw)
    second = compiled.stream(follow, session_id="c", **kw)
    assert "".join(second) == "".join(eager2) and second.stats.reused_tokens > 0
    assert second.generated_ids == eager2.generated_ids
    engine.end_session("e")


def test_compile_modes(tiny_checkpoint):
    from dsvl.generation import compile_mode

    assert compile_mode("auto", torch.device("cuda")) and not compile_mode("auto", torch.device("cpu"))
    assert compile_mode("on", torch.device("cpu")) and not compile_mode("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        dsvl.load(str(tiny_checkpoint), device="cpu", compile="sometimes")
