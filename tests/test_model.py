"""DeepseekVLHybrid against transformers' DeepseekVLHybridForConditionalGeneration on the same saved random weights
(float32, CPU), plus the pitfalls (docs/MODEL.md §7) of the glue, the aligner and sequence assembly.

Inputs are built by hand (BOS + ids + 576 x image id), so these tests do not depend on the processor.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dsvl.llama import KVCache
from dsvl.loading import load_model
from dsvl.model import DeepseekVLHybrid

import transformers  # the test-only reference: fail, never skip, without it

TOL = 1e-4  # max|diff| <= TOL * max|ref|


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class Special:
    def __init__(self, checkpoint):
        tok = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
        ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
        self.bos, self.eos = ids["<｜begin▁of▁sentence｜>"], ids["<｜end▁of▁sentence｜>"]
        self.image = ids["<image_placeholder>"]
        self.size = max(ids.values()) + 1  # ids the tokenizer can decode
        self.text_ids = min(ids.values())  # ordinary BPE ids are 0 .. text_ids-1


@pytest.fixture(scope="module")
def env(tiny_checkpoint):
    ours, _ = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    ref, info = transformers.DeepseekVLHybridForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, output_loading_info=True)
    ref.eval()
    sp = Special(tiny_checkpoint)
    assert ours.config.image_token_id == sp.image == ref.config.image_token_id
    assert ours.config.text.vocab_size > sp.size  # rows the tokenizer cannot decode exist, like the real model
    return ours, ref, info, sp


def prompt(sp: Special, pieces: list[int | str], seed: int) -> list[int]:
    """BOS, then for each piece n random text ids or 'img' (576 image ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = [sp.bos]
    for p in pieces:
        ids += [sp.image] * 576 if p == "img" else torch.randint(0, sp.text_ids, (p,), generator=g).tolist()
    return ids


def pixels(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 384, 384, generator=g), torch.randn(n, 3, 1024, 1024, generator=g)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, rows))
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_reference_loads_cleanly_and_untied(env):
    ours, ref, info, _ = env
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # docs/MODEL.md §1: the chat model's lm_head is its own tensor, in both implementations.
    assert not torch.equal(ref.lm_head.weight, ref.model.language_model.embed_tokens.weight)
    assert ours.lm_head.weight is not ours.model.language_model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)
    assert set(ours.state_dict()) == set(ref.state_dict())  # same in-memory names (DESIGN.md)


def test_tower_and_aligner_features(env):
    ours, ref, _, _ = env
    pv, hpv = pixels(1, 1)
    seen: dict[str, torch.Tensor] = {}
    # One pass per implementation: the SAM tower outputs are captured on the way (hooks).
    h1 = ref.model.high_res_vision_model.register_forward_hook(
        lambda mod, args, out: seen.update(ref_neck=out.last_hidden_state, ref_hidden=out.hidden_states))
    h2 = ours.model.high_res_vision_model.vision_encoder.register_forward_hook(
        lambda mod, args, out: seen.update(neck=out[0], kept=out[1]))
    try:
        with torch.no_grad():
            r = ref.model.get_image_features(pv, hpv, return_dict=True, output_hidden_states=True)
            low, high = ours.get_low_res_features(pv), ours.get_high_res_features(hpv)
            aligned = ours.model.aligner(low, high)
    finally:
        h1.remove()
        h2.remove()
    checks = {
        "siglip": (low, r.last_hidden_state),
        "sam_neck": (seen["neck"], seen["ref_neck"]),
        "sam_kept_block": (seen["kept"], seen["ref_hidden"][ours.model.global_attn_index + 1]),
        "high_res_glue": (high, r.high_res_vision_last_hidden_state),
        "aligner": (aligned, r.pooler_output),
    }
    diffs = {k: rel(a, b) for k, (a, b) in checks.items()}
    print("max rel diffs:", diffs)
    for k, (a, b) in checks.items():
        assert a.shape == b.shape, k
    assert all(d <= TOL for d in diffs.values()), diffs


@pytest.mark.parametrize("case", ["text", "one_image", "three_images"])
def test_logits_and_loss_match(env, case):
    ours, ref, _, sp = env
    pieces = {"text": [23], "one_image": [5, "img", 9], "three_images": [3, "img", 4, "img", "img", 6]}[case]
    ids = torch.tensor([prompt(sp, pieces, seed=2)])
    n_img = pieces.count("img")
    kw = dict(zip(("pixel_values", "high_res_pixel_values"), pixels(n_img, 3))) if n_img else {}
    labels = ids.masked_fill(ids == sp.image, -100)  # shifted CE over text targets, -100 ignored
    labels[:, :2] = -100
    with torch.no_grad():
        got = ours(ids, labels=labels, **kw)
        want = ref(input_ids=ids, labels=labels, **kw)
    print(case, "max rel diff", rel(got.logits, want.logits), "loss", got.loss.item(), want.loss.item())
    assert got.logits.shape == want.logits.shape == (1, ids.shape[1], ours.config.text.vocab_size)
    assert rel(got.logits, want.logits) <= TOL
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5
    # The loss is the shifted mean CE: recompute it by hand.
    logp = got.logits[0, :-1].log_softmax(-1)
    tgt = labels[0, 1:]
    keep = tgt != -100
    assert abs(got.loss.item() + logp[keep].gather(1, tgt[keep, None]).mean().item()) <= 1e-5


def test_left_padded_batch_logits(env):
    ours, ref, _, sp = env
    rows = [prompt(sp, [6, "img", 30], seed=6), prompt(sp, [21], seed=7)]  # 613 and 22 tokens
    ids, mask = left_pad(rows, sp.eos)
    pv, hpv = pixels(1, 8)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what HF generate passes
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, pixel_values=pv, high_res_pixel_values=hpv).logits
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pv, high_res_pixel_values=hpv,
                   position_ids=pos).logits
        # MODEL.md §2: the padded row gives the same logits as the same prompt alone (default position_ids = cumsum).
        alone = ours(torch.tensor([rows[1]])).logits
    real = mask.bool()
    print("padded batch max rel diff", rel(got[real], want[real]), "vs alone", rel(got[1, -len(rows[1]):], alone[0]))
    assert not got.isnan().any()
    assert rel(got[real], want[real]) <= TOL
    assert rel(got[1, -len(rows[1]):], alone[0]) <= TOL


def greedy(model: DeepseekVLHybrid, ids, mask, pv, hpv, n: int, vocab_limit: int, eos: int) -> list[list[int]]:
    """Plain greedy decoding with our static KV cache; logits of ids the tokenizer cannot decode are masked."""
    B, T = ids.shape
    cache = KVCache(model.config.text, B, T + n, torch.float32, "cpu")
    out = model(ids, attention_mask=mask, pixel_values=pv, high_res_pixel_values=hpv, cache=cache, logits_to_keep=1)
    tokens, done = [], torch.zeros(B, dtype=torch.bool)
    for i in range(n):
        logits = out.logits[:, -1].clone()
        logits[:, vocab_limit:] = float("-inf")
        nxt = torch.where(done, torch.full_like(done, eos, dtype=torch.long), logits.argmax(-1))
        tokens.append(nxt)
        done |= nxt == eos
        if done.all():
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
        out = model(nxt[:, None], attention_mask=mask, cache=cache, cache_start=T + i)
    return torch.stack(tokens, 1).tolist()


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_continuation_matches_generate(env, batch):
    ours, ref, _, sp = env
    rows = [prompt(sp, [8, "img", 12], seed=9), prompt(sp, [30], seed=10)][:batch]  # image row + padded text row
    ids, mask = left_pad(rows, sp.eos)
    pv, hpv = pixels(1, 11)
    with torch.no_grad():
        got = greedy(ours, ids, mask, pv, hpv, 32, sp.size, sp.eos)
        want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, high_res_pixel_values=hpv,
                            max_new_tokens=32, do_sample=False, suppress_tokens=list(range(sp.size, 1024)),
                            eos_token_id=sp.eos, pad_token_id=sp.eos)[:, ids.shape[1]:].tolist()
    print("ours", got, "\nhf  ", want)
    for g, w in zip(got, want):
        assert g[:len(w)] == w and len(w) >= min(len(g), 32)
    assert len(set(got[0])) > 4, "random weights must not produce a constant continuation"


# ---- pitfalls (MODEL.md §7) of the parts this module owns -----------------------------------------------


def test_high_res_glue_by_hand(env):
    """MODEL.md §3: full block-2 output through the second neck; ONE shared downsample pair, bilinear 64->96 with
    align_corners=False; alpha on the global path only, after its convs; row-major 24x24 tokens."""
    ours, _, _, _ = env
    m = ours.model
    convs = [k for k in ours.state_dict() if k.startswith("model.high_res_vision_proj.")]
    assert sorted(convs) == ["model.high_res_vision_proj.conv1.weight", "model.high_res_vision_proj.conv2.weight"]
    assert m.global_attn_index == ours.config.high_res_vision.global_attn_indexes[0]
    assert float(m.high_res_vision_alpha) != 0.0  # else the global path would be untested
    _, hpv = pixels(1, 14)

    def down(x):
        x = F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False)
        return m.high_res_vision_proj.conv2(m.high_res_vision_proj.conv1(x))

    with torch.no_grad():
        enc = m.high_res_vision_model.vision_encoder
        x = enc.patch_embed(hpv) + enc.pos_embed
        for layer in enc.layers[:m.global_attn_index + 1]:
            x = layer(x)
        kept = x
        for layer in enc.layers[m.global_attn_index + 1:]:
            x = layer(x)
        high = down(enc.neck(x)) + m.high_res_vision_alpha * down(m.high_res_vision_neck(kept))
        want = high.flatten(2).transpose(1, 2)  # (N, 576, C): row h then column w
        got = ours.get_high_res_features(hpv)
        main_only = down(enc.neck(x)).flatten(2).transpose(1, 2)
    assert rel(got, want) <= 1e-6
    assert rel(got, main_only) > 1e-3  # the global path (alpha) visibly contributes


def test_aligner_order_and_exact_gelu(env):
    """MODEL.md §1: proj(GELU_erf(cat[high_res_vision_proj(sam) | vision_proj(siglip)]))."""
    ours, _, _, _ = env
    a = ours.model.aligner
    g = torch.Generator().manual_seed(15)
    low = torch.randn(2, 576, a.vision_proj.in_features, generator=g)
    high = torch.randn(2, 576, a.high_res_vision_proj.in_features, generator=g)
    with torch.no_grad():
        got = a(low, high)
        cat = torch.cat([a.high_res_vision_proj(high), a.vision_proj(low)], -1)
        want = a.proj(0.5 * cat * (1 + torch.erf(cat / 2**0.5)))
        swapped = a.proj(F.gelu(torch.cat([a.vision_proj(low), a.high_res_vision_proj(high)], -1)))
        tanh = a.proj(F.gelu(cat, approximate="tanh"))
    assert rel(got, want) <= 1e-6
    assert rel(got, swapped) > 1e-2 and rel(got, tanh) > 1e-5


def test_embed_scatter_row_major_and_count_check(env):
    """MODEL.md §2: image n fills the n-th run of 576 placeholders, batch row 0 first; wrong counts are errors."""
    ours, _, _, sp = env
    ids, _ = left_pad([prompt(sp, [3, "img", 2, "img"], seed=16), prompt(sp, [1, "img", 9], seed=17)], sp.eos)
    feats = torch.arange(3, dtype=torch.float32)[:, None, None].expand(3, 576, ours.config.text.hidden_size) + 10
    with torch.no_grad():
        emb = ours.embed(ids, feats)
    img = ids == sp.image
    order = emb[img][:, 0]
    assert order.tolist() == [10.0] * 576 + [11.0] * 576 + [12.0] * 576
    text = ours.model.language_model.embed_tokens(ids)
    assert torch.equal(emb[~img], text[~img])
    with pytest.raises(ValueError, match=r"1152 image tokens .* 3 image\(s\) x 576 = 1728"):
        ours.embed(ids[:1], feats)
    with pytest.raises(ValueError, match="together"):
        ours(ids, pixel_values=torch.zeros(1, 3, 384, 384))


def test_default_position_ids_and_logits_to_keep(env):
    ours, _, _, sp = env
    ids, mask = left_pad([prompt(sp, [20], seed=18), prompt(sp, [9], seed=19)], sp.eos)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask, position_ids=pos).logits
        c = ours(ids, attention_mask=mask, logits_to_keep=1).logits
    assert torch.equal(a, b)
    assert c.shape == (2, 1, a.shape[-1]) and rel(c[:, 0], a[:, -1]) <= 1e-6
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(ids, attention_mask=mask[:, 1:])


@pytest.mark.slow
def test_full_size_towers_with_two_layer_decoder(tmp_path):
    """SigLIP-L (24 layers, 384 px) and SAM-B (12 layers, 1024 px, windows + 4 global layers) at full size, with a
    narrow 2-layer decoder: tower features, aligner output and logits against transformers (one image)."""
    from dsvl.config import DsvlConfig, TextConfig
    from dsvl.tiny import write_checkpoint

    cfg = DsvlConfig(text=TextConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=512, vocab_size=1024),
                     image_token_id=0)  # replaced by the tokenizer's id
    d = write_checkpoint(tmp_path / "full-towers", config=cfg, dtype=torch.float32, shard_bytes=1 << 30)
    ours, _ = load_model(d, device="cpu", dtype=torch.float32)
    sp = Special(d)
    assert ours.config.vision.num_hidden_layers == 24 and ours.config.high_res_vision.num_hidden_layers == 12
    ids = torch.tensor([prompt(sp, [4, "img", 6], seed=20)])
    pv, hpv = pixels(1, 21)
    with torch.no_grad():  # one pass per tower per implementation: the slow part of this test
        low, high = ours.get_low_res_features(pv), ours.get_high_res_features(hpv)
        aligned = ours.model.aligner(low, high)
        hidden = ours.model.language_model(ours.embed(ids, aligned), torch.arange(ids.shape[1])[None])
        logits = ours.lm_head(hidden)
    del ours
    ref = transformers.DeepseekVLHybridForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pv, high_res_pixel_values=hpv)
        r, want = out.image_outputs, out.logits
    diffs = {"siglip": rel(low, r.last_hidden_state), "high_res": rel(high, r.high_res_vision_last_hidden_state),
             "aligner": rel(aligned, r.pooler_output), "logits": rel(logits, want)}
    print("full-size towers max rel diffs:", diffs)
    assert all(v <= TOL for v in diffs.values()), diffs
