"""The app's pure functions: flags and environment, history shapes, image labels, export/import, upload
checks, session file cleanup, slider values. No model, no server."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from dsvl_app import history
from dsvl_app import cli
from dsvl_app.runtime import UserError, generation_params
from dsvl_app.settings import Settings, parse_auth, parse_settings, parse_size
from dsvl_app.ui import context_html
from dsvl_app.uploads import SessionFiles, UploadError, check_files, check_image

ASSETS = Path(__file__).resolve().parent.parent / "assets"


# ---- settings --------------------------------------------------------------------------------------


def test_defaults():
    s = parse_settings([], env={})
    assert (s.model, s.host, s.port) == ("deepseek-community/deepseek-vl-7b-chat", "127.0.0.1", 7860)
    assert (s.quantization, s.device, s.dtype) == ("auto", "auto", "auto")
    assert s.share is False and s.auth is None
    assert s.concurrency == 1 and s.max_file_size == 20 * 1024**2
    g = s.generation
    assert (g.temperature, g.top_p, g.repetition_penalty) == (0.1, 0.95, 1.1)


def test_every_flag_reads_its_environment_variable_and_the_flag_wins():
    env = {"DSVL_MODEL": "/ckpt", "DSVL_QUANTIZATION": "nf4", "DSVL_DEVICE": "cuda:1", "DSVL_DTYPE": "float16",
           "DSVL_HOST": "0.0.0.0", "DSVL_PORT": "8000", "DSVL_SHARE": "true", "DSVL_AUTH": "ann:pw",
           "DSVL_MAX_IMAGES": "6", "DSVL_MAX_CONTEXT_TOKENS": "2048", "DSVL_CONCURRENCY": "2",
           "DSVL_MAX_QUEUE": "5", "DSVL_MAX_FILE_SIZE": "5MB"}
    s = parse_settings([], env=env)
    assert s == Settings(model="/ckpt", quantization="nf4", device="cuda:1", dtype="float16", host="0.0.0.0",
                         port=8000, share=True, auth="ann:pw", max_images=6, max_context_tokens=2048,
                         concurrency=2, max_queue=5, max_file_size=5 * 1024**2)
    s = parse_settings(["--port", "9000", "--no-share", "--model", "other"], env=env)
    assert (s.port, s.share, s.model) == (9000, False, "other")
    assert parse_settings([], env={"GRADIO_SERVER_NAME": "0.0.0.0"}).host == "0.0.0.0"  # as on Spaces


@pytest.mark.parametrize("text,expected", [("20MB", 20 * 1024**2), ("500 kb", 500 * 1024), ("1.5GB", int(1.5 * 1024**3)),
                                           ("1048576", 1048576), ("2MiB", 2 * 1024**2)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_bad_flags_are_refused():
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(ValueError):
        parse_auth("nopassword")
    assert parse_auth("ann:pa:ss") == ("ann", "pa:ss")
    with pytest.raises(SystemExit):
        parse_settings(["--auth", "nocolon"], env={})
    with pytest.raises(SystemExit):
        parse_settings(["--concurrency", "0"], env={})
    with pytest.raises(SystemExit):
        parse_settings(["--kv-cache-memory", "lots"], env={})
    with pytest.raises(SystemExit):
        parse_settings(["--compile", "sometimes"], env={})


def test_kv_cache_memory_and_compile_flags():
    s = parse_settings(["--kv-cache-memory", "6GB", "--compile", "on"], env={})
    assert (s.kv_cache_memory, s.compile) == ("6GB", "on")
    s = parse_settings([], env={"DSVL_KV_CACHE_MEMORY": "0.5", "DSVL_COMPILE": "off"})
    assert (s.kv_cache_memory, s.compile) == ("0.5", "off")
    assert (parse_settings([], env={}).kv_cache_memory, parse_settings([], env={}).compile) == ("auto", "auto")


def test_missing_model_fails_fast_with_the_options(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(cli, "_hub_reachable", lambda endpoint, timeout=3.0: False)  # as without network
    import dsvl

    with monkeypatch.context() as m:  # fails before the core tries the hub (whose client retries for minutes)
        m.setattr(dsvl, "load", lambda *a, **k: pytest.fail("the core was asked to download the model"))
        with pytest.raises(SystemExit) as e:
            cli.main(["--model", "someone/not-cached-model"])
    for must in ("--model", "random:tiny", "HF_HUB_OFFLINE"):
        assert must in str(e.value.code)
    # a local path that is no checkpoint: the core's error, with the same options
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(tmp_path)])
    assert "config.json" in str(e.value.code) and "--model PATH" in str(e.value.code)


def test_share_without_auth_warns():
    assert any("public" in w for w in cli.startup_warnings(Settings(share=True), on_spaces=False))
    assert not cli.startup_warnings(Settings(share=True, auth="a:b"), on_spaces=False)
    assert not cli.startup_warnings(Settings(), on_spaces=False)
    assert "ignored" in cli.startup_warnings(Settings(share=True), on_spaces=True)[0]
    assert any("0.0.0.0" in w for w in cli.startup_warnings(Settings(host="0.0.0.0"), on_spaces=False))


# ---- history shapes ---------------------------------------------------------------------------------


def test_normalize_accepts_browser_and_api_shapes_alike():
    typed = [  # Chatbot value in the browser (typed content lists)
        {"role": "user", "content": [{"type": "file", "file": {"path": "/a.png"}}, {"type": "file", "file": {"path": "/b.png"}},
                                     {"type": "text", "text": "compare"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "they differ"}], "metadata": None},
        {"role": "user", "content": [{"type": "text", "text": "why?"}]},
    ]
    raw = [  # what a chat function gets through the API
        {"role": "user", "content": [{"path": "/a.png"}, {"path": "/b.png"}, "compare"]},
        {"role": "assistant", "content": "they differ"},
        {"role": "user", "content": "why?"},
    ]
    older = [  # one message per file, tuples
        {"role": "user", "content": ("/a.png",)},
        {"role": "user", "content": {"path": "/b.png"}},
        {"role": "user", "content": "compare"},
        {"role": "assistant", "content": "they differ"},
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "why?"},
    ]
    engine_shape = [
        {"role": "user", "content": [{"type": "image", "path": "/a.png"}, {"type": "image", "path": "/b.png"},
                                     {"type": "text", "text": "compare"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "they differ"}]},
        {"role": "user", "content": [{"type": "text", "text": "why?"}]},
    ]
    want = [history.user_turn("compare", ["/a.png", "/b.png"]),
            history.assistant_turn("they differ", "done"), history.user_turn("why?")]
    for shape in (typed, raw, older, engine_shape, want):
        assert history.normalize_history(shape) == want


def test_normalize_rejects_garbage():
    for bad in ("text", [{"role": "robot", "content": "x"}], [{"role": "assistant", "content": {"path": "/a.png"}}],
                [{"role": "user", "content": [42]}]):
        with pytest.raises(history.ConversationFormatError):
            history.normalize_history(bad)


def test_clean_text_strips_controls_and_invalid_unicode():
    assert history.clean_text("a\x00b\x1bc\td\r\ne") == "abc\td\ne"
    assert history.clean_text("x\ud800y") == "x?y"
    assert history.clean_text(b"\xff\xfeok") == "\ufffd\ufffdok"


def _conv():
    return [history.user_turn("what is this?", ["/x/cat.png"]), history.assistant_turn("a cat", "done"),
            history.user_turn("and these?", ["/x/cup.png", "/x/sign.png"]), history.assistant_turn("", "pending")]


def test_engine_messages_label_images_across_the_conversation():
    msgs = history.engine_messages(_conv())
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]  # the empty pending answer is left out
    assert msgs[0]["content"] == [{"type": "text", "text": "Image 1:"}, {"type": "image", "path": "/x/cat.png"},
                                  {"type": "text", "text": "\nwhat is this?"}]
    assert [c.get("text") for c in msgs[2]["content"] if c["type"] == "text"] == ["Image 2:", "\nImage 3:", "\nand these?"]
    # a single image keeps the model's native prompt: no label
    one = history.engine_messages(_conv()[:1])
    assert one[0]["content"] == [{"type": "image", "path": "/x/cat.png"}, {"type": "text", "text": "what is this?"}]
    assert history.image_labels(_conv()) == [["Image 1"], [], ["Image 2", "Image 3"], []]


def test_chatbot_messages_one_per_turn_with_captioned_images():
    conv = _conv()
    conv[1] = history.assistant_turn("a cat", "stopped")
    shown = history.chatbot_messages(conv)
    assert [m["role"] for m in shown] == ["user", "assistant", "user"]
    gallery = shown[2]["content"][0]
    assert gallery.component == "gallery"
    assert [item["caption"] for item in gallery.value] == ["Image 2", "Image 3"]
    assert shown[2]["content"][1] == "and these?"
    assert "stopped" in shown[1]["content"]
    assert history.turn_index_for_chatbot_index(conv, 2) == 2


def test_export_import_roundtrip_keeps_texts_images_and_stats(tmp_path):
    img = tmp_path / "cat.png"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(img)
    conv = [history.user_turn("describe", [str(img)]),
            history.assistant_turn("red", "done", {"new_tokens": 1, "ttft_s": 0.1}),
            history.user_turn("more"), history.assistant_turn("very red", "stopped")]
    doc = history.export_conversation(conv, model="m")
    assert doc["format"] == history.FORMAT and doc["messages"][0]["content"][0]["data"]
    raw = json.dumps(doc).encode()
    turns, written = history.import_conversation(raw, tmp_path / "imp")
    assert [t["text"] for t in turns] == ["describe", "red", "more", "very red"]
    assert turns[1]["stats"] == {"new_tokens": 1, "ttft_s": 0.1} and turns[3]["status"] == "stopped"
    assert len(written) == 1 and written[0].read_bytes() == img.read_bytes()
    assert turns[0]["images"] == [str(written[0])]


def test_import_never_opens_paths_from_the_file(tmp_path):
    sneaky = {"format": history.FORMAT, "version": 1, "messages": [
        {"role": "user", "content": [{"type": "image", "path": "/etc/passwd", "name": "../../etc/passwd",
                                      "data": base64.b64encode(b"x").decode()}]}]}
    turns, written = history.import_conversation(json.dumps(sneaky), tmp_path / "imp")
    assert written[0].parent == tmp_path / "imp" and written[0].read_bytes() == b"x"  # name flattened, data only
    for bad in (b"not json", json.dumps({"messages": []}), json.dumps({"format": history.FORMAT, "messages": [
            {"role": "user", "content": [{"type": "image", "data": "%%%"}]}]})):
        with pytest.raises(history.ConversationFormatError):
            history.import_conversation(bad, tmp_path / "imp2")


# ---- uploads ----------------------------------------------------------------------------------------


def test_check_image_accepts_photos_and_names_the_file_when_refusing(tmp_path):
    check_image(ASSETS / "chelsea.png", 20 * 1024**2)
    check_image(ASSETS / "rocket.jpg", 20 * 1024**2)
    (tmp_path / "notes.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {"notes.png": "not an image", "empty.png": "empty"}
    for name, words in cases.items():
        with pytest.raises(UploadError, match=words) as e:
            check_image(tmp_path / name, 20 * 1024**2)
        assert name in str(e.value)
    with pytest.raises(UploadError, match="limit"):
        check_image(ASSETS / "coffee.png", 1000)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # tiny file, 400 megapixels declared
    with pytest.raises(UploadError, match="bomb.png"):
        check_image(bomb, 20 * 1024**2)
    with pytest.raises(UploadError, match="at most 2"):
        check_files([str(ASSETS / "chelsea.png")] * 3, max_images=2, max_bytes=20 * 1024**2)


def test_session_files_deletes_only_unshared_uploads_under_its_root(tmp_path):
    root = tmp_path / "cache"
    (root / "h1").mkdir(parents=True)
    (root / "h2").mkdir()
    mine, shared, example = root / "h1" / "mine.png", root / "h2" / "shared.png", root / "h2" / "chelsea.png"
    outside = tmp_path / "outside.png"
    for p in (mine, shared, example, outside):
        p.write_bytes(b"x")
    files = SessionFiles([root])
    files.protect([example])
    files.track("a", [str(mine), str(shared), str(example), str(outside)])
    files.track("b", [str(shared)])
    assert files.release("a") == 1
    assert not mine.exists() and not (root / "h1").exists()  # emptied hash folder removed too
    assert shared.exists() and example.exists() and outside.exists()
    assert files.release("b") == 1 and not shared.exists()


def test_generation_params_from_sliders_and_api():
    p = generation_params(0.1, 0.95, 0.0, 512.0, 1.1, -1, max_context_tokens=4096)
    assert p == {"temperature": 0.1, "top_p": 0.95, "top_k": 0, "max_new_tokens": 512, "repetition_penalty": 1.1,
                 "seed": None}
    p = generation_params(None, None, None, 10**9, None, 7.0, max_context_tokens=4096)
    assert p["max_new_tokens"] == 4096 and p["seed"] == 7 and p["temperature"] == 0.1
    for bad in ("hot", float("inf")):
        with pytest.raises(UserError):
            generation_params(0.1, 0.9, 0, bad, 1.1, 0, max_context_tokens=4096)


@pytest.mark.parametrize("name, value, says", [
    ("temperature", float("nan"), "temperature must be a number"),
    ("top_p", float("nan"), "top p must be a number"),
    ("repetition_penalty", float("nan"), "repetition penalty must be a number"),
    ("repetition_penalty", 0.1, "between 1 and 2"),
    ("temperature", float("-inf"), "must be a number"),
    ("temperature", 2.5, "between 0 and 2"),
    ("top_k", 10**6, "between 0 and 200"),
    ("top_k", 3.5, "whole number"),
    ("seed", 2**64, "between -1 and"),
    ("seed", -5, "between -1 and"),
    ("seed", True, "must be a number"),
    ("seed", [1], "must be a number"),
])
def test_generation_params_refuse_what_no_slider_can_send(name, value, says):
    args = {"temperature": 0.1, "top_p": 0.9, "top_k": 0, "max_new_tokens": 8, "repetition_penalty": 1.1, "seed": 0}
    args[name] = value
    with pytest.raises(UserError, match=says) as e:
        generation_params(*args.values(), max_context_tokens=4096)
    assert e.value.title == "Bad setting"


def test_tiny_temperatures_are_greedy_and_big_seeds_exact():
    assert generation_params(1e-45, 0.9, 0, 8, 1.1, 2**63 - 1, max_context_tokens=4096) == {
        "temperature": 0.0, "top_p": 0.9, "top_k": 0, "max_new_tokens": 8, "repetition_penalty": 1.1,
        "seed": 2**63 - 1}


def test_context_line_shows_stats_budget_and_a_dropped_turns_notice():
    conv = [history.user_turn("q", ["/a.png", "/b.png"]),
            history.assistant_turn("a", "done", {"prompt_tokens": 1200, "new_tokens": 34, "ttft_s": 0.5,
                                                  "decode_tokens_per_s": 21.0, "dropped_turns": 0})]
    line = context_html(conv, 4096, 576)
    for part in ("first token 0.50 s", "21.0 tokens/s", "34 tokens", "1,234 of 4,096 tokens used", "2,862 left",
                 "2 images × 576"):
        assert part in line
    assert "left out" not in line
    conv[1]["stats"]["dropped_turns"] = 2
    assert "The 2 oldest turns no longer fit" in context_html(conv, 4096, 576)
    assert "each image takes 576" in context_html([], 4096, 576)


def test_banner_names_the_kv_memory():
    import types

    from dsvl_app.ui import banner_html

    engine = types.SimpleNamespace(quantization="none", dtype="torch.bfloat16", weight_bytes=14_700_000_000,
                                   device="cuda", max_context_tokens=4096, kv_budget_bytes=6_000_000_000,
                                   kv_conversations=2.9, is_random=False)
    assert "KV memory: 6.0 GB ≈ 2.9 full conversations" in banner_html(engine, Settings())
