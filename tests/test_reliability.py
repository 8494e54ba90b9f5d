"""The bad-input battery (hostile uploads, images, text and settings), through the live app's API and the core.

Every bad input gets a clear message (naming the file where there is one) or a correct answer, and the server
answers the next normal request. The server runs with small limits (2 images per message, 1 MB per file) so that
the limit cases stay cheap."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import dsvl
from apphelpers import (CAT, CUP, SIGN, ask, bad_inputs, chat_data, encoded, engine_is_free, fn_index, live_app,
                        load_tiny_engine, photo, png_declaring, raw_chat, rss_bytes)
from dsvl.images import load_image

MAX_IMAGES = 2
MAX_FILE_SIZE = 1024 * 1024

# case -> None (a correct answer) or a regex the error message must match (the file's name where there is one)
EXPECTED = {
    "not_an_image": r"“not_an_image\.png” is not an image this app can read",
    "truncated_jpeg": r"truncated_jpeg\.jpg'?:? the file is truncated or corrupt",
    "truncated_png": r"“truncated_png\.png” is not an image this app can read \(or the file is damaged\)",
    "zero_bytes": r"“zero_bytes\.png” is empty \(0 bytes\)",
    "one_pixel": None,
    "bomb_20000x20000": r"“bomb_20000x20000\.png” declares an enormous size; it was refused without being decoded",
    "animated": None,
    "cmyk": None,
    "sixteen_bit": None,
    "exif_rotated": None,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-inputs")
    out = bad_inputs(d)
    out["megapixels_48"] = d / "megapixels_48.png"  # over the app's 40 MP limit, under PIL's own bomb limit
    out["megapixels_48"].write_bytes(png_declaring(8000, 6000))
    out["too_big"] = d / "too_big.png"  # a valid PNG of ~1.5 MB (noise does not compress)
    noise = np.random.default_rng(0).integers(0, 256, (720, 720, 3), dtype=np.uint8)
    out["too_big"].write_bytes(encoded(Image.fromarray(noise), "PNG"))
    assert out["too_big"].stat().st_size > MAX_FILE_SIZE
    return out


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load_tiny_engine(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(engine, tiny_checkpoint):
    with live_app(engine, tiny_checkpoint, max_images=MAX_IMAGES, max_file_size=MAX_FILE_SIZE) as app:
        yield app


def served_normally(url: str, client: Client | None = None) -> None:
    """The next normal request (an image and a question) gets an answer, for this client and a new one."""
    if client is not None:
        assert ask(client, "What is in this picture?", [CAT])
    other = Client(url, verbose=False)
    try:
        assert ask(other, "What is in this picture?", [CAT])
    finally:
        other.close()


# ---- through the live app -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_image_through_the_app(case, files, server):
    demo, url = server
    rt = demo.dsvl_runtime
    client = Client(url, verbose=False)
    expected = EXPECTED[case]
    if expected is None:
        answer = ask(client, "What is in this picture?", [files[case]])
        assert isinstance(answer, str) and answer
        assert rt.last_stats[client.session_hash]["prompt_tokens"] > 576  # the image reached the model
    else:
        with pytest.raises(AppError, match=expected) as err:
            ask(client, "What is in this picture?", [files[case]])
        print(f"{case}: {err.value}")
        assert str(files[case].parent) not in str(err.value)  # names the file, not the server's folders
    assert rt.active_generations() == 0 and engine_is_free(rt.engine)
    served_normally(url, client)


def test_image_over_the_pixel_limit(files, server):
    client = Client(server[1], verbose=False)
    with pytest.raises(AppError, match=r"“megapixels_48\.png” is 8000×6000 pixels; the limit is 40 megapixels"):
        ask(client, "What is it?", [files["megapixels_48"]])
    served_normally(server[1], client)


def test_the_bomb_is_refused_without_allocating_it(files, server):
    rss = rss_bytes()
    with pytest.raises(AppError, match="enormous"):
        ask(Client(server[1], verbose=False), "What is it?", [files["bomb_20000x20000"]])
    assert rss_bytes() - rss < 200 * 2**20  # decoding it would take 1.2 GB


def test_upload_over_max_file_size_is_refused(files, server):
    demo, url = server
    # gradio_client reads the server's limit and refuses before sending
    with pytest.raises(ValueError, match=r"too_big\.png exceeds the maximum file size of 1048576 bytes"):
        ask(Client(url, verbose=False), "What is it?", [files["too_big"]])
    # the upload route itself refuses it (a browser or a script that ignores the limit) and keeps nothing
    data = files["too_big"].read_bytes()
    r = httpx.post(url + "gradio_api/upload", files={"files": ("too_big.png", data, "image/png")}, timeout=30)
    assert r.status_code == 413 and "1048576 bytes" in r.text, (r.status_code, r.text)
    assert not list(Path(demo.dsvl_runtime.upload_root).rglob("too_big.png"))
    served_normally(url)


def test_more_images_than_max_images(server):
    client = Client(server[1], verbose=False)
    with pytest.raises(AppError, match=rf"3 images attached; at most {MAX_IMAGES} per message"):
        ask(client, "Compare them.", [CAT, CUP, SIGN])
    assert ask(client, "Compare them.", [CAT, CUP])  # exactly the limit is fine
    served_normally(server[1], client)


def test_empty_message_and_image_only_message(server):
    client = Client(server[1], verbose=False)
    for empty in ("", "   \n\t "):
        with pytest.raises(AppError, match="Type a question or attach an image first"):
            ask(client, empty)
    assert ask(client, "", [CAT])  # an image alone is a question
    served_normally(server[1], client)


def test_100k_character_message(server):
    client = Client(server[1], verbose=False)
    with pytest.raises(AppError, match=r"does not fit in the 4,096-token context.*Shorten the message") as err:
        ask(client, "word " * 20_000)
    assert ".." not in str(err.value)
    served_normally(server[1], client)


def prompt_tokens(url: str, rt, text: str) -> int:
    client = Client(url, verbose=False)
    assert isinstance(ask(client, text, max_new_tokens=2), str)
    return rt.last_stats[client.session_hash]["prompt_tokens"]


def test_control_characters_are_removed(server):
    demo, url = server
    rt = demo.dsvl_runtime
    dirty = "Hello\x00 wor\x07ld\x1b[31m!\x7f\x08 \u200b"
    assert prompt_tokens(url, rt, dirty) == prompt_tokens(url, rt, "Hello world[31m! \u200b")
    served_normally(url)


def test_lone_surrogates_in_the_json_are_replaced(server):
    """gradio_client cannot even encode a lone surrogate; a raw client can send one as a JSON escape."""
    demo, url = server
    rt = demo.dsvl_runtime
    session = uuid.uuid4().hex
    done = raw_chat(url, {"text": "broken \ud800 text \udfff end", "files": []}, session_hash=session)
    assert done["success"], done
    answer = done["output"]["data"][0]
    assert isinstance(answer, str) and answer
    # the same prompt as with '?' in their place
    assert rt.last_stats[session]["prompt_tokens"] == prompt_tokens(url, rt, "broken ? text ? end")
    served_normally(url)


def test_invalid_utf8_in_the_request_body(server):
    demo, url = server
    session = uuid.uuid4().hex
    body = json.dumps({"data": chat_data({"text": "PLACEHOLDER", "files": []}), "fn_index": fn_index(url),
                       "session_hash": session, "event_data": None, "trigger_id": None}).encode()
    body = body.replace(b"PLACEHOLDER", b"bad \xff\xfe\xc3 bytes")
    r = httpx.post(url + "gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "error parsing the body" in r.text, (r.status_code, r.text)
    served_normally(url)


def test_path_as_a_plain_string_is_refused(server):
    """A message whose `files` are bare strings (not uploaded FileData) is refused by Gradio's data model."""
    done = raw_chat(server[1], {"text": "look", "files": [CAT]})
    assert not done["success"] and "meta" in done["output"]["error"]
    served_normally(server[1])


# ---- through the core -----------------------------------------------------------------------------------

def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a.convert("RGB"), dtype=np.float64) -
                        np.asarray(b.convert("RGB"), dtype=np.float64)).mean())


def test_core_load_image_battery(files):
    for case, expected in EXPECTED.items():
        if expected is not None:
            with pytest.raises(dsvl.ImageError, match=case):
                load_image(str(files[case]))
    with pytest.raises(dsvl.ImageError, match="8000x6000 = 48,000,000 pixels exceeds the limit"):
        load_image(str(files["megapixels_48"]))

    one = load_image(str(files["one_pixel"]))
    assert one.mode == "RGB" and one.size == (1, 1) and one.getpixel((0, 0)) == (200, 10, 10)

    gif = load_image(str(files["animated"]))  # the first frame
    frames = [photo((64, 64), seed=s) for s in range(3)]
    assert gif.mode == "RGB" and gif.size == (64, 64)
    assert _mean_abs_diff(gif, frames[0]) < 12 < _mean_abs_diff(gif, frames[1])

    base = photo((240, 160), seed=3)
    cmyk = load_image(str(files["cmyk"]))
    assert cmyk.mode == "RGB" and cmyk.size == (240, 160) and _mean_abs_diff(cmyk, base) < 12

    sixteen = load_image(str(files["sixteen_bit"]))  # scaled to 8 bits, not clipped at 255
    assert sixteen.mode == "RGB" and sixteen.size == (80, 40)
    assert sixteen.getpixel((40, 20))[0] == round((40 * 800 + 20 * 40) / 257)
    assert sixteen.getpixel((79, 39))[0] == round((79 * 800 + 39 * 40) / 257)

    rotated = load_image(str(files["exif_rotated"]))  # orientation 6: shown rotated 90° clockwise
    stored = photo((120, 60), seed=5)
    upright, wrong_way = (stored.transpose(t) for t in (Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90))
    assert rotated.size == (60, 120)
    assert _mean_abs_diff(rotated, upright) < 0.5 * _mean_abs_diff(rotated, wrong_way)  # JPEG noise aside


def _msg(text: str, images=()) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "path": str(p)} for p in images),
                                         {"type": "text", "text": text}]}]


def test_core_engine_battery(engine, files):
    def answer(messages) -> str:
        return engine.generate(messages, max_new_tokens=3, temperature=0.0)

    for case, expected in EXPECTED.items():
        if expected is None:
            assert isinstance(answer(_msg("What is it?", [files[case]])), str)
        else:
            with pytest.raises(dsvl.ImageError, match=case):
                engine.stream(_msg("What is it?", [files[case]]))  # refused before it takes the engine
        assert engine_is_free(engine)
    with pytest.raises(dsvl.ContextOverflowError, match="Shorten the message"):
        engine.stream(_msg("word " * 20_000))
    assert isinstance(answer(_msg("")), str)  # an empty text is a valid (if odd) prompt for the core
    invalid_utf8 = b"\xff\xfe".decode("utf-8", "surrogateescape")  # as os.fsdecode gives it
    for text in ["a\x00b\x07c\x1b[31m\x7f", "lone \ud800 surrogate \udfff", invalid_utf8]:
        assert isinstance(answer(_msg(text)), str), repr(text)
    with pytest.raises(ValueError, match="empty"):
        engine.stream([])
    assert answer(_msg("Still fine?", [CAT]))
