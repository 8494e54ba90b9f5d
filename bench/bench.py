"""dsvl vs transformers, side by side, on the same random-weight checkpoint and the same conversation.

    python bench/bench.py --preset mid --dtype float32          # CPU (full-size vision, 2 decoder layers)
    python bench/bench.py --preset 7b --dtype bfloat16 [--quantization nf4]   # GPU
    python bench/bench.py --preset 1.3b --dtype bfloat16        # DeepSeek-VL 1.3B chat, full size, CPU
    python bench/bench.py --preset mid --dtype bfloat16 --dsvl-modes int8-wo,int4-wo,bnb-nf4 \
        --transformers-modes bnb-nf4 --no-full-head-run           # quantized modes side by side (CPU)

Each implementation runs in its own subprocess (clean peak-memory numbers, no shared caches): load, then one
image + a question, then a follow-up question in the same conversation, greedy, ``--new-tokens`` tokens per turn
(or fewer at an EOS; with identical greedy ids both stop at the same place). Per-token timestamps are taken inside one generation
(dsvl: ``stats.token_times``; transformers: a streamer's ``put()`` times), so decode speed is not polluted by
prefill. TTFT is measured from before the conversation is processed (image decode + preprocessing + vision towers
+ prefill) to the first new token. Writes ``bench/out/bench-<preset>-<dtype>[-<quant>].{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
QUESTION = "Describe this image in detail."
FOLLOW_UP = "What colors stand out the most?"
IMPLS = ("dsvl", "transformers")


# ---- shared helpers ---------------------------------------------------------------------------------------------

def make_image(path: Path) -> Path:
    """A deterministic 640x480 test picture (gradients, shapes, noise): decoding and resizing cost like a photo."""
    import numpy as np
    from PIL import Image, ImageDraw

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    rgb = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], -1).astype(np.int16)
    rgb = np.clip(rgb + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    d = ImageDraw.Draw(im)
    d.ellipse((80, 60, 300, 280), fill=(220, 40, 40))
    d.rectangle((360, 200, 600, 440), fill=(30, 90, 200))
    im.save(path)
    return path


def conversation(image: Path, reply: str | None = None) -> list[dict]:
    conv = [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": QUESTION}]}]
    if reply is not None:
        conv += [{"role": "assistant", "content": [{"type": "text", "text": reply}]},
                 {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]}]
    return conv


def decode_rate(times: list[float]) -> float | None:
    """Tokens per second after the first token, from per-token timestamps of one generation."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


def peak_memory(device: str) -> dict:
    import torch

    # VmHWM (this process image's high-water mark); ru_maxrss would include the parent's peak across exec.
    try:
        hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_gb": hwm * 1024 / 1e9}
    if device.startswith("cuda"):
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


# ---- workers (one per subprocess) -------------------------------------------------------------------------------

def run_dsvl(a: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import dsvl

    t0 = time.perf_counter()
    engine = dsvl.load(a.checkpoint, device=a.device, dtype=a.dtype, quantization=a.quantization,
                       slice_lm_head=not a.full_lm_head)
    load_s = time.perf_counter() - t0
    kw = dict(max_new_tokens=a.new_tokens, temperature=0.0, repetition_penalty=1.0, stop=())
    s1 = engine.stream(conversation(a.image), session_id="bench", **kw)
    reply = "".join(s1)
    s2 = engine.stream(conversation(a.image, reply), session_id="bench", **kw)
    "".join(s2)
    st1, st2 = s1.stats, s2.stats
    return {
        "load_s": load_s, "image_encode_s": st1.image_encode_s, "ttft_s": st1.ttft_s,
        "decode_tok_s": decode_rate(st1.token_times), "followup_ttft_s": st2.ttft_s,
        "followup_decode_tok_s": decode_rate(st2.token_times), "prompt_tokens": st1.prompt_tokens,
        "followup_prompt_tokens": st2.prompt_tokens, "followup_prefilled_tokens": st2.prefilled_tokens,
        "followup_images_encoded": st2.images_encoded, "weight_bytes": engine.weight_bytes,
        "lm_head_rows": engine.lm_head_rows,
        "new_tokens": st1.new_tokens, "ids": s1.generated_ids, "threads": torch.get_num_threads(),
        "quantization": engine.quantization, "decode_bytes": quantized_decode_bytes(engine),
        **peak_memory(a.device), **text_logits(engine, a.result),
    }


def quantized_decode_bytes(engine) -> int | None:
    """Bytes a quantized engine reads per decoded token: the decoder Linears as stored + the lm_head rows used."""
    from dsvl.quantization import is_quantizable, module_weight_bytes

    if engine.quantization == "none":
        return None  # bytes_per_token computes it from the shapes
    mods = dict(engine.model.named_modules())
    layers = sum(module_weight_bytes(m) for n, m in mods.items() if n != "lm_head" and
                 is_quantizable(n, engine.quantization))
    head = module_weight_bytes(mods["lm_head"])
    rows = engine.lm_head_rows
    return layers + head * rows // engine.config.text.vocab_size


def text_logits(engine, result: Path) -> dict:
    """The next-token logits (float32, decodable ids) after each position of a fixed text, saved next to the
    result for the accuracy comparison between precisions (cosine against dsvl's unquantized run)."""
    import torch

    ids = torch.tensor([engine.tokenizer.encode(f"User: {QUESTION}\n\nAssistant: The image shows")])
    with torch.no_grad():
        logits = engine.model(ids.to(engine.device)).logits[0, :, :engine.vocab_limit].float().cpu()
    path = result.with_suffix(".logits.pt")
    torch.save(logits, path)
    return {"logits_path": str(path)}


def run_transformers(a: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    kwargs: dict = {"dtype": dtype}
    if a.quantization != "none":
        skip = ["vision_model", "high_res_vision_model", "high_res_vision_neck", "high_res_vision_proj", "aligner",
                "lm_head"]
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=a.quantization in ("int8", "bnb-int8"), load_in_4bit=a.quantization in ("nf4", "bnb-nf4"),
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)
    if a.device.startswith("cuda"):
        kwargs["device_map"] = a.device
    hybrid = json.loads((Path(a.checkpoint) / "config.json").read_text())["model_type"] == "deepseek_vl_hybrid"
    cls = (transformers.DeepseekVLHybridForConditionalGeneration if hybrid
           else transformers.DeepseekVLForConditionalGeneration)  # the 1.3B model: SigLIP only
    model = cls.from_pretrained(a.checkpoint, **kwargs).eval()
    processor = transformers.AutoProcessor.from_pretrained(a.checkpoint)
    load_s = time.perf_counter() - t0
    size = len(processor.tokenizer)  # ids the tokenizer can decode; the rest must be masked (docs/MODEL.md §5)

    class MaskUndecodable(transformers.LogitsProcessor):
        """Slice assignment (``suppress_tokens`` would run an isin over the vocabulary every step)."""

        def __call__(self, input_ids, scores):
            scores[:, size:] = float("-inf")
            return scores

    class Times(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.ids: list[int] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first puts the prompt
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())
            self.ids += value.reshape(-1).tolist()

        def end(self) -> None:
            pass

    encode_s: list[float] = []
    inner = model.model.get_image_features

    @functools.wraps(inner)  # generate() inspects its signature to route pixel_values to it
    def timed_features(*args, **kw):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = inner(*args, **kw)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        encode_s.append(time.perf_counter() - t)
        return out

    model.model.get_image_features = timed_features

    def turn(conv: list[dict]) -> tuple[float, Times, str, int]:
        t_start = time.perf_counter()
        inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        if "high_res_pixel_values" in inputs:
            inputs["high_res_pixel_values"] = inputs["high_res_pixel_values"].to(dtype)
        streamer = Times()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=a.new_tokens, do_sample=False,
                           repetition_penalty=1.0, logits_processor=[MaskUndecodable()], streamer=streamer,
                           pad_token_id=processor.tokenizer.pad_token_id)
        text = processor.tokenizer.decode(streamer.ids, skip_special_tokens=True)
        return streamer.times[0] - t_start, streamer, text, inputs["input_ids"].shape[1]

    ttft1, st1, reply, n1 = turn(conversation(a.image))
    ttft2, st2, _, n2 = turn(conversation(a.image, reply))
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    return {
        "load_s": load_s, "image_encode_s": encode_s[0], "ttft_s": ttft1, "decode_tok_s": decode_rate(st1.times),
        "followup_ttft_s": ttft2, "followup_decode_tok_s": decode_rate(st2.times), "prompt_tokens": n1,
        "followup_prompt_tokens": n2, "followup_prefilled_tokens": n2, "followup_images_encoded": len(encode_s) - 1,
        "weight_bytes": weights, "lm_head_rows": model.config.text_config.vocab_size, "ids": st1.ids,
        "new_tokens": len(st1.ids),
        "threads": torch.get_num_threads(), "quantization": a.quantization, **peak_memory(a.device),
    }


# ---- parent: machine info, subprocesses, table ----------------------------------------------------------------

def machine_info() -> dict:
    import torch

    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["cpu_flags_of_note"] = [f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma", "f16c"))]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def memory_bandwidth_gbs(device: str) -> float:
    """Streaming-read bandwidth with torch (sum over 512 MiB of float32), best of 5."""
    import torch

    x = torch.ones(128 << 20, device="cuda" if device.startswith("cuda") else "cpu")
    best = 0.0
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum().item()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def bytes_per_token(r: dict, checkpoint: Path, dtype: str) -> float:
    """Weight bytes one decode step must read: decoder linears + the lm_head rows computed (+ 1 embedding row)."""
    sys.path.insert(0, str(ROOT))
    from dsvl.config import DsvlConfig

    t = DsvlConfig.from_file(checkpoint / "config.json").text
    item = 4 if dtype == "float32" else 2
    per_layer = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) + \
        3 * t.hidden_size * t.intermediate_size
    return (per_layer * t.num_hidden_layers + r["lm_head_rows"] * t.hidden_size) * item


def ensure_checkpoint(preset: str, path: Path | None) -> Path:
    if path is not None:
        return path
    path = OUT / f"ckpt-{preset}"
    if not (path / "config.json").exists():
        print(f"writing the {preset} random-weight checkpoint to {path} ...", flush=True)
        subprocess.run([sys.executable, "-m", "dsvl.tiny", str(path), "--size", preset], cwd=ROOT, check=True)
    return path


def run_worker(impl: str, a: argparse.Namespace, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", impl, "--result", str(out), "--checkpoint", str(a.checkpoint),
           "--image", str(a.image), "--dtype", a.dtype, "--device", a.device, "--quantization", a.quantization,
           "--new-tokens", str(a.new_tokens), *extra]
    print(f"running {impl}{' ' + ' '.join(extra) if extra else ''} ...", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{impl} worker failed with exit code {proc.returncode}")
    r = json.loads(out.read_text())
    out.unlink()
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return r


ROWS = [("image encode (s)", "image_encode_s", "lower"), ("time to first token (s)", "ttft_s", "lower"),
        ("decode (tok/s)", "decode_tok_s", "higher"), ("decode weights read (GB/s)", "decode_gbs", "higher"),
        ("follow-up time to first token (s)", "followup_ttft_s", "lower"),
        ("follow-up prefilled tokens", "followup_prefilled_tokens", "lower"),
        ("peak RSS (GB)", "peak_rss_gb", "lower"), ("peak GPU memory (GB)", "peak_gpu_gb", "lower"),
        ("weights (GB)", "weight_gb", "lower"), ("load (s)", "load_s", "lower")]


def table(results: dict[str, dict]) -> str:
    names = list(results)
    ref = results["transformers"]
    head = "| | " + " | ".join(names) + " | " + " | ".join(f"{n} / transformers" for n in names if n != "transformers")
    lines = [head + " |", "|" + " --- |" * (1 + len(names) + len(names) - 1)]
    for label, key, _ in ROWS:
        if all(results[n].get(key) is None for n in names):
            continue
        vals = [results[n].get(key) for n in names]
        cells = [_fmt(v) for v in vals]
        ratios = [_fmt(results[n][key] / ref[key], ratio=True) if results[n].get(key) is not None and ref.get(key)
                  else "" for n in names if n != "transformers"]
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def compare_precisions(results: dict[str, dict]) -> list[str]:
    """Each extra dsvl precision against the plain dsvl run: logits cosine over a fixed text and how many greedy
    tokens of the image conversation agree."""
    import torch
    import torch.nn.functional as F

    if "dsvl" not in results:
        return []
    ref_ids = results["dsvl"]["ids"]
    ref = torch.load(results["dsvl"]["logits_path"])
    lines = ["", f"Against dsvl at {results['dsvl']['quantization']}:"]
    for name, r in results.items():
        if not name.startswith("dsvl ") or "logits_path" not in r:
            continue
        got = torch.load(r["logits_path"])
        cos = F.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
        same = next((i for i, (x, y) in enumerate(zip(r["ids"], ref_ids)) if x != y), min(len(ref_ids), len(r["ids"])))
        r["logits_cosine"], r["greedy_agree"] = cos, same
        lines.append(f"- {name}: logits cosine {cos:.5f} over {ref.shape[0]} positions; greedy ids equal for the "
                     f"first {same} of {len(ref_ids)} tokens")
    for r in results.values():
        if "logits_path" in r:
            Path(r.pop("logits_path")).unlink(missing_ok=True)
    return lines


def best_of(runs: list[dict]) -> dict:
    higher = {key for _, key, better in ROWS if better == "higher"} | {"followup_decode_tok_s"}
    out = dict(runs[0])
    for key, v in runs[0].items():
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if len(vals) == len(runs) and key not in ("prompt_tokens", "followup_prompt_tokens", "weight_bytes",
                                                  "lm_head_rows", "new_tokens", "threads"):
            out[key] = max(vals) if key in higher else min(vals)
    out["runs"] = len(runs)
    return out


def _fmt(v, ratio: bool = False) -> str:
    if v is None:
        return "-"
    if ratio:
        return f"{v:.2f}x"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "mid", "7b", "1.3b-tiny", "1.3b"], default="mid")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="default: cpu for tiny/mid, cuda for 7b")
    p.add_argument("--quantization", default="none",
                   help="none, int8-wo, int4-wo[-gN] (dsvl only), bnb-int8, bnb-nf4 (old names int8, nf4)")
    p.add_argument("--dsvl-modes", default="", help="comma-separated extra dsvl runs, e.g. int8-wo,int4-wo: "
                   "side by side, with logits cosine and greedy agreement against the --quantization run")
    p.add_argument("--transformers-modes", default="", help="comma-separated extra transformers runs: bnb-int8,bnb-nf4")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: bench/out/ckpt-<preset> (written once)")
    p.add_argument("--only", choices=IMPLS, default=None)
    p.add_argument("--repeat", type=int, default=1, help="alternating runs per implementation; best value kept")
    p.add_argument("--no-full-head-run", action="store_true",
                   help="skip the extra dsvl run that computes all lm_head rows (like-for-like decode)")
    # worker mode (internal)
    p.add_argument("--worker", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--image", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--full-lm-head", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.device = a.device or ("cuda" if a.preset == "7b" else "cpu")

    if a.worker:
        r = run_dsvl(a) if a.worker == "dsvl" else run_transformers(a)
        a.result.write_text(json.dumps(r))
        return

    OUT.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(json.dumps(info, indent=1), flush=True)
    a.checkpoint = ensure_checkpoint(a.preset, a.checkpoint)
    a.image = make_image(OUT / "bench-image.png")
    info["memory_bandwidth_gbs"] = round(memory_bandwidth_gbs(a.device), 1)

    plan = []
    if a.only in (None, "dsvl"):
        plan.append(("dsvl", "dsvl", []))
    if a.only is None and not a.no_full_head_run:
        plan.append(("dsvl (all lm_head rows)", "dsvl", ["--full-lm-head"]))
    for mode in filter(None, a.dsvl_modes.split(",")):
        plan.append((f"dsvl {mode}", "dsvl", ["--quantization", mode]))
    if a.only in (None, "transformers"):
        plan.append(("transformers", "transformers", []))
        for mode in filter(None, a.transformers_modes.split(",")):
            plan.append((f"transformers {mode}", "transformers", ["--quantization", mode]))
    # Shared machines are noisy: with --repeat N the implementations run in alternating order N times and each
    # metric keeps its best value (lowest time / memory, highest rate).
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
    for i in range(a.repeat):
        for name, impl, extra in (plan if i % 2 == 0 else plan[::-1]):
            runs[name].append(run_worker(impl, a, extra))
    results = {name: best_of(rs) for name, rs in runs.items()}
    for rs in runs.values():  # best_of keeps the first run's logits for the accuracy comparison
        for r in rs[1:]:
            if "logits_path" in r:
                Path(r["logits_path"]).unlink(missing_ok=True)
    for r in results.values():
        r["weight_gb"] = r["weight_bytes"] / 1e9
        quantized = r.get("quantization", a.quantization) != "none"
        if r.get("decode_tok_s") and (r.get("decode_bytes") or not quantized):
            per_token = r.get("decode_bytes") or bytes_per_token(r, a.checkpoint, a.dtype)
            r["decode_gbs"] = r["decode_tok_s"] * per_token / 1e9
    accuracy = compare_precisions(results)
    ids = {n: r.pop("ids") for n, r in results.items()}
    agree = None
    if "transformers" in ids and "dsvl" in ids:
        ref = ids["transformers"]
        agree = next((i for i, (x, y) in enumerate(zip(ids["dsvl"], ref)) if x != y), min(len(ref), len(ids["dsvl"])))

    name = f"bench-{a.preset}-{a.dtype}" + (f"-{a.quantization}" if a.quantization != "none" else "")
    md = [f"## {a.preset} preset, {a.dtype}" + (f", {a.quantization}" if a.quantization != "none" else "") +
          f", {a.device}", "",
          f"{info['date']} · {info.get('cpu', '')} ({info['cpus']} CPUs{', ' + info['gpu'] if 'gpu' in info else ''})"
          f" · torch {info['torch']} · transformers {info.get('transformers', '-')} · measured streaming-read bandwidth "
          f"{info['memory_bandwidth_gbs']} GB/s", "",
          f"One {a.image.name} (640x480) + \"{QUESTION}\", then \"{FOLLOW_UP}\"; greedy, {a.new_tokens} new tokens per "
          f"turn; prompt {results[next(iter(results))]['prompt_tokens']} tokens; best of {a.repeat} alternating "
          f"run(s) per implementation.", "", table(results) if
          "transformers" in results else json.dumps(results, indent=1), ""]
    if agree is not None:
        md.append(f"Greedy ids identical to transformers for the first {agree} of {a.new_tokens} tokens.")
    md += accuracy
    text = "\n".join(md) + "\n"
    (OUT / f"{name}.md").write_text(text)
    (OUT / f"{name}.json").write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(a).items()},
                                                  "results": results, "ids_agree": agree}, indent=1))
    print("\n" + text)


if __name__ == "__main__":
    main()
