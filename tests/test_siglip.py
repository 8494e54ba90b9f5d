"""SigLIP tower parity against transformers' SiglipVisionModel (the test-only reference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transformers import SiglipVisionConfig
from transformers.initialization import no_init_weights
from transformers.models.siglip.modeling_siglip import SiglipVisionModel

from dsvl.config import DsvlConfig, SiglipConfig
from dsvl.siglip import SiglipVisionTransformer


def reference(cfg: SiglipConfig, attn: str = "eager", seed: int = 0) -> nn.Module:
    """transformers' tower built from our config, with non-trivial random weights."""
    hf = SiglipVisionConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                            image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.num_channels,
                            layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, vision_use_head=False,
                            attn_implementation=attn)
    with no_init_weights():  # every parameter is overwritten below; skipping init saves ~20 s at full size
        model = SiglipVisionModel(hf).eval()
    randomize(model, seed)
    return model


def randomize(model: nn.Module, seed: int) -> None:
    """Fan-in scaled weights (activations stay O(1) so attention is far from uniform), non-zero biases,
    LayerNorm gains away from 1, a position table that matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2, generator=g)
            elif p.dim() == 1:  # LayerNorm weight
                p.normal_(1.0, 0.2, generator=g)
            elif "position_embedding" in name:
                p.normal_(0.0, 0.5, generator=g)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)


def ours_from(ref: nn.Module, cfg: SiglipConfig) -> SiglipVisionTransformer:
    with torch.device("meta"):  # no init work: every tensor comes from the reference
        ours = SiglipVisionTransformer(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # names and shapes must match exactly
    return ours


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_tiny_matches_transformers(attn: str, act: str) -> None:
    cfg = DsvlConfig.tiny().vision
    cfg.hidden_act = act
    ref = reference(cfg, attn)
    ours = ours_from(ref, cfg)
    x = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).last_hidden_state
        got = ours(x)
    assert got.shape == (2, 576, cfg.hidden_size)
    assert rel_err(got, want) <= 1e-4


def test_activation_is_selected_by_config() -> None:
    """erf and tanh GELU must give different outputs: the config value is really used."""
    cfg = DsvlConfig.tiny().vision
    ours = ours_from(reference(cfg), cfg)
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = ours(x)
        for layer in ours.encoder.layers:
            layer.mlp.act = "gelu_pytorch_tanh"
        tanh = ours(x)
    assert rel_err(tanh, exact) > 1e-5


def test_state_dict_names() -> None:
    keys = set(SiglipVisionTransformer(DsvlConfig.tiny().vision).state_dict())
    assert "embeddings.position_embedding.weight" in keys
    assert "encoder.layers.1.self_attn.out_proj.bias" in keys
    assert "post_layernorm.weight" in keys
    assert not any(k.startswith("head.") for k in keys)


def test_bfloat16_close_to_float32() -> None:
    cfg = DsvlConfig.tiny().vision
    ours = ours_from(reference(cfg), cfg)
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(x)
        got = ours.to(torch.bfloat16)(x.bfloat16())  # float pixels are cast to the weight dtype
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) < 5e-2


def test_wrong_image_size_raises() -> None:
    ours = SiglipVisionTransformer(DsvlConfig.tiny().vision)
    with pytest.raises(ValueError, match="384"):
        ours(torch.zeros(1, 3, 224, 224))


@pytest.mark.slow
def test_full_siglip_large_matches_transformers() -> None:
    """SigLIP-L/16 at 384 px, 24 layers, batch 1 (the 7B chat model's low-res tower)."""
    cfg = SiglipConfig()
    ref = reference(cfg, "eager")
    ours = ours_from(ref, cfg)
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = ref(x).last_hidden_state
        got = ours(x)
    assert got.shape == (1, 576, 1024)
    assert rel_err(got, want) <= 1e-4
