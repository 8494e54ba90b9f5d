"""Checkpoint resolution (local directory or hub repo id), key layouts and shard-by-shard loading.

Three key layouts are accepted and mapped onto our (= transformers 5 in-memory) names (docs/MODEL.md §6):

- ``converted``: the published ``deepseek-community/deepseek-vl-7b-chat`` (SigLIP under
  ``model.vision_model.vision_model.``);
- ``transformers5``: the same model saved by transformers 5 (SigLIP under ``model.vision_model.``);
- ``original``: ``deepseek-ai/deepseek-vl-7b-chat`` names (fused SigLIP qkv split into q/k/v, ``pos_embed``
  squeezed, the unused ``high_layer_norm``/``low_layer_norm``/``attn_pool`` tensors ignored).

The SigLIP-only 1.3B model uses the same three layouts; only its original names differ: SigLIP sits under
``vision_model.vision_tower.`` (no ``_low``) and the aligner is ``aligner.layers.{0,2}`` (our ``linear{1,2}``).

Loading builds the model on ``meta`` and assigns tensors one by one, read with plain file reads at the offsets of
the safetensors header (``safe_open`` validates each file first). Reading through an mmap would leave every
touched page of the current shard resident (file-backed pages count in RSS), so peak RSS would be the weights
plus a whole shard; with direct reads it is the weights plus one tensor. Safetensors only: pickles are refused.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from .config import ConfigError, DsvlConfig
from .packing import pack_linears, should_pack

log = logging.getLogger(__name__)

LAYOUTS = ("converted", "transformers5", "original")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, downloaded or loaded; the message names the file/tensor and a way out."""


# ---- key layouts ---------------------------------------------------------------------------------

_SAM_O = "vision_model.vision_tower_high.vision_tower."
_SIG_O = "vision_model.vision_tower_low.vision_tower."
_SIG_O_SIGLIP_ONLY = "vision_model.vision_tower."  # the 1.3B model's single tower
_SAM = "model.high_res_vision_model.vision_encoder."
_SIG = "model.vision_model."

# (our prefix, original prefix); "{i}" is a layer index. Fused SigLIP qkv and pos_embed are handled apart.
_ORIGINAL_PREFIXES: list[tuple[str, str]] = [
    (_SAM + "patch_embed.projection.", _SAM_O + "patch_embed.proj."),
    (_SAM + "pos_embed", _SAM_O + "pos_embed"),
    (_SAM + "layers.{i}.layer_norm1.", _SAM_O + "blocks.{i}.norm1."),
    (_SAM + "layers.{i}.layer_norm2.", _SAM_O + "blocks.{i}.norm2."),
    (_SAM + "layers.{i}.attn.", _SAM_O + "blocks.{i}.attn."),
    (_SAM + "layers.{i}.mlp.", _SAM_O + "blocks.{i}.mlp."),
    (_SAM + "neck.conv1.", _SAM_O + "neck.0."),
    (_SAM + "neck.layer_norm1.", _SAM_O + "neck.1."),
    (_SAM + "neck.conv2.", _SAM_O + "neck.2."),
    (_SAM + "neck.layer_norm2.", _SAM_O + "neck.3."),
    ("model.high_res_vision_neck.conv1.", _SAM_O + "neck_hd.0."),
    ("model.high_res_vision_neck.layer_norm1.", _SAM_O + "neck_hd.1."),
    ("model.high_res_vision_neck.conv2.", _SAM_O + "neck_hd.2."),
    ("model.high_res_vision_neck.layer_norm2.", _SAM_O + "neck_hd.3."),
    ("model.high_res_vision_proj.conv1.", _SAM_O + "downsamples.0."),
    ("model.high_res_vision_proj.conv2.", _SAM_O + "downsamples.1."),
    ("model.high_res_vision_alpha", _SAM_O + "hd_alpha_downsamples"),
    (_SIG + "embeddings.patch_embedding.", _SIG_O + "patch_embed.proj."),
    (_SIG + "encoder.layers.{i}.layer_norm1.", _SIG_O + "blocks.{i}.norm1."),
    (_SIG + "encoder.layers.{i}.layer_norm2.", _SIG_O + "blocks.{i}.norm2."),
    (_SIG + "encoder.layers.{i}.self_attn.out_proj.", _SIG_O + "blocks.{i}.attn.proj."),
    (_SIG + "encoder.layers.{i}.mlp.", _SIG_O + "blocks.{i}.mlp."),
    (_SIG + "post_layernorm.", _SIG_O + "norm."),
    ("model.aligner.high_res_vision_proj.", "aligner.high_up_proj."),
    ("model.aligner.vision_proj.", "aligner.low_up_proj."),
    ("model.aligner.proj.", "aligner.layers.1."),
    ("model.aligner.linear1.", "aligner.layers.0."),  # 1.3B: Sequential(Linear, GELU, Linear)
    ("model.aligner.linear2.", "aligner.layers.2."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.weight", "language_model.lm_head.weight"),
]
# Present in the original checkpoint, unused by the model (DS builds them but never calls them).
ORIGINAL_IGNORED = ("vision_model.high_layer_norm.", "vision_model.low_layer_norm.", _SIG_O + "attn_pool.")
_SIG_POS, _SIG_POS_O = _SIG + "embeddings.position_embedding.weight", _SIG_O + "pos_embed"
_QKV_O = re.compile(re.escape(_SIG_O) + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_QKV = re.compile(re.escape(_SIG) + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _prefix_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_TO_ORIGINAL = [(_prefix_regex(ours), orig) for ours, orig in _ORIGINAL_PREFIXES]
_FROM_ORIGINAL = [(_prefix_regex(orig), ours) for ours, orig in _ORIGINAL_PREFIXES]


def _swap_prefix(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.replace("{i}", m.group("i") if "i" in m.groupdict() else "") + name[m.end():]
    return None


def to_layout_name(name: str, layout: str, hybrid: bool = True) -> str:
    """Our name -> the name in ``layout`` (for the original layout the fused qkv name for q/k/v_proj)."""
    if layout == "original" and not hybrid:
        out = to_layout_name(name, layout)
        return _SIG_O_SIGLIP_ONLY + out[len(_SIG_O):] if out.startswith(_SIG_O) else out
    if layout == "transformers5":
        return name
    if layout == "converted":
        return "model.vision_model.vision_model." + name[len(_SIG):] if name.startswith(_SIG) else name
    if layout == "original":
        if name == _SIG_POS:
            return _SIG_POS_O
        m = _QKV.match(name)
        if m:
            return f"{_SIG_O}blocks.{m.group(1)}.attn.qkv.{m.group(3)}"
        out = _swap_prefix(name, _TO_ORIGINAL)
        if out is None:
            raise KeyError(f"no original-layout name for {name}")
        return out
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


@dataclass(frozen=True)
class Target:
    """Where (part of) a stored tensor goes: our name, and for fused qkv the row block (0=q, 1=k, 2=v)."""

    name: str
    chunk: int | None = None  # row third of a fused qkv tensor
    squeeze0: bool = False  # original SigLIP pos_embed [1, 576, D] -> [576, D]


def from_layout_name(name: str, layout: str) -> list[Target] | None:
    """A stored name -> our names (None: a known-unused tensor to skip)."""
    if layout == "transformers5":
        return [Target(name)]
    if layout == "converted":
        inner = "model.vision_model.vision_model."
        return [Target(_SIG + name[len(inner):] if name.startswith(inner) else name)]
    if layout == "original":
        if name.startswith(_SIG_O_SIGLIP_ONLY):
            name = _SIG_O + name[len(_SIG_O_SIGLIP_ONLY):]
        if name.startswith(ORIGINAL_IGNORED):
            return None
        if name == _SIG_POS_O:
            return [Target(_SIG_POS, squeeze0=True)]
        m = _QKV_O.match(name)
        if m:
            return [Target(f"{_SIG}encoder.layers.{m.group(1)}.self_attn.{p}_proj.{m.group(2)}", chunk=c)
                    for c, p in enumerate("qkv")]
        ours = _swap_prefix(name, _FROM_ORIGINAL)
        return [Target(ours if ours is not None else name)]
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def detect_layout(names: list[str]) -> str:
    """Tell the three layouts apart from the stored tensor names."""
    if any(n.startswith("model.vision_model.vision_model.") for n in names):
        return "converted"
    if any(n.startswith(("vision_model.vision_tower", "language_model.model.")) for n in names):
        return "original"
    if any(n.startswith(("model.vision_model.", "model.language_model.")) for n in names):
        return "transformers5"
    sample = ", ".join(names[:3])
    raise CheckpointError(f"unrecognised weight names (e.g. {sample}): not a DeepSeek-VL checkpoint in the "
                          "converted, transformers-5 or original deepseek-ai layout")


# ---- safetensors files ---------------------------------------------------------------------------


@dataclass
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header (``u64 little-endian length + JSON``) and check it against the file size, then
    let ``safe_open`` validate the file too. Any problem -> CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size or n > 100 << 20:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"tensor {name}: unsupported dtype {info['dtype']}")
            dtype, shape = _DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"])
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or not 0 <= begin <= end or 8 + n + end > size:
                raise ValueError(f"tensor {name}: data offsets {begin}..{end} do not fit (file truncated?)")
            entries[name] = TensorEntry(name, dtype, shape, 8 + n + begin, end - begin)
        from safetensors import safe_open  # validates the layout the reference way (lazy: no data read)

        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file missing") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (json, safetensors and OS errors all mean the same to the user)
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return entries


STAGING_BYTES = 64 << 20


def read_tensor(f, entry: TensorEntry, dtype: torch.dtype | None = None, device: torch.device | None = None,
                staging: list[Tensor] | None = None) -> Tensor:
    """Read one tensor with plain file reads (no mmap: see the module docstring).

    Stored dtype on CPU: read straight into the result. Otherwise the result is allocated in its final dtype and
    device first and filled through one reused staging buffer of ``STAGING_BYTES``: no full-size temporary, and
    no freed half-size buffers fragmenting the heap (which costs ~15% extra peak RSS for bf16 -> fp32).
    """
    dtype = dtype or entry.dtype
    device = device or torch.device("cpu")
    if dtype == entry.dtype and device.type == "cpu" or entry.nbytes <= (1 << 20):
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        f.seek(entry.start)
        if entry.nbytes and f.readinto(memoryview(buf.numpy())) != entry.nbytes:
            raise CheckpointError(f"{f.name}: truncated while reading {entry.name}")
        return buf.view(entry.dtype).reshape(entry.shape).to(device=device, dtype=dtype)
    if staging is None:
        staging = []
    if not staging:
        staging.append(torch.empty(STAGING_BYTES, dtype=torch.uint8))
    stage = staging[0]
    out = torch.empty(entry.shape, dtype=dtype, device=device)
    flat = out.view(-1)
    f.seek(entry.start)
    item, done = entry.dtype.itemsize, 0
    while done < entry.nbytes:
        n = min(STAGING_BYTES, entry.nbytes - done)
        if f.readinto(memoryview(stage[:n].numpy())) != n:
            raise CheckpointError(f"{f.name}: truncated while reading {entry.name}")
        flat[done // item:(done + n) // item].copy_(stage[:n].view(entry.dtype))  # converts dtype and device
        done += n
    return out


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order. Pickle-only checkpoints are refused."""
    index = checkpoint_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [checkpoint_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: weight shard listed in {SAFETENSORS_INDEX} is missing "
                                      "(incomplete download? re-run it, or check --model PATH)")
        return files
    if (checkpoint_dir / SAFETENSORS_SINGLE).is_file():
        return [checkpoint_dir / SAFETENSORS_SINGLE]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in checkpoint_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{checkpoint_dir}: only pickle weights ({', '.join(pickles)}); dsvl loads "
                              "safetensors only (pickles can run code). Convert the checkpoint to safetensors.")
    raise CheckpointError(f"{checkpoint_dir}: no *.safetensors weight files")


# ---- resolving a --model argument ----------------------------------------------------------------


def _hint() -> str:
    return ("Pass a local checkpoint with --model PATH, try the interface with random weights with "
            "--model random:tiny (or write one with `python -m dsvl.tiny OUT_DIR`), or, if you have network "
            "access, unset HF_HUB_OFFLINE so the weights can be downloaded.")


def resolve_checkpoint(model: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; ``random:tiny`` / ``random:mid`` / ``random:7b`` a random-weight checkpoint
    written once into the cache (to try the UI without the 15 GB download); otherwise a hub repo id fetched
    with ``snapshot_download`` (safetensors, JSON, tokenizer and template files only; never pickles)."""
    text = str(model)
    if text.startswith(RANDOM_PREFIX):
        return _random_checkpoint(text.removeprefix(RANDOM_PREFIX))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json; not a checkpoint directory. {_hint()}")
        return path
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such checkpoint directory (and not a hub repo id 'owner/name'). "
                              f"{_hint()}")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001  (offline, not found, gated, network: same advice)
        raise CheckpointError(f"cannot get {text!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                              f"{_hint()}") from None
    if not (local / "config.json").is_file() or not any(local.glob("*.safetensors")):
        raise CheckpointError(f"{text}: the downloaded snapshot {local} has no config.json or no safetensors "
                              f"weights (pickle formats are not accepted). {_hint()}")
    return local


RANDOM_PREFIX = "random:"


def _random_checkpoint(size: str) -> Path:
    """Write (once) and return a random-weight checkpoint of ``size`` under the dsvl cache directory."""
    from .tiny import SIZES, write_checkpoint

    if size not in SIZES:
        raise CheckpointError(f"random:{size}: unknown size; choose one of {', '.join('random:' + s for s in SIZES)}")
    cache = Path(os.environ.get("DSVL_CACHE", Path.home() / ".cache" / "dsvl")) / f"random-{size}"
    if not (cache / "config.json").is_file():
        print(f"dsvl: writing a random-weight {size} checkpoint to {cache} (answers will be noise)", flush=True)
        tmp = cache.with_name(cache.name + ".partial")
        write_checkpoint(tmp, size=size)
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        tmp.rename(cache)
    return cache


# ---- loading -------------------------------------------------------------------------------------


@dataclass
class LoadInfo:
    layout: str
    files: list[str]
    weight_bytes: int  # bytes of the model's weights after loading (and quantization)
    n_tensors: int  # tensors assigned to the model
    tied_lm_head: bool = False
    ignored: list[str] = field(default_factory=list)  # known-unused stored tensors
    unexpected: list[str] = field(default_factory=list)  # unknown stored tensors (skipped, logged)
    quantized: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}") from None


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter/persistent buffer the checkpoint must provide, with its shape (lm_head may be tied)."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def _assign(model: nn.Module, name: str, tensor: Tensor) -> str | None:
    """Put ``tensor`` where the checkpoint name ``name`` belongs. A part of a fused Linear (``fuse_on_load``) is
    copied into its rows of the fused weight, allocated on the first part; returns that Linear's name then."""
    module_name, _, attr = name.rpartition(".")
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    slot = getattr(parent, "fused_parts", {}).get(child)
    if slot is not None:
        fused_name, lo, hi = slot
        fused = getattr(parent, fused_name)
        whole = fused._parameters[attr]
        if whole.is_meta:
            whole = nn.Parameter(torch.empty(whole.shape, dtype=tensor.dtype, device=tensor.device),
                                 requires_grad=False)
            fused._parameters[attr] = whole
        whole.data[lo:hi] = tensor
        return f"{parent_name}.{fused_name}" if parent_name else fused_name
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor
    return None


def _fused_part_counts(model: nn.Module, names) -> dict[str, int]:
    """Fused Linear name -> how many checkpoint tensors fill it (it is complete when all have been assigned)."""
    counts: dict[str, int] = {}
    for name in names:
        module_name, _, _ = name.rpartition(".")
        parent_name, _, child = module_name.rpartition(".")
        slot = getattr(model.get_submodule(parent_name), "fused_parts", {}).get(child)
        if slot is not None:
            key = f"{parent_name}.{slot[0]}" if parent_name else slot[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


def _is_loaded(module: nn.Module) -> bool:
    return all(not t.is_meta for t in module.parameters(recurse=False))


def load_model(checkpoint_dir: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype | str = torch.bfloat16, quantization: str = "none",
               config: DsvlConfig | None = None, pack: bool | None = False
               ) -> tuple["DeepseekVLHybrid", LoadInfo]:  # noqa: F821
    """Build the model on ``meta`` and fill it tensor by tensor, shard by shard, straight in ``device``/``dtype``.

    Every expected tensor must be present with the right shape (else CheckpointError naming tensor and file).
    With ``quantization != "none"`` each Linear accepted by ``dsvl.quantization.is_quantizable`` is replaced by
    ``quantize_linear(linear, quantization, name)`` as soon as its last tensor is read, so full-precision copies
    never pile up: peak memory is the quantized weights + about one 16-bit Linear. This is where the decoder's
    fused Linears (``qkv_proj``, ``gate_up_proj``: filled part by part as the checkpoint's q/k/v and gate/up
    tensors arrive) are quantized, once their last part is in: fuse, then quantize. Without quantization, the
    decoder's Linears are finally packed for oneDNN when ``pack`` is true (``None``: on CPU in bfloat16 where
    supported, what ``dsvl.load`` does; default off, plain ``nn.Linear``s).
    """
    from .model import DeepseekVLHybrid

    t0 = time.perf_counter()
    checkpoint_dir = Path(checkpoint_dir)
    device, dtype = torch.device(device), _resolve_dtype(dtype)
    if config is None:
        try:
            config = DsvlConfig.from_file(checkpoint_dir / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    files = weight_files(checkpoint_dir)
    headers = {f: read_header(f) for f in files}
    stored = [n for h in headers.values() for n in h]
    layout = detect_layout(stored)

    with torch.device("meta"):
        model = DeepseekVLHybrid(config)
    expected = expected_tensors(model)

    # Plan: which stored tensor (file, entry, target) provides each expected tensor; validate before reading.
    plan: dict[Path, list[tuple[TensorEntry, list[Target]]]] = {f: [] for f in files}
    found: dict[str, Path] = {}
    info = LoadInfo(layout=layout, files=[f.name for f in files], weight_bytes=0, n_tensors=0)
    for f, entries in headers.items():
        for entry in entries.values():
            targets = from_layout_name(entry.name, layout)
            if targets is None:
                info.ignored.append(entry.name)
                continue
            targets = [t for t in targets if t.name in expected]
            if not targets:
                info.unexpected.append(entry.name)
                continue
            for t in targets:
                want = expected[t.name]
                got = _target_shape(entry.shape, t)
                if got != want:
                    raise CheckpointError(f"{f}: tensor {entry.name} has shape {list(entry.shape)}, expected "
                                          f"{list(_stored_shape(want, t))} (for {t.name}; does config.json "
                                          "match the weights?)")
                if t.name in found:
                    raise CheckpointError(f"{f}: tensor {entry.name} duplicates {t.name} already in {found[t.name]}")
                found[t.name] = f
            plan[f].append((entry, targets))
    if info.unexpected:
        log.warning("ignoring %d unexpected tensors, e.g. %s", len(info.unexpected), info.unexpected[:3])

    tie = config.tie_word_embeddings and "lm_head.weight" not in found
    missing = [n for n in expected if n not in found and not (tie and n == "lm_head.weight")]
    if missing:
        name = missing[0]
        stored_name = to_layout_name(name, layout, config.hybrid)
        where = _index_file(checkpoint_dir, stored_name) or ", ".join(f.name for f in files)
        raise CheckpointError(f"{checkpoint_dir}: tensor {stored_name} ({len(missing)} missing in all) not found "
                              f"in {where}" + (" (the config has tie_word_embeddings=false, so lm_head.weight "
                                               "is required)" if name == "lm_head.weight" else ""))

    quantize = _quantizer(quantization)
    if quantize is not None and device.type == "cpu":
        _mmap_large_allocations()
    skip = {"lm_head"} if tie else set()  # tied: it is the embedding, quantized never
    done_linears: set[str] = set()
    unfilled = _fused_part_counts(model, found)  # fused Linears still waiting for some of their parts
    staging: list[Tensor] = []
    for f in files:
        with open(f, "rb") as fh:
            for entry, targets in plan[f]:
                target_dtype = dtype if entry.dtype.is_floating_point else entry.dtype
                if len(targets) == 1 and targets[0].chunk is None:
                    x = read_tensor(fh, entry, target_dtype, device, staging)
                    fused = _assign(model, targets[0].name, x.squeeze(0) if targets[0].squeeze0 else x)
                    if fused is not None:
                        unfilled[fused] -= 1
                    info.n_tensors += 1
                    # At once (never more than one 16-bit Linear waits for it); a fused one when its last part is in.
                    if quantize is not None and not (fused is not None and unfilled[fused]):
                        info.quantized += _quantize_loaded(model, quantize, quantization, done_linears, skip,
                                                           fused or targets[0].name.rpartition(".")[0])
                    continue
                raw = read_tensor(fh, entry)  # fused original SigLIP qkv: split rows into q, k, v
                rows = raw.shape[0] // 3
                for t in targets:
                    part = raw[t.chunk * rows:(t.chunk + 1) * rows]
                    # clone: never keep the whole fused buffer alive through a view
                    _assign(model, t.name, part.to(device=device, dtype=target_dtype).clone())
                    info.n_tensors += 1
                del raw
        if quantize is not None:  # whatever the per-tensor pass could not take (e.g. Linears split across files)
            skip_now = skip | {name for name, left in unfilled.items() if left}  # fused, still missing parts
            info.quantized += _quantize_loaded(model, quantize, quantization, done_linears, skip_now)

    if tie:
        model.tie_weights()
        info.tied_lm_head = True
    leftover = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if leftover:  # cannot happen when the plan is complete; guards against model/plan drift
        raise CheckpointError(f"{checkpoint_dir}: tensors left unloaded: {leftover[:5]}")
    model.init_buffers(device)
    model.eval().requires_grad_(False)
    seen: set[int] = set()
    for t in model.state_dict(keep_vars=True).values():  # weights only (not RoPE tables); tied counted once
        if id(t) not in seen:
            seen.add(id(t))
            info.weight_bytes += t.numel() * t.element_size()
    if pack is None:
        pack = quantization == "none" and should_pack(device, dtype)
    if pack:
        pack_linears(model.model.language_model)
    info.seconds = time.perf_counter() - t0
    return model, info


def _target_shape(shape: tuple[int, ...], t: Target) -> tuple[int, ...]:
    if t.squeeze0:
        return shape[1:] if shape and shape[0] == 1 else shape
    if t.chunk is not None:
        return (shape[0] // 3, *shape[1:]) if shape and shape[0] % 3 == 0 else shape
    return shape


def _stored_shape(shape: tuple[int, ...], t: Target) -> tuple[int, ...]:
    if t.squeeze0:
        return (1, *shape)
    if t.chunk is not None:
        return (3 * shape[0], *shape[1:])
    return shape


def _index_file(checkpoint_dir: Path, stored_name: str) -> str | None:
    index = checkpoint_dir / SAFETENSORS_INDEX
    if index.is_file():
        return json.loads(index.read_text(encoding="utf-8"))["weight_map"].get(stored_name)
    return None


def _quantizer(quantization: str):
    if quantization == "none":
        return None
    # Lazy: bitsandbytes is heavy and optional on CPU. import_module (not `from . import`) so tests can swap it.
    return importlib.import_module("dsvl.quantization")


def _mmap_large_allocations(threshold: int = 1 << 20) -> None:
    """glibc: serve every allocation >= 1 MiB by its own mmap, returned to the OS on free. By default glibc raises
    that threshold (up to 32 MiB) after the first large free, so the 16-bit Linears and quantization temporaries
    land on the heap between long-lived quantized weights and their holes stay resident: a quantized load then
    peaked at ~7x the quantized size instead of ~1.6x (tests/test_quant_fast.py). No-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _quantize_loaded(model: nn.Module, q, mode: str, done: set[str], skip: set[str],
                     only: str | None = None) -> list[str]:
    """Replace each fully-loaded, not yet visited Linear accepted by ``q.is_quantizable`` (only the module named
    ``only`` when given: the one whose tensor was just read)."""
    replaced = []
    modules = [(only, model.get_submodule(only))] if only is not None else list(model.named_modules())
    for name, module in modules:
        if not isinstance(module, nn.Linear) or name in done or name in skip or not _is_loaded(module):
            continue
        done.add(name)
        if q.is_quantizable(name, mode):
            parent_name, _, child = name.rpartition(".")
            new = q.quantize_linear(module, mode, name)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            replaced.append(name)
            # A wrapper may keep Linear children: never quantize those a second time.
            done.update(f"{name}.{sub}" for sub, _ in new.named_modules() if sub)
    return replaced


def iter_expected(config: DsvlConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the model for ``config``, from a ``meta`` build (no memory)."""
    from .model import DeepseekVLHybrid

    with torch.device("meta"):
        model = DeepseekVLHybrid(config)
    yield from expected_tensors(model).items()

