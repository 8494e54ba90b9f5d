"""Weight-only int8 / int4 (``int8-wo``, ``int4-wo``): the modules against their dequantized weights, accuracy of
the whole model against 16-bit, that every decoder Linear is quantized, memory while loading, mode names and
``auto``'s choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsvl
from dsvl.config import DsvlConfig
from dsvl.quantization import (QuantizationError, check_mode, choose_auto, estimate_bytes, quantize_linear,
                               quantize_model, speed_order)
from dsvl.weightonly import Int4Linear, Int8Linear, WeightOnlyLinear, quantize_int4
from configs import wide_decoder

ROOT = Path(__file__).resolve().parents[1]
TEXT = "User: What is the capital of France?\n\nAssistant: The capital of France is Paris."


def _linear(in_f: int, out_f: int, dtype=torch.bfloat16, bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


# ---- the modules ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_computes_its_dequantized_weight(cls, dtype):
    lin = _linear(256, 192, dtype, bias=True)
    q = cls(lin)
    w = q.dequantize()
    for rows in (1, 3, q.dense_from_rows + 5):  # fused kernel (decode) and dequantize + GEMM (prefill)
        x = torch.randn(1, rows, 256, dtype=dtype)
        y = q(x)
        assert y.shape == (1, rows, 192) and y.dtype == dtype
        ref = F.linear(x.float(), w, lin.bias.float())
        assert F.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0) > 0.9999
    # Both paths agree with each other, not only with the reference.
    x = torch.randn(40, 256, dtype=dtype)
    assert torch.allclose(q._matmul(x).float(), q._dense_matmul(x).float(), rtol=0.05, atol=0.05)


def test_quantization_error_is_within_half_a_step():
    lin = _linear(256, 64, torch.float32)
    w = lin.weight.data
    q8 = Int8Linear(lin)
    step8 = q8.scales.float()[:, None]
    assert ((q8.dequantize() - w).abs() <= step8 * 0.51).all()
    q4 = Int4Linear(lin, 64)
    step4 = q4.scale_zero[..., 0].float().t().repeat_interleave(64, dim=1)  # (out, in)
    assert ((q4.dequantize() - w).abs() <= step4 * 0.51).all()
    codes, scale_zero = quantize_int4(w, 64)
    assert codes.min() >= 0 and codes.max() <= 15 and scale_zero.shape == (4, 64, 2)


def test_bytes_per_weight():
    lin = _linear(512, 256)
    assert Int8Linear(lin).nbytes == 512 * 256 + 256 * 2  # int8 + a bf16 scale per row
    q4 = Int4Linear(lin, 128)
    assert q4.nbytes == 512 * 256 // 2 + (512 // 128) * 256 * 2 * 2  # nibbles + bf16 (scale, zero) per group
    assert q4.nbytes / (512 * 256 * 2) < 0.27  # vs bf16


def test_int4_group_size_adapts_and_validates():
    assert Int4Linear(_linear(64, 64), 128).group_size == 64  # the tiny model's width
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear(_linear(40, 64))
    # A Linear no int4 group fits stays int8 instead of failing the load.
    assert isinstance(quantize_linear(_linear(40, 64), "int4-wo"), Int8Linear)


def test_mode_names():
    assert check_mode(" INT8-WO ") == "int8-wo" and check_mode("int4-wo") == "int4-wo"
    assert check_mode("int4-wo-g64") == "int4-wo-g64"
    assert check_mode("int8") == "bnb-int8" and check_mode("nf4") == "bnb-nf4"  # the old names still work
    with pytest.raises(QuantizationError, match="group size"):
        check_mode("int4-wo-g100")
    with pytest.raises(QuantizationError, match="unknown quantization.*int8-wo"):
        check_mode("int3")


# ---- the whole model --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return dsvl.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", quantization="none")


def _logits(engine, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(ids).logits[0].float()


def _greedy(engine, ids: torch.Tensor, n: int = 8) -> list[int]:
    out = []
    for _ in range(n):
        nxt = _logits(engine, ids)[-1, :engine.vocab_limit].argmax().item()
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def _same_greedy_tokens(reference, q, prompt: str, n: int = 8, tie: float = 0.1) -> None:
    """The reference's first ``n`` greedy tokens are the quantized model's argmax too, fed the same prefix. A random
    tiny model has near-ties (top-2 logits closer than ``tie``); there either token is fine, and free-running
    greedy would then follow a different but equally valid path, so the prefixes are teacher-forced."""
    ids = torch.tensor([reference.tokenizer.encode(prompt)])
    greedy = torch.tensor(_greedy(reference, ids, n))
    full = torch.cat([ids, greedy[None]], 1)
    rows = slice(ids.shape[1] - 1, -1)
    ref = _logits(reference, full)[rows, :reference.vocab_limit]
    got = _logits(q, full)[rows, :reference.vocab_limit].argmax(-1)
    top2 = ref.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) >= tie
    assert clear.sum() >= n - 2, "the prompt must give mostly clear choices to test anything"
    assert torch.equal(got[clear], greedy[clear]), (got.tolist(), greedy.tolist())


# Bounds against bf16: logits cosine >= 0.999 (int8) / 0.99 (int4), the first 8 greedy tokens equal.
@pytest.mark.parametrize("mode,min_cos,kind", [("int8-wo", 0.999, Int8Linear), ("int4-wo", 0.99, Int4Linear)])
def test_every_decoder_linear_quantized_and_accurate(reference, tiny_checkpoint, mode, min_cos, kind):
    q = dsvl.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", quantization=mode)
    assert q.quantization == mode
    lm = q.model.model.language_model
    layer_linears = [(n, m) for n, m in lm.layers.named_modules() if isinstance(m, (nn.Linear, WeightOnlyLinear))]
    assert len(layer_linears) >= 4 * len(lm.layers)  # q/k/v/o + MLP, fused or not
    assert all(isinstance(m, kind) for _, m in layer_linears), [n for n, m in layer_linears if type(m) is not kind]
    assert isinstance(q.model.lm_head, Int8Linear)  # lm_head: int8 in both modes
    assert type(q.model.model.vision_model.encoder.layers[0].self_attn.q_proj) is nn.Linear  # towers stay 16-bit
    assert type(q.model.model.aligner.proj) is nn.Linear

    ids = torch.tensor([q.tokenizer.encode(TEXT)])
    a, b = _logits(reference, ids), _logits(q, ids)
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() >= min_cos
    for prompt in (TEXT, "User: Describe the capital of France in detail.\n\nAssistant:"):
        _same_greedy_tokens(reference, q, prompt)
    sixteen = sum(2 * m.in_features * m.out_features for _, m in layer_linears)
    # + the scales: one per row (int8) or per group (int4) on the tiny model's 64-128 wide rows
    assert sum(m.nbytes for _, m in layer_linears) <= (0.52 if mode == "int8-wo" else 0.29) * sixteen
    assert q.weight_bytes < reference.weight_bytes
    s = q.stream([{"role": "user", "content": "Hi"}], max_new_tokens=4, temperature=0, stop=())
    list(s)
    assert s.stats.new_tokens == 4


def test_quantize_model_hook_on_a_loaded_model(tiny_checkpoint):
    """The hook for bench/gpu_check.py: a model from ``load_model`` (its q|k|v and gate|up already fused), quantized in
    place on whatever device it is on, equals the one quantized while loading."""
    from dsvl.loading import load_model

    m, _ = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    n = quantize_model(m, "int4-wo")
    assert n == 4 * m.config.text.num_hidden_layers + 1  # qkv, o, gate_up, down per layer + lm_head
    at_load, _ = load_model(tiny_checkpoint, dtype=torch.bfloat16, quantization="int4-wo")
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, at_load(ids).logits)


# ---- memory while loading ---------------------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(2)
    import dsvl.model, dsvl.tiny, dsvl.quantization, dsvl.weightonly
    from dsvl.config import DsvlConfig
    from dsvl.loading import load_model

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    path, mode = sys.argv[1], sys.argv[2]
    with torch.device("meta"):  # one-time costs (lazy imports, kernel set-up) paid before measuring
        dsvl.model.DeepseekVLHybrid(DsvlConfig.tiny())
    dsvl.weightonly.Int4Linear(torch.nn.Linear(256, 128).bfloat16())(torch.randn(1, 256, dtype=torch.bfloat16))
    base = status("VmRSS:")
    model, info = load_model(path, device="cpu", dtype="bfloat16", quantization=mode)
    print(json.dumps({"growth": status("VmHWM:") - base, "bytes": dsvl.quantization.weight_bytes(model),
                      "file": info.weight_bytes, "quantized": len(info.quantized)}))
""")


def test_quantized_load_peak_is_the_quantized_weights(tmp_path):
    """8 decoder layers 1024 wide in one 200 MB bf16 file: loading as int4 must peak near the int4 size (the
    16-bit file never accumulates), not near the file."""
    from dsvl.tiny import write_checkpoint

    cfg = wide_decoder(8)
    d = tmp_path / "wide"
    write_checkpoint(d, size="mid", config=cfg, shard_bytes=1 << 40)
    file_bytes = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(d), "int4-wo"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print("int4 load: peak growth", r["growth"], "quantized weights", r["bytes"], "file", file_bytes)
    assert r["quantized"] == 4 * 8 + 1  # fused qkv, o, gate_up, down per layer + lm_head
    assert r["bytes"] < 0.45 * file_bytes
    largest_linear = 2 * 2816 * 1024 * 4  # fused gate|up in float32: quantizing it needs a few such temporaries
    assert r["growth"] <= 1.2 * r["bytes"] + 4 * largest_linear, r  # measured: 1.0x + ~3.4x
    assert r["growth"] < 0.6 * file_bytes


# ---- auto ---------------------------------------------------------------------------------------------------------

def test_auto_picks_the_fastest_mode_that_fits():
    cfg = DsvlConfig()  # 7B shapes
    cpu = torch.device("cpu")
    order, why = speed_order(cpu, torch.bfloat16)
    need = {m: estimate_bytes(cfg, torch.bfloat16, m, 4096) for m in order}
    gib = 1 << 30
    assert need["int4-wo"] < need["int8-wo"] < need["none"]
    # 7B int4: decoder 3.2 GB + int8 lm_head 0.4 + 16-bit rest 1.7 + 2 GB KV + headroom -> under 9 GiB.
    assert need["int4-wo"] < 9 * gib
    plenty = choose_auto(cfg, cpu, torch.bfloat16, free_bytes=80 * gib)
    assert plenty.mode == order[0] and why in plenty.reason and "fits" in plenty.reason
    if order[0] == "int4-wo":  # AVX2/AVX512 CPUs: the fused kernels make 4-bit the fastest
        assert "int4-wo" in plenty.reason
    tight = choose_auto(cfg, cpu, torch.bfloat16, free_bytes=min(need.values()) - 1)
    assert tight.mode == min(need, key=need.get) and "may run out of memory" in tight.reason
    second = choose_auto(cfg, cpu, torch.bfloat16, free_bytes=need[order[1]] + 1)
    if need[order[0]] > need[order[1]]:
        assert second.mode == order[1] and f"{order[0]} would need" in second.reason


def test_auto_order_per_device():
    order, _ = speed_order(torch.device("cpu"), torch.bfloat16)
    assert order[-1] == "bnb-nf4" and set(order) >= {"none", "int8-wo", "int4-wo"}
    if torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        assert order[:3] == ("int4-wo", "int8-wo", "none")
    assert speed_order(torch.device("mps"), torch.float16)[0] == ("none",)


def test_auto_on_load_reports_choice(tiny_checkpoint):
    e = dsvl.load(str(tiny_checkpoint), device="cpu", dtype="float32", quantization="auto")
    assert e.quantization == speed_order(torch.device("cpu"), torch.float32)[0][0]  # a tiny model fits anywhere
    assert "free on cpu" in e.quantization_reason and "fastest" in e.quantization_reason
