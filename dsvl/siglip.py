"""SigLIP vision tower (the low-resolution branch: SigLIP-L/16 at 384 px for the 7B chat model).

Module names equal transformers 5's ``SiglipVisionTransformer`` (in memory under ``model.vision_model.``),
so checkpoints load with ``strict=True`` and no renaming. There is no pooling head: the hybrid model uses
``post_layernorm(last layer)`` for all 576 patches (docs/MODEL.md §1, §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsvl.config import SiglipConfig


def gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``gelu`` is the exact erf form (what the 7B model uses); ``gelu_pytorch_tanh`` the tanh approximation."""
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported activation {kind!r}")


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, 24, 24)
        x = x.flatten(2).transpose(1, 2)  # row-major patch order
        # The input is always image_size, so the table is added as is (no interpolation).
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        shape = (n, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        # No mask, default scale head_dim**-0.5: SDPA picks a fused kernel on CPU and GPU alike.
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(n, t, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x), self.act))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """SigLIP ViT without the pooling head: ``(N, 3, 384, 384) -> (N, 576, hidden_size)``."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = self.config
        if pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"SigLIP expects pixel_values of shape (N, {c.num_channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(pixel_values.shape)}")
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
