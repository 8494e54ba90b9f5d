"""SAM ViT image encoder + neck (the high-resolution branch: SAM-B at 1024 px for the 7B chat model).

Module names equal transformers 5's ``SamVisionModel`` (in memory under ``model.high_res_vision_model.``),
so checkpoints load with ``strict=True`` and no renaming. Numerics follow docs/MODEL.md §7:

- windowed blocks zero-pad the *normalised* 64×64 map to 70×70 and attend inside 25 windows of 14×14;
  the padded tokens are NOT masked (their keys/values are the qkv biases), exactly as SAM was trained;
- decomposed relative positions are computed from the unscaled q and passed to
  ``F.scaled_dot_product_attention`` as an additive float mask, so no eager softmax over the
  12×4096×4096 global-attention scores is ever built in Python (docs/PERFORMANCE.md, vision per image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsvl.config import SamConfig
from dsvl.siglip import gelu

# Global layers attend 4096 queries to 4096 keys; their rel-pos mask is heads×4096×4096 per image
# (805 MB in fp32 for SAM-B). Queries are processed in chunks of whole map rows so that one chunk's
# mask stays under this many elements, whatever the batch size. On CPU, 16 Mi (64 MB fp32, 5 rows per
# chunk at batch 1) halves the peak memory of a SAM-B forward and is also ~10% faster per global layer
# than one big mask; on GPU each chunk costs kernel launches, so the budget only caps memory.
MAX_MASK_ELEMENTS_CPU = 1 << 24
MAX_MASK_ELEMENTS_GPU = 1 << 28


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position table -> (q_size, k_size, C) with ``R[i, j] = rel_pos[i - j + k_size - 1]``.

    A table whose length is not ``2 * max(q_size, k_size) - 1`` is first resized linearly
    (``align_corners=False``), as SAM's ``get_rel_pos`` does. At equal length that resize is the
    identity, so it is skipped.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).transpose(1, 2), size=max_rel_dist,
                                mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    # Scale the coordinates of the shorter side when q and k sizes differ (never the case in SAM-B).
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


class SamPatchEmbeddings(nn.Module):
    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                    stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).permute(0, 2, 3, 1)  # channels-last (N, 64, 64, D)


class SamMLPBlock(nn.Module):
    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.lin1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.lin2 = nn.Linear(config.mlp_dim, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(gelu(self.lin1(x), self.act))


class SamVisionAttention(nn.Module):
    """Multi-head attention over a (B, H, W, D) map with decomposed relative positions."""

    def __init__(self, config: SamConfig, window_size: int) -> None:
        super().__init__()
        size = config.grid_size if window_size == 0 else window_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.use_rel_pos = config.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))

    def rel_pos_mask(self, q: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor) -> torch.Tensor:
        """Additive mask (B, heads, rows*w, h*w) for queries q (B, heads, rows*w, C) that cover whole map rows.

        ``rh`` (rows, h, C) and ``rw`` (w, w, C) are the get_rel_pos tables for those rows. Uses the UNSCALED q:
        ``mask[(y, x), (ky, kx)] = q[y, x]·rh[y, ky] + q[y, x]·rw[x, kx]``.
        """
        b, n, lq, c = q.shape
        rows, h, w = rh.shape[0], rh.shape[1], rw.shape[0]
        q5 = q.reshape(b, n, rows, w, c)
        rel_h = torch.einsum("bnyxc,ykc->bnyxk", q5, rh)  # (B, heads, rows, w, h)
        rel_w = torch.einsum("bnyxc,xkc->bnyxk", q5, rw)  # (B, heads, rows, w, w)
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, lq, h * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, h*w, C)
        if not self.use_rel_pos:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)  # (h, h, C)
            rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)  # (w, w, C)
            # Chunk over query rows of the map so one chunk's mask stays bounded (global layers).
            budget = MAX_MASK_ELEMENTS_CPU if q.device.type == "cpu" else MAX_MASK_ELEMENTS_GPU
            rows = max(1, min(h, budget // (b * self.num_heads * w * h * w)))
            outs = []
            for y0 in range(0, h, rows):
                qc = q[:, :, y0 * w:(y0 + rows) * w]
                # SDPA applies the head_dim**-0.5 scale to q·k itself; the mask is added unscaled.
                mask = self.rel_pos_mask(qc, rh[y0:y0 + rows], rw)
                outs.append(F.scaled_dot_product_attention(qc, k, v, attn_mask=mask))
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        y = y.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(y)


class SamVisionLayer(nn.Module):
    """Pre-norm ViT block; windowed (window_size > 0) or global (window_size == 0)."""

    def __init__(self, config: SamConfig, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SamVisionAttention(config, window_size)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SamMLPBlock(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer_norm1(x)
        if self.window_size > 0:
            n, h, w, d = y.shape
            s = self.window_size
            ph, pw = -h % s, -w % s
            # Zero padding AFTER the norm: the padded tokens' k/v are the qkv biases, and they are
            # deliberately left unmasked (SAM was trained that way).
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            # (N, hp, wp, D) -> (N * windows, s, s, D): all windows of all images form one batch.
            y = y.view(n, hp // s, s, wp // s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, d)
            y = self.attn(y)
            y = y.view(n, hp // s, wp // s, s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, d)
            y = y[:, :h, :w]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.layer_norm2(x))


class SamLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (biased variance), same parameters as nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamNeck(nn.Module):
    """Channels-last (N, H, W, hidden) -> (N, output_channels, H, W): 1×1 conv, LN2d, 3×3 conv, LN2d.

    Used inside the encoder (``neck``) and, with its own weights, by the hybrid model on the kept
    global-layer output (``high_res_vision_neck``).
    """

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        c = config.output_channels
        self.conv1 = nn.Conv2d(config.hidden_size, c, kernel_size=1, bias=False)
        self.layer_norm1 = SamLayerNorm2d(c, eps=config.layer_norm_eps)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = SamLayerNorm2d(c, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm1(self.conv1(x.permute(0, 3, 1, 2)))
        return self.layer_norm2(self.conv2(x))


class SamVisionEncoder(nn.Module):
    """SAM ViT: ``(N, 3, 1024, 1024) -> (neck(last block) (N, C_out, 64, 64), block[keep_layer] (N, 64, 64, D))``."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.config = config
        g = config.grid_size
        self.patch_embed = SamPatchEmbeddings(config)
        # Registered only when used, like transformers, so strict loading sees the same key set.
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, config.hidden_size)) if config.use_abs_pos else None
        self.layers = nn.ModuleList(
            SamVisionLayer(config, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.num_hidden_layers))
        self.neck = SamNeck(config)

    def forward(self, pixel_values: torch.Tensor, keep_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"SAM expects pixel_values of shape (N, {c.num_channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(pixel_values.shape)}")
        if not 0 <= keep_layer < len(self.layers):
            raise ValueError(f"keep_layer {keep_layer} is not a layer index (num_hidden_layers={len(self.layers)})")
        x = self.patch_embed(pixel_values.to(self.patch_embed.projection.weight.dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed
        kept = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == keep_layer:
                kept = x  # the full block output, after its MLP residual
        return self.neck(x), kept


class SamVisionModel(nn.Module):
    """Holds ``vision_encoder`` so that weight names come out as ``...vision_encoder.*``."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.vision_encoder = SamVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, keep_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vision_encoder(pixel_values, keep_layer)
