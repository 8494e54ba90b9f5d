"""Security: weights from safetensors only (a pickle is refused and never unpickled), no remote
code, no local file reachable through Gradio's file routes, --auth works, --share warns without --auth, and the
app writes no conversation to disk."""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

import dsvl
from apphelpers import CAT, REPO, ask, live_app, load_tiny_engine, photo, raw_chat, run_app
from dsvl.loading import HUB_ALLOW_PATTERNS
from dsvl_app import parse_settings
from dsvl_app.ui import launch_options


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load_tiny_engine(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(engine, tiny_checkpoint):
    with live_app(engine, tiny_checkpoint) as app:
        yield app


# ---- weights: safetensors only, no code ---------------------------------------------------------------

class _Payload:
    """Unpickling this creates the file `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickle_checkpoint(src: Path, d: Path, marker: Path, keep_safetensors: bool) -> None:
    shutil.copytree(src, d)
    if not keep_safetensors:
        for f in d.glob("model*.safetensors*"):
            f.unlink()
    payload = pickle.dumps({"model.language_model.embed_tokens.weight": _Payload(marker)})
    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt"):
        (d / name).write_bytes(payload)


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tiny_checkpoint, tmp_path):
    marker = tmp_path / "UNPICKLED"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload works: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()

    d = tmp_path / "pickled"
    _pickle_checkpoint(tiny_checkpoint, d, marker, keep_safetensors=False)
    with pytest.raises(dsvl.CheckpointError, match=r"only pickle weights .*pytorch_model\.bin.*safetensors only"):
        dsvl.load(str(d), device="cpu", quantization="none")
    result = run_app("--model", str(d), timeout=90)  # the app, the same way
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "pytorch_model.bin" in result.stderr and "safetensors only" in result.stderr
    assert not marker.exists()


def test_pickles_beside_safetensors_are_ignored_and_nothing_unpickles(tiny_checkpoint, tmp_path, monkeypatch):
    marker = tmp_path / "UNPICKLED"
    d = tmp_path / "mixed"
    _pickle_checkpoint(tiny_checkpoint, d, marker, keep_safetensors=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("a loader tried to unpickle something")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(target, name, forbidden)
    engine = dsvl.load(str(d), device="cpu", quantization="none")
    assert isinstance(engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=2), str)
    assert not marker.exists()


def test_hub_downloads_fetch_no_pickles():
    for name in ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "model.pth", "model.ckpt",
                 "optimizer.pkl", "training_args.bin", "modeling_deepseek.py", "processing_vlm.py"]:
        assert not any(fnmatch.fnmatch(name, p) for p in HUB_ALLOW_PATTERNS), name
    for name in ["model-00001-of-00002.safetensors", "config.json", "tokenizer.json"]:
        assert any(fnmatch.fnmatch(name, p) for p in HUB_ALLOW_PATTERNS), name


def test_no_remote_code_runs(tiny_checkpoint, tmp_path):
    """A checkpoint that asks for its own Python code (auto_map, as DeepSeek's original repo does) loads without
    running it: dsvl builds the model from its own classes."""
    marker = tmp_path / "REMOTE_CODE_RAN"
    d = tmp_path / "remote-code"
    shutil.copytree(tiny_checkpoint, d)
    for name in ("modeling_deepseek.py", "configuration_deepseek.py", "processing_deepseek.py", "__init__.py"):
        (d / name).write_text(f"open({str(marker)!r}, 'w').write({name!r})\n", encoding="utf-8")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.Config", "AutoModel": "modeling_deepseek.Model",
                       "AutoModelForCausalLM": "modeling_deepseek.Model"}
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg["auto_map"] = {"AutoProcessor": "processing_deepseek.Processor"}
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg), encoding="utf-8")
    engine = dsvl.load(str(d), device="cpu", quantization="none")
    assert isinstance(engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=2), str)
    assert not marker.exists()


def test_the_code_never_unpickles_nor_trusts_remote_code():
    """The source of the core and the app: no pickle loading, no trust_remote_code, no exec of strings."""
    sources = [*sorted((REPO / "dsvl").glob("*.py")), *sorted((REPO / "dsvl_app").glob("*.py")), REPO / "app.py"]
    assert len(sources) > 10
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for needle in ("torch.load(", "pickle.load", "trust_remote_code=True", "weights_only=False", "exec(",
                       "import pickle", "import dill", "joblib"):
            assert needle not in text, f"{path.name} contains {needle!r}"


# ---- file routes ------------------------------------------------------------------------------------------

def test_file_routes_serve_uploads_but_no_other_local_file(server, engine, tmp_path):
    demo, url = server
    upload_root = Path(demo.dsvl_runtime.upload_root).resolve()
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-" + uuid.uuid4().hex, encoding="utf-8")
    secret_png = tmp_path / "secret.png"
    photo((32, 32), seed=9).save(secret_png)
    secret_bytes = secret_png.read_bytes()

    with httpx.Client(timeout=15) as http:
        # the positive control: an upload is stored under the upload folder and served from there
        r = http.post(url + "gradio_api/upload", files={"files": ("mine.png", Path(CAT).read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        uploaded = r.json()[0]
        assert Path(uploaded).resolve().is_relative_to(upload_root)
        r = http.get(url + "gradio_api/file=" + uploaded)
        assert r.status_code == 200 and r.content == Path(CAT).read_bytes()

        up = Path(uploaded).parent
        depth = "../" * (len(up.parts) + 2)
        targets = [
            "/etc/passwd", "/proc/self/environ", "/proc/self/cmdline", str(secret), str(secret_png),
            str(REPO / "app.py"), "app.py", "./app.py", "tests/apphelpers.py", "dsvl/loading.py", ".git/config",
            str(REPO / "assets" / "chelsea.png"), str(engine.checkpoint_dir / "config.json"),
            f"{uploaded}/../../../../etc/passwd", f"{up}/{depth}etc/passwd", f"{up}/{depth}{secret}",
            f"{upload_root}/../../../../../etc/passwd", "../../../../../../etc/passwd",
            "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "%252Fetc%252Fpasswd",
            "..%252F..%252F..%252Fetc%252Fpasswd", "....//....//....//etc/passwd", "..\\..\\..\\etc\\passwd",
            quote(str(secret), safe=""), "file:///etc/passwd", "file://" + str(secret),
        ]
        forbidden = [b"root:x:0", secret.read_bytes(), secret_bytes, b"dsvl_app", b"[core]",
                     (REPO / "app.py").read_bytes()[:200]]
        for target in targets:
            for route in ("gradio_api/file=", "file=", "gradio_api/file%3D", "gradio_api/file=/", "static/",
                          "assets/", "gradio_api/"):
                r = http.get(url + route + target)
                leaked = [f for f in forbidden if f and f in r.content]
                assert not leaked, (route, target, r.status_code)
                if route.startswith("gradio_api/file"):
                    assert r.status_code in (403, 404), (route, target, r.status_code)


def test_uploads_are_used_as_images_only(server, tmp_path):
    """Script-bearing files (SVG, HTML, a script renamed .png) are refused by /chat, and what Gradio serves back
    of such an upload is a download, never a page the browser would run."""
    demo, url = server
    evil = {
        "evil.svg": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "evil.html": b"<html><script>alert(1)</script></html>",
        "evil.png": b"<html><script>alert(1)</script></html>",
    }
    client = Client(url, verbose=False)
    for name, data in evil.items():
        path = tmp_path / name
        path.write_bytes(data)
        # refused by the app's check, or before it by Gradio's file_types=["image"] (".html": "Invalid file type")
        with pytest.raises(AppError, match=rf"“{name}” is not an image this app can read|Invalid file type"):
            ask(client, "What is this?", [path])
        r = httpx.post(url + "gradio_api/upload", files={"files": (name, data, "image/png")}, timeout=15)
        served = httpx.get(url + "gradio_api/file=" + r.json()[0], timeout=15)
        assert served.status_code == 200
        kind, disposition = served.headers["content-type"], served.headers["content-disposition"]
        assert "html" not in kind and "svg" not in kind, (name, kind)
        # inline only as a raster image type (a browser shows a broken image, it runs nothing)
        assert disposition.startswith("attachment") or kind in ("image/png", "image/jpeg", "image/gif"), (name, kind)
    assert ask(client, "And this?", [CAT])


def test_files_in_a_message_must_be_uploads(server, tmp_path):
    """A /chat message can only use files uploaded to this server: a path to any other local file is refused,
    also when it is written as a traversal out of the upload folder."""
    demo, url = server
    upload_root = Path(demo.dsvl_runtime.upload_root)
    secret = tmp_path / "secret.png"
    photo((32, 32), seed=7).save(secret)
    for path in [str(secret), f"{upload_root}/../../../../../..{secret}", "/etc/passwd"]:
        done = raw_chat(url, {"text": "describe", "files": [{"path": path, "meta": {"_type": "gradio.FileData"}}]})
        assert not done["success"], path
        assert "not uploaded by a user" in done["output"]["error"] or "not allowed" in done["output"]["error"]
    # and a history may only point at uploads too
    client = Client(url, verbose=False)
    for path in [str(secret), f"{upload_root}/x/../../../../../..{secret}"]:
        with pytest.raises(AppError, match="uploaded"):
            client.predict({"text": "describe", "files": []}, 0.0, 0.95, 0, 4, 1.1, 0,
                           [{"role": "user", "content": [{"path": path}, "hi"]},
                            {"role": "assistant", "content": "ok"}], api_name="/chat")


# ---- auth and share ---------------------------------------------------------------------------------------

def test_auth_wrong_and_right_password(engine, tiny_checkpoint):
    with live_app(engine, tiny_checkpoint, auth="ann:s3cret-pw") as (demo, url):
        with httpx.Client(timeout=15) as http:
            # nothing is reachable without logging in
            assert http.get(url + "config").status_code == 401
            assert http.get(url + "gradio_api/info").status_code == 401
            r = http.post(url + "gradio_api/upload", files={"files": ("a.png", Path(CAT).read_bytes(), "image/png")})
            assert r.status_code == 401
            r = http.post(url + "gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
            assert r.status_code == 401
            # a wrong password is refused and gives no session cookie
            for user, password in [("ann", "wrong"), ("bob", "s3cret-pw"), ("ann", ""), ("ann", "S3CRET-PW")]:
                r = http.post(url + "login", data={"username": user, "password": password})
                assert r.status_code in (400, 401, 422), (user, password, r.status_code)
                assert not http.cookies, (user, password)
                assert http.get(url + "config").status_code == 401
            # the right one logs in
            r = http.post(url + "login", data={"username": "ann", "password": "s3cret-pw"})
            assert r.status_code == 200 and http.cookies
            assert http.get(url + "config").status_code == 200

        with pytest.raises(Exception, match="(?i)login|auth|401|credentials|incorrect"):
            Client(url, auth=("ann", "wrong"), verbose=False)
        client = Client(url, auth=("ann", "s3cret-pw"), verbose=False)
        assert ask(client, "Hello", max_new_tokens=2)


def test_share_is_off_by_default():
    settings = parse_settings([], env={})
    assert settings.share is False and settings.auth is None and settings.host == "127.0.0.1"
    assert launch_options(settings)["share"] is False and launch_options(settings)["auth"] is None
    assert parse_settings(["--share"], env={}).share is True
    assert parse_settings([], env={"DSVL_SHARE": "1"}).share is True


def test_share_without_auth_warns_at_startup(tmp_path):
    missing = str(tmp_path / "no-model")  # start-up stops at the model: the warning must come before that
    warned = run_app("--share", "--model", missing, timeout=90)
    assert warned.returncode != 0
    assert "WARNING" in warned.stderr and "public" in warned.stderr and "--auth" in warned.stderr, warned.stderr
    via_env = run_app("--model", missing, timeout=90,
                      env={**{k: v for k, v in os.environ.items() if not k.startswith(("DSVL_", "GRADIO_"))},
                           "HF_HUB_OFFLINE": "1", "DSVL_SHARE": "true"})
    assert "WARNING" in via_env.stderr and "public" in via_env.stderr
    for quiet in (run_app("--share", "--auth", "ann:pw", "--model", missing, timeout=90),
                  run_app("--model", missing, timeout=90)):
        assert "public" not in quiet.stderr, quiet.stderr


# ---- no conversation on disk --------------------------------------------------------------------------

def _files_containing(marker: bytes, roots: list[Path], since: float) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in (".git", ".venv")]
            for name in filenames:
                p = Path(dirpath, name)
                try:
                    st = p.lstat()
                    if st.st_mtime < since or not p.is_file() or st.st_size > 64 * 2**20:
                        continue
                    if marker in p.read_bytes():
                        found.append(p)
                except OSError:
                    continue
    return found


def test_the_app_writes_no_conversation_to_disk(server, tmp_path):
    demo, url = server
    since = time.time() - 1
    marker = f"PRIVATE-{uuid.uuid4().hex}"
    roots = sorted({Path.cwd(), REPO, Path(tempfile.gettempdir()), Path(demo.dsvl_runtime.upload_root),
                    Path.home() / ".gradio", Path.home() / ".cache" / "huggingface", Path(os.devnull).parent / "shm"})
    roots = [r for r in roots if r.is_dir()]

    client = Client(url, verbose=False)
    answers = [ask(client, f"My secret is {marker}. Remember it.", [CAT], max_new_tokens=6),
               ask(client, f"Repeat {marker} twice.", max_new_tokens=6)]
    assert all(answers)
    client.predict(api_name="/clear")
    demo.dsvl_runtime.flush()

    # the scan can find it: a file written now with the marker is found
    probe = tmp_path / "probe.txt"
    probe.write_text(f"x {marker} y", encoding="utf-8")
    found = _files_containing(marker.encode(), roots, since)
    assert probe in found
    probe.unlink()
    found = [p for p in found if p != probe]
    assert not found, f"the conversation was written to {found}"
