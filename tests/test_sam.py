"""SAM encoder parity against transformers' SamVisionEncoder (the test-only reference)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamVisionConfig
from transformers.initialization import no_init_weights
from transformers.models.sam.modeling_sam import SamVisionAttention as RefAttention
from transformers.models.sam.modeling_sam import SamVisionEncoder as RefEncoder

import dsvl.sam
from dsvl.config import DsvlConfig, SamConfig
from dsvl.sam import SamNeck, SamVisionEncoder, SamVisionLayer, SamVisionModel, get_rel_pos

HF_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim", "image_size", "patch_size",
             "num_channels", "output_channels", "window_size", "layer_norm_eps", "qkv_bias", "use_abs_pos",
             "use_rel_pos", "hidden_act")


def hf_config(cfg: SamConfig, attn: str = "eager") -> SamVisionConfig:
    return SamVisionConfig(**{k: getattr(cfg, k) for k in HF_FIELDS},
                           global_attn_indexes=list(cfg.global_attn_indexes), attn_implementation=attn)


def randomize(model: nn.Module, seed: int) -> None:
    """Fan-in scaled weights (attention far from uniform), large biases (the padded tokens' k/v are the qkv
    biases, so they must matter), LayerNorm gains away from 1, random pos_embed and rel-pos tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5, generator=g)
            elif p.dim() == 1:  # LayerNorm weight
                p.normal_(1.0, 0.2, generator=g)
            elif "rel_pos" in name or "pos_embed" in name:
                p.normal_(0.0, 0.5, generator=g)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)


def reference(cfg: SamConfig, attn: str = "eager", seed: int = 0) -> RefEncoder:
    with no_init_weights():  # every parameter is overwritten below
        model = RefEncoder(hf_config(cfg, attn)).eval()
    randomize(model, seed)
    return model


def ours_from(ref: nn.Module, cfg: SamConfig) -> SamVisionEncoder:
    with torch.device("meta"):  # no init work: every tensor comes from the reference
        ours = SamVisionEncoder(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # names and shapes must match exactly
    return ours


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed))


def tiny() -> SamConfig:
    return DsvlConfig.tiny().high_res_vision


# ---- parity with transformers -----------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_matches_transformers(attn: str) -> None:
    cfg = tiny()
    keep = cfg.global_attn_indexes[0]
    ref = reference(cfg, attn)
    ours = ours_from(ref, cfg)
    x = pixels(2, 1)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        neck, kept = ours(x, keep)
    assert neck.shape == (2, cfg.output_channels, 64, 64)
    assert kept.shape == (2, 64, 64, cfg.hidden_size)
    assert rel_err(neck, out.last_hidden_state) <= 1e-4
    assert rel_err(kept, out.hidden_states[keep + 1]) <= 1e-4


def test_keep_layer_is_that_blocks_output() -> None:
    cfg = tiny()
    ref = reference(cfg, "sdpa", seed=5)
    ours = ours_from(ref, cfg)
    x = pixels(1, 6)
    with torch.no_grad():
        hidden = ref(x, output_hidden_states=True).hidden_states
        for keep in (0, 2, 3):  # windowed, windowed, last (global) block
            _, kept = ours(x, keep)
            assert rel_err(kept, hidden[keep + 1]) <= 1e-4


def test_query_chunking_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Global layers split queries into row chunks to bound the mask; any chunking gives the same result."""
    cfg = tiny()
    ours = ours_from(reference(cfg, seed=7), cfg)
    x = pixels(1, 8)
    with torch.no_grad():
        monkeypatch.setattr(dsvl.sam, "MAX_MASK_ELEMENTS_CPU", 1 << 40)  # one mask per layer
        whole = ours(x, 1)
        # 5 map rows per chunk in the global layers: 12 chunks of 5 rows and a ragged one of 4.
        monkeypatch.setattr(dsvl.sam, "MAX_MASK_ELEMENTS_CPU", cfg.num_attention_heads * 64 * 4096 * 5)
        chunked = ours(x, 1)
    for a, b in zip(chunked, whole):
        assert rel_err(a, b) <= 1e-5


def test_bfloat16_close_to_float32() -> None:
    cfg = tiny()
    ours = ours_from(reference(cfg, seed=9), cfg)
    x = pixels(1, 10)
    with torch.no_grad():
        want = ours(x, 1)
        got = ours.to(torch.bfloat16)(x, 1)  # float32 pixels are cast to the weight dtype
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert rel_err(a.float(), b) < 5e-2


# ---- windowed attention: padded tokens take part ----------------------------------------------


def eager_windowed_block(layer: SamVisionLayer, x: torch.Tensor, heads: int,
                         mask_padding: bool = False) -> torch.Tensor:
    """Hand-written float64 SAM block, one window at a time. SAM leaves the padded keys unmasked
    (docs/MODEL.md §7); ``mask_padding=True`` gives the variant it does NOT compute."""
    p = {k: v.double() for k, v in layer.state_dict().items()}
    x = x.double()
    n, h, w, d = x.shape
    s, c = layer.window_size, d // heads
    y = F.layer_norm(x, (d,), p["layer_norm1.weight"], p["layer_norm1.bias"], 1e-6)
    hp, wp = math.ceil(h / s) * s, math.ceil(w / s) * s
    padded = torch.zeros(n, hp, wp, d, dtype=torch.float64)
    padded[:, :h, :w] = y
    valid = torch.zeros(hp, wp, dtype=torch.bool)
    valid[:h, :w] = True
    # Full relative-position table per window: bias[(y, x), (ky, kx)] = q·(Rh[y - ky] + Rw[x - kx]).
    ys, xs = torch.arange(s).repeat_interleave(s), torch.arange(s).repeat(s)
    table = (p["attn.rel_pos_h"][ys[:, None] - ys[None, :] + s - 1]
             + p["attn.rel_pos_w"][xs[:, None] - xs[None, :] + s - 1])  # (s*s, s*s, C)
    out = torch.zeros_like(padded)
    for i in range(0, hp, s):
        for j in range(0, wp, s):
            win = padded[:, i:i + s, j:j + s].reshape(n, s * s, d)
            qkv = (win @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).view(n, s * s, 3, heads, c)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (n, heads, s*s, c)
            scores = q @ k.transpose(-1, -2) / math.sqrt(c) + torch.einsum("nhqc,qkc->nhqk", q, table)
            if mask_padding:
                scores = scores.masked_fill(~valid[i:i + s, j:j + s].reshape(-1), float("-inf"))
            a = scores.softmax(-1) @ v
            out[:, i:i + s, j:j + s] = (a.transpose(1, 2).reshape(n, s * s, d) @ p["attn.proj.weight"].T
                                        + p["attn.proj.bias"]).view(n, s, s, d)
    x = x + out[:, :h, :w]
    z = F.layer_norm(x, (d,), p["layer_norm2.weight"], p["layer_norm2.bias"], 1e-6)
    return x + F.gelu(z @ p["mlp.lin1.weight"].T + p["mlp.lin1.bias"]) @ p["mlp.lin2.weight"].T + p["mlp.lin2.bias"]


def test_windowed_block_matches_eager_reference_with_unmasked_padding() -> None:
    cfg = tiny()
    ref = reference(cfg, seed=11)
    ours = ours_from(ref, cfg)
    layer = ours.layers[0]
    assert layer.window_size == 14
    x = torch.randn(2, 64, 64, cfg.hidden_size, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        got = layer(x).double()
        want = eager_windowed_block(layer, x, cfg.num_attention_heads)
        # The same block with the padded keys masked out: the edge windows (last row/column) must differ,
        # so the comparison above really checks that the padding takes part.
        masked = eager_windowed_block(layer, x, cfg.num_attention_heads, mask_padding=True)
    assert rel_err(got, want) <= 1e-5
    edge = ((masked - want)[:, 56:].abs().max() / want.abs().max()).item()  # last row of windows
    interior = ((masked - want)[:, :56, :56].abs().max() / want.abs().max()).item()
    assert edge > 1e-2
    assert interior <= 1e-9  # windows without padding are unaffected


# ---- relative positions -----------------------------------------------------------------------


@pytest.mark.parametrize("length", [27, 15, 41])
def test_get_rel_pos_matches_transformers(length: int) -> None:
    """Table lengths other than 2·size−1 are resized linearly, as in SAM."""
    attn = RefAttention(hf_config(tiny()), window_size=14)
    table = torch.randn(length, 16, generator=torch.Generator().manual_seed(length))
    torch.testing.assert_close(get_rel_pos(14, 14, table), attn.get_rel_pos(14, 14, table), rtol=1e-6, atol=1e-6)


def test_attention_with_resized_rel_pos_matches_transformers() -> None:
    cfg = tiny()
    ref = reference(cfg, seed=13)
    ours = ours_from(ref, cfg)
    g = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for module in (ref.layers[0].attn, ours.layers[0].attn):  # window 14: native length would be 27
            module.rel_pos_h = nn.Parameter(torch.randn(19, 16, generator=g))
            module.rel_pos_w = nn.Parameter(torch.randn(35, 16, generator=g))
        ours.layers[0].attn.load_state_dict(ref.layers[0].attn.state_dict())
        x = torch.randn(3, 14, 14, cfg.hidden_size, generator=g)
        want, _ = ref.layers[0].attn(x)
        got = ours.layers[0].attn(x)
    assert rel_err(got, want) <= 1e-5


# ---- structure --------------------------------------------------------------------------------


def test_state_dict_names_and_shapes() -> None:
    cfg = SamConfig()
    with torch.device("meta"):
        sd = SamVisionModel(cfg).state_dict()
        hd = SamNeck(cfg).state_dict()
    assert sd["vision_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert sd["vision_encoder.patch_embed.projection.weight"].shape == (768, 3, 16, 16)
    assert sd["vision_encoder.layers.2.attn.rel_pos_h"].shape == (127, 64)
    assert sd["vision_encoder.layers.3.attn.rel_pos_w"].shape == (27, 64)
    assert sd["vision_encoder.layers.0.attn.qkv.weight"].shape == (2304, 768)
    assert sd["vision_encoder.neck.conv2.weight"].shape == (256, 256, 3, 3)
    assert "vision_encoder.neck.conv1.bias" not in sd
    assert sorted(hd) == ["conv1.weight", "conv2.weight", "layer_norm1.bias", "layer_norm1.weight",
                          "layer_norm2.bias", "layer_norm2.weight"]
    assert len(sd) == 3 + 12 * 14 + 6  # patch (2) + pos_embed, 14 tensors per block, neck


def test_neck_matches_transformers_neck() -> None:
    """The standalone neck (model.py's high_res_vision_neck) takes the channels-last kept state."""
    cfg = tiny()
    ref = reference(cfg, seed=15)
    with torch.device("meta"):
        neck = SamNeck(cfg)
    neck.load_state_dict(ref.neck.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 64, 64, cfg.hidden_size, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        assert rel_err(neck(x), ref.neck(x)) <= 1e-5


def test_bad_inputs_raise() -> None:
    ours = SamVisionEncoder(tiny())
    with pytest.raises(ValueError, match="1024"):
        ours(torch.zeros(1, 3, 512, 512), 1)
    with pytest.raises(ValueError, match="keep_layer"):
        ours(torch.zeros(1, 3, 1024, 1024), 4)


# ---- full size ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_sam_b_matches_transformers() -> None:
    """SAM ViT-B at 1024 px, 12 layers, batch 1, kept block 2 (the 7B chat model's high-res tower)."""
    cfg = SamConfig()
    ref = reference(cfg, "sdpa")  # eager is ~2x slower here and checked at tiny size
    ours = ours_from(ref, cfg)
    x = pixels(1, 17)
    with torch.inference_mode():
        out = ref(x, output_hidden_states=True)
        neck, kept = ours(x, 2)
    assert neck.shape == (1, 256, 64, 64) and kept.shape == (1, 64, 64, 768)
    assert rel_err(neck, out.last_hidden_state) <= 1e-4
    assert rel_err(kept, out.hidden_states[3]) <= 1e-4
