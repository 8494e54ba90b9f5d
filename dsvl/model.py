"""``DeepseekVLHybrid``: SigLIP-L (384 px) + SAM-B (1024 px) towers, the high-res glue, the hybrid aligner, the
LLaMA decoder and ``lm_head`` (docs/MODEL.md §1-3).

The same class is the SigLIP-only DeepSeek-VL 1.3B (transformers' ``DeepseekVLForConditionalGeneration``) when
``config.high_res_vision`` is None: no SAM tower, neck, downsample convs or alpha, and ``MlpAligner``
(``linear1`` -> GELU -> ``linear2``) instead of the split hybrid aligner. Decoder, SigLIP, embedding scatter and
``forward`` are shared.

Module names equal transformers 5 in-memory names (``model.vision_model.*``, ``model.high_res_vision_model.*``,
``model.high_res_vision_neck.*``, ``model.high_res_vision_proj.conv{1,2}``, ``model.high_res_vision_alpha``,
``model.aligner.*``, ``model.language_model.*``, ``lm_head``), so ``state_dict()`` keys need no renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DsvlConfig, SamConfig
from .llama import LlamaModel
from .sam import SamNeck, SamVisionModel
from .siglip import SiglipVisionTransformer


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None = None


class HighResVisionProj(nn.Module):
    """The downsample pair shared by both high-res paths: bilinear 64->96 (align_corners=False) then two stride-2
    3x3 convs without bias or activation: (N, C, 64, 64) -> (N, 4C, 24, 24)."""

    def __init__(self, config: SamConfig, output_size: int) -> None:
        super().__init__()
        c = config.output_channels
        self.output_size = output_size
        self.conv1 = nn.Conv2d(c, 2 * c, kernel_size=3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2 * c, 4 * c, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        size = 4 * self.output_size
        # Interpolated in the activation dtype like HF (DS upcasts to float32 here: small bf16 difference).
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(x))


class Aligner(nn.Module):
    """Hybrid split MLP: proj(GELU(cat[high_res_vision_proj(sam) | vision_proj(siglip)])). High-res half first."""

    def __init__(self, config: DsvlConfig) -> None:
        super().__init__()
        out = config.text.hidden_size
        self.vision_proj = nn.Linear(config.vision.hidden_size, out // 2)
        self.high_res_vision_proj = nn.Linear(config.high_res_vision.output_channels * 4, out // 2)
        self.proj = nn.Linear(out, out)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        x = torch.cat([self.high_res_vision_proj(high), self.vision_proj(low)], dim=-1)
        return self.proj(F.gelu(x))  # exact erf GELU, not tanh


class MlpAligner(nn.Module):
    """The 1.3B model's aligner (DeepSeek's ``mlp_gelu``): linear1 (vision -> text width), exact GELU, linear2."""

    def __init__(self, config: DsvlConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(config.vision.hidden_size, config.text.hidden_size)
        self.linear2 = nn.Linear(config.text.hidden_size, config.text.hidden_size)

    def forward(self, low: Tensor) -> Tensor:
        return self.linear2(F.gelu(self.linear1(low)))


class DeepseekVLHybridModel(nn.Module):
    def __init__(self, config: DsvlConfig) -> None:
        super().__init__()
        self.config = config
        self.output_size = config.vision.image_size // config.vision.patch_size
        self.vision_model = SiglipVisionTransformer(config.vision)
        if config.hybrid:
            # The global path keeps the output of the first global-attention block (index 2 in SAM-B).
            self.global_attn_index = config.high_res_vision.global_attn_indexes[0]
            self.high_res_vision_model = SamVisionModel(config.high_res_vision)
            self.high_res_vision_neck = SamNeck(config.high_res_vision)
            self.high_res_vision_proj = HighResVisionProj(config.high_res_vision, self.output_size)
            # Zero-initialised in training; the real value comes from the checkpoint.
            self.high_res_vision_alpha = nn.Parameter(torch.zeros(1))
        self.aligner = Aligner(config) if config.hybrid else MlpAligner(config)
        self.language_model = LlamaModel(config.text)


class DeepseekVLHybrid(nn.Module):
    def __init__(self, config: DsvlConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekVLHybridModel(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    # ---- weights ---------------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with the input embeddings (only for checkpoints without lm_head.weight whose
        config asks for tying; the 7B chat model is untied)."""
        self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.language_model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.norm.weight.dtype

    # ---- vision ----------------------------------------------------------------------------------

    def get_low_res_features(self, pixel_values: Tensor) -> Tensor:
        """SigLIP: (N, 3, 384, 384) -> (N, 576, vision.hidden_size), post_layernorm applied."""
        return self.model.vision_model(pixel_values.to(self.dtype))

    def get_high_res_features(self, high_res_pixel_values: Tensor) -> Tensor:
        """SAM + both necks + shared downsample convs: (N, 3, 1024, 1024) -> (N, 576, 4 * output_channels)."""
        m = self.model
        main, kept = m.high_res_vision_model.vision_encoder(high_res_pixel_values.to(self.dtype),
                                                            m.global_attn_index)
        main = m.high_res_vision_proj(main)
        glob = m.high_res_vision_proj(m.high_res_vision_neck(kept))  # same convs, second neck
        x = main + glob * m.high_res_vision_alpha  # alpha scales the global path only
        return x.permute(0, 2, 3, 1).flatten(1, 2)  # row-major 24x24 tokens

    def get_image_features(self, pixel_values: Tensor, high_res_pixel_values: Tensor | None = None) -> Tensor:
        """(N, 3, 384, 384), (N, 3, 1024, 1024) -> aligned image embeddings (N, 576, text.hidden_size).
        The SigLIP-only model takes ``pixel_values`` alone."""
        _check_pixel_inputs(self.config, pixel_values, high_res_pixel_values)
        if not self.config.hybrid:
            return self.model.aligner(self.get_low_res_features(pixel_values))
        if pixel_values.shape[0] != high_res_pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} images but high_res_pixel_values has "
                             f"{high_res_pixel_values.shape[0]}")
        low = self.get_low_res_features(pixel_values)
        high = self.get_high_res_features(high_res_pixel_values)
        return self.model.aligner(low, high)

    # ---- text ------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor, image_features: Tensor | None = None) -> Tensor:
        """Token embeddings with the image placeholders replaced by ``image_features`` rows in row-major order
        (batch 0 first, left to right; image n fills the n-th run of 576 placeholders)."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        if image_features is None:
            return embeds
        mask = input_ids == self.config.image_token_id
        n_tokens = int(mask.sum())
        n_images, per_image = image_features.shape[0], image_features.shape[1]
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"image token count mismatch: input_ids hold {n_tokens} image tokens (id "
                f"{self.config.image_token_id}) but there are {n_images} image(s) x {per_image} = "
                f"{n_images * per_image} image features; each image needs exactly {per_image} placeholder tokens")
        feats = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(mask[..., None], feats)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                high_res_pixel_values: Tensor | None = None, labels: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, cache_start: int = 0,
                logits_to_keep: int = 0) -> CausalLMOutput:
        """``attention_mask`` (B, cache_start+T), 1 = real token, 0 = (left) pad; it covers the cached prefix too,
        like HF. ``position_ids`` default to ``cumsum(mask) - 1`` with pads at 0 (what HF ``generate`` uses, so
        left-padded rows get the same positions as unpadded ones), else ``arange(cache_start, cache_start+T)``.
        ``logits_to_keep`` > 0 computes logits for the last positions only. ``labels`` give the shifted mean
        cross-entropy (-100 ignored), computed in float32."""
        _check_pixel_inputs(self.config, pixel_values, high_res_pixel_values)
        B, T = input_ids.shape
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, high_res_pixel_values)
        embeds = self.embed(input_ids, image_features)

        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, cache_start + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"(batch, cache_start + T) = {(B, cache_start + T)}")
            attention_mask = attention_mask.to(input_ids.device).bool()
            if position_ids is None:
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.masked_fill(~attention_mask, 0)[:, -T:]
            if not bool(attention_mask.all()):  # all-ones: keep the mask-free fast path
                key_padding_mask = attention_mask
        if position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + T, device=input_ids.device)[None].expand(B, T)

        hidden = self.model.language_model(embeds, position_ids, cache=cache, cache_start=cache_start,
                                           key_padding_mask=key_padding_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need logits for every position (logits_to_keep=0)")
            shift = F.pad(labels.to(logits.device), (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift.reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    # ---- buffers ---------------------------------------------------------------------------------

    def init_buffers(self, device: torch.device | str) -> None:
        """Rebuild non-persistent buffers (RoPE ``inv_freq`` etc.) after building on ``meta`` and loading."""
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers(device)


def _check_pixel_inputs(config: DsvlConfig, pixel_values: Tensor | None, high_res_pixel_values: Tensor | None) -> None:
    if config.hybrid and (pixel_values is None) != (high_res_pixel_values is None):
        raise ValueError("pixel_values and high_res_pixel_values must be given together")
    if not config.hybrid and high_res_pixel_values is not None:
        raise ValueError("this model (SigLIP only) has no high-resolution tower: pass pixel_values alone")
