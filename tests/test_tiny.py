"""dsvl.tiny: random-weight checkpoints in the exact hub layout (files, index, shapes, counts, determinism)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsvl.config import DsvlConfig
from dsvl.loading import load_model
from dsvl.tiny import config_for, default_dtype, plan_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_ids(d: Path) -> dict[str, int]:
    tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    return {t["content"]: t["id"] for t in tok["added_tokens"]}


def test_hub_files_and_index(tiny_checkpoint):
    d = tiny_checkpoint
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json", "chat_template.jinja", "model.safetensors.index.json"):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["dsvl_random_weights"] is True and cfg["model_type"] == "deepseek_vl_hybrid"
    assert cfg["dtype"] == "float32"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in d.glob("model-*.safetensors"))
    assert all(f.startswith("model-0000") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    stored, total = {}, 0
    for f in files:
        with safe_open(str(d / f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                t = h.get_tensor(k)
                stored[k] = f
                total += t.numel() * t.element_size()
    assert stored == index["weight_map"] and index["metadata"]["total_size"] == total
    assert any(k.startswith("model.vision_model.vision_model.") for k in stored)  # converted layout


def test_tokenizer_ids_and_vocab(tiny_checkpoint):
    ids = tokenizer_ids(tiny_checkpoint)
    cfg = DsvlConfig.from_file(tiny_checkpoint / "config.json")
    assert cfg.image_token_id == ids["<image_placeholder>"]  # the tokenizer's own id, not 100015
    assert cfg.random_weights
    # More embedding rows than tokenizer ids, on purpose (the real model: 102400 rows, 100016 ids).
    assert cfg.text.vocab_size > max(ids.values()) + 1


def test_weights_have_sensible_scales(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    m = model.model
    assert 0.2 < float(m.high_res_vision_alpha) < 1.0
    assert not torch.equal(m.language_model.norm.weight, torch.ones_like(m.language_model.norm.weight))
    assert m.aligner.proj.bias.abs().max() > 0
    assert m.high_res_vision_model.vision_encoder.layers[0].attn.rel_pos_h.abs().max() > 0
    ids = torch.randint(0, 600, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert 1.0 < logits.std(-1).mean() < 10  # spread, not degenerate
    assert len(set(logits.argmax(-1).tolist())) > 10  # the argmax depends on the context


def test_deterministic_per_seed(tmp_path):
    a = write_checkpoint(tmp_path / "a", seed=3)
    b = write_checkpoint(tmp_path / "b", seed=3)
    c = write_checkpoint(tmp_path / "c", seed=4)
    for f in sorted(a.glob("model-*.safetensors")):
        assert f.read_bytes() == (b / f.name).read_bytes()
        assert f.read_bytes() != (c / f.name).read_bytes()


def test_full_size_counts_from_meta():
    """docs/MODEL.md §6: 854 tensors and 7,331,390,721 parameters; the original checkpoint fuses SigLIP qkv and
    adds the unused attention-pool head and two LayerNorms (12,595,200 + 4,096), 14.688 GB in bfloat16."""
    cfg = config_for("7b", image_token_id=702)
    conv = plan_tensors(cfg, "converted", seed=0)
    numel = lambda ts: sum(torch.Size(t.shape).numel() for t in ts)  # noqa: E731
    assert len(conv) == 854 and numel(conv) == 7_331_390_721
    orig = plan_tensors(cfg, "original", seed=0)
    assert len(orig) == 854 - 6 * 24 + 2 * 24 + 17  # q,k,v weight+bias -> qkv weight+bias per layer
    assert numel(orig) == 7_331_390_721 + 12_595_200 + 4_096
    assert abs(numel(orig) * 2 / 1e9 - 14.69) < 0.01
    shapes = {t.name: t.shape for t in orig}
    assert shapes["vision_model.vision_tower_low.vision_tower.blocks.0.attn.qkv.weight"] == (3072, 1024)
    assert shapes["vision_model.vision_tower_low.vision_tower.pos_embed"] == (1, 576, 1024)
    assert shapes["vision_model.vision_tower_high.vision_tower.blocks.2.attn.rel_pos_h"] == (127, 64)
    assert shapes["vision_model.vision_tower_high.vision_tower.blocks.3.attn.rel_pos_h"] == (27, 64)
    assert shapes["language_model.lm_head.weight"] == (102400, 4096)


def test_default_dtypes():
    assert default_dtype("tiny") == torch.float32
    assert default_dtype("mid") == default_dtype("7b") == torch.bfloat16


def test_transformers_reads_every_layout_it_knows(tmp_path):
    import transformers
    for layout in ("converted", "transformers5"):
        d = write_checkpoint(tmp_path / layout, layout=layout)
        _, info = transformers.DeepseekVLHybridForConditionalGeneration.from_pretrained(
            d, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], layout


def test_cli(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "dsvl.tiny", str(out), "--layout", "original", "--seed", "1"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "original" in r.stdout and str(out) in r.stdout
    _, info = load_model(out, device="cpu", dtype=torch.float32)
    assert info.layout == "original"
