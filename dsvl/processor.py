"""`Processor`: conversations -> token ids + pixel tensors, with the context-limit policy; and the writer of
the processor-side hub files of `deepseek-community/deepseek-vl-7b-chat`.

Sequence assembly equals transformers' `DeepseekVLHybridProcessor`: render the chat template, tokenize with
one BOS in front, and replace each `<image_placeholder>` by `num_image_tokens` (576) image-token ids.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageError, ImageProcessor, load_image, preprocessor_config
from .text import CHAT_TEMPLATE, Tokenizer, normalize_messages, render_chat, split_system, with_system_prompt

PROCESSOR_CLASS = "DeepseekVLHybridProcessor"
PROCESSOR_CLASS_SIGLIP_ONLY = "DeepseekVLProcessor"  # the 1.3B model's
DEFAULT_NUM_IMAGE_TOKENS = 576
ESTIMATE_SLACK = 8  # tokens by which the per-turn estimate may miss the whole prompt's count


class ContextOverflowError(ValueError):
    """Even the newest user turn does not fit in the context window."""


@dataclass
class Prompt:
    """A tokenized conversation ready for the model."""

    token_ids: list[int]  # BOS first; each image = num_image_tokens consecutive image-token ids
    images: list[Image.Image] = field(default_factory=list)  # RGB, in text order
    image_keys: list[str] = field(default_factory=list)  # content hash per image (for feature caches)
    dropped_turns: int = 0  # oldest user(+assistant) turns removed to fit the context
    text: str = ""  # rendered prompt (one placeholder per image), after dropping
    loaders: list[Callable[[], Image.Image]] = field(default_factory=list, repr=False)  # decode image i again

    def image_for(self, key: str) -> Image.Image:
        """The decoded image with this key (decoded now if `prepare` skipped it because its features were cached)."""
        i = self.image_keys.index(key)
        if self.images[i] is None:
            self.images[i] = self.loaders[i]()
        return self.images[i]


class Cancelled(Exception):
    """The caller's cancel event fired while a conversation was being prepared."""


def _check(cancel: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled while preparing the prompt")


def _local_path(source: Any) -> Path | None:
    """The file behind an image source when it is a local path (not a URL, data URL, bytes or array)."""
    if isinstance(source, Path):
        return source
    if isinstance(source, str) and not source.startswith(("http://", "https://", "data:")):
        return Path(source)
    return None


class FileKeys:
    """Content keys of image files, each file version (path, inode, size, mtime) hashed once: a follow-up
    question about an image already seen costs a `stat`, not a read, a decode and a hash."""

    def __init__(self, capacity: int = 1024) -> None:
        self._keys: OrderedDict[tuple, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.hashed = 0  # files hashed so far (tests count them)

    def key(self, path: Path) -> str:
        try:
            st = path.stat()
        except OSError:
            raise ImageError(f"Cannot load image {path.name!r}: file not found") from None
        version = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if version in self._keys:
                self._keys.move_to_end(version)
                return self._keys[version]
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except IsADirectoryError:
            raise ImageError(f"Cannot load image {path.name!r}: is a directory, not an image file") from None
        except OSError as e:
            raise ImageError(f"Cannot load image {path.name!r}: cannot read the file ({e.strerror})") from None
        key = "bytes:" + h.hexdigest()
        with self._lock:
            self.hashed += 1
            self._keys[version] = key
            while len(self._keys) > self._capacity:
                self._keys.popitem(last=False)
        return key


def content_key(data: bytes) -> str:
    """Key of an encoded image (a file's bytes): equal to `FileKeys.key` of a file holding these bytes."""
    return "bytes:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image: equal pixels give equal keys whatever file or format they came from."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _image_source(item: Mapping[str, Any]) -> Any:
    for key in ("image", "url", "path"):
        if item.get(key) is not None:
            return item[key]
    raise ImageError("Cannot load image: an image item has no 'image', 'url' or 'path'")


class Processor:
    """Conversation -> `Prompt` / batched tensors. See `prepare` for the context policy."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        *,
        chat_template: str | None = None,
        sanitize_control_tokens: bool = True,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        allow_urls: bool = False,
    ) -> None:
        if tokenizer.image_token_id is None:
            raise ValueError("the tokenizer has no image token (<image_placeholder>)")
        if tokenizer.bos_id is None:
            raise ValueError("the tokenizer has no BOS token")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        # The checkpoint's own template when it ships one, else the built-in Python equivalent (None).
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.sanitize_control_tokens = sanitize_control_tokens
        self.max_image_pixels = max_image_pixels
        self.allow_urls = allow_urls  # fetch http(s) image URLs (public hosts only); off: a server never fetches
        self._file_keys = FileKeys()

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs: Any) -> "Processor":
        """From a checkpoint directory (tokenizer files, preprocessor/processor configs, chat template)."""
        path = Path(path)
        num = DEFAULT_NUM_IMAGE_TOKENS
        if (path / "processor_config.json").is_file():
            num = int(json.loads((path / "processor_config.json").read_text(encoding="utf-8")).get("num_image_tokens", num))
        return cls(Tokenizer.from_dir(path), ImageProcessor.from_dir(path), num, **kwargs)

    # ---- text -> ids ----------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               system: str | None = None) -> str:
        """The chat template's text. `system` (the system prompt) replaces the template's own, see
        `dsvl.text.with_system_prompt`."""
        tok = self.tokenizer
        kw = dict(bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                  image_token=tok.image_token)
        text = render_chat(messages, add_generation_prompt, self.chat_template, **kw)
        if system is None:
            return text
        out = with_system_prompt(text, self.render([], False), system)
        if out is None:  # a template without a fixed preamble: let it write the system message its own way
            out = render_chat([{"role": "system", "content": system}, *messages], add_generation_prompt,
                              self.chat_template, **kw)
        return out

    @property
    def default_system_prompt(self) -> str:
        """The system prompt the checkpoint's chat template writes when none is given ("" if it writes none)."""
        return self.render([], False).removesuffix("\n\n")

    def _mark_control_tokens(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
        """Wrap special-token strings typed inside text items with a random marker, so `_encode` can encode them
        as plain text: a user writing "<image_placeholder>" or the EOS string must not create image slots or end
        the turn. Returns (messages, marker or None when no text contains one)."""
        specials = [t for t in self.tokenizer.special_tokens if t]
        if not self.sanitize_control_tokens or not specials:
            return messages, None
        pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        if not any(
            item.get("type") == "text" and isinstance(item.get("text"), str) and pattern.search(item["text"])
            for m in messages
            for item in m["content"]
        ):
            return messages, None
        marker = f"\ue000{secrets.token_hex(8)}\ue001"
        out = []
        for m in messages:
            content = [
                {**item, "text": pattern.sub(lambda x: marker + x.group(0) + marker, item["text"])}
                if item.get("type") == "text" and isinstance(item.get("text"), str)
                else item
                for item in m["content"]
            ]
            out.append({**m, "content": content})
        return out, marker

    def _encode(self, text: str, marker: str | None) -> list[int]:
        """BOS + ids of `text`, each image token expanded to num_image_tokens ids. Expanding after
        tokenizing equals tokenizing the expanded string (special tokens split the text either way)."""
        tok = self.tokenizer
        if marker is None:
            ids = tok.encode(text, add_bos=True)
        else:
            ids = [tok.bos_id]
            for i, piece in enumerate(text.split(marker)):  # odd pieces are user-typed control tokens
                ids += tok.encode_plain(piece) if i % 2 else tok.encode(piece, add_bos=False)
        image_id = tok.image_token_id
        if image_id not in ids:
            return ids
        out: list[int] = []
        for t in ids:
            if t == image_id:
                out.extend([image_id] * self.num_image_tokens)
            else:
                out.append(t)
        return out

    # ---- conversations ----------------------------------------------------------------------------------
    def prepare(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        max_context_tokens: int | None = 4096,
        reserve_new_tokens: int = 0,
        cancel: Any = None,
        have_features: Callable[[str], bool] | None = None,
    ) -> Prompt:
        """Tokenize one conversation and load its images.

        A leading `system` message is the system prompt: it replaces the template's own (see `render`), and is
        always kept. Context policy: a turn is a user message with the assistant message(s) that follow it
        (messages before the first user message are always kept). If the prompt plus
        `reserve_new_tokens` exceeds `max_context_tokens`, the oldest whole turns are dropped, images included,
        until it fits; `Prompt.dropped_turns` says how many. An image's tokens are never cut. If even the last
        turn alone does not fit, `ContextOverflowError` is raised. `max_context_tokens=None` disables the limit.
        A generation prompt ("Assistant:") is added unless the conversation ends with an assistant message,
        which is then continued.

        Cost: the turns are tokenized one by one from the newest, stopping at the first that no longer fits,
        then the kept prompt once more as a whole; older turns are dropped by count, never tokenized.
        `cancel` (anything with `is_set()`) abandons the work between turns and between images (`Cancelled`).
        `have_features(key) -> True` says an image's features are cached: that image is not decoded
        (`Prompt.images` holds None for it; `Prompt.image_for` decodes on demand).
        """
        messages = normalize_messages(conversation)
        system, messages = split_system(messages)  # a leading system message: the system prompt
        if not messages:
            raise ValueError("the conversation is empty")
        add_generation_prompt = str(messages[-1]["role"]).lower() != "assistant"
        if system is not None:  # sanitised with the messages: typed control tokens stay plain text
            first = {"role": "system", "content": [{"type": "text", "text": system}]}
            marked, marker = self._mark_control_tokens([first, *messages])
            system, marked = marked[0]["content"][0]["text"], marked[1:]
        else:
            marked, marker = self._mark_control_tokens(messages)

        starts = [i for i, m in enumerate(marked) if str(m["role"]).lower() == "user"]
        preamble_end = starts[0] if starts else 0
        turn_starts = starts or [0]
        budget = None if max_context_tokens is None else max_context_tokens - reserve_new_tokens
        dropped, slack = self._estimate_dropped(marked, preamble_end, turn_starts, marker, budget, cancel)

        def encoded(first_turn: int) -> tuple[str, list[int]]:
            _check(cancel)
            text = self.render(marked[:preamble_end] + marked[turn_starts[first_turn]:], add_generation_prompt, system)
            return text, self._encode(text, marker)

        text, ids = encoded(dropped)
        while budget is not None and len(ids) > budget:
            if dropped + 1 >= len(turn_starts):
                kept = marked[:preamble_end] + marked[turn_starts[dropped]:]
                raise self._overflow(kept, len(ids), max_context_tokens, reserve_new_tokens)
            dropped += 1
            text, ids = encoded(dropped)
        if dropped and slack:  # the per-turn estimate was near the edge: one more turn may fit exactly
            more_text, more_ids = encoded(dropped - 1)
            if len(more_ids) <= budget:
                dropped, text, ids = dropped - 1, more_text, more_ids

        # Images of the kept messages only, in text order (the original items, not the marked copies).
        kept_original = messages[:preamble_end] + messages[turn_starts[dropped]:]
        items = [item for m in kept_original for item in m["content"] if item.get("type") == "image"]
        n_slots = ids.count(self.tokenizer.image_token_id)
        if n_slots != len(items) * self.num_image_tokens:  # e.g. a custom template that drops image items
            raise ValueError(f"{n_slots} image-token ids for {len(items)} image(s) x {self.num_image_tokens}")
        images, keys, loaders = [], [], []
        for item in items:
            _check(cancel)
            image, key, load = self._image_and_key(item, have_features)
            images.append(image)
            keys.append(key)
            loaders.append(load)
        return Prompt(ids, images, keys, dropped, text, loaders)

    def _estimate_dropped(self, marked: list[dict], preamble_end: int, turn_starts: list[int], marker: str | None,
                          budget: int | None, cancel: Any) -> tuple[int, bool]:
        """(turns to drop, whether keeping one more might fit) from each turn's own token count, newest first.
        Tokenizing turns apart can differ from tokenizing the whole prompt by a token at a turn boundary,
        so `prepare` checks the result on the whole prompt."""
        if budget is None or len(turn_starts) == 1:
            return 0, False
        preamble = marked[:preamble_end]
        base = len(self._encode(self.render(preamble, True), marker))
        total = base
        bounds = [*turn_starts[1:], len(marked)]
        for t in range(len(turn_starts) - 1, -1, -1):
            _check(cancel)
            turn = marked[turn_starts[t]:bounds[t]]
            total += len(self._encode(self.render(preamble + turn, True), marker)) - base
            if total > budget:
                return min(t + 1, len(turn_starts) - 1), total - budget <= ESTIMATE_SLACK
        return 0, False

    def _overflow(self, kept: list[dict], n_ids: int, max_context_tokens: int, reserve: int) -> ContextOverflowError:
        n_images = sum(1 for m in kept for item in m["content"] if item.get("type") == "image")
        return ContextOverflowError(
            f"The message needs {n_ids} prompt tokens"
            + (f" + {reserve} reserved for the reply" if reserve else "")
            + f" but the context allows {max_context_tokens}"
            + (f" ({n_images} image(s) at {self.num_image_tokens} tokens per image)" if n_images else "")
            + ". Shorten the message, attach fewer images, or lower the reply length."
        )

    def _image_and_key(self, item: Mapping[str, Any], have_features: Callable[[str], bool] | None):
        """(decoded image or None, key, loader). A local file or encoded bytes are keyed by their content (a
        file hashed once per version); when that key's features are cached the image is not decoded at all.
        Decoded inputs (PIL images, arrays) and URLs are keyed by their pixels."""
        source = _image_source(item)

        def load() -> Image.Image:
            return load_image(source, max_pixels=self.max_image_pixels, name=item.get("name"),
                              allow_urls=self.allow_urls)

        path = _local_path(source)
        if path is not None:
            key = self._file_keys.key(path)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            key = content_key(bytes(source))
        else:
            image = load()
            return image, image_key(image), load
        if have_features is not None and have_features(key):
            return None, key, load
        return load(), key, load

    def pixel_values(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values, high_res_pixel_values), or (None, None) without images."""
        if not images:
            return None, None
        return self.image_processor(images)

    def collate(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor | None]:
        """Left-padded batch (pad = eos id, attention_mask 0 on pads); images flattened in batch/text order."""
        length = max(len(p.token_ids) for p in prompts)
        pad = self.tokenizer.pad_id
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, p in enumerate(prompts):
            n = len(p.token_ids)
            input_ids[row, length - n :] = torch.tensor(p.token_ids, dtype=torch.long)
            attention_mask[row, length - n :] = 1
        pixel_values, high_res_pixel_values = self.pixel_values([im for p in prompts for im in p.images])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "high_res_pixel_values": high_res_pixel_values,
        }

    def __call__(
        self,
        conversations: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        *,
        max_context_tokens: int | None = None,
        reserve_new_tokens: int = 0,
    ) -> dict[str, torch.Tensor | None]:
        """One conversation (list of messages) or a batch (list of conversations) -> dict with `input_ids`,
        `attention_mask`, `pixel_values`, `high_res_pixel_values` (the last two None without images)."""
        if not conversations:
            raise ValueError("no conversation given")
        batch = [conversations] if isinstance(conversations[0], Mapping) else list(conversations)
        prompts = [
            self.prepare(c, max_context_tokens=max_context_tokens, reserve_new_tokens=reserve_new_tokens) for c in batch
        ]
        return self.collate(prompts)


# --------------------------------------------------------------------------------------------------
# Hub files
# --------------------------------------------------------------------------------------------------


def write_processor_files(out_dir: Path, num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS, hybrid: bool = True) -> None:
    """Write `preprocessor_config.json`, `processor_config.json` and `chat_template.jinja` as the hub repo has
    them (HF conversion script values; `hybrid=False`: the 1.3B model's processor). Together with
    `dsvl.text.write_tiny_tokenizer` the directory loads with `transformers.AutoProcessor.from_pretrained`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "preprocessor_config.json", preprocessor_config(hybrid))
    _write_json(
        out_dir / "processor_config.json",
        {"num_image_tokens": num_image_tokens,
         "processor_class": PROCESSOR_CLASS if hybrid else PROCESSOR_CLASS_SIGLIP_ONLY},
    )
    # transformers >= 4.52 saves a processor's template as a raw Jinja file (no JSON escaping).
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
