"""DsvlConfig: both transformers schemas, the 7B defaults, the presets and field-naming errors."""

from __future__ import annotations

import json

import pytest

from dsvl.config import ConfigError, DsvlConfig


def converted_v4() -> dict:
    """A transformers-4.x style converted config (rope_theta / torch_dtype at the top of the sub-configs)."""
    return {
        "model_type": "deepseek_vl_hybrid",
        "text_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 30,
                        "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 102400,
                        "max_position_embeddings": 16384, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1024, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "intermediate_size": 4096, "image_size": 384,
                          "patch_size": 16, "hidden_act": "gelu", "vision_use_head": False},
        "high_res_vision_config": {"model_type": "sam_vision_model", "hidden_size": 768, "num_hidden_layers": 12,
                                   "num_attention_heads": 12, "mlp_ratio": 4.0, "output_channels": 256,
                                   "image_size": 1024, "patch_size": 16, "window_size": 14,
                                   "global_attn_indexes": [2, 5, 8, 11]},
        "image_token_id": 100015,
        "torch_dtype": "bfloat16",
    }


def converted_v5() -> dict:
    d = converted_v4()
    text = d["text_config"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    text["dtype"] = text.pop("torch_dtype")
    d["dtype"] = d.pop("torch_dtype")
    return d


def test_defaults_are_the_7b_chat_model():
    c = DsvlConfig()
    t, v, s = c.text, c.vision, c.high_res_vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, t.vocab_size, t.rms_norm_eps, t.rope_theta) == (
        4096, 30, 32, 32, 128, 11008, 102400, 1e-6, 10000.0)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, v.hidden_act, v.layer_norm_eps) == (
        1024, 24, 384, 16, "gelu", 1e-6)
    assert (s.hidden_size, s.num_hidden_layers, s.mlp_dim, s.output_channels, s.window_size,
            s.global_attn_indexes, s.grid_size) == (768, 12, 3072, 256, 14, (2, 5, 8, 11), 64)
    assert c.image_token_id == 100015 and c.tie_word_embeddings is False and c.num_image_tokens == 576
    assert DsvlConfig.from_dict({}) == DsvlConfig()  # every missing field takes the 7B default


def test_both_schemas_read_the_same():
    a, b = DsvlConfig.from_dict(converted_v4()), DsvlConfig.from_dict(converted_v5())
    assert a == b == DsvlConfig()
    theta = converted_v5()
    theta["text_config"]["rope_parameters"]["rope_theta"] = 500000.0
    assert DsvlConfig.from_dict(theta).text.rope_theta == 500000.0


def test_tie_word_embeddings_top_level_then_text_config():
    d = converted_v5()
    d["text_config"]["tie_word_embeddings"] = True
    assert DsvlConfig.from_dict(d).tie_word_embeddings is True
    d["tie_word_embeddings"] = False
    assert DsvlConfig.from_dict(d).tie_word_embeddings is False


@pytest.mark.parametrize("preset", [DsvlConfig.tiny, DsvlConfig.mid, DsvlConfig])
def test_round_trip_and_real_geometry(preset):
    c = preset()
    assert DsvlConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.num_image_tokens == 576 and c.high_res_vision.grid_size == 64  # tiny shrinks widths only


def test_to_dict_is_what_transformers_reads():
    import transformers
    c = DsvlConfig.tiny()
    hf = transformers.DeepseekVLHybridConfig(**c.to_dict())
    assert hf.text_config.rope_parameters["rope_theta"] == c.text.rope_theta
    assert hf.vision_config.hidden_act == "gelu" and hf.vision_config.vision_use_head is False
    assert hf.high_res_vision_config.mlp_dim == c.high_res_vision.mlp_dim
    assert list(hf.high_res_vision_config.global_attn_indexes) == list(c.high_res_vision.global_attn_indexes)
    assert hf.image_token_id == c.image_token_id and hf.tie_word_embeddings is False


def test_original_deepseek_schema():
    d = {"model_type": "multi_modality", "language_config": {"hidden_size": 4096, "num_hidden_layers": 30,
                                                             "vocab_size": 102400, "torch_dtype": "bfloat16"},
         "vision_config": {"cls": "HybridVisionTower", "params": {}}}
    assert DsvlConfig.from_dict(d) == DsvlConfig()
    with pytest.raises(ConfigError, match="vision_config.cls"):
        DsvlConfig.from_dict({"language_config": {}, "vision_config": {"cls": "SamVisionTower"}})
    # CLIPVisionTower (SigLIP alone) is the 1.3B model: tests/test_model_1_3b.py


@pytest.mark.parametrize("section,key,value,match", [
    ("text_config", "hidden_size", "4096", r"text_config\.hidden_size: expected int"),
    ("text_config", "num_hidden_layers", True, r"text_config\.num_hidden_layers: expected int"),
    ("text_config", "rms_norm_eps", "1e-6", r"text_config\.rms_norm_eps: expected float"),
    ("text_config", "num_attention_heads", 0, r"text_config\.num_attention_heads: must be positive"),
    ("text_config", "num_key_value_heads", 5, r"text_config\.num_key_value_heads: 5 does not divide"),
    ("text_config", "hidden_act", "gelu", r"text_config\.hidden_act"),
    ("vision_config", "patch_size", 15, r"vision_config\.patch_size: 15 does not divide"),
    ("vision_config", "hidden_act", "relu", r"vision_config\.hidden_act"),
    ("high_res_vision_config", "global_attn_indexes", [2, 12], r"high_res_vision_config\.global_attn_indexes"),
    ("high_res_vision_config", "global_attn_indexes", "2,5", r"high_res_vision_config\.global_attn_indexes"),
    ("high_res_vision_config", "window_size", -1, r"high_res_vision_config\.window_size: must be positive"),
])
def test_bad_fields_are_named(section, key, value, match):
    d = converted_v5()
    d[section][key] = value
    with pytest.raises(ConfigError, match=match):
        DsvlConfig.from_dict(d)


def test_bad_top_level_fields_are_named(tmp_path):
    with pytest.raises(ConfigError, match="image_token_id"):
        DsvlConfig.from_dict({**converted_v5(), "image_token_id": 102400})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        DsvlConfig.from_dict({**converted_v5(), "tie_word_embeddings": "yes"})
    with pytest.raises(ConfigError, match="torch_dtype"):
        DsvlConfig.from_dict({**converted_v5(), "dtype": "float8"})
    with pytest.raises(ConfigError, match="rope_type"):
        d = converted_v5()
        d["text_config"]["rope_parameters"] = {"rope_type": "linear", "factor": 2.0}
        DsvlConfig.from_dict(d)
    with pytest.raises(ConfigError, match="text_config: expected an object"):
        DsvlConfig.from_dict({"text_config": [1]})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        DsvlConfig.from_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        DsvlConfig.from_file(tmp_path / "missing" / "config.json")
