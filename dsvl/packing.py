"""oneDNN pre-packed bfloat16 Linears for CPU decoding.

PyTorch's plain bf16 matrix-vector product reaches 6-15 GB/s of weights on AVX512-BF16 / AMX CPUs; the same
product over a weight reordered once for oneDNN (what inductor's CPU "freezing" does) reaches 14-19 GB/s, and decode
at batch 1 is nothing but such products. ``pack_linears`` swaps a model's ``nn.Linear``s for ``PackedLinear``s after
loading (after fusion and instead of quantization: a quantized Linear is not an ``nn.Linear`` any more).

A packed weight is an opaque oneDNN tensor; ``state_dict()`` unpacks it (``to_dense``, exact), so a packed model
still saves the checkpoint's values.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight reordered for oneDNN's bf16 GEMM. Same numbers as ``F.linear``."""

    rows_split_on_save = True  # its saved weight is the dense one: a fused parent may split it (llama.fuse_on_load)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Buffers, not parameters: an opaque tensor cannot be a Parameter, and memory accounting still sees them.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight, self.bias,
                                               "none", [None], "")
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.packed_weight.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.cache
def packing_works() -> bool:
    """oneDNN bf16 weight packing exists in this build and gives ``F.linear``'s numbers on this CPU."""
    try:
        w = torch.randn(48, 32, dtype=torch.bfloat16)
        x = torch.randn(3, 32, dtype=torch.bfloat16)
        got = PackedLinear(_linear(w))(x)
        return torch.allclose(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)
    except Exception:  # noqa: BLE001  (missing op, unsupported CPU: use plain F.linear)
        return False


def _linear(weight: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def should_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype is torch.bfloat16 and packing_works()


def pack_linears(module: nn.Module) -> int:
    """Replace every plain bf16 ``nn.Linear`` under ``module`` by a ``PackedLinear``, one at a time (peak memory:
    one extra matrix). Returns how many were packed."""
    targets = [name for name, m in module.named_modules()
               if type(m) is nn.Linear and m.weight.dtype is torch.bfloat16 and m.weight.device.type == "cpu"]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, PackedLinear(getattr(parent, child)))
    return len(targets)
