"""One decoder-sized Linear (4096 -> 11008) through every CPU kernel dsvl could use, side by side in one run.

    python bench/linear_kernels.py [--tokens 1 512] [--repeat 15]

Rows: float32 and bfloat16 ``F.linear``, bfloat16 pre-packed for oneDNN (dsvl's dense CPU path), dsvl's int8 and
int4 weight-only modules (``dsvl.weightonly``: aten's fused kernels; "kernel" rows call the kernel at every size,
"module" rows switch to dequantize + dense GEMM from ``DENSE_FROM_ROWS`` rows on), the same through torchao 0.18's
``quantize_`` configs where torchao supports the CPU, and dynamic int8 activations x int8 weights (fbgemm's
``quantize_dynamic``; torchao's ``Int8DynamicActivationInt8WeightConfig``). Each row prints the median time over
``--repeat`` calls (rows interleaved, so a neighbour's load on a shared machine hits all of them alike), the
ratio to bfloat16 packed, and the output's cosine against float32. Prints the CPU model and its relevant flags.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsvl.device import cpu_flags  # noqa: E402
from dsvl.packing import PackedLinear  # noqa: E402
from dsvl.weightonly import Int4Linear, Int8Linear  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


def cpu_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    have = [f for f in FLAGS if f in cpu_flags()]
    return f"{model}, {torch.get_num_threads()} threads, flags: {' '.join(have) or 'none of ' + ' '.join(FLAGS)}"


def torchao_variant(linear: nn.Linear, config_name: str, **kw):
    """``linear`` quantized by torchao's ``quantize_``, or the reason it cannot be on this machine."""
    try:
        import torchao.quantization as tq

        m = nn.Sequential(copy.deepcopy(linear))
        tq.quantize_(m, getattr(tq, config_name)(**kw))
        m(torch.randn(1, linear.in_features, dtype=linear.weight.dtype))
        return m
    except Exception as e:  # noqa: BLE001  (report any failure as a row)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"


def fbgemm_dynamic(linear: nn.Linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(linear).float()), {nn.Linear},
                                                      dtype=torch.qint8)


def variants(w32: torch.Tensor) -> dict[str, tuple[object, torch.dtype]]:
    """name -> (callable or failure reason, activation dtype)."""
    lin32 = nn.Linear(w32.shape[1], w32.shape[0], bias=False)
    lin32.weight.data = w32
    lin16 = copy.deepcopy(lin32).to(torch.bfloat16)
    i8, i4 = Int8Linear(lin16), Int4Linear(lin16, 128)
    return {
        "float32 F.linear": (lambda x: F.linear(x, w32), torch.float32),
        "bf16 F.linear": (lambda x: F.linear(x, lin16.weight), torch.bfloat16),
        "bf16 oneDNN packed (dsvl dense)": (PackedLinear(lin16), torch.bfloat16),
        "dsvl int8-wo kernel (aten, bf16 act)": (i8._matmul, torch.bfloat16),
        "dsvl int8-wo module (bf16 act)": (i8, torch.bfloat16),
        "dsvl int8-wo module (float32 act)": (i8, torch.float32),
        "dsvl int4-wo g128 kernel (aten)": (i4._matmul, torch.bfloat16),
        "dsvl int4-wo g128 module (bf16 act)": (i4, torch.bfloat16),
        "dsvl int4-wo g128 module (float32 act)": (i4, torch.float32),
        "torchao Int8WeightOnly": (torchao_variant(lin16, "Int8WeightOnlyConfig"), torch.bfloat16),
        "torchao Int4WeightOnly g128": (torchao_variant(lin16, "Int4WeightOnlyConfig", group_size=128),
                                        torch.bfloat16),
        "fbgemm dynamic int8 (float32 act)": (fbgemm_dynamic(lin32), torch.float32),
        "torchao Int8DynAct-Int8Weight": (torchao_variant(lin16, "Int8DynamicActivationInt8WeightConfig"),
                                          torch.bfloat16),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 512], help="rows of the activation (1 = decode)")
    p.add_argument("--out-features", type=int, default=11008)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=15)
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"# {cpu_line()}; torch {torch.__version__}")
    w32 = torch.randn(a.out_features, a.in_features) * a.in_features ** -0.5
    rows = variants(w32)
    for m in a.tokens:
        x32 = torch.randn(m, a.in_features)
        ref = F.linear(x32, w32)
        times: dict[str, list[float]] = {k: [] for k, (f, _) in rows.items() if callable(f)}
        with torch.no_grad():
            for _ in range(a.repeat + 2):  # interleaved; the first two rounds are warm-up
                for name in times:
                    f, dt = rows[name]
                    x = x32.to(dt)
                    t0 = time.perf_counter()
                    f(x)
                    times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["bf16 oneDNN packed (dsvl dense)"][2:])
            print(f"\n## {m} token(s) x {a.in_features} -> {a.out_features}\n")
            print("| kernel | median ms | vs bf16 packed | cosine vs float32 |\n|---|---|---|---|")
            for name, (f, dt) in rows.items():
                if not callable(f):
                    print(f"| {name} | n/a ({f}) | | |")
                    continue
                t = statistics.median(times[name][2:])
                cos = F.cosine_similarity(f(x32.to(dt)).float().flatten(), ref.flatten(), dim=0).item()
                print(f"| {name} | {t * 1e3:.2f} | {base / t:.2f}x | {cos:.5f} |")


if __name__ == "__main__":
    main()
