"""LLaMA-style decoder of DeepSeek LLM 7B (gpt-fast style): RMSNorm, half-rotation RoPE, SwiGLU, SDPA attention
and a static KV cache.

Attribute names equal transformers' ``LlamaModel`` (``embed_tokens``, ``layers.N.self_attn.o_proj``, ...), except
that q/k/v and gate/up are each one fused Linear (``qkv_proj``, ``gate_up_proj``); ``state_dict()`` and
``load_state_dict`` still use the checkpoint's separate names (``fuse_on_load``), so nothing else renames. Numerics follow transformers 5.24 ``modeling_llama.py``
(docs/MODEL.md §7): RMSNorm in float32 then cast back before the weight multiply; cos/sin in float32 then cast
to the activation dtype; rotate_half (GPT-NeoX) rotation, not interleaved.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back *before* the weight multiply, like HF LlamaRMSNorm (matters in bf16).
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE (no scaling). ``inv_freq`` is a non-persistent buffer: not in checkpoints, rebuilt by
    ``init_buffers`` when the model was created on the ``meta`` device."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> Tensor:
        # Same expression as HF compute_default_rope_parameters, so the float32 values are bit-identical.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        return 1.0 / (self.theta**exponent)

    def init_buffers(self, device: torch.device | str) -> None:
        self.inv_freq = self._inv_freq(torch.device(device))

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, head_dim), computed in float32, returned in ``dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static K/V buffers ``(layers, B, H_kv, max_len, head_dim)``, allocated once.

    ``update`` writes the new keys/values at ``[start, start+T)`` and returns views over ``[0, start+T)``: attention
    then runs over the live length only, never the whole buffer. With ``start`` a tensor of positions (the compiled
    decode step), every shape is static instead: K/V are written with ``index_copy_`` and the whole buffer is
    returned, for attention under a mask (``static_attention_mask``).
    """

    def __init__(self, config: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        if max_len > config.max_position_embeddings:
            raise ValueError(f"KVCache max_len {max_len} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.batch_size, self.max_len = batch_size, max_len
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer: int, start: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(start, Tensor):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: positions up to {end} but max_len is {self.max_len}")
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache batch size is {self.batch_size}, got a batch of {k.shape[0]}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def fuse_on_load(module: nn.Module, fused: str, parts: Sequence[tuple[str, int]]) -> None:
    """Make ``module.<fused>`` (one ``nn.Linear``) hold the checkpoint's Linears ``parts`` (name, out_features)
    stacked by rows, in that order: one matrix product instead of several (at batch 1 a product streams its
    weight once, and one wide product runs faster than three narrow ones).

    The checkpoint keeps the separate names, so, like gpt-fast's ``wqkv`` load hook: ``load_state_dict`` joins the
    parts into the fused weight, ``state_dict()`` gives them back (row views, no copy) under their own names and
    in their own order, and ``module.fused_parts`` tells the loader where each part's rows go
    (``{"q_proj": ("qkv_proj", 0, 4096), ...}``)."""
    slots, lo = {}, 0
    for name, rows in parts:
        slots[name] = (fused, lo, lo + rows)
        lo += rows
    module.fused_parts = slots

    def split_on_save(mod: nn.Module, state: dict, prefix: str, _meta) -> None:
        linear = getattr(mod, fused)
        mine = [k for k in state if k.startswith(prefix + fused + ".")]
        if not all(k.endswith((".weight", ".bias")) for k in mine) or not getattr(linear, "rows_split_on_save",
                                                                                  type(linear) is nn.Linear):
            return  # a quantized stand-in: its tensors are not the checkpoint's rows
        # This module's entries are the last ones written: re-insert them in checkpoint order.
        own = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        for k, v in own.items():
            name, _, attr = k[len(prefix):].partition(".")
            if name != fused:
                state[k] = v
                continue
            for part, (_, a, b) in slots.items():
                state[f"{prefix}{part}.{attr}"] = v[a:b]

    def join_on_load(mod: nn.Module, state: dict, prefix: str, *_args) -> None:
        for attr in ("weight", "bias"):
            keys = [f"{prefix}{part}.{attr}" for part in slots]
            if all(k in state for k in keys):
                state[f"{prefix}{fused}.{attr}"] = torch.cat([state.pop(k) for k in keys])

    module.register_state_dict_post_hook(split_on_save)
    module.register_load_state_dict_pre_hook(join_on_load)


class Attention(nn.Module):
    """Self-attention with q|k|v as one Linear (``qkv_proj``); the checkpoint's q/k/v_proj names are kept in
    ``state_dict()`` (see ``fuse_on_load``)."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        bias = config.attention_bias
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, nq + 2 * nkv, bias=bias)
        self.o_proj = nn.Linear(nq, config.hidden_size, bias=bias)
        fuse_on_load(self, "qkv_proj", [("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, cache_start: int | Tensor,
                mask: Tensor | None, is_causal: bool) -> Tensor:
        B, T, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([nq, nkv, nkv], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, cache_start, k, v)
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nq))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate|up as one Linear (``gate_up_proj``)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        fuse_on_load(self, "gate_up_proj", [("gate_proj", config.intermediate_size),
                                            ("up_proj", config.intermediate_size)])

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, cache_start: int | Tensor,
                mask: Tensor | None, is_causal: bool) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_start, mask, is_causal)
        return h + self.mlp(self.post_attention_layernorm(h))


def build_attention_mask(T: int, cache_start: int, key_padding_mask: Tensor | None,
                         device: torch.device) -> tuple[Tensor | None, bool]:
    """Return ``(attn_mask, is_causal)`` for SDPA with T queries at positions ``[cache_start, cache_start+T)``
    over keys ``[0, cache_start+T)``.

    - no padding, no prefix: ``is_causal=True`` (fast path, no mask tensor);
    - no padding, one query: nothing to mask (decode step attends to all live keys);
    - otherwise a boolean (B|1, 1, T, S) mask, causal aligned lower-right (query i sees keys <= cache_start+i:
      SDPA's ``is_causal`` is upper-left aligned and would be wrong with a reused prefix).
    A query row with no visible key (a left-pad token) would make SDPA return NaN, which then poisons nothing
    (pads are never attended) but trips NaN checks and the loss; such rows attend to every key instead.
    """
    S = cache_start + T
    if key_padding_mask is None:
        if cache_start == 0:
            return None, True
        if T == 1:
            return None, False
    q_pos = torch.arange(cache_start, S, device=device)[:, None]
    mask = (torch.arange(S, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        if key_padding_mask.shape[-1] != S:
            raise ValueError(f"key_padding_mask covers {key_padding_mask.shape[-1]} positions, expected "
                             f"cache_start + T = {S}")
        mask = mask & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask, False


def static_attention_mask(positions: Tensor, S: int) -> Tensor:
    """(1, 1, T, S) mask for queries at ``positions`` (T,) over a whole cache buffer of S slots: slot <= position.
    Slots past the live length are masked; they must hold finite numbers (0 x NaN would still poison the sum)."""
    return (torch.arange(S, device=positions.device)[None, :] <= positions[:, None])[None, None]


class LlamaModel(nn.Module):
    """Decoder stack without the LM head; ``forward`` takes embeddings (the caller scatters image features)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, cache: KVCache | None = None,
                cache_start: int | Tensor = 0, key_padding_mask: Tensor | None = None) -> Tensor:
        """inputs_embeds (B, T, D), position_ids (B, T) or (T,), key_padding_mask (B, cache_start+T) bool with
        True = real token. Returns the final-normed hidden states (B, T, D). ``cache_start`` as a tensor (T,) of
        cache slots makes every shape static (what ``torch.compile`` with CUDA graphs needs; no padding mask)."""
        B, T, _ = inputs_embeds.shape
        static = isinstance(cache_start, Tensor)
        if cache is None and (static or cache_start):
            raise ValueError("cache_start > 0 needs a cache holding the prefix")
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, T)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        if static:
            mask, is_causal = static_attention_mask(cache_start, cache.max_len), False
        else:
            mask, is_causal = build_attention_mask(T, cache_start, key_padding_mask, inputs_embeds.device)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, cache, cache_start, mask, is_causal)
        return self.norm(h)
