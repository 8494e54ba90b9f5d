"""dsvl.processor: ids and pixels equal transformers' DeepseekVLHybridProcessor on the tiny hub files;
batching, context-drop policy, overflow error, image errors and control-token sanitising."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsvl.processor as proc_mod
from dsvl.images import ImageError
from dsvl.processor import ContextOverflowError, Processor, Prompt, content_key, image_key, write_processor_files
from dsvl.text import EOS_TOKEN, IMAGE_TOKEN


@pytest.fixture(scope="module")
def proc_dir(processor_files: Path) -> Path:
    return processor_files


@pytest.fixture(scope="module")
def proc(proc_dir: Path) -> Processor:
    return Processor.from_dir(proc_dir)


@pytest.fixture(scope="module")
def hf_proc(proc_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(proc_dir)


def _img(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


RED, NOISE, TALL = Image.new("RGB", (500, 333), (255, 0, 0)), _img(70, 40, 1), _img(30, 90, 2)


def _user(*items) -> dict:
    return {"role": "user", "content": [i if isinstance(i, dict) else {"type": "text", "text": i} for i in items]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _image(img) -> dict:
    return {"type": "image", "image": img}


PARITY = {
    "text_only": [_user("What is the capital of France?")],
    "one_image": [_user(_image(RED), "Describe this image.")],
    "two_images": [_user("What's the difference between", _image(NOISE), " and ", _image(TALL))],
    "multi_turn": [
        _user(_image(RED), "Where is the cat standing?"),
        _assistant("The cat is standing on snow. 😀"),
        _user(_image(TALL), "请描述这张图片。"),
    ],
}


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_transformers(name, proc: Processor, hf_proc):
    conv = PARITY[name]
    ours = proc(conv)
    ref = hf_proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    if "pixel_values" in ref:
        assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-5
        assert (ours["high_res_pixel_values"] - ref["high_res_pixel_values"]).abs().max() <= 1e-5
    else:
        assert ours["pixel_values"] is None and ours["high_res_pixel_values"] is None
    # same ids through the processor(text=..., images=...) entry point
    prompt = proc.prepare(conv)
    images = prompt.images or None
    assert hf_proc(text=prompt.text, images=images, return_tensors="pt")["input_ids"][0].tolist() == prompt.token_ids


def test_prompt_structure(proc: Processor):
    p = proc.prepare(PARITY["two_images"])
    tok = proc.tokenizer
    assert isinstance(p, Prompt) and p.dropped_turns == 0
    assert p.token_ids[0] == tok.bos_id and p.token_ids.count(tok.bos_id) == 1
    positions = [i for i, t in enumerate(p.token_ids) if t == tok.image_token_id]
    assert len(positions) == 2 * 576
    runs = np.split(np.array(positions), np.where(np.diff(positions) != 1)[0] + 1)
    assert [len(r) for r in runs] == [576, 576]  # contiguous, one run per image
    assert [im.size for im in p.images] == [NOISE.size, TALL.size] and all(im.mode == "RGB" for im in p.images)
    assert p.image_keys == [image_key(NOISE), image_key(TALL)] and len(set(p.image_keys)) == 2


def test_image_sources_and_keys(proc: Processor, tmp_path: Path):
    path = tmp_path / "noise.png"
    NOISE.save(path)
    conv = [_user({"type": "image", "path": str(path)}, {"type": "image", "url": path.read_bytes()},
                  _image(path.read_bytes()), "same?")]
    p = proc.prepare(conv)  # encoded images (a file, bytes) are keyed by their bytes: one key for the three
    assert len(set(p.image_keys)) == 1 and p.image_keys[0] == content_key(path.read_bytes())
    rgba = NOISE.convert("RGBA")
    assert proc.prepare([_user(_image(rgba), "x")]).image_keys == [image_key(NOISE)]  # keys hash decoded pixels


def test_num_image_tokens_from_config(proc_dir: Path, tmp_path: Path):
    for f in proc_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    write_processor_files(tmp_path, num_image_tokens=7)
    p = Processor.from_dir(tmp_path)
    assert p.num_image_tokens == 7
    ids = p.prepare([_user(_image(RED), "x")]).token_ids
    assert ids.count(p.tokenizer.image_token_id) == 7


def test_string_content_equals_list_content(proc: Processor):
    a = proc.prepare([{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi."},
                      {"role": "user", "content": "Bye"}])
    b = proc.prepare([_user("Hello there."), _assistant("Hi."), _user("Bye")])
    assert a.token_ids == b.token_ids


def test_batch_left_padding(proc: Processor):
    short = [_user("Hi")]
    long = PARITY["multi_turn"]
    two = PARITY["two_images"]
    out = proc([short, long, two])
    lens = [len(proc.prepare(c).token_ids) for c in (short, long, two)]
    T = max(lens)
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, T)
    assert out["input_ids"].dtype == torch.long
    for row, (conv, n) in enumerate(zip((short, long, two), lens)):
        assert out["attention_mask"][row].tolist() == [0] * (T - n) + [1] * n
        assert out["input_ids"][row, : T - n].eq(proc.tokenizer.eos_id).all()
        assert out["input_ids"][row, T - n :].tolist() == proc.prepare(conv).token_ids
    # images flattened in batch then text order: RED, TALL (long), NOISE, TALL (two)
    low, high = proc.image_processor([RED, TALL, NOISE, TALL])
    assert torch.equal(out["pixel_values"], low) and torch.equal(out["high_res_pixel_values"], high)
    text_only = proc([short, [_user("Another")]])
    assert text_only["pixel_values"] is None and text_only["high_res_pixel_values"] is None


def test_context_drop_policy(proc: Processor):
    turns = [
        _user(_image(RED), "First question with an image?"),
        _assistant("First answer."),
        _user("Second question?"),
        _assistant("Second answer."),
        _user("Third question?"),
    ]
    full = proc.prepare(turns, max_context_tokens=None)
    without_first = proc.prepare(turns[2:], max_context_tokens=None)
    only_last = proc.prepare(turns[4:], max_context_tokens=None)
    assert proc.prepare(turns, max_context_tokens=len(full.token_ids)).dropped_turns == 0
    p = proc.prepare(turns, max_context_tokens=len(full.token_ids) - 1)
    assert p.dropped_turns == 1 and p.token_ids == without_first.token_ids and p.images == [] and p.image_keys == []
    p = proc.prepare(turns, max_context_tokens=len(without_first.token_ids) + 10, reserve_new_tokens=11)
    assert p.dropped_turns == 2 and p.token_ids == only_last.token_ids
    # a leading system message is kept whatever is dropped
    with_system = [{"role": "system", "content": "Be brief."}, *turns]
    expected = proc.prepare([with_system[0], *turns[2:]], max_context_tokens=None)
    p = proc.prepare(with_system, max_context_tokens=len(expected.token_ids))
    assert p.dropped_turns == 1 and p.token_ids == expected.token_ids
    assert p.text.startswith("Be brief.\n\nUser: ") and "First question" not in p.text  # the system prompt


def test_context_overflow(proc: Processor):
    conv = [_user("Hi"), _assistant("Hello"), _user(_image(RED), _image(NOISE), "Compare these.")]
    need = len(proc.prepare(conv[2:], max_context_tokens=None).token_ids)
    with pytest.raises(ContextOverflowError) as e:
        proc.prepare(conv, max_context_tokens=1000)
    msg = str(e.value)
    assert f"{need} prompt tokens" in msg and "1000" in msg and "576 tokens per image" in msg and "2 image(s)" in msg
    with pytest.raises(ContextOverflowError, match="reserved"):
        proc.prepare(conv, max_context_tokens=need + 10, reserve_new_tokens=11)
    assert proc.prepare(conv, max_context_tokens=need + 10, reserve_new_tokens=10).dropped_turns == 1
    assert issubclass(ContextOverflowError, ValueError)


def test_bad_images_raise_image_error(proc: Processor, tmp_path: Path):
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageError, match="holiday.jpg"):
        proc.prepare([_user({"type": "image", "path": str(bad)}, "What is this?")])
    buf = io.BytesIO()
    RED.save(buf, format="PNG")
    with pytest.raises(ImageError, match="upload.png.*truncated"):
        proc.prepare([_user({"type": "image", "image": buf.getvalue()[:100], "name": "upload.png"}, "x")])
    with pytest.raises(ImageError, match="no 'image', 'url' or 'path'"):
        proc.prepare([_user({"type": "image"}, "x")])
    # images of dropped turns are not even loaded
    conv = [_user({"type": "image", "path": str(bad)}, "old"), _assistant("ok"), _user("new")]
    need = len(proc.prepare(conv[2:]).token_ids)
    assert proc.prepare(conv, max_context_tokens=need).dropped_turns == 1


def test_control_tokens_in_user_text_are_plain_text(proc: Processor, proc_dir: Path, hf_proc):
    tok = proc.tokenizer
    conv = [_user(_image(RED), f"fake {IMAGE_TOKEN} and {EOS_TOKEN} end")]
    p = proc.prepare(conv)
    assert p.token_ids.count(tok.image_token_id) == 576  # only the real image
    assert tok.eos_id not in p.token_ids
    assert tok.decode(p.token_ids).endswith(f"fake {IMAGE_TOKEN} and {EOS_TOKEN} end\n\nAssistant:")
    # without sanitising, the string is tokenized as transformers does by default (specials matched)
    raw = Processor.from_dir(proc_dir, sanitize_control_tokens=False)
    conv = [_user(f"say {EOS_TOKEN} now")]
    ids = raw.prepare(conv).token_ids
    ref = hf_proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert tok.eos_id in ids and ids == list(ref["input_ids"][0])


def test_continuation_of_final_assistant_message(proc: Processor):
    p = proc.prepare([_user("Hi"), _assistant("Partial answer")])
    assert p.text.endswith("User: Hi\n\nAssistant: Partial answer")
    assert proc.prepare([_user("Hi")]).text.endswith("User: Hi\n\nAssistant:")


def test_errors_on_empty_input(proc: Processor):
    with pytest.raises(ValueError):
        proc.prepare([])
    with pytest.raises(ValueError):
        proc([])


def test_context_fit_keeps_the_most_turns_that_fit(proc: Processor):
    """Fitting by per-turn counts drops exactly as many turns as dropping one at a time did."""
    rng = np.random.default_rng(0)
    conv = []
    for i in range(30):
        conv += [_user(f"q{i} " + "word " * int(rng.integers(1, 40))), _assistant(f"a{i} " + "answer " * int(rng.integers(1, 40)))]
    conv.append(_user("last question"))
    starts = [i for i, m in enumerate(conv) if m["role"] == "user"]
    lengths = [len(proc.prepare(conv[s:], max_context_tokens=None).token_ids) for s in starts]
    for budget in (lengths[-1], lengths[-1] + 5, 100, 257, 400, 801, lengths[0] - 1, lengths[0]):
        expected = next(k for k, n in enumerate(lengths) if n <= budget)
        p = proc.prepare(conv, max_context_tokens=budget)
        assert p.dropped_turns == expected and len(p.token_ids) == lengths[expected], budget


def test_long_history_tokenizes_about_what_is_kept(proc: Processor, monkeypatch):
    conv = []
    for i in range(400):
        conv += [_user(f"question {i} " + "about the sea " * 30), _assistant(f"answer {i} " + "waves " * 30)]
    conv.append(_user("and now?"))
    encoded = []
    real = proc.tokenizer.encode
    monkeypatch.setattr(proc.tokenizer, "encode", lambda t, add_bos=True: encoded.append(len(t)) or real(t, add_bos))
    p = proc.prepare(conv, max_context_tokens=4096)
    assert p.dropped_turns > 350
    assert sum(encoded) < 4 * len(p.text), (sum(encoded), len(p.text))  # was: every turn, once per dropped turn


def test_cancel_abandons_preparation_between_turns_and_images(proc: Processor, tmp_path: Path, monkeypatch):
    import threading

    from dsvl.processor import Cancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        proc.prepare([_user("hi"), _assistant("yo"), _user("again")], max_context_tokens=4096, cancel=cancel)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        _img(20, 20, 10 + i).save(files[-1])
    cancel = threading.Event()
    decoded = []
    real = proc_mod.load_image
    monkeypatch.setattr(proc_mod, "load_image", lambda *a, **k: (decoded.append(a), cancel.set(), real(*a, **k))[2])
    with pytest.raises(Cancelled):
        proc.prepare([_user(*[{"type": "image", "path": str(f)} for f in files], "x")], cancel=cancel)
    assert len(decoded) == 1  # stopped at the next image


def test_an_image_already_seen_is_neither_decoded_nor_hashed_again(tiny_checkpoint, tmp_path: Path, monkeypatch):
    """Three turns about one uploaded picture, a second picture in the third: two decodes, two hashes."""
    import dsvl

    engine = dsvl.load(str(tiny_checkpoint), device="cpu", quantization="none")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    _img(50, 40, 21).save(a)
    _img(40, 50, 22).save(b)
    decoded = []
    real = proc_mod.load_image
    monkeypatch.setattr(proc_mod, "load_image", lambda src, **k: decoded.append(Path(src).name) or real(src, **k))
    conv = [_user({"type": "image", "path": str(a)}, "What is this?")]
    for turn, new_images in enumerate([[], [{"type": "image", "path": str(b)}]]):
        with engine.stream(conv, session_id="s", max_new_tokens=3, temperature=0) as s:
            reply = "".join(s)
        conv += [_assistant(reply or "ok"), _user(*new_images, f"And now ({turn})?")]
    with engine.stream(conv, session_id="s", max_new_tokens=3, temperature=0) as s:
        "".join(s)
        stats = s.stats
    assert decoded == ["a.png", "b.png"], decoded
    assert engine.processor._file_keys.hashed == 2
    assert stats.images_encoded == 1 and stats.prompt_tokens > 2 * 576
