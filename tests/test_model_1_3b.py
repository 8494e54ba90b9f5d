"""DeepSeek-VL 1.3B chat (SigLIP only, no SAM) against transformers' DeepseekVLForConditionalGeneration and
DeepseekVLProcessor on the same random checkpoint in its hub layout (``python -m dsvl.tiny --size 1.3b-tiny``),
float32 on CPU: towers, logits, greedy tokens (model and engine), pixels and ids on the golden chat cases, the
three weight layouts and both config schemas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsvl
from dsvl.config import DsvlConfig
from dsvl.loading import load_model
from dsvl.processor import Processor
from dsvl.tiny import write_checkpoint

import transformers  # the test-only reference: fail, never skip, without it

from test_model import Special, greedy, left_pad, prompt, rel

TOL = 1e-4  # max|diff| <= TOL * max|ref|
CASES = json.loads((Path(__file__).parent / "data" / "chat-format-cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-1.3b"), size="1.3b-tiny", layout="converted")


@pytest.fixture(scope="module")
def env(ckpt):
    ours, _ = load_model(ckpt, device="cpu", dtype=torch.float32)
    ref, info = transformers.DeepseekVLForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, output_loading_info=True)
    ref.eval()
    return ours, ref, info, Special(ckpt)


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 384, 384, generator=torch.Generator().manual_seed(seed))


def test_same_modules_without_sam(env, ckpt):
    ours, ref, info, _ = env
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert not any("high_res" in k for k in ours.state_dict())
    assert not ours.config.hybrid and ours.config.model_type == "deepseek_vl"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["DeepseekVLForConditionalGeneration"]
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)


def test_siglip_and_aligner_features(env):
    ours, ref, _, _ = env
    pv = pixels(2, 1)
    with torch.no_grad():
        r = ref.model.get_image_features(pv, return_dict=True)
        low = ours.get_low_res_features(pv)
        feats = ours.get_image_features(pv)
    assert low.shape == r.last_hidden_state.shape and feats.shape == r.pooler_output.shape
    assert rel(low, r.last_hidden_state) <= TOL and rel(feats, r.pooler_output) <= TOL
    with pytest.raises(ValueError, match="no high-resolution tower"):
        ours.get_image_features(pv, torch.zeros(2, 3, 1024, 1024))


@pytest.mark.parametrize("case", ["text", "one_image", "three_images"])
def test_logits_match(env, case):
    ours, ref, _, sp = env
    pieces = {"text": [23], "one_image": [5, "img", 9], "three_images": [3, "img", 4, "img", "img", 6]}[case]
    ids = torch.tensor([prompt(sp, pieces, seed=2)])
    n_img = pieces.count("img")
    kw = {"pixel_values": pixels(n_img, 3)} if n_img else {}
    with torch.no_grad():
        got, want = ours(ids, **kw).logits, ref(input_ids=ids, **kw).logits
    print(case, "max rel diff", rel(got, want))
    assert got.shape == want.shape and rel(got, want) <= TOL


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_matches_generate(env, batch):
    ours, ref, _, sp = env
    rows = [prompt(sp, [8, "img", 12], seed=9), prompt(sp, [30], seed=10)][:batch]
    ids, mask = left_pad(rows, sp.eos)
    pv = pixels(1, 11)
    with torch.no_grad():
        got = greedy(ours, ids, mask, pv, None, 32, sp.size, sp.eos)
        want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=32, do_sample=False,
                            suppress_tokens=list(range(sp.size, ours.config.text.vocab_size)), eos_token_id=sp.eos,
                            pad_token_id=sp.eos)[:, ids.shape[1]:].tolist()
    for g, w in zip(got, want):
        assert g[:len(w)] == w and len(w) >= min(len(g), 32)
    assert len(set(got[0])) > 4, "random weights must not produce a constant continuation"


def _image(i: int) -> Image.Image:
    sizes = [(500, 333), (40, 90), (384, 384), (1, 1), (2000, 15)]
    w, h = sizes[i % len(sizes)]
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _with_images(messages: list[dict]) -> list[dict]:
    n = 0
    out = []
    for m in messages:
        content = []
        for item in m["content"]:
            if item["type"] == "image":
                item, n = {"type": "image", "image": _image(n)}, n + 1
            content.append(item)
        out.append({**m, "content": content})
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_processor_ids_and_pixels_match(ckpt, case):
    ours = Processor.from_dir(ckpt)
    hf = transformers.AutoProcessor.from_pretrained(ckpt)
    assert type(hf).__name__ == "DeepseekVLProcessor"
    conv, gen = _with_images(case["messages"]), case["add_generation_prompt"]
    p = ours.prepare(conv, max_context_tokens=None)
    assert p.text == case["rendered"]
    want = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=True,
                                  return_tensors="pt")
    assert p.token_ids == want["input_ids"][0].tolist()
    if p.images:
        pv, hpv = ours.image_processor(p.images)
        assert hpv is None and pv.shape == want["pixel_values"].shape
        assert (pv - want["pixel_values"]).abs().max() <= 1e-5


def test_engine_stream_matches_generate(ckpt):
    engine = dsvl.load(str(ckpt), device="cpu", dtype="float32", max_context_tokens=2048)
    ref = transformers.DeepseekVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    conv = [{"role": "user", "content": [{"type": "image", "image": _image(0)}, {"type": "text", "text": "What?"}]}]
    p = engine.processor.prepare(conv)
    pv, _ = engine.processor.image_processor(p.images)
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([p.token_ids]), pixel_values=pv, max_new_tokens=12,
                           do_sample=False, suppress_tokens=list(range(engine.tokenizer.size, engine.config.text.vocab_size)),
                           eos_token_id=engine.eos_id, pad_token_id=engine.pad_id)
    s = engine.stream(conv, max_new_tokens=12, temperature=0.0, repetition_penalty=1.0, stop=())
    list(s)
    got = s.generated_ids + ([engine.eos_id] if s.stats.stop_reason == "eos" else [])
    assert got == out[0, len(p.token_ids):].tolist()
    assert s.stats.images_encoded == 1


def test_three_layouts_load_identically(tmp_path):
    loaded = {}
    for layout in ("converted", "transformers5", "original"):
        d = write_checkpoint(tmp_path / layout, size="1.3b-tiny", layout=layout, seed=3)
        model, info = load_model(d, dtype=torch.float32)
        loaded[layout] = (model.state_dict(), info)
    assert loaded["original"][1].ignored and all("attn_pool" in n for n in loaded["original"][1].ignored)
    names = json.loads((tmp_path / "original" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "aligner.layers.0.weight" in names and "aligner.layers.2.weight" in names
    assert any(n.startswith("vision_model.vision_tower.blocks.0.attn.qkv") for n in names)
    base = loaded["converted"][0]
    for layout in ("transformers5", "original"):
        assert all(torch.equal(base[k], loaded[layout][0][k]) for k in base), layout


def test_config_schemas():
    cfg = DsvlConfig.siglip_only_1_3b()
    d = cfg.to_dict()
    assert d["model_type"] == "deepseek_vl" and "high_res_vision_config" not in d
    assert DsvlConfig.from_dict(d) == cfg
    # transformers' DeepseekVLConfig ties by default; the loader still uses a stored lm_head.
    untold = {k: v for k, v in d.items() if k != "tie_word_embeddings"}
    untold["text_config"] = {k: v for k, v in d["text_config"].items() if k != "tie_word_embeddings"}
    assert DsvlConfig.from_dict(untold).tie_word_embeddings
    original = {"model_type": "multi_modality", "language_config": {"hidden_size": 2048, "num_hidden_layers": 24,
                "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632},
                "vision_config": {"cls": "CLIPVisionTower", "params": {"model_name": "siglip_large_patch16_384"}},
                "aligner_config": {"cls": "MlpProjector", "params": {"projector_type": "mlp_gelu"}}}
    orig = DsvlConfig.from_dict(original)
    assert not orig.hybrid and orig.text.hidden_size == 2048 and orig.vision == cfg.vision
    assert DsvlConfig.from_dict({**original, "vision_config": {"cls": "HybridVisionTower"}}).hybrid


def test_auto_on_a_small_cpu_suggests_the_1_3b_model():
    from dsvl.quantization import SMALLER_MODEL, choose_auto, estimate_bytes

    gib, bf16, cpu = 1 << 30, torch.bfloat16, torch.device("cpu")
    small = estimate_bytes(DsvlConfig.siglip_only_1_3b(), bf16, "none", 4096)
    assert 3 * gib < small < 8 * gib  # ~2 G parameters in bfloat16 + KV cache + headroom
    seven = DsvlConfig()
    c = choose_auto(seven, cpu, bf16, free_bytes=small + gib)  # the 7B does not fit in 16-bit, the 1.3B does
    assert c.mode != "none" and SMALLER_MODEL in c.reason and "--model" in c.reason
    assert SMALLER_MODEL not in choose_auto(seven, cpu, bf16, free_bytes=80 * gib).reason  # 7B fits: no hint
    assert SMALLER_MODEL not in choose_auto(seven, cpu, bf16, free_bytes=small // 2).reason  # neither fits
    assert SMALLER_MODEL not in choose_auto(DsvlConfig.siglip_only_1_3b(), cpu, bf16, free_bytes=small // 2).reason


def test_app_names_the_loaded_model(ckpt, tiny_checkpoint):
    from dsvl_app import Settings
    from dsvl_app.ui import banner_html, build_app

    small = dsvl.load(str(ckpt), device="cpu", dtype="float32")
    big = dsvl.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    for engine, name, hub in [(small, "DeepSeek-VL 1.3B chat", "deepseek-vl-1.3b-chat"),
                              (big, "DeepSeek-VL 7B chat", "deepseek-vl-7b-chat")]:
        banner = banner_html(engine, Settings(model=str(ckpt)))
        assert f'<span class="name">{name}</span>' in banner and f"--model deepseek-community/{hub}" in banner
        assert build_app(engine, Settings(model=str(ckpt))).title == name


def test_image_processor_family_from_its_file():
    from dsvl.images import ImageProcessor, preprocessor_config

    assert ImageProcessor.from_dict(preprocessor_config()).hybrid
    assert not ImageProcessor.from_dict(preprocessor_config(hybrid=False)).hybrid
    assert not ImageProcessor.from_dict({"processor_class": "DeepseekVLProcessor"}).hybrid
    assert not ImageProcessor.from_dict({"image_processor_type": "VLMImageProcessor", "image_size": 384}).hybrid
    assert ImageProcessor.from_dict({"image_processor_type": "VLMImageProcessor", "image_size": 1024}).hybrid
    assert ImageProcessor.from_dict({}).hybrid  # no file content: the 7B defaults


def test_mismatched_processor_files_are_refused(ckpt, tmp_path):
    import shutil

    from dsvl.images import preprocessor_config

    d = tmp_path / "mixed"
    shutil.copytree(ckpt, d)
    (d / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(hybrid=True)))
    with pytest.raises(dsvl.CheckpointError, match="other DeepSeek-VL family"):
        dsvl.load(str(d), device="cpu", dtype="float32")


def test_full_size_shapes_equal_transformers_on_meta():
    from dsvl.loading import iter_expected

    cfg = DsvlConfig.siglip_only_1_3b()
    ours = dict(iter_expected(cfg))
    with torch.device("meta"):
        ref = transformers.DeepseekVLForConditionalGeneration(transformers.DeepseekVLConfig(**cfg.to_dict()))
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    n = sum(torch.Size(s).numel() for s in ours.values())
    assert 1.9e9 < n < 2.1e9  # untied 102400-row embeddings and head + 1.23 G decoder + 0.3 G SigLIP-L
