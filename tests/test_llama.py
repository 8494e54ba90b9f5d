"""dsvl.llama against transformers' LlamaModel (the test-only reference) and against itself (KV cache, padding)."""

from __future__ import annotations

import pytest
import torch

from dsvl.config import TextConfig
from dsvl.llama import KVCache, LlamaModel, RMSNorm, RotaryEmbedding, apply_rotary, build_attention_mask

import transformers  # the test-only reference: fail, never skip, without it
from transformers.models.llama import modeling_llama as hf  # noqa: E402


def text_config(**kw) -> TextConfig:
    base = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=96, vocab_size=300, max_position_embeddings=512)
    base.update(kw)
    return TextConfig(**base)


def hf_config(cfg: TextConfig):
    return transformers.LlamaConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attn_implementation="sdpa")


def random_model(cfg: TextConfig, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # not all-ones: the weight must be applied
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.normal_()
    return model


def pair(cfg: TextConfig):
    ours = random_model(cfg)
    ref = hf.LlamaModel(hf_config(cfg)).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_bitwise(dtype):
    # MODEL.md §7: normalise in float32, cast back to the input dtype, THEN multiply by the weight.
    x = (torch.randn(3, 7, 64) * 5).to(dtype)
    ours, ref = RMSNorm(64, 1e-6).to(dtype), hf.LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(1 + torch.randn(64))
        ref.weight.copy_(ours.weight)
    assert torch.equal(ours(x), ref(x))
    if dtype == torch.bfloat16:  # the other order (multiply in float32, cast last) gives different bits
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        assert not torch.equal(ours(x), (ours.weight.float() * h).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_hf_half_rotation(dtype):
    cfg = text_config()
    pos = torch.tensor([[0, 1, 5, 300], [7, 8, 9, 10]])
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    ref = hf.LlamaRotaryEmbedding(hf_config(cfg))
    x = torch.randn(2, 4, 4, cfg.head_dim).to(dtype)  # (B, H, T, D)
    cos, sin = rope(pos, dtype)
    rcos, rsin = ref(x, pos)
    assert cos.dtype == dtype and torch.equal(cos, rcos) and torch.equal(sin, rsin)
    q, _ = hf.apply_rotary_pos_emb(x, x, rcos, rsin)
    assert torch.equal(apply_rotary(x, cos, sin), q)
    # MODEL.md §7: half rotation pairs channel i with i + D/2 (GPT-NeoX), not the interleaved (2i, 2i+1) form.
    d = cfg.head_dim
    e = torch.zeros(1, 1, 1, d)
    e[..., 0] = 1.0
    out = apply_rotary(e, *rope(torch.tensor([[1]]), torch.float32))
    nonzero = set(torch.nonzero(out[0, 0, 0].abs() > 1e-6).flatten().tolist())
    assert nonzero == {0, d // 2}


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decoder_matches_hf(kv_heads):
    cfg = text_config(num_key_value_heads=kv_heads)
    ours, ref = pair(cfg)
    x = torch.randn(2, 19, cfg.hidden_size)
    pos = torch.arange(19)[None].expand(2, 19)
    with torch.no_grad():
        got = ours(x, pos)
        want = ref(inputs_embeds=x, position_ids=pos).last_hidden_state
    assert rel(got, want) <= 1e-5


def test_kv_cache_prefix_reuse_equals_full_recompute():
    cfg = text_config()
    model = random_model(cfg)
    x = torch.randn(2, 24, cfg.hidden_size)
    pos = torch.arange(24)[None].expand(2, 24)
    with torch.no_grad():
        full = model(x, pos)
        cache = KVCache(cfg, batch_size=2, max_len=64, dtype=torch.float32, device="cpu")
        # Garbage beyond the live length must never be read: attention covers [0, cache_start+T) only.
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        parts = [model(x[:, :10], pos[:, :10], cache=cache, cache_start=0),
                 model(x[:, 10:17], pos[:, 10:17], cache=cache, cache_start=10)]  # T>1 on a prefix: lower-right
        for t in range(17, 24):  # single-token decode steps
            parts.append(model(x[:, t:t + 1], pos[:, t:t + 1], cache=cache, cache_start=t))
    got = torch.cat(parts, 1)
    assert not got.isnan().any()
    assert rel(got, full) <= 1e-5
    # The upper-left aligned is_causal mask (SDPA's) would be wrong for the 7-token chunk over a 10-token prefix.
    mask, is_causal = build_attention_mask(7, 10, None, x.device)
    assert not is_causal and mask.shape == (1, 1, 7, 17)
    assert mask[0, 0, 0, :11].all() and not mask[0, 0, 0, 11:].any()


def test_attention_mask_fast_paths():
    assert build_attention_mask(5, 0, None, torch.device("cpu")) == (None, True)  # prefill: is_causal
    assert build_attention_mask(1, 9, None, torch.device("cpu")) == (None, False)  # decode: no mask
    kpm = torch.tensor([[False, True, True]])
    mask, causal = build_attention_mask(3, 0, kpm, torch.device("cpu"))
    assert not causal and mask.shape == (1, 1, 3, 3)
    assert mask[0, 0, 0].all()  # a pad query row sees something (no NaN), its output is unused
    assert mask[0, 0, 2].tolist() == [False, True, True]


def test_left_padded_batch_matches_unpadded_rows():
    cfg = text_config()
    model = random_model(cfg)
    a, b = torch.randn(1, 12, cfg.hidden_size), torch.randn(1, 8, cfg.hidden_size)
    x = torch.cat([a, torch.cat([torch.randn(1, 4, cfg.hidden_size), b], 1)])
    kpm = torch.tensor([[True] * 12, [False] * 4 + [True] * 8])
    pos = (kpm.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(x, pos, key_padding_mask=kpm)
        ra = model(a, torch.arange(12)[None])
        rb = model(b, torch.arange(8)[None])
        # ...and the decode step with the cache, padding included.
        cache = KVCache(cfg, batch_size=2, max_len=32, dtype=torch.float32, device="cpu")
        model(x, pos, cache=cache, key_padding_mask=kpm)
        nxt = torch.randn(2, 1, cfg.hidden_size)
        kpm2 = torch.cat([kpm, torch.ones(2, 1, dtype=torch.bool)], 1)
        step = model(nxt, pos[:, -1:] + 1, cache=cache, cache_start=12, key_padding_mask=kpm2)
        rb2 = model(torch.cat([b, nxt[1:]], 1), torch.arange(9)[None])
    assert not got.isnan().any()
    assert rel(got[0], ra[0]) <= 1e-5
    assert rel(got[1, 4:], rb[0]) <= 1e-5
    assert rel(step[1], rb2[0, -1:]) <= 1e-5


def test_left_padded_batch_matches_hf():
    cfg = text_config()
    ours, ref = pair(cfg)
    x = torch.randn(2, 10, cfg.hidden_size)
    mask = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        got = ours(x, pos, key_padding_mask=mask.bool())
        want = ref(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
    real = mask.bool()
    assert rel(got[real], want[real]) <= 1e-5


def test_kv_cache_bounds_and_shape():
    cfg = text_config(num_key_value_heads=2)
    cache = KVCache(cfg, batch_size=3, max_len=16, dtype=torch.bfloat16, device="cpu")
    assert cache.k.shape == (cfg.num_hidden_layers, 3, 2, 16, cfg.head_dim) and cache.k.dtype == torch.bfloat16
    assert "k" not in cache.state_dict()  # runtime state, never saved
    model = random_model(cfg)
    with pytest.raises(ValueError, match="overflow"):
        with torch.no_grad():
            model(torch.randn(3, 17, cfg.hidden_size), torch.arange(17), cache=KVCache(
                cfg, 3, 16, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        KVCache(cfg, 1, cfg.max_position_embeddings + 1, torch.float32, "cpu")
