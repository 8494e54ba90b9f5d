"""bitsandbytes quantization of the decoder's linear layers: LLM.int8 (``int8``) and 4-bit NormalFloat (``nf4``).

Only the 7 Linears of each decoder layer (q/k/v/o, gate/up/down: 6.07 G of the 7B model's 7.33 G parameters) are
quantized. The vision towers, aligner, embeddings and ``lm_head`` stay in the model dtype, as bitsandbytes'
transformers integration does by default: they are small, and quantizing the head or the vision path costs quality
for little memory. The loader (``dsvl.loading``) calls ``is_quantizable`` / ``quantize_linear`` as each shard
finishes, so peak memory stays near the quantized size instead of the 16-bit one.

Both modes run on CPU with bitsandbytes 0.50 (its CPU backend) and on CUDA. On CPU they save memory, not time:
bitsandbytes' CPU kernels dequantize per call, so decode is slower than bfloat16 (measured numbers in
``bench/README.md``).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import CHAT_MODELS, SIGLIP_ONLY_TYPE, DsvlConfig

log = logging.getLogger(__name__)

MODES = ("none", "int8", "nf4", "auto")
NF4_BLOCKSIZE = 64
# LLM.int8's outlier threshold (transformers' BitsAndBytesConfig default): activation columns above it run in
# 16-bit. 0 would be faster on GPU but loses the method's accuracy guarantee on real 7B activations.
INT8_THRESHOLD = 6.0

# Decoder projections (also the fused names, should the loader ever fuse q/k/v or gate/up).
_DECODER_LINEAR = re.compile(
    r"(^|\.)language_model\.layers\.\d+\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)$")


class QuantizationError(ValueError):
    """Unknown mode, or bitsandbytes missing / unusable on this device."""


def is_quantizable(module_name: str) -> bool:
    """True for the decoder Linears (``model.language_model.layers.N.self_attn.q_proj`` etc.), False for everything
    else (vision towers, aligner, embeddings, ``lm_head``)."""
    return _DECODER_LINEAR.search(module_name) is not None


def check_mode(mode: str) -> str:
    mode = mode.strip().lower()
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        raise QuantizationError(f"quantization needs bitsandbytes (pip install bitsandbytes): {e}") from None
    return bnb


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """Replace a loaded ``nn.Linear`` by its bitsandbytes counterpart, quantized on the Linear's own device.

    ``int8``: ``Linear8bitLt`` (int8 rows + one float32 scale per row; LLM.int8 outlier threshold 6.0).
    ``nf4``: ``Linear4bit`` (NF4, blocksize 64, double-quantized absmax), compute dtype = the Linear's dtype.
    The 16-bit weight is dropped as soon as the quantized copy exists.
    """
    bnb = _bnb()
    w = linear.weight.data
    if w.device.type == "meta":
        raise QuantizationError("quantize_linear needs a loaded Linear, got one on the meta device")
    out_f, in_f = w.shape
    bias = linear.bias
    if mode == "int8":
        # bnb warns on every float32 call that it casts activations to float16 for the int8 matmul: expected.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        # Built on meta so that nn.Linear.__init__ does not allocate and randomly initialise a full weight.
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
        # Row-wise absmax quantization (what Int8Params does on .cuda()); bnb quantizes from float16.
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        q.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    elif mode == "nf4":
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=w.dtype, compress_statistics=True,
                              quant_type="nf4", device="meta")
        w4, state = bnb.functional.quantize_4bit(w.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True,
                                                 quant_type="nf4", quant_storage=torch.uint8)
        q.weight = bnb.nn.Params4bit(w4, requires_grad=False, quant_state=state, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                     module=q, bnb_quantized=True)
        q.quant_state = state
    else:
        raise QuantizationError(f"quantize_linear: mode must be 'int8' or 'nf4', got {mode!r}")
    if bias is not None:
        q.bias = nn.Parameter(bias.data, requires_grad=False)
    q.requires_grad_(False)
    return q


def quantize_model(model: nn.Module, mode: str) -> int:
    """Quantize every quantizable Linear of an already-loaded model in place; returns how many were replaced.
    (The loader does this shard by shard; this is for models built in memory, e.g. tests.)"""
    targets = [name for name, m in model.named_modules() if type(m) is nn.Linear and is_quantizable(name)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(getattr(parent, child), mode))
    return len(targets)


# ---- memory accounting -----------------------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _quant_state_bytes(state) -> int:
    if state is None:
        return 0
    n = _tensor_bytes(getattr(state, "absmax", None)) + _tensor_bytes(getattr(state, "code", None))
    return n + _quant_state_bytes(getattr(state, "state2", None))  # double quantization


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of one module's own parameters and buffers, including bitsandbytes scales / quant state."""
    n = sum(_tensor_bytes(p.data) for p in module.parameters(recurse=False))
    n += sum(_tensor_bytes(b) for b in module.buffers(recurse=False))
    w = getattr(module, "weight", None)
    if w is not None and getattr(w, "quant_state", None) is not None:  # Params4bit
        n += _quant_state_bytes(w.quant_state)
    scb = getattr(w, "SCB", None) if w is not None else None
    state = getattr(module, "state", None)
    if scb is None and state is not None:  # Linear8bitLt moves SCB to .state on its first forward
        scb = getattr(state, "SCB", None)
    return n + _tensor_bytes(scb)


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of all weights (parameters + buffers + quantization scales). Shared tensors count once."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        key = id(m)
        if key in seen:
            continue
        seen.add(key)
        # Tied weights (lm_head = embed_tokens) would be counted twice through their two modules.
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                total -= _tensor_bytes(p.data)
            seen.add(id(p))
        total += module_weight_bytes(m)
    return total


def quantized_layer_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantizable decoder Linears as they are now, bytes they would take in 16-bit)."""
    now = sixteen = 0
    for name, m in model.named_modules():
        if is_quantizable(name):
            now += module_weight_bytes(m)
            sixteen += 2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
    return now, sixteen


# ---- "auto" ----------------------------------------------------------------------------------------------------

# Bytes per decoder-Linear parameter: int8 rows + a float32 scale per row (~1.0); NF4 0.5 + double-quantized
# absmax (~0.516, performance-notes §1).
_BYTES_PER_PARAM = {"int8": 1.0, "nf4": 0.52}


@dataclass
class AutoChoice:
    mode: str
    reason: str
    needed_bytes: dict[str, int]
    free_bytes: int


def estimate_bytes(config: DsvlConfig, dtype: torch.dtype, mode: str, max_context_tokens: int) -> int:
    """Weights in ``mode`` + one session's KV cache + working headroom (activations, image features, allocator)."""
    t = config.text
    itemsize = torch.finfo(dtype).bits // 8
    per_layer = (t.hidden_size * t.num_attention_heads * t.head_dim * 2  # q, o
                 + t.hidden_size * t.num_key_value_heads * t.head_dim * 2  # k, v
                 + 3 * t.hidden_size * t.intermediate_size)
    decoder_linears = per_layer * t.num_hidden_layers
    other = _other_params(config)
    linear_bytes = decoder_linears * (itemsize if mode == "none" else _BYTES_PER_PARAM[mode])
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * itemsize * max_context_tokens
    weights = linear_bytes + other * itemsize
    # 10% of the weights + 1 GiB covers vision activations (SAM at 1024 px) and allocator slack.
    return int(weights + kv + 0.10 * weights + (1 << 30))


def _other_params(config: DsvlConfig) -> int:
    """Parameters that stay 16-bit: embeddings, lm_head, norms, vision towers and aligner (analytic count)."""
    t, v, s = config.text, config.vision, config.high_res_vision
    emb = t.vocab_size * t.hidden_size * (1 if config.tie_word_embeddings else 2)
    norms = (2 * t.num_hidden_layers + 1) * t.hidden_size
    siglip = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + \
        (v.image_size // v.patch_size) ** 2 * v.hidden_size + 3 * v.patch_size ** 2 * v.hidden_size
    if s is None:  # SigLIP-only (1.3B): linear1 + linear2 aligner
        return emb + norms + siglip + v.hidden_size * t.hidden_size + t.hidden_size ** 2
    sam = s.num_hidden_layers * (4 * s.hidden_size ** 2 + 2 * s.hidden_size * s.mlp_dim) + \
        (s.image_size // s.patch_size) ** 2 * s.hidden_size + 3 * s.patch_size ** 2 * s.hidden_size + \
        2 * (s.hidden_size * s.output_channels + 9 * s.output_channels ** 2) + 7 * s.output_channels ** 2 * 9 * 4
    aligner = (v.hidden_size + 4 * s.output_channels) * t.hidden_size // 2 + t.hidden_size ** 2
    return emb + norms + siglip + sam + aligner


SMALLER_MODEL = CHAT_MODELS[SIGLIP_ONLY_TYPE][1]


def _smaller_model_hint(config: DsvlConfig, dtype: torch.dtype, max_context_tokens: int, free: int) -> str:
    """On a CPU, int8/NF4 save memory but are several times slower than 16-bit (see the module docstring): when
    the hybrid (7B) model does not fit in 16-bit, point at the 1.3B model if that one does."""
    small = DsvlConfig.siglip_only_1_3b()
    need = estimate_bytes(small, dtype, "none", max_context_tokens)
    if not config.hybrid or need > free:
        return ""
    return (f". The smaller DeepSeek-VL 1.3B chat fits here in {str(dtype).removeprefix('torch.')} "
            f"(~{need / (1 << 30):.1f} GiB) and answers much faster on a CPU: --model {SMALLER_MODEL}")


def choose_auto(config: DsvlConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                max_context_tokens: int = 4096, free_bytes: int | None = None) -> AutoChoice:
    """The best precision (none > int8 > nf4) whose weights + KV cache + headroom fit the device's free memory.
    Where nothing fits, nf4 is chosen anyway (the smallest) and the reason says it will probably not fit."""
    from .device import free_memory_bytes

    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    needed = {m: estimate_bytes(config, dtype, m, max_context_tokens) for m in ("none", "int8", "nf4")}
    gib = 1 << 30
    for mode in ("none", "int8", "nf4"):
        if needed[mode] <= free:
            skipped = [m for m in ("none", "int8") if m != mode and needed[m] > free and
                       ("none", "int8", "nf4").index(m) < ("none", "int8", "nf4").index(mode)]
            why = (f"{mode}: needs ~{needed[mode] / gib:.1f} GiB (weights + {max_context_tokens}-token KV cache + "
                   f"headroom), {free / gib:.1f} GiB free on {device.type}")
            if skipped:
                why += "; " + ", ".join(f"{m} would need ~{needed[m] / gib:.1f} GiB" for m in skipped)
            choice = AutoChoice(mode, why, needed, free)
            break
    else:
        choice = AutoChoice("nf4", f"nf4: even nf4 needs ~{needed['nf4'] / gib:.1f} GiB but only "
                                   f"{free / gib:.1f} GiB is free on {device.type}; loading may run out of memory",
                            needed, free)
    if device.type == "cpu" and needed["none"] > free:
        choice.reason += _smaller_model_hint(config, dtype, max_context_tokens, free)
    log.info("quantization='auto' chose %s", choice.reason)
    return choice
