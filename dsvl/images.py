"""Image decoding (every input kind, every PIL mode) and the exact DeepSeek-VL hybrid preprocessing.

`load_image` turns any supported source into an RGB `PIL.Image`; `ImageProcessor` reproduces transformers'
`DeepseekVLHybridImageProcessor` (PIL backend) with the values of the converted checkpoint:

1. high-res: resize so the longest side is 1024 (Python `round`, each side at least `min_size` 14), bicubic;
2. pad to 1024x1024 with int(mean*255) = (122, 116, 104), the image centred ((1024-short)//2 top/left);
3. low-res: bilinear resize of that padded uint8 1024 image to 384x384;
4. x/255 then per-branch normalisation (CLIP mean/std for high-res, 0.5/0.5 for low-res), float32.

The SigLIP-only 1.3B model (`hybrid=False`, transformers' `DeepseekVLImageProcessor`) has one branch: resize so
the longest side is `size` (384) with `resample`, pad with int(image_mean*255), rescale and normalise.

Intentional differences from transformers (which leaves decoding to the caller):
- EXIF orientation is applied (`ImageOps.exif_transpose`), so phone photos are upright.
- Transparent pixels are composited on white (transformers' `convert_rgb` does the same for RGBA; a bare
  `Image.convert("RGB")` would expose whatever colour hides under alpha 0, often black).
- 16-bit images are scaled to 8 bits (x/257) instead of being clipped at 255, and animated images use frame 0.
- Errors are one `ImageError` that names the input and the reason; the pixel limit is checked on the
  declared size before any pixel data is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import struct  # struct.error: raised by some PIL plugins on corrupt headers
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Pad colour of each branch is int(mean * 255), as the HF processor computes it.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
PIL_BILINEAR = 2
PIL_BICUBIC = 3

DEFAULT_MAX_PIXELS = 40_000_000
URL_TIMEOUT_S = 15.0
URL_MAX_BYTES = 50 * 1024 * 1024


class ImageError(ValueError):
    """An input could not be turned into an image; the message names the input and the reason."""


def preprocessor_config(hybrid: bool = True) -> dict[str, Any]:
    """`preprocessor_config.json` with the values the HF conversion script passes (docs/MODEL.md §4). For the
    SigLIP-only model: transformers' DeepseekVLImageProcessor at 384 px with SigLIP's 0.5/0.5 normalisation."""
    if not hybrid:
        return {
            "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(IMAGENET_STANDARD_MEAN), "image_processor_type": "DeepseekVLImageProcessor",
            "image_std": list(IMAGENET_STANDARD_STD), "min_size": 14, "processor_class": "DeepseekVLProcessor",
            "resample": PIL_BICUBIC, "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384},
        }
    return {
        "background_color": [int(m * 255) for m in IMAGENET_STANDARD_MEAN],
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "high_res_background_color": [int(m * 255) for m in OPENAI_CLIP_MEAN],
        "high_res_image_mean": list(OPENAI_CLIP_MEAN),
        "high_res_image_std": list(OPENAI_CLIP_STD),
        "high_res_resample": PIL_BICUBIC,
        "high_res_size": {"height": 1024, "width": 1024},
        "image_mean": list(IMAGENET_STANDARD_MEAN),
        "image_processor_type": "DeepseekVLHybridImageProcessor",
        "image_std": list(IMAGENET_STANDARD_STD),
        "min_size": 14,
        "processor_class": "DeepseekVLHybridProcessor",
        "resample": PIL_BILINEAR,
        "rescale_factor": 1 / 255,
        "size": {"height": 384, "width": 384},
    }


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _describe(source: Any) -> str:
    """Short human name of an input for error messages (a file's base name, not its temp directory)."""
    if isinstance(source, Path):
        return source.name or str(source)
    if isinstance(source, str):
        if source.startswith("data:"):
            return "data URL"
        if source.startswith(("http://", "https://")):
            return source if len(source) <= 120 else source[:117] + "..."
        return os.path.basename(source) or source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image data ({len(source)} bytes)"
    if isinstance(source, np.ndarray):
        return f"array {tuple(source.shape)} {source.dtype}"
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "")
        return os.path.basename(filename) if filename else f"{source.mode} image {source.width}x{source.height}"
    return type(source).__name__


def _fetch_url(url: str, label: str) -> bytes:
    from .safe_fetch import FetchError, fetch  # public hosts only, no redirects, no proxies, bounded

    try:
        return fetch(url, max_bytes=URL_MAX_BYTES, timeout=URL_TIMEOUT_S)
    except FetchError as e:
        raise ImageError(f"Cannot load image {label!r}: {e}") from None


def _decode_data_url(url: str, label: str) -> bytes:
    header, _, payload = url.partition(",")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"Cannot load image {label!r}: malformed data URL ({e})") from e


def _array_to_image(arr: np.ndarray, label: str) -> Image.Image:
    """HWC (C = 1, 3, 4) or HW array: uint8, uint16 (scaled /257), bool, or float in [0, 1]."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"Cannot load image {label!r}: expected an HxW or HxWxC array with C in 1, 3, 4")
    if arr.dtype == np.uint8:
        data = arr
    elif arr.dtype == np.bool_:
        data = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        data = np.round(arr / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ImageError(f"Cannot load image {label!r}: float pixel values must lie in [0, 1]")
        data = np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"Cannot load image {label!r}: unsupported array dtype {arr.dtype}")
    mode = "L" if data.ndim == 2 else {3: "RGB", 4: "RGBA"}[data.shape[2]]
    return Image.fromarray(np.ascontiguousarray(data), mode=mode)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on white; 16/32-bit integer and float data are scaled."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img.copy()
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
    elif mode in ("LA", "La", "RGBa") or (mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")
    elif mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # "I" is used both for 16-bit data (older PIL, some TIFFs) and for 8-bit data promoted to 32 bits:
        # scale only when values exceed the 8-bit range.
        if mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if arr.size and arr.max() <= 1.0:  # float images are usually [0, 1]
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, ...


def load_image(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None,
               allow_urls: bool = False) -> Image.Image:
    """Decode `source` into an upright RGB image.

    `source`: a PIL image, a path (str/Path), encoded bytes, an http(s) or data: URL, or a numpy array
    (HxWx{1,3,4} or HxW; uint8, uint16, bool, or float in [0, 1]). `name` labels the input in error messages.
    http(s) URLs are fetched only with `allow_urls=True`, and never from a private, loopback or link-local
    address (a server must not be made to probe its own network).
    Raises `ImageError` for anything that is not a usable image (unreadable, truncated, empty, too large).
    """
    label = name or _describe(source)

    def fail(reason: str, cause: BaseException | None = None) -> ImageError:
        err = ImageError(f"Cannot load image {label!r}: {reason}")
        err.__cause__ = cause
        return err

    if isinstance(source, np.ndarray):
        if source.size == 0:
            raise fail("the image is empty (0 pixels)")
        if source.shape[0] * (source.shape[1] if source.ndim > 1 else 1) > max_pixels:
            raise fail(f"{source.shape[1]}x{source.shape[0]} exceeds the limit of {max_pixels:,} pixels")
        return _to_rgb(_array_to_image(source, label))

    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            stream: Any = io.BytesIO(bytes(source))
        elif isinstance(source, (str, Path)):
            text = str(source)
            if isinstance(source, str) and text.startswith(("http://", "https://")):
                if not allow_urls:
                    raise fail("loading images from URLs is off (the caller did not allow it)")
                stream = io.BytesIO(_fetch_url(text, label))
            elif isinstance(source, str) and text.startswith("data:"):
                stream = io.BytesIO(_decode_data_url(text, label))
            else:
                path = Path(text).expanduser()
                if not path.exists():
                    raise fail("file not found")
                if path.is_dir():
                    raise fail("is a directory, not an image file")
                stream = path
        else:
            raise fail(f"unsupported input type {type(source).__name__}")
        try:
            # Image.open reads only the header; PIL's own bomb check (2x its MAX_IMAGE_PIXELS) raises here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(stream)
        except Image.DecompressionBombError as e:
            raise fail(f"declared size exceeds the limit of {max_pixels:,} pixels (decompression bomb)", e) from e
        except UnidentifiedImageError as e:
            raise fail("not an image, or an unsupported image format", e) from e
        except PermissionError as e:
            raise fail("permission denied", e) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise fail(f"cannot read the file ({e})", e) from e

    width, height = img.size
    if width <= 0 or height <= 0:
        raise fail(f"the image is empty ({width}x{height})")
    # Checked on the declared size, before any pixel data is decoded.
    if width * height > max_pixels:
        raise fail(f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} pixels")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF/WebP/APNG, multi-page TIFF: first frame
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise fail(f"declared size exceeds the limit of {max_pixels:,} pixels (decompression bomb)", e) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        reason = "the file is truncated or corrupt" if "truncat" in str(e).lower() else f"cannot decode the image ({e})"
        raise fail(reason, e) from e
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not reject an otherwise fine image
        upright = img
    try:
        return _to_rgb(upright if upright is not None else img)
    except (OSError, ValueError) as e:
        raise fail(f"cannot convert mode {img.mode} to RGB ({e})", e) from e


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------

_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _side(value: Any, key: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        h, w = value.get("height"), value.get("width")
        if h is not None and h == w:
            return int(h)
    raise ValueError(f"{key} must be a square size (height == width), got {value!r}")


def _is_hybrid(kind: str, cfg: Mapping[str, Any]) -> bool:
    """DeepseekVLHybrid* (7B) or DeepseekVL* (1.3B, one branch); a file that names neither: its keys decide."""
    if "Hybrid" in kind:
        return True
    if kind.startswith("DeepseekVL"):
        return False
    return "high_res_size" in cfg or "size" not in cfg  # (no keys at all: the 7B defaults, as before)


def _resample(value: Any) -> int:
    return _RESAMPLE_NAMES[value.lower()] if isinstance(value, str) else int(value)


@dataclass(frozen=True)
class ImageProcessor:
    """Exact HF DeepSeek-VL hybrid preprocessing (see module docstring). Build with `from_dir`/`from_dict`."""

    size: int = 384
    high_res_size: int = 1024
    min_size: int = 14
    resample: int = PIL_BILINEAR
    high_res_resample: int = PIL_BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    high_res_image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    high_res_image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    hybrid: bool = True  # False: the SigLIP-only model's single 384 px branch, no high-res tensor

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "ImageProcessor":
        """From `preprocessor_config.json` contents. The original DeepSeek file (`VLMImageProcessor`, which
        normalises inside the model instead) maps to the HF-converted defaults, which the model code expects."""
        kind = str(cfg.get("image_processor_type") or "")
        if kind == "VLMImageProcessor":  # 1024 px: the hybrid's; 384 px: the SigLIP-only model's
            hybrid = int(cfg.get("image_size") or 1024) > 384
            return cls() if hybrid else cls.from_dict(preprocessor_config(hybrid=False))
        if not cfg.get("do_resize", True) or not cfg.get("do_pad", True):
            raise ValueError("do_resize=false / do_pad=false are not supported: the model needs square inputs")
        hybrid = _is_hybrid(kind or str(cfg.get("processor_class") or ""), cfg)
        d = {**preprocessor_config(), **preprocessor_config(hybrid)}
        get = lambda key: cfg.get(key, d[key]) if cfg.get(key) is not None else d[key]  # noqa: E731
        return cls(
            hybrid=hybrid,
            size=_side(get("size"), "size"),
            high_res_size=_side(get("high_res_size"), "high_res_size"),
            min_size=int(get("min_size")),
            resample=_resample(get("resample")),
            high_res_resample=_resample(get("high_res_resample")),
            do_rescale=bool(get("do_rescale")),
            rescale_factor=float(get("rescale_factor")),
            do_normalize=bool(get("do_normalize")),
            image_mean=tuple(get("image_mean")),
            image_std=tuple(get("image_std")),
            high_res_image_mean=tuple(get("high_res_image_mean")),
            high_res_image_std=tuple(get("high_res_image_std")),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ImageProcessor":
        """From `preprocessor_config.json`, or the `image_processor` entry of `processor_config.json` (the layout
        transformers 5 saves); HF-converted defaults when neither exists."""
        path = Path(path)
        if (path / "preprocessor_config.json").is_file():
            return cls.from_dict(json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8")))
        if (path / "processor_config.json").is_file():
            nested = json.loads((path / "processor_config.json").read_text(encoding="utf-8")).get("image_processor")
            if isinstance(nested, Mapping):
                return cls.from_dict(nested)
        return cls()

    # HF pads with int(mean * 255) of the branch being padded.
    @property
    def high_res_background(self) -> tuple[int, ...]:
        return tuple(int(m * 255) for m in self.high_res_image_mean)

    @cached_property
    def _low_lut(self) -> np.ndarray:
        return self._lut(self.image_mean, self.image_std)

    @cached_property
    def _high_lut(self) -> np.ndarray:
        return self._lut(self.high_res_image_mean, self.high_res_image_std)

    def _lut(self, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
        """(3, 256) float32 table of the rescale+normalise result of each uint8 value, computed exactly as
        transformers does (float64 rescale, cast to float32, then (x - mean) / std in float32)."""
        x = np.arange(256, dtype=np.float64)
        x = (x * self.rescale_factor if self.do_rescale else x).astype(np.float32)
        if not self.do_normalize:
            return np.stack([x, x, x])
        m = np.asarray(mean, dtype=np.float32)[:, None]
        s = np.asarray(std, dtype=np.float32)[:, None]
        return (x[None, :] - m) / s

    def _apply_lut(self, img: np.ndarray, lut: np.ndarray) -> np.ndarray:
        """uint8 HWC -> float32 CHW via the per-channel table (no per-pixel arithmetic)."""
        return np.stack([lut[c][img[:, :, c]] for c in range(3)])

    def high_res_uint8(self, image: Image.Image) -> np.ndarray:
        """Steps 1-2: the padded high_res_size x high_res_size uint8 HWC image."""
        return self._square_uint8(image, self.high_res_size, self.high_res_resample, self.high_res_background)

    def _square_uint8(self, image: Image.Image, target: int, resample: int, background: Sequence[int]) -> np.ndarray:
        """Resize so the longest side is `target` (each side at least min_size), then pad to a square."""
        if image.mode != "RGB":
            image = _to_rgb(image)
        w, h = image.size
        scale = target / max(h, w)
        new_h, new_w = max(round(h * scale), self.min_size), max(round(w * scale), self.min_size)
        resized = np.asarray(image.resize((new_w, new_h), resample=resample))
        if new_h == new_w:
            return resized
        side = max(new_h, new_w)
        padded = np.empty((side, side, 3), dtype=np.uint8)
        padded[:] = np.asarray(background, dtype=np.uint8)
        if new_w > new_h:
            top = (side - new_h) // 2
            padded[top : top + new_h] = resized
        else:
            left = (side - new_w) // 2
            padded[:, left : left + new_w] = resized
        return padded

    def process_one(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """(low-res (3,size,size), high-res (3,high,high) or None) float32 arrays for one image."""
        if not self.hybrid:
            background = tuple(int(m * 255) for m in self.image_mean)
            return self._apply_lut(self._square_uint8(image, self.size, self.resample, background), self._low_lut), None
        high = self.high_res_uint8(image)
        # Low-res input = the padded uint8 high-res image resized (as HF does; not the original image).
        low = np.asarray(Image.fromarray(high).resize((self.size, self.size), resample=self.resample))
        return self._apply_lut(low, self._low_lut), self._apply_lut(high, self._high_lut)

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixel_values (N,3,size,size), high_res_pixel_values (N,3,high,high)) float32 CPU tensors; the second is
        None for the SigLIP-only model."""
        if isinstance(images, Image.Image):
            images = [images]
        low = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)
        if not self.hybrid:
            for i, image in enumerate(images):
                low[i] = self.process_one(image)[0]
            return torch.from_numpy(low), None
        high = np.empty((len(images), 3, self.high_res_size, self.high_res_size), dtype=np.float32)
        for i, image in enumerate(images):
            low[i], high[i] = self.process_one(image)
        return torch.from_numpy(low), torch.from_numpy(high)
