"""GPU tests (``pytest -m cuda``; ``bench/gpu_check.py`` runs them). Without CUDA they are collected and skipped.

bf16 and fp16 greedy tokens and logits against CPU float32 on the tiny and mid checkpoints; the compiled step
(CUDA graphs) against eager; the KV budget on an emulated 24 GB card with the 7b checkpoint (``DSVL_CHECK_7B``).
Only torch, tokenizers, safetensors, pillow and jinja2 are needed (no gradio, bitsandbytes or torchao).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import dsvl

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = dict(temperature=0.0, repetition_penalty=1.0, stop=())
CARD_BYTES = 24 * 10**9  # an L4-class card


def user(text: str, image: Image.Image | None = None) -> dict:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> Path:
    from dsvl.tiny import write_checkpoint

    path = tmp_path_factory.mktemp("mid")
    write_checkpoint(path, size="mid")
    return path


def _first_logits(engine, conv, images) -> torch.Tensor:
    """float32 logits (on the CPU) of the prompt's last position."""
    ids = engine.processor.prepare(conv, max_context_tokens=4096, reserve_new_tokens=8).token_ids
    with torch.no_grad():
        pv, hpv = engine.processor.image_processor(images)
        feats = engine.model.get_image_features(pv.to(engine.device, engine.dtype), hpv.to(engine.device, engine.dtype))
        x = torch.tensor([ids], device=engine.device)
        h = engine.model.model.language_model(engine.model.embed(x, feats), torch.arange(len(ids), device=engine.device))
        return engine._logits(h[:, -1])[0].cpu()


@pytest.mark.parametrize("size", ["tiny", "mid"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_gpu_matches_cpu_float32(size, dtype, tiny_checkpoint, request):
    checkpoint = tiny_checkpoint if size == "tiny" else request.getfixturevalue("mid_checkpoint")
    cpu = dsvl.load(str(checkpoint), device="cpu", dtype="float32")
    gpu = dsvl.load(str(checkpoint), device="cuda", dtype=dtype, compile="off")
    image = Image.linear_gradient("L").convert("RGB").resize((80, 60))
    conv = [user("Describe this picture.", image)]
    a, b = _first_logits(cpu, conv, [image]), _first_logits(gpu, conv, [image])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.995
    ref = cpu.stream(conv, max_new_tokens=4, **GREEDY)
    "".join(ref)
    got = gpu.stream(conv, max_new_tokens=4, **GREEDY)
    "".join(got)
    assert got.generated_ids[:3] == ref.generated_ids[:3]  # random weights: later tokens may sit on near-ties


def test_compiled_step_matches_eager_on_gpu(tiny_checkpoint):
    eager = dsvl.load(str(tiny_checkpoint), device="cuda", dtype="bfloat16", compile="off")
    compiled = dsvl.load(str(tiny_checkpoint), device="cuda", dtype="bfloat16")  # auto = on for CUDA
    assert compiled.compiled and not eager.compiled
    conv = [user("What is the capital of France?")]
    for sid in ("a", "b"):  # two sessions: the graph serves every cache of the same size
        e = eager.stream(conv, session_id=sid, max_new_tokens=12, **GREEDY)
        c = compiled.stream(conv, session_id=sid, max_new_tokens=12, **GREEDY)
        assert "".join(c) == "".join(e) and c.generated_ids == e.generated_ids
        follow = conv + [assistant(c.text), user("Why?")]
        e2 = eager.stream(follow, session_id=sid, max_new_tokens=12, **GREEDY)
        c2 = compiled.stream(follow, session_id=sid, max_new_tokens=12, **GREEDY)
        assert "".join(c2) == "".join(e2) and c2.stats.reused_tokens > 0


@pytest.mark.skipif(not os.environ.get("DSVL_CHECK_7B"), reason="DSVL_CHECK_7B (a 7b checkpoint) not set")
def test_kv_budget_keeps_a_24gb_card_out_of_memory():
    """The 7B in bf16 on an emulated 24 GB card with the default KV budget: 8 sessions x 3 turns with one image
    each, no out-of-memory, reserved KV never above the budget."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_BYTES / total))
    try:
        engine = dsvl.load(os.environ["DSVL_CHECK_7B"], device="cuda", dtype="bfloat16")
        assert engine.kv_budget_bytes >= 4096 * engine._kv.token_bytes  # at least one full conversation
        convs = {f"s{i}": [] for i in range(8)}
        for turn in range(3):
            for sid, conv in convs.items():
                image = Image.new("RGB", (64 + 8 * turn, 48), (30 * int(sid[1:]), 90, 40 * turn))
                conv.append(user(f"Turn {turn}: what is in this picture?", image))
                s = engine.stream(conv, session_id=sid, max_new_tokens=32, **GREEDY)
                conv.append(assistant("".join(s)))
                st = engine.kv_stats()
                assert s.stats.stop_reason != "error"
                assert st["kv_reserved_bytes"] <= st["kv_budget_bytes"]
        assert torch.cuda.max_memory_reserved() <= CARD_BYTES
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
