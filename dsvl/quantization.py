"""Quantized decoder weights: fast weight-only int8/int4 (``int8-wo``, ``int4-wo``) and bitsandbytes
(``bnb-int8`` = LLM.int8, ``bnb-nf4`` = 4-bit NormalFloat; the old names ``int8`` / ``nf4`` still select them).

Which modules: the Linears of every decoder layer (whatever they are -- q/k/v/o and gate/up/down, or fused
q|k|v and gate|up: 6.07 G of the 7B model's 7.33 G parameters). The weight-only modes also store ``lm_head`` as
int8 (0.42 G parameters: 0.42 GB less, and 6% of the bytes each decoded token reads). The vision towers, aligner
and embeddings stay in the model dtype. The loader (``dsvl.loading``) calls ``is_quantizable`` /
``quantize_linear`` as each Linear finishes loading, so peak memory stays near the quantized size instead of the
16-bit one.

What each costs (7B; measured figures in README.md and bench/README.md):

- ``int8-wo``: 1 byte per weight + a scale per row (decoder 6.1 GB). ``dsvl.weightonly.Int8Linear``: PyTorch's
  fused int8 kernel on CPU, ~2-3x faster decode than bf16 there; on CUDA the fused kernel where PyTorch has one.
- ``int4-wo`` (``int4-wo-gN``, N = 32/64/128/256, default 128): 0.53 byte per weight (decoder 3.2 GB).
  ``dsvl.weightonly.Int4Linear``: the fused int4 kernels (CPU; tinygemm on Ampere+ CUDA), ~3-4x faster decode
  than bf16 on CPU; logits cosine ~0.99 against 16-bit instead of ~0.9999 for int8.
- ``bnb-int8`` / ``bnb-nf4``: bitsandbytes 0.50 on CPU and CUDA. They save memory, not time: on CPU the kernels
  dequantize per call (decode 8-30x slower than bf16), on GPU NF4 decodes slower than bf16.
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

MODES = ("none", "int8-wo", "int4-wo", "bnb-int8", "bnb-nf4", "auto")
ALIASES = {"int8": "bnb-int8", "nf4": "bnb-nf4"}
WEIGHT_ONLY = ("int8-wo", "int4-wo")
NF4_BLOCKSIZE = 64
# LLM.int8's outlier threshold (transformers' BitsAndBytesConfig default): activation columns above it run in
# 16-bit. 0 would be faster on GPU but loses the method's accuracy guarantee on real 7B activations.
INT8_THRESHOLD = 6.0

# Decoder projections, separate or fused (self_attn.q_proj ... or self_attn.qkv_proj, mlp.gate_up_proj).
_DECODER_LINEAR = re.compile(r"(^|\.)language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$")
_INT4_GROUP = re.compile(r"^int4-wo(?:-g(\d+))?$")

class QuantizationError(ValueError):
    """Unknown mode, or bitsandbytes missing / unusable on this device."""


def is_quantizable(module_name: str, mode: str = "bnb-int8") -> bool:
    """True for the decoder Linears (``model.language_model.layers.N.self_attn.q_proj`` etc.) and, in the
    weight-only modes, ``lm_head``; False for everything else (vision towers, aligner, embeddings). The caller
    checks that the module is an ``nn.Linear``."""
    if _DECODER_LINEAR.search(module_name) is not None:
        return True
    return module_name == "lm_head" and base_mode(mode) in WEIGHT_ONLY


def check_mode(mode: str) -> str:
    """The canonical name of ``mode`` (aliases resolved), or QuantizationError listing the valid ones."""
    name = str(mode).strip().lower()
    name = ALIASES.get(name, name)
    match = _INT4_GROUP.match(name)
    if match and match.group(1):
        from .weightonly import GROUP_SIZES

        if int(match.group(1)) not in GROUP_SIZES:
            raise QuantizationError(f"int4-wo group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                                    f"got {match.group(1)}")
        return name
    if name not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; expected one of {', '.join(MODES)}, int4-wo-gN "
                                f"(N = 32/64/128/256) or the old names {', '.join(ALIASES)}")
    return name


def base_mode(mode: str) -> str:
    """``int4-wo-g64`` -> ``int4-wo``; other modes unchanged."""
    return "int4-wo" if _INT4_GROUP.match(mode) else mode


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        raise QuantizationError(f"quantization needs bitsandbytes (pip install bitsandbytes): {e}") from None
    return bnb


def quantize_linear(linear: nn.Linear, mode: str, name: str = "") -> nn.Module:
    """Replace a loaded ``nn.Linear`` by its quantized counterpart, on the Linear's own device (the 16-bit weight
    is dropped as soon as the quantized copy exists).

    ``int8-wo`` / ``int4-wo[-gN]``: ``dsvl.weightonly`` modules (``lm_head`` always int8-wo: its error would reach
    every logit directly). ``bnb-int8``: ``Linear8bitLt`` (int8 rows + one float32 scale per row; LLM.int8
    outlier threshold 6.0). ``bnb-nf4``: ``Linear4bit`` (NF4, blocksize 64, double-quantized absmax), compute
    dtype = the Linear's dtype.
    """
    mode = ALIASES.get(mode, mode)
    if linear.weight.device.type == "meta":
        raise QuantizationError("quantize_linear needs a loaded Linear, got one on the meta device")
    if base_mode(mode) in WEIGHT_ONLY:
        from . import weightonly

        match = _INT4_GROUP.match(mode)
        if match is None or name == "lm_head":
            return weightonly.Int8Linear(linear)
        group = int(match.group(1) or weightonly.DEFAULT_GROUP_SIZE)
        if weightonly.int4_group_size(linear.in_features, group) is None:  # odd sizes (tests): int8 instead
            return weightonly.Int8Linear(linear)
        return weightonly.Int4Linear(linear, group)
    return _quantize_bnb(linear, mode)


def _quantize_bnb(linear: nn.Linear, mode: str) -> nn.Module:
    bnb = _bnb()
    w = linear.weight.data
    out_f, in_f = w.shape
    bias = linear.bias
    if mode == "bnb-int8":
        # bnb warns on every float32 call that it casts activations to float16 for the int8 matmul: expected.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        # Built on meta so that nn.Linear.__init__ does not allocate and randomly initialise a full weight.
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
        # Row-wise absmax quantization (what Int8Params does on .cuda()); bnb quantizes from float16.
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        q.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    elif mode == "bnb-nf4":
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=w.dtype, compress_statistics=True,
                              quant_type="nf4", device="meta")
        w4, state = bnb.functional.quantize_4bit(w.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True,
                                                 quant_type="nf4", quant_storage=torch.uint8)
        q.weight = bnb.nn.Params4bit(w4, requires_grad=False, quant_state=state, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                     module=q, bnb_quantized=True)
        _share_code_tables(state)
        q.quant_state = state
    else:
        raise QuantizationError(f"quantize_linear: mode must be one of {', '.join(MODES[1:-1])}, got {mode!r}")
    if bias is not None:
        q.bias = nn.Parameter(bias.data, requires_grad=False)
    q.requires_grad_(False)
    return q


def quantize_model(model: nn.Module, mode: str) -> int:
    """Quantize every quantizable Linear of an already-loaded model in place, on the device it is on; returns how
    many were replaced. The loader does this Linear by Linear while loading; this is the hook for models built or
    moved in memory (tests, ``bench/gpu_check.py``: load in bf16, ``.to("cuda")``, then ``quantize_model(m,
    "int4-wo")``)."""
    mode = check_mode(mode)
    targets = [name for name, m in model.named_modules() if type(m) is nn.Linear and is_quantizable(name, mode)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(getattr(parent, child), mode, name))
    return len(targets)


# ---- memory accounting -----------------------------------------------------------------------------------------

# bitsandbytes gives every NF4 layer its own copy of two constant lookup tables (the 16 NF4 levels and the 256-entry
# map of the double-quantized absmax, 1,088 bytes together). They never change, so all layers share one copy per
# device and dtype; at tiny widths the copies would otherwise outweigh the 4-bit weights themselves.
_CODE_TABLES: dict[tuple, torch.Tensor] = {}


def _shared_table(t: torch.Tensor) -> torch.Tensor:
    key = (t.device, t.dtype, tuple(t.tolist()))
    return _CODE_TABLES.setdefault(key, t)


def _share_code_tables(state) -> None:
    while state is not None:
        state.code = _shared_table(state.code)
        state = getattr(state, "state2", None)


def _quant_state_tensors(state) -> list[torch.Tensor]:
    if state is None:
        return []
    own = [getattr(state, k, None) for k in ("absmax", "code", "offset")]
    return [t for t in own if t is not None] + _quant_state_tensors(getattr(state, "state2", None))  # double quant


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """One module's own parameters and buffers, including bitsandbytes scales / quant state."""
    out = [p.data for p in module.parameters(recurse=False)] + [b for b in module.buffers(recurse=False)
                                                                if b is not None]
    w = getattr(module, "weight", None)
    if w is not None and getattr(w, "quant_state", None) is not None:  # Params4bit
        out += _quant_state_tensors(w.quant_state)
    scb = getattr(w, "SCB", None) if w is not None else None
    state = getattr(module, "state", None)
    if scb is None and state is not None:  # Linear8bitLt moves SCB to .state on its first forward
        scb = getattr(state, "SCB", None)
    return out + ([scb] if scb is not None else [])


def _storage_key(t: torch.Tensor) -> tuple:
    # The same memory (tied weights), not just the same storage; tensors without memory (meta) or without a plain
    # storage (oneDNN-packed weights) are all distinct.
    try:
        ptr = t.data_ptr()
    except RuntimeError:
        ptr = 0
    return t.device, ptr or id(t), t.numel(), t.dtype


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of one module's own parameters and buffers, including bitsandbytes scales / quant state."""
    return sum(_tensor_bytes(t) for t in _module_tensors(module))


def _shared_bytes(modules: dict[str, nn.Module]) -> dict[str, float]:
    """Bytes per module, where a tensor held by k of the modules (tied weights, shared code tables) counts 1/k
    in each: the figures add up to the memory the modules really take."""
    holders: dict[tuple, set[str]] = {}
    for name, m in modules.items():
        for t in _module_tensors(m):
            holders.setdefault(_storage_key(t), set()).add(name)
    out = {}
    for name, m in modules.items():
        tensors = {_storage_key(t): t for t in _module_tensors(m)}  # a tensor held twice by one module counts once
        out[name] = sum(_tensor_bytes(t) / len(holders[k]) for k, t in tensors.items())
    return out


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of all weights (parameters + buffers + quantization scales). Shared tensors count once."""
    modules = dict(model.named_modules(remove_duplicate=True))
    return round(sum(_shared_bytes(modules).values()))


def quantized_layer_bytes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """For each quantizable decoder Linear: (bytes it takes now, bytes it would take in 16-bit). Constants shared
    by several layers (bitsandbytes' code tables) are split among them, so the values add up to what is held."""
    layers = {name: m for name, m in model.named_modules() if is_quantizable(name)}
    now = _shared_bytes(layers)
    sixteen = {name: 2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
               for name, m in layers.items()}
    return {name: (round(now[name]), sixteen[name]) for name in layers}


# ---- "auto" ----------------------------------------------------------------------------------------------------

# Bytes per decoder-Linear parameter: int8 rows + a scale per row (~1.0); int4 0.5 + a bf16 scale and zero per 128
# (0.53); NF4 0.5 + double-quantized absmax (~0.516; docs/PERFORMANCE.md, floors).
_BYTES_PER_PARAM = {"bnb-int8": 1.0, "bnb-nf4": 0.52, "int8-wo": 1.0, "int4-wo": 0.53}


def speed_order(device: torch.device, dtype: torch.dtype) -> tuple[tuple[str, ...], str]:
    """Modes from fastest to slowest decode on ``device``, and why (what the device has). At batch 1 decode reads
    every weight once per token, so fewer bytes are faster wherever a kernel reads them packed: on CPU the aten
    int8/int4 kernels are vectorized for AVX2/AVX512 (bench/linear_kernels.py: int4 ~4x, int8 ~3x a bf16 product on a
    Sapphire Rapids); on CUDA tinygemm's int4 needs Ampere+ and bf16. bitsandbytes is always last (slower than
    dense on CPU, and NF4 on GPU)."""
    fast = ("int4-wo", "int8-wo", "none", "bnb-nf4")
    if device.type == "cpu":
        isa = torch.backends.cpu.get_cpu_capability()
        if isa.startswith(("AVX2", "AVX512")):
            return fast, f"{isa} CPU: fused int4/int8 kernels"
        return ("none", "int8-wo", "int4-wo", "bnb-nf4"), f"{isa} CPU: no vectorized int4/int8 kernels measured"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8 and dtype is torch.bfloat16:
            return fast, f"sm{major}{minor} GPU: tinygemm int4"
        return ("none", "int8-wo", "bnb-nf4"), f"sm{major}{minor} GPU in {dtype}: no tinygemm int4"
    return ("none",), f"{device.type}: no quantized kernels"


@dataclass
class AutoChoice:
    mode: str
    reason: str
    needed_bytes: dict[str, int]
    free_bytes: int


def estimate_bytes(config: DsvlConfig, dtype: torch.dtype, mode: str, max_context_tokens: int) -> int:
    """Weights in ``mode`` + one session's KV cache + working headroom (activations, image features, allocator)."""
    mode = ALIASES.get(mode, mode)
    t = config.text
    itemsize = torch.finfo(dtype).bits // 8
    per_layer = (t.hidden_size * t.num_attention_heads * t.head_dim * 2  # q, o
                 + t.hidden_size * t.num_key_value_heads * t.head_dim * 2  # k, v
                 + 3 * t.hidden_size * t.intermediate_size)
    decoder_linears = per_layer * t.num_hidden_layers
    other = _other_params(config)
    linear_bytes = decoder_linears * (itemsize if mode == "none" else _BYTES_PER_PARAM[base_mode(mode)])
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * itemsize * max_context_tokens
    weights = linear_bytes + other * itemsize
    if base_mode(mode) in WEIGHT_ONLY and not config.tie_word_embeddings:  # lm_head stored as int8
        weights -= t.vocab_size * t.hidden_size * (itemsize - 1)
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
    """When the hybrid (7B) model does not fit a CPU's memory in 16-bit, point at the 1.3B model if that one does:
    about the same bytes per token as the 7B in int4, without quantization error, and a SAM-free first turn."""
    small = DsvlConfig.siglip_only_1_3b()
    need = estimate_bytes(small, dtype, "none", max_context_tokens)
    if not config.hybrid or need > free:
        return ""
    return (f". The smaller DeepSeek-VL 1.3B chat fits here unquantized in {str(dtype).removeprefix('torch.')} "
            f"(~{need / (1 << 30):.1f} GiB): --model {SMALLER_MODEL}")


def choose_auto(config: DsvlConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                max_context_tokens: int = 4096, free_bytes: int | None = None) -> AutoChoice:
    """The fastest mode on this device (``speed_order``) whose weights + KV cache + headroom fit its free memory.
    Where nothing fits, the smallest is chosen anyway and the reason says it will probably not fit."""
    from .device import free_memory_bytes

    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    order, why_order = speed_order(device, dtype)
    needed = {m: estimate_bytes(config, dtype, m, max_context_tokens) for m in order}
    gib = 1 << 30
    fits = [m for m in order if needed[m] <= free]
    if fits:
        mode = fits[0]
        why = (f"{mode}: the fastest decode here ({why_order}; order {' > '.join(order)}) that fits: needs "
               f"~{needed[mode] / gib:.1f} GiB (weights + {max_context_tokens}-token KV cache + headroom), "
               f"{free / gib:.1f} GiB free on {device.type}")
        skipped = order[:order.index(mode)]
        if skipped:
            why += "; " + ", ".join(f"{m} would need ~{needed[m] / gib:.1f} GiB" for m in skipped)
    else:
        mode = min(needed, key=needed.get)
        why = (f"{mode}: even {mode} needs ~{needed[mode] / gib:.1f} GiB but only {free / gib:.1f} GiB is free on "
               f"{device.type}; loading may run out of memory")
    choice = AutoChoice(mode, why, needed, free)
    if device.type == "cpu" and needed.get("none", 0) > free:
        choice.reason += _smaller_model_hint(config, dtype, max_context_tokens, free)
    log.info("quantization='auto' chose %s", choice.reason)
    return choice
