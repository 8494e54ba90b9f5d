"""Model configuration, read from a checkpoint's ``config.json`` (the transformers "converted" layout).

Two families share this config:
- the hybrid (``model_type: deepseek_vl_hybrid``, ``deepseek-community/deepseek-vl-7b-chat``): SigLIP-L at
  384 px + SAM-B at 1024 px, a split aligner, a 7B decoder;
- the SigLIP-only model (``model_type: deepseek_vl``, ``deepseek-community/deepseek-vl-1.3b-chat``): no SAM
  tower (``high_res_vision is None``), a two-layer GELU aligner, a 1.3B decoder.

Three dataclasses mirror the sub-configs of ``DeepseekVLHybridConfig``; their defaults are the
values of ``deepseek-community/deepseek-vl-7b-chat`` (not the transformers class defaults, which
describe a different model: LLaMA-7B text, SigLIP-B at 224 px with a tanh GELU and a pooling head).

Both schemas found in the wild are accepted:
- transformers 4.x: ``rope_theta`` and ``torch_dtype`` at the top of the sub-config;
- transformers 5.x: ``rope_parameters = {"rope_type": "default", "rope_theta": ...}`` and ``dtype``.
Unknown keys are ignored; a value of the wrong type or an impossible one raises ``ConfigError``
naming the field (``text_config.num_attention_heads: ...``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A config.json field has a wrong type or an impossible value."""


@dataclass
class TextConfig:
    """LLaMA-style decoder (DeepSeek LLM 7B)."""

    hidden_size: int = 4096
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 102400
    max_position_embeddings: int = 16384
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    head_dim: int | None = None  # derived from hidden_size / heads when absent

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)

    def validate(self, prefix: str = "text_config") -> None:
        _positive(self, prefix, "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
                  "rms_norm_eps", "rope_theta", "head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{prefix}.num_key_value_heads: {self.num_key_value_heads} does not divide "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{prefix}.head_dim: {self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ConfigError(f"{prefix}.hidden_act: only 'silu' is supported, got {self.hidden_act!r}")


@dataclass
class SiglipConfig:
    """SigLIP-L/16 at 384 px: the low-resolution tower (576 patches, no CLS token, no pooling head)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"  # exact erf GELU, not the tanh approximation

    def validate(self, prefix: str = "vision_config") -> None:
        _positive(self, prefix, "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "image_size", "patch_size", "num_channels", "layer_norm_eps")
        _divides(self, prefix, "num_attention_heads", "hidden_size")
        _divides(self, prefix, "patch_size", "image_size")
        if self.hidden_act not in ("gelu", "gelu_pytorch_tanh"):
            raise ConfigError(f"{prefix}.hidden_act: expected 'gelu', got {self.hidden_act!r}")


@dataclass
class SamConfig:
    """SAM ViT-B image encoder at 1024 px: the high-resolution tower."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 1024
    patch_size: int = 16
    num_channels: int = 3
    output_channels: int = 256
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    hidden_act: str = "gelu"

    def validate(self, prefix: str = "high_res_vision_config") -> None:
        _positive(self, prefix, "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim",
                  "image_size", "patch_size", "num_channels", "output_channels", "window_size",
                  "layer_norm_eps")
        _divides(self, prefix, "num_attention_heads", "hidden_size")
        _divides(self, prefix, "patch_size", "image_size")
        if not self.global_attn_indexes:
            raise ConfigError(f"{prefix}.global_attn_indexes: at least one global layer is required "
                              "(the high-res path keeps the output of the first one)")
        for i in self.global_attn_indexes:
            if not 0 <= i < self.num_hidden_layers:
                raise ConfigError(f"{prefix}.global_attn_indexes: {i} is not a layer index "
                                  f"(num_hidden_layers={self.num_hidden_layers})")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


HYBRID_TYPE, SIGLIP_ONLY_TYPE = "deepseek_vl_hybrid", "deepseek_vl"  # config.json model_type of each family
# The published chat model of each family: (name people know it by, hub id).
CHAT_MODELS = {HYBRID_TYPE: ("DeepSeek-VL 7B chat", "deepseek-community/deepseek-vl-7b-chat"),
               SIGLIP_ONLY_TYPE: ("DeepSeek-VL 1.3B chat", "deepseek-community/deepseek-vl-1.3b-chat")}


@dataclass
class DsvlConfig:
    """The whole model: ``text`` + ``vision`` (SigLIP) + ``high_res_vision`` (SAM; None for the 1.3B family)."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    high_res_vision: SamConfig | None = field(default_factory=SamConfig)
    image_token_id: int = 100015
    # The 7B chat model has an untied lm_head; tying also requires the checkpoint to lack lm_head.weight.
    tie_word_embeddings: bool = False
    torch_dtype: str | None = "bfloat16"
    # Set by our random-checkpoint writer so that the app can warn that answers are meaningless.
    random_weights: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.text.validate()
        self.vision.validate()
        if self.high_res_vision is not None:
            self.high_res_vision.validate()
        if not isinstance(self.image_token_id, int) or not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id: {self.image_token_id!r} is not a valid id for vocab_size "
                              f"{self.text.vocab_size}")
        if self.torch_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"torch_dtype: unsupported dtype {self.torch_dtype!r}")

    @property
    def hybrid(self) -> bool:
        """True for the SigLIP + SAM model (7B), False for the SigLIP-only one (1.3B)."""
        return self.high_res_vision is not None

    @property
    def model_type(self) -> str:
        return HYBRID_TYPE if self.hybrid else SIGLIP_ONLY_TYPE

    @property
    def display_name(self) -> str:
        """What the app calls the loaded model: the chat model of this family ("DeepSeek-VL 1.3B chat")."""
        return CHAT_MODELS[self.model_type][0]

    @property
    def num_image_tokens(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    # ---- reading -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DsvlConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(d).__name__}")
        if "text_config" not in d and "language_config" in d:
            d = _from_original_schema(d)
        hybrid = d.get("model_type") != SIGLIP_ONLY_TYPE
        text = dict(_section(d, "text_config"))
        # transformers 5 moved rope_theta into rope_parameters; 4.x keeps it at the top.
        rope = text.pop("rope_parameters", None) or text.pop("rope_scaling", None)
        if isinstance(rope, dict):
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                raise ConfigError(f"text_config.rope_parameters.rope_type: only default RoPE is supported, "
                                  f"got {rope.get('rope_type', rope.get('type'))!r}")
            if "rope_theta" in rope:
                text.setdefault("rope_theta", rope["rope_theta"])
        sam = dict(_section(d, "high_res_vision_config"))
        if "mlp_dim" not in sam and "mlp_ratio" in sam and "hidden_size" in sam:
            sam["mlp_dim"] = int(sam["hidden_size"] * sam["mlp_ratio"])
        dtype = d.get("dtype", d.get("torch_dtype", "bfloat16"))
        # Top level wins (transformers reads it there), else the text config's, else the class default of
        # transformers: False for the hybrid, True for DeepseekVLConfig (the loader still uses a stored lm_head).
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", not hybrid))
        return cls(
            text=_build(TextConfig, text, "text_config"),
            vision=_build(SiglipConfig, _section(d, "vision_config"), "vision_config"),
            high_res_vision=_build(SamConfig, sam, "high_res_vision_config") if hybrid else None,
            image_token_id=_typed(d.get("image_token_id", 100015), int, "image_token_id"),
            tie_word_embeddings=_typed(tie, bool, "tie_word_embeddings"),
            torch_dtype=dtype,
            random_weights=bool(d.get("dsvl_random_weights", False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "DsvlConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    # ---- writing (the converted layout, loadable by transformers too) ---------------------------

    def to_dict(self) -> dict[str, Any]:
        t, v, s = self.text, self.vision, self.high_res_vision
        text = {k: getattr(t, k) for k in _field_names(TextConfig) if k != "rope_theta"}
        text.update(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                    tie_word_embeddings=self.tie_word_embeddings)
        vision = {k: getattr(v, k) for k in _field_names(SiglipConfig)}
        vision.update(model_type="siglip_vision_model", vision_use_head=False)
        arch = "DeepseekVLHybridForConditionalGeneration" if self.hybrid else "DeepseekVLForConditionalGeneration"
        out = {"architectures": [arch], "model_type": self.model_type, "text_config": text, "vision_config": vision}
        if s is not None:
            sam = {k: getattr(s, k) for k in _field_names(SamConfig)}
            sam.update(model_type="sam_vision_model", global_attn_indexes=list(s.global_attn_indexes),
                       mlp_ratio=s.mlp_dim / s.hidden_size)
            out["high_res_vision_config"] = sam
        out.update(image_token_id=self.image_token_id, tie_word_embeddings=self.tie_word_embeddings,
                   dtype=self.torch_dtype)
        if self.random_weights:
            out["dsvl_random_weights"] = True
        return out

    # ---- presets --------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, vocab_size: int = 1024, image_token_id: int = 1000, hybrid: bool = True) -> "DsvlConfig":
        """Narrow and shallow, but with the real image geometry (384/1024 px, 576 tokens)."""
        return cls(
            text=TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=4096),
            vision=SiglipConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
            high_res_vision=SamConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_dim=64,
                                      output_channels=16, global_attn_indexes=(1, 3)) if hybrid else None,
            image_token_id=image_token_id,
            torch_dtype="float32",
            random_weights=True,
        )

    @classmethod
    def mid(cls) -> "DsvlConfig":
        """Full-size vision towers and vocabulary, 2 full-width decoder layers (CPU benchmark preset)."""
        return cls(text=TextConfig(num_hidden_layers=2), random_weights=True)

    @classmethod
    def siglip_only_1_3b(cls) -> "DsvlConfig":
        """``deepseek-community/deepseek-vl-1.3b-chat``: SigLIP-L/16-384, no SAM, DeepSeek-LLM-1.3B (24 layers,
        width 2048, 16 heads). The MLP width 5632 is the published DeepSeek-LLM-1.3B value, not read from the
        hub config here; a real checkpoint's config.json always wins."""
        return cls(text=TextConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                                   num_key_value_heads=16, intermediate_size=5632),
                   high_res_vision=None)


# ---- helpers ------------------------------------------------------------------------------------


def _from_original_schema(d: dict[str, Any]) -> dict[str, Any]:
    """deepseek-ai's own config.json (``model_type: multi_modality``): ``language_config`` is a LlamaConfig;
    the vision towers are named presets, so they take the defaults here: ``HybridVisionTower`` = SigLIP-L/16-384
    + SAM-B (7B), ``CLIPVisionTower`` = SigLIP-L/16-384 alone (1.3B, aligner ``mlp_gelu``)."""
    vision = d.get("vision_config") or {}
    cls = vision.get("cls") if isinstance(vision, dict) else None
    if cls not in (None, "HybridVisionTower", "CLIPVisionTower"):
        raise ConfigError(f"vision_config.cls: expected HybridVisionTower or CLIPVisionTower, got {cls!r}")
    return {"model_type": SIGLIP_ONLY_TYPE if cls == "CLIPVisionTower" else HYBRID_TYPE,
            "text_config": d["language_config"], "image_token_id": d.get("image_token_id", 100015),
            "tie_word_embeddings": d.get("tie_word_embeddings", False),
            "dtype": d.get("dtype", d.get("torch_dtype", "bfloat16"))}



def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section(d: dict[str, Any], name: str) -> dict[str, Any]:
    value = d.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected an object, got {type(value).__name__}")
    return value


def _typed(value: Any, kind: type, name: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values or values[f.name] is None:
            continue
        value, hint = values[f.name], hints[f.name]
        name = f"{prefix}.{f.name}"
        if hint in (int, float, str, bool):
            kwargs[f.name] = _typed(value, hint, name)
        elif hint == (int | None):
            kwargs[f.name] = _typed(value, int, name)
        elif f.name == "global_attn_indexes":
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name}: expected a list of layer indexes, got {value!r}")
            kwargs[f.name] = tuple(_typed(i, int, name) for i in value)
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def _positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{prefix}.{name}: must be positive, got {value!r}")


def _divides(obj: Any, prefix: str, small: str, big: str) -> None:
    if getattr(obj, big) % getattr(obj, small):
        raise ConfigError(f"{prefix}.{small}: {getattr(obj, small)} does not divide {big} {getattr(obj, big)}")
