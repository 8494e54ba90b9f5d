"""dsvl.images: decoding of every input kind / PIL mode, error reporting, and exact parity of the
preprocessing with transformers' DeepseekVLHybridImageProcessorPil (configured from our hub files)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsvl.safe_fetch as safe_fetch
from dsvl.images import ImageError, ImageProcessor, load_image, preprocessor_config
from dsvl.processor import write_processor_files


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("processor")
    write_processor_files(out)
    return out


@pytest.fixture(scope="module")
def hf_image_processor(processor_dir: Path):
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil,
    )

    return DeepseekVLHybridImageProcessorPil.from_pretrained(processor_dir)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------
# Preprocessing parity
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (15, 2000), (2000, 15), (500, 333), (333, 500), (4000, 3000), (1024, 1024)])
def test_parity_with_transformers(size, processor_dir, hf_image_processor):
    img = _random_rgb(*size, seed=size[0])
    ours = ImageProcessor.from_dir(processor_dir)
    low, high = ours([img])
    ref = hf_image_processor(images=[img], return_tensors="np")
    assert low.shape == (1, 3, 384, 384) and high.shape == (1, 3, 1024, 1024)
    assert low.dtype == torch.float32 and high.dtype == torch.float32
    assert np.abs(low.numpy() - ref["pixel_values"]).max() <= 1e-5
    assert np.abs(high.numpy() - ref["high_res_pixel_values"]).max() <= 1e-5


def _palette_image() -> Image.Image:
    return _random_rgb(300, 200, seed=7).quantize(colors=16)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _random_rgb(300, 200, seed=3).convert("L"),
        _palette_image,
        lambda: _random_rgb(64, 90, seed=5).convert("CMYK"),
    ],
    ids=["grayscale", "palette", "cmyk"],
)
def test_parity_non_rgb_modes(make, processor_dir, hf_image_processor):
    img = make()
    low, high = ImageProcessor.from_dir(processor_dir)([load_image(img)])
    # transformers needs do_convert_rgb for non-RGB input (our load_image converts for us)
    ref = hf_image_processor(images=[img], do_convert_rgb=True, return_tensors="np")
    assert np.abs(low.numpy() - ref["pixel_values"]).max() <= 1e-5
    assert np.abs(high.numpy() - ref["high_res_pixel_values"]).max() <= 1e-5


def test_geometry_and_pad_colour():
    """docs/MODEL.md §4: solid red 500x333 -> content rows 171..852, pad un-normalises to (122,116,104)."""
    proc = ImageProcessor()
    high_u8 = proc.high_res_uint8(Image.new("RGB", (500, 333), (255, 0, 0)))
    assert high_u8.shape == (1024, 1024, 3)
    assert (high_u8[171:853] == (255, 0, 0)).all()
    assert (high_u8[:171] == (122, 116, 104)).all() and (high_u8[853:] == (122, 116, 104)).all()
    low, high = proc([Image.new("RGB", (500, 333), (255, 0, 0))])
    mean, std = np.array(proc.high_res_image_mean), np.array(proc.high_res_image_std)
    corner = high[0, :, 0, 0].numpy() * std + mean
    assert np.allclose(corner * 255, (122, 116, 104), atol=1e-3)
    low_corner = low[0, :, 0, 0].numpy() * 0.5 + 0.5
    assert np.allclose(low_corner * 255, (122, 116, 104), atol=1e-3)  # low-res derives from the padded image
    # Portrait: the image is centred horizontally, (1024 - 682) // 2 = 171 columns on the left.
    tall = proc.high_res_uint8(Image.new("RGB", (333, 500), (0, 0, 255)))
    assert (tall[:, 171:853] == (0, 0, 255)).all() and (tall[:, 170] == (122, 116, 104)).all()


def test_min_size_and_rounding():
    proc = ImageProcessor()
    # 2000x15 -> height round(15 * 1024 / 2000) = round(7.68) = 8, raised to min_size 14
    u8 = proc.high_res_uint8(Image.new("RGB", (2000, 15), (10, 20, 30)))
    rows = np.where((u8 == (10, 20, 30)).all(axis=(1, 2)))[0]
    assert len(rows) == 14 and rows[0] == (1024 - 14) // 2
    # 1000x333: 333 * 1.024 = 340.992 -> 341 rows (Python round), offset (1024 - 341) // 2 = 341
    u8 = proc.high_res_uint8(Image.new("RGB", (1000, 333), (10, 20, 30)))
    rows = np.where((u8 == (10, 20, 30)).all(axis=(1, 2)))[0]
    assert len(rows) == 341 and rows[0] == 341


def test_config_layouts(tmp_path):
    assert ImageProcessor.from_dict(preprocessor_config()) == ImageProcessor()
    # transformers 5 save_pretrained layout: image processor nested in processor_config.json
    cfg = {**preprocessor_config(), "min_size": 20}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": cfg, "num_image_tokens": 576}))
    assert ImageProcessor.from_dir(tmp_path).min_size == 20
    # original DeepSeek file (normalisation inside the model there) -> HF-converted values
    original = {"image_processor_type": "VLMImageProcessor", "image_size": 1024, "do_normalize": False}
    assert ImageProcessor.from_dict(original) == ImageProcessor()
    with pytest.raises(ValueError):
        ImageProcessor.from_dict({**preprocessor_config(), "size": {"height": 384, "width": 500}})


def test_batch_order():
    a, b = _random_rgb(50, 40, 1), _random_rgb(40, 50, 2)
    low, high = ImageProcessor()([a, b])
    la, ha = ImageProcessor()([a])
    lb, hb = ImageProcessor()(b)
    assert torch.equal(low, torch.cat([la, lb])) and torch.equal(high, torch.cat([ha, hb]))


# ---------------------------------------------------------------------------------------------------
# Decoding: modes
# ---------------------------------------------------------------------------------------------------


def _px(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    out = load_image(rgba)
    assert _px(out) == (255, 255, 255)
    assert _px(out, (1, 1)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in _px(out, (2, 2)))
    la = Image.new("LA", (2, 2), (0, 0))
    assert _px(load_image(la)) == (255, 255, 255)
    # RGB / L PNGs with a tRNS colour key: that colour is transparent
    rgb = Image.new("RGB", (2, 1), (0, 0, 0))
    rgb.putpixel((1, 0), (9, 9, 9))
    out = load_image(_png(rgb, transparency=(0, 0, 0)))
    assert _px(out) == (255, 255, 255) and _px(out, (1, 0)) == (9, 9, 9)
    assert _px(load_image(_png(Image.new("L", (1, 1), 5), transparency=5))) == (255, 255, 255)


def test_palette_modes():
    p = Image.new("P", (3, 3), 0)
    p.putpalette([0, 255, 0] + [0, 0, 255] * 255)
    assert _px(load_image(p)) == (0, 255, 0)
    # palette with a transparent index: composited on white, other index keeps its colour
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    out = load_image(Image.open(io.BytesIO(_png(p, transparency=0))))
    assert _px(out) == (255, 255, 255) and _px(out, (1, 1)) == (0, 0, 255)
    pa = Image.new("PA", (2, 2))
    pa.putpalette([200, 10, 10] * 256)
    pa.putpixel((0, 0), (0, 255))
    pa.putpixel((1, 0), (0, 0))
    out = load_image(pa)
    assert _px(out) == (200, 10, 10) and _px(out, (1, 0)) == (255, 255, 255)


def test_grayscale_bilevel_cmyk():
    assert _px(load_image(Image.new("L", (2, 2), 77))) == (77, 77, 77)
    one = Image.new("1", (2, 2), 0)
    one.putpixel((1, 1), 1)
    out = load_image(one)
    assert _px(out) == (0, 0, 0) and _px(out, (1, 1)) == (255, 255, 255)
    assert _px(load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))) == (255, 0, 0)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(arr, mode="I;16")
    path = tmp_path / "depth.png"
    img16.save(path)
    for source in (img16, path):
        out = np.asarray(load_image(source))[0, :, 0]
        assert out.tolist() == [0, 1, 128, 255]
    # 32-bit "I" holding 16-bit data is scaled; "I" holding 8-bit data is kept
    assert np.asarray(load_image(Image.fromarray(arr.astype(np.int32), mode="I")))[0, :, 0].tolist() == [0, 1, 128, 255]
    small = np.array([[0, 100, 255]], dtype=np.int32)
    assert np.asarray(load_image(Image.fromarray(small, mode="I")))[0, :, 0].tolist() == [0, 100, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_applied():
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))  # red top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90° clockwise
    data = io.BytesIO()
    img.save(data, format="PNG", exif=exif.tobytes())
    out = load_image(data.getvalue())
    assert out.size == (2, 4)
    assert _px(out, (1, 0)) == (255, 0, 0)  # top-left moved to top-right


def test_animated_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    opened = Image.open(io.BytesIO(buf.getvalue()))
    opened.seek(2)
    assert _px(load_image(opened)) == (255, 0, 0)
    assert _px(load_image(buf.getvalue())) == (255, 0, 0)


# ---------------------------------------------------------------------------------------------------
# Decoding: input kinds
# ---------------------------------------------------------------------------------------------------


def test_input_kinds(tmp_path):
    img = _random_rgb(20, 10, seed=11)
    path = tmp_path / "photo.png"
    img.save(path)
    expected = np.asarray(img)
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for source in (img, str(path), path, path.read_bytes(), bytearray(path.read_bytes()), data_url, expected):
        out = load_image(source)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected)
    assert load_image(img) is not img  # never hands back (or mutates) the caller's object


def test_numpy_arrays():
    hw = np.array([[0, 255]], dtype=np.uint8)
    assert np.asarray(load_image(hw))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    assert np.asarray(load_image(hw[:, :, None]))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    rgba = np.zeros((1, 1, 4), dtype=np.uint8)  # transparent black -> white
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    flt = np.full((2, 2, 3), 0.5, dtype=np.float32)
    assert np.asarray(load_image(flt))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(load_image(np.full((1, 1), 65535, dtype=np.uint16)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(np.ones((1, 1), dtype=bool)))[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(np.full((2, 2, 3), 3.0))
    with pytest.raises(ImageError, match="HxW"):
        load_image(np.zeros((2, 2, 2), dtype=np.uint8))


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802
        if self.path == "/cat.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload)
        else:
            self.send_error(404)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def local_http():
    hits = []

    class Handler(_Handler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            super().do_GET()

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_http_url(local_http, monkeypatch):
    base, hits = local_http
    img = _random_rgb(6, 5, seed=2)
    _Handler.payload = _png(img)
    monkeypatch.setattr(safe_fetch, "is_public", lambda address: True)  # this test's server is on loopback
    assert np.array_equal(np.asarray(load_image(base + "/cat.png", allow_urls=True)), np.asarray(img))
    with pytest.raises(ImageError, match="404") as e:
        load_image(base + "/missing.png", allow_urls=True)
    assert "missing.png" in str(e.value)


def test_urls_are_off_by_default_and_never_reach_private_addresses(local_http):
    base, hits = local_http
    _Handler.payload = _png(_random_rgb(6, 5, seed=2))
    with pytest.raises(ImageError, match="URLs is off"):
        load_image(base + "/cat.png")
    port = base.rsplit(":", 1)[1]
    for url in (base + "/cat.png", f"http://localhost:{port}/cat.png", f"http://[::1]:{port}/cat.png",
                "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.png", "http://192.168.1.1/x.png",
                f"http://0.0.0.0:{port}/cat.png"):
        with pytest.raises(ImageError, match="not a public internet address|cannot be resolved"):
            load_image(url, allow_urls=True)
    assert hits == []  # nothing reached the local server
    assert not safe_fetch.is_public("100.64.0.1") and safe_fetch.is_public("93.184.216.34")  # carrier-grade NAT


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (CRC fixed) followed by the tiny original data."""
    data = bytearray(_png(Image.new("RGB", (4, 4))))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not an image")
    with pytest.raises(ImageError) as e:
        load_image(str(path))
    msg = str(e.value)
    assert "notes.txt" in msg and str(tmp_path) not in msg and "not an image" in msg


def test_truncated_files(tmp_path):
    img = _random_rgb(64, 64, seed=4)
    for fmt, name in (("PNG", "cut.png"), ("JPEG", "cut.jpg")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        path = tmp_path / name
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(ImageError, match="truncated or corrupt") as e:
            load_image(path)
        assert name in str(e.value)


def test_empty_inputs(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="cannot read|not an image|empty"):
        load_image(_png_with_declared_size(0, 4), name="zero.png")


def test_decompression_bomb_checked_before_decoding():
    # 8000x8000 = 64 M pixels: below PIL's own bomb limit (89 M), above ours (40 M); the pixel data is
    # only 4x4, so any attempt to decode would fail with a truncation error instead.
    with pytest.raises(ImageError, match="exceeds the limit") as e:
        load_image(_png_with_declared_size(8000, 8000), name="bomb.png")
    assert "bomb.png" in str(e.value) and "8000x8000" in str(e.value)
    # beyond PIL's hard limit as well
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(_png_with_declared_size(30000, 30000))
    # the limit is configurable and also applies to arrays and PIL images
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(Image.new("L", (100, 100)), max_pixels=9999)
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(np.zeros((100, 100), dtype=np.uint8), max_pixels=9999)
    assert load_image(Image.new("L", (100, 100)), max_pixels=10000).size == (100, 100)


def test_other_errors(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="unsupported input type"):
        load_image(42)
    with pytest.raises(ImageError, match="malformed data URL"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="upload.bin"):
        load_image(b"\x00\x01garbage", name="upload.bin")
    assert issubclass(ImageError, ValueError)
