"""Random-weight checkpoints in the exact hub layout, for tests and benchmarks without the real weights.

    python -m dsvl.tiny OUT_DIR [--size tiny|mid|7b|1.3b-tiny|1.3b] [--layout converted|transformers5|original]

``tiny``/``mid``/``7b`` are the hybrid (SigLIP + SAM) family of DeepSeek-VL 7B chat; ``1.3b-tiny``/``1.3b`` the
SigLIP-only family of DeepSeek-VL 1.3B chat (tiny widths / the full 1.3B shapes).

Writes ``config.json`` (``DsvlConfig.to_dict()`` + ``dsvl_random_weights: true``), sharded safetensors with
``model.safetensors.index.json`` (a single ``model.safetensors`` when everything fits in one shard), and the tiny
tokenizer / processor files. All sizes use the tiny tokenizer (703 ids), so ``vocab_size`` is larger than the
tokenizer on purpose (like the real 102400 rows vs 100016 ids), and ``image_token_id`` is the tokenizer's own.

Tensors are generated one at a time from a per-tensor seed and streamed into the shard files (header first,
then data), so even ``7b`` (14.7 GB in bfloat16) needs about one tensor of RAM. Scales are chosen so that every
path matters: norms are 1 + noise, biases non-zero, ``high_res_vision_alpha`` non-zero, linears
variance-preserving and ``lm_head`` wide enough that logits are spread and greedy continuations vary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .config import DsvlConfig
from .loading import (DTYPE_NAMES, LAYOUTS, ORIGINAL_IGNORED, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, _QKV,
                      iter_expected, to_layout_name)

SIZES = ("tiny", "mid", "7b", "1.3b-tiny", "1.3b")
DEFAULT_SHARD_BYTES = {"tiny": 1 << 20, "mid": 2 << 30, "7b": 4 << 30, "1.3b-tiny": 1 << 20, "1.3b": 2 << 30}


def config_for(size: str, image_token_id: int) -> DsvlConfig:
    if size in ("tiny", "1.3b-tiny"):
        cfg = DsvlConfig.tiny(image_token_id=image_token_id, hybrid=size == "tiny")
    elif size == "1.3b":
        cfg = DsvlConfig.siglip_only_1_3b()
    elif size == "mid":
        cfg = DsvlConfig.mid()
    elif size == "7b":
        cfg = DsvlConfig()
    else:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    return dataclasses.replace(cfg, image_token_id=image_token_id, random_weights=True)


def default_dtype(size: str) -> torch.dtype:
    """float32 for the tiny sizes (parity tests), bfloat16 for the others (the real checkpoints' dtype)."""
    return torch.float32 if size.endswith("tiny") else torch.bfloat16


# ---- random values -------------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    # Per-tensor seed: values do not depend on write order, shard size or layout.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def random_tensor(name: str, shape: tuple[int, ...], seed: int, hidden_size: int, num_layers: int = 1) -> Tensor:
    """float32 values for our tensor ``name``."""
    g = _generator(seed, name)
    leaf = name.rsplit(".", 2)
    module, attr = (leaf[-2] if len(leaf) > 1 else ""), leaf[-1]
    x = torch.randn(shape, generator=g)  # scaled in place below: one float32 copy at a time (7b embeddings)
    if name.endswith("high_res_vision_alpha"):
        return 0.3 + 0.5 * torch.rand(shape, generator=g)  # zero would hide the global path
    if "norm" in module and attr == "weight":
        return x.mul_(0.1).add_(1.0)
    if attr == "bias":
        return x.mul_(0.05 if "norm" in module else 0.02)
    if name.endswith("embed_tokens.weight"):
        return x
    if name == "lm_head.weight":
        return x.mul_(3.0 / math.sqrt(hidden_size))  # logits ~ N(0, 9): spread, no constant argmax
    if attr in ("rel_pos_h", "rel_pos_w"):
        return x.mul_(0.1)
    if attr == "pos_embed" or name.endswith("position_embedding.weight"):
        return x.mul_(0.2)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    x.mul_(1.0 / math.sqrt(fan_in))  # variance-preserving linears and convs
    if "language_model" in name and attr == "weight" and module in ("o_proj", "down_proj"):
        # GPT-2-style residual scaling: like a trained LLM, each block adds a little to the residual stream
        # rather than as much as the embedding (which would make any noise, e.g. 4-bit weights, compound).
        x.mul_(1.0 / math.sqrt(2 * num_layers))
    return x


# ---- planning what to write ----------------------------------------------------------------------


@dataclass
class OutTensor:
    name: str  # stored name (layout)
    shape: tuple[int, ...]
    make: Callable[[], Tensor]  # float32 values


def plan_tensors(config: DsvlConfig, layout: str, seed: int) -> list[OutTensor]:
    """The stored tensors of ``layout``, in model order, each with a lazy value maker."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    hidden = config.text.hidden_size
    ours = dict(iter_expected(config))
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)  # a tied checkpoint stores no lm_head (the loader ties it)
    layers = config.text.num_hidden_layers
    make = lambda n: (lambda: random_tensor(n, ours[n], seed, hidden, layers))  # noqa: E731
    out: list[OutTensor] = []
    for name, shape in ours.items():
        m = _QKV.match(name) if layout == "original" else None
        if m:
            if m.group(2) != "q":
                continue  # fused into the q entry
            parts = [name.replace(".q_proj.", f".{p}_proj.") for p in "qkv"]
            fused = (3 * shape[0], *shape[1:])
            out.append(OutTensor(to_layout_name(name, layout, config.hybrid), fused,
                                 lambda parts=parts: torch.cat([make(p)() for p in parts])))
        elif layout == "original" and name.endswith("embeddings.position_embedding.weight"):
            out.append(OutTensor(to_layout_name(name, layout, config.hybrid), (1, *shape),
                                 lambda f=make(name): f()[None]))
        else:
            out.append(OutTensor(to_layout_name(name, layout, config.hybrid), shape, make(name)))
    if layout == "original":
        out += _original_unused(config, seed)
    return out


def _original_unused(config: DsvlConfig, seed: int) -> list[OutTensor]:
    """The tensors of deepseek-ai's checkpoint that the model never uses: two LayerNorms built by
    ``HybridVisionTower`` (7B only) and the SigLIP attention-pool head (12,595,200 params at full size)."""
    d, ff = config.vision.hidden_size, config.vision.intermediate_size
    shapes = {
        "vision_model.high_layer_norm.weight": (d,), "vision_model.high_layer_norm.bias": (d,),
        "vision_model.low_layer_norm.weight": (d,), "vision_model.low_layer_norm.bias": (d,),
    } if config.hybrid else {}
    pool = ORIGINAL_IGNORED[2] if config.hybrid else "vision_model.vision_tower.attn_pool."
    shapes.update({
        pool + "latent": (1, 1, d), pool + "q.weight": (d, d), pool + "q.bias": (d,),
        pool + "kv.weight": (2 * d, d), pool + "kv.bias": (2 * d,), pool + "proj.weight": (d, d),
        pool + "proj.bias": (d,), pool + "norm.weight": (d,), pool + "norm.bias": (d,),
        pool + "mlp.fc1.weight": (ff, d), pool + "mlp.fc1.bias": (ff,), pool + "mlp.fc2.weight": (d, ff),
        pool + "mlp.fc2.bias": (d,),
    })
    return [OutTensor(n, s, lambda n=n, s=s: 0.02 * torch.randn(s, generator=_generator(seed, n)))
            for n, s in shapes.items()]


# ---- streaming safetensors writer ------------------------------------------------------------------


def _shards(tensors: list[OutTensor], itemsize: int, shard_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        n = math.prod(t.shape) * itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def write_safetensors_streaming(path: Path, tensors: list[OutTensor], dtype: torch.dtype) -> int:
    """Write a safetensors file tensor by tensor: the header is known from the shapes, then each tensor is
    generated, converted and appended. Returns the data bytes written."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = math.prod(t.shape) * itemsize
        header[t.name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            x = t.make()
            assert tuple(x.shape) == t.shape, (t.name, x.shape, t.shape)
            # Convert and write in ~64 MiB pieces so no second full-size copy exists.
            flat = x.reshape(-1)
            step = 1 << 24
            for i in range(0, flat.numel(), step):
                piece = flat[i:i + step].to(dtype).contiguous()
                f.write(memoryview(piece.view(torch.uint8).numpy()))
            del x, flat
    return offset


def write_checkpoint(out_dir: str | Path, size: str = "tiny", layout: str = "converted", seed: int = 0,
                     dtype: torch.dtype | str | None = None, shard_bytes: int | None = None,
                     tie_word_embeddings: bool = False, config: DsvlConfig | None = None) -> Path:
    """Write a random-weight checkpoint directory; returns it. ``dtype`` defaults to float32 for tiny and
    bfloat16 for mid/7b; ``shard_bytes`` to 1 MiB (tiny: several shards) / 2 GiB (mid) / 4 GiB (7b).
    ``config`` overrides the preset's shapes (its ``image_token_id`` is replaced by the tokenizer's)."""
    from .processor import write_processor_files
    from .text import IMAGE_TOKEN, write_tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    image_id = next(t["id"] for t in vocab["added_tokens"] if t["content"] == IMAGE_TOKEN)

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(size)
    config = config_for(size, image_id) if config is None else dataclasses.replace(
        config, image_token_id=image_id, random_weights=True)
    write_processor_files(out, hybrid=config.hybrid)
    config = dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch."),
                                 tie_word_embeddings=tie_word_embeddings)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")

    tensors = plan_tensors(config, layout, seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(tensors, itemsize, shard_bytes or DEFAULT_SHARD_BYTES[size])
    for stale in list(out.glob("model*.safetensors")) + [out / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        write_safetensors_streaming(out / SAFETENSORS_SINGLE, shards[0], dtype)
        return out
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors_streaming(out / name, shard, dtype)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dsvl.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--layout", choices=LAYOUTS, default="converted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--shard-mb", type=int, default=None, help="max shard size in MiB")
    a = p.parse_args(argv)
    out = write_checkpoint(a.out_dir, size=a.size, layout=a.layout, seed=a.seed, dtype=a.dtype,
                           shard_bytes=a.shard_mb << 20 if a.shard_mb else None)
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {a.size} ({a.layout} layout) random-weight checkpoint to {out} ({total / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
