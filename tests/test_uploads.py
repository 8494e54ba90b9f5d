"""What the server keeps of uploads: refused files are deleted at once, a session's uploads are bounded by a
quota, and `--max-image-pixels` reaches both the app's upload check and the core's loader."""

from __future__ import annotations

import os

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import dsvl
from apphelpers import CAT, ask, encoded, live_app, load_tiny_engine, photo
from dsvl_app.settings import parse_settings
from dsvl_app.uploads import SessionFiles, UploadError


def test_refused_and_over_quota_files_are_deleted(tmp_path):
    files = SessionFiles([tmp_path])
    a, b, c = (tmp_path / n for n in ("a.png", "b.png", "c.png"))
    for p, size in ((a, 600), (b, 600), (c, 10)):
        p.write_bytes(b"x" * size)
    assert files.track("s1", [str(a)]) == [str(a)]
    assert files.track("s1", [str(a), str(b)]) == [str(b)]  # only what is new to the session
    files.track("s2", [str(b)])
    assert files.discard("s1", [str(b)]) == 0 and b.exists()  # another session still uses it
    assert files.discard("s2", [str(b)]) == 1 and not b.exists()
    new = files.track("s1", [str(c)])
    with pytest.raises(UploadError, match="limit"):
        files.check_quota("s1", new, quota=500)
    assert not c.exists() and a.exists()  # the new file goes; what the chat already holds stays
    files.check_quota("s1", [], quota=1000)


def test_ten_non_image_uploads_do_not_stay_on_the_server(tiny_checkpoint, tmp_path):
    engine = load_tiny_engine(tiny_checkpoint)
    with live_app(engine, tiny_checkpoint) as (demo, url):
        root = demo.dsvl_runtime.upload_root
        client = Client(url, verbose=False)
        for i in range(10):
            junk = tmp_path / f"junk{i}.png"
            junk.write_bytes(os.urandom(2 * 1024 * 1024))
            with pytest.raises(AppError, match="not an image"):
                ask(client, "look", [junk])
        assert not [p for p in root.rglob("junk*") if p.is_file()]
        assert ask(client, "Hi", [CAT])  # the session works on


def test_max_image_pixels_reaches_the_app_and_the_core(tiny_checkpoint, tmp_path):
    assert parse_settings(["--max-image-pixels", "5000"]).max_image_pixels == 5000
    assert parse_settings([], env={"DSVL_MAX_IMAGE_PIXELS": "7"}).max_image_pixels == 7
    assert parse_settings([]).max_image_pixels is None  # the core's default
    big = tmp_path / "big.png"
    big.write_bytes(encoded(photo((100, 80)), "PNG"))  # 8,000 pixels
    engine = load_tiny_engine(tiny_checkpoint, max_image_pixels=5000)
    assert engine.processor.max_image_pixels == 5000
    with pytest.raises(dsvl.ImageError, match="5,000"):
        list(engine.stream([{"role": "user", "content": [{"type": "image", "path": str(big)},
                                                         {"type": "text", "text": "hi"}]}], max_new_tokens=2))
    with live_app(engine, tiny_checkpoint) as (demo, url):
        with pytest.raises(AppError, match="0.005 megapixels"):
            ask(Client(url, verbose=False), "look", [big])
