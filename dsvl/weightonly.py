"""Weight-only int8 and int4 Linears that run on PyTorch's own fused kernels: smaller *and* faster than 16-bit.

At batch 1 a decoder step streams every weight once, so fewer bytes per weight is fewer milliseconds per token --
provided the kernel reads the packed weight directly instead of dequantizing a full copy first (what bitsandbytes'
CPU backend does, which is why it is slower than bf16). The kernels used here do:

- ``Int8Linear``: int8 rows + one scale per output row (symmetric absmax). CPU: ``aten._weight_int8pack_mm``
  (1 byte/weight). It is fast with bfloat16 activations and ~15x slower with float32 ones, so float32 activations
  are cast to bfloat16 for the product and the result cast back. CUDA: the same op where this PyTorch has it,
  else ``F.linear`` over the weight dequantized on the fly (correct everywhere; fast once ``torch.compile`` fuses it).
- ``Int4Linear``: 4-bit asymmetric, one (scale, zero) pair per group of ``group_size`` inputs (tinygemm's
  convention ``w = (q - 8) * scale + zero``; 0.53 byte/weight at group 128). CPU:
  ``aten._convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu``. CUDA (bf16, sm80+):
  ``aten._convert_weight_to_int4pack`` / ``_weight_int4pack_mm`` (tinygemm), else the dequantizing fallback.

torchao 0.18 wraps these same aten kernels in tensor subclasses; calling them directly measured as fast or faster
here (``bench/linear_kernels.py``) and keeps torchao out of the runtime requirements. Each module keeps the forward
contract of ``nn.Linear`` (``(..., in) -> (..., out)`` in the input's dtype), so it can replace any Linear,
fused or not, and ``dequantize()`` gives the float weight it stands for (tests, fallbacks).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 128
GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels accept
_CUDA_INNER_K_TILES = 8  # tinygemm packing: K must be a multiple of 16 * this


class WeightOnlyLinear(nn.Module):
    """Common part: shapes, the optional bias (kept in the model dtype) and the float32/bf16 casts around a kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= self.dense_from_rows and self.weight.device.type == "cpu" and self.can_dequantize:
            # Prefill: the fused kernels are matrix-vector loops (cost grows linearly with rows); a dense GEMM over
            # the weight dequantized for this call is several times faster on long prompts.
            y = self._dense_matmul(x2)
        else:
            y = self._matmul(x2).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    can_dequantize = True
    # From this many rows (tokens) on, CPU products dequantize the weight and run a dense GEMM. The aten kernels
    # cost about as much per row as for one row (bench/linear_kernels.py, 4096 -> 11008: ~3 ms a row on 2 cores), while
    # dequantizing costs a fixed ~2x (int8: one cast) to ~8x (int4: unpack, scale, reorder) of a bf16 matrix-vector
    # product; the crossovers measured on a 2-core Sapphire Rapids were ~64 and ~256 rows.
    dense_from_rows = 64

    def _matmul(self, x2: Tensor) -> Tensor:
        raise NotImplementedError

    def _dense_matmul(self, x2: Tensor) -> Tensor:
        return F.linear(x2, self.dequantize(x2.dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight this module computes with, in ``dtype``."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(WeightOnlyLinear):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = linear.weight.data
        self.kernel_dtype = torch.bfloat16 if w.device.type == "cpu" else _cuda_dtype(w.dtype)
        # Round the scales to the stored dtype first, then quantize with them: the error stays within half a step.
        absmax = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).float()  # no full-size temporary
        scales = (absmax.clamp(min=1e-12) / 127).to(self.kernel_dtype)
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        for rows in _row_chunks(w):
            chunk = w[rows].to(torch.float32, copy=True)  # worked on in place
            q[rows] = chunk.div_(scales[rows].float()[:, None]).round_().clamp_(-127, 127)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.fused = w.device.type == "cpu" or _cuda_int8_kernel(w.device)

    def _matmul(self, x2: Tensor) -> Tensor:
        if self.fused:
            return torch.ops.aten._weight_int8pack_mm(x2.to(self.kernel_dtype), self.weight, self.scales)
        return F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)

    def _dense_matmul(self, x2: Tensor) -> Tensor:
        return F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)  # row scales factor out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]


class Int4Linear(WeightOnlyLinear):
    dense_from_rows = 256

    def __init__(self, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        super().__init__(linear)
        w = linear.weight.data
        self.group_size = group_size = int4_group_size(self.in_features, group_size)
        if group_size is None:
            raise ValueError(f"int4 needs in_features divisible by one of {GROUP_SIZES}, got {self.in_features}")
        q, scale_zero = quantize_int4(w, group_size, torch.bfloat16)
        self.device_type = w.device.type
        if self.device_type == "cpu":
            self.kernel_dtype = torch.bfloat16
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        else:
            self.kernel_dtype = torch.bfloat16
            self.tinygemm = _tinygemm_ok(w.device, self.in_features, self.out_features)
            packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # two nibbles per byte, even index high
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(packed, _CUDA_INNER_K_TILES)
                                 if self.tinygemm else packed)
        self.register_buffer("scale_zero", scale_zero)  # (in / group, out, 2), bf16

    def _matmul(self, x2: Tensor) -> Tensor:
        if self.device_type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.kernel_dtype), self.weight,
                                                              self.group_size, self.scale_zero)
        if self.tinygemm:
            return torch.ops.aten._weight_int4pack_mm(x2.to(self.kernel_dtype), self.weight, self.group_size,
                                                      self.scale_zero)
        return F.linear(x2, self.dequantize().to(x2.dtype))

    @property
    def can_dequantize(self) -> bool:
        return self.device_type != "cpu" or _cpu_int4_block(self.out_features) is not None

    def _dense_matmul(self, x2: Tensor) -> Tensor:
        """CPU: dequantize in the packing's own (row block, in, rows of the block) order with contiguous scales,
        then one reordering copy to (out, in) for the GEMM (cheaper than a batched GEMM over 64-row blocks)."""
        block = _cpu_int4_block(self.out_features)
        nb, k, g = self.out_features // block, self.in_features, self.group_size
        v = self.weight.view(nb, k, block // 2)
        q = torch.cat([v & 15, v >> 4], -1).to(x2.dtype).view(nb, k // g, g, block)
        s, z = self.scale_zero.to(x2.dtype).view(k // g, nb, 1, block, 2).transpose(0, 1).unbind(-1)
        w = q.mul_(s.contiguous()).add_((z - 8 * s).contiguous())  # (q - 8) * s + z, in place
        return F.linear(x2, w.view(nb, k, block).transpose(1, 2).reshape(self.out_features, k))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        s, z = self.scale_zero.to(dtype).unbind(-1)  # (groups, out) each
        if self.device_type == "cpu":
            q = _unpack_int4_cpu(self.weight, self.out_features, self.in_features, self.group_size)
        elif self.tinygemm:
            raise NotImplementedError("tinygemm's packed layout is opaque; dequantize before packing")
        else:
            q = torch.stack([self.weight >> 4, self.weight & 15], -1).view(self.out_features, self.in_features)
        q = (q.to(dtype) - 8).view(self.out_features, -1, self.group_size)
        return (q * s.t()[..., None] + z.t()[..., None]).view(self.out_features, self.in_features)


def quantize_int4(w: Tensor, group_size: int, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Asymmetric 4-bit per group of ``group_size`` inputs: int32 codes 0..15 (out, in) and (in/group, out, 2)
    (scale, zero) in ``dtype`` with ``w ~ (q - 8) * scale + zero`` -- the layout both int4 kernels take. The codes
    are computed against the rounded (scale, zero), so the error stays within about half a step."""
    out_f, in_f = w.shape
    q = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    scale_zero = torch.empty(in_f // group_size, out_f, 2, dtype=dtype, device=w.device)
    for rows in _row_chunks(w):
        g = w[rows].to(torch.float32, copy=True).view(-1, in_f // group_size, group_size)  # worked on in place
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo).clamp(min=1e-6) / 15).to(dtype).float()
        zero = (lo + 8 * scale).to(dtype).float()
        q[rows] = g.sub_(zero).div_(scale).add_(8).round_().clamp_(0, 15).view(-1, in_f)
        scale_zero[:, rows] = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1)
    return q, scale_zero


def _row_chunks(w: Tensor, elements: int = 1 << 24) -> list[slice]:
    """Row ranges of ~``elements`` weights: quantizing works on float32 copies of one range at a time, so a 7B
    Linear (or the 0.4 G-weight lm_head) never needs a full-size float32 temporary (that alone peaked the 7B load
    at +3.8 GB)."""
    step = max(1, elements // max(1, w.shape[1]))
    return [slice(r, min(r + step, w.shape[0])) for r in range(0, w.shape[0], step)]


def int4_group_size(in_features: int, wanted: int = DEFAULT_GROUP_SIZE) -> int | None:
    """``wanted`` if it divides ``in_features``, else the largest smaller group size that does (small test models)."""
    for g in sorted((g for g in GROUP_SIZES if g <= wanted), reverse=True):
        if in_features % g == 0:
            return g
    return None


def _unpack_int4_cpu(packed: Tensor, out_f: int, in_f: int, group_size: int) -> Tensor:
    """Codes (out, in) back from the CPU packing. PyTorch packs blocks of B output rows (B = 64 with AVX512, 32 with
    AVX2) as (in, B/2) bytes whose low nibble is row d and high nibble row d + B/2; ``_cpu_int4_block`` checks that
    against the kernel once. Where the layout is unknown, the codes come through the kernel itself: the identity
    times the weight with scale 1 and zero 8 is exactly ``q`` (slow; tests only)."""
    block = _cpu_int4_block(out_f)
    if block is not None:
        v = packed.view(out_f // block, in_f, block // 2)
        return torch.cat([v & 15, v >> 4], -1).transpose(1, 2).reshape(out_f, in_f)
    eye = torch.eye(in_f, dtype=torch.bfloat16)
    sz = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(in_f // group_size, out_f, 2).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz).t().round().to(torch.uint8)


def _cpu_int4_block(out_f: int) -> int | None:
    block = _cpu_int4_layout()
    return block if block is not None and out_f % block == 0 else None


@functools.lru_cache(maxsize=1)
def _cpu_int4_layout() -> int | None:
    """The row-block size of this machine's CPU int4 packing (see ``_unpack_int4_cpu``), or None if neither fits."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (64, 32):
        v = packed.view(128 // block, 64, block // 2)
        if torch.equal(torch.cat([v & 15, v >> 4], -1).transpose(1, 2).reshape(128, 64).to(torch.int32), q):
            return block
    log.info("unknown CPU int4 packing: int4 prefill runs the matrix-vector kernel (slow for long prompts)")
    return None


def _cuda_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


@functools.lru_cache(maxsize=None)
def _cuda_int8_kernel(device: torch.device) -> bool:
    """Whether this PyTorch has a CUDA ``_weight_int8pack_mm`` that agrees with the dequantized product."""
    try:
        w = torch.randint(-127, 128, (64, 128), dtype=torch.int8, device=device)
        s = torch.rand(64, device=device, dtype=torch.bfloat16) / 100
        x = torch.randn(2, 128, device=device, dtype=torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x, w, s)
        return torch.allclose(y.float(), F.linear(x.float(), w.float()) * s.float(), rtol=2e-2, atol=2e-2)
    except (RuntimeError, NotImplementedError):
        log.info("no CUDA _weight_int8pack_mm in this PyTorch: int8 dequantizes per call (slow without compile)")
        return False


def _tinygemm_ok(device: torch.device, in_f: int, out_f: int) -> bool:
    """tinygemm needs an Ampere+ GPU, out % 8 == 0 and in % (16 * inner_k_tiles) == 0."""
    return (torch.cuda.get_device_capability(device)[0] >= 8 and out_f % 8 == 0
            and in_f % (16 * _CUDA_INNER_K_TILES) == 0)
