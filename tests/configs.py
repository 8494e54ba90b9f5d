"""Model configurations that several tests share."""

from __future__ import annotations

from dsvl.config import DsvlConfig, SamConfig, SiglipConfig, TextConfig


def wide_decoder(num_layers: int) -> DsvlConfig:
    """Decoder layers at a realistic width (1024, MLP 2816) beside tiny vision towers: big enough that memory
    peaks while loading measure the decoder's weights, small enough for a test (~25 MB of bf16 per layer)."""
    return DsvlConfig(text=TextConfig(hidden_size=1024, num_hidden_layers=num_layers, num_attention_heads=8,
                                      num_key_value_heads=8, intermediate_size=2816, vocab_size=2048),
                      vision=SiglipConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=128),
                      high_res_vision=SamConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                mlp_dim=64, output_channels=16, global_attn_indexes=(1,)),
                      image_token_id=0)
