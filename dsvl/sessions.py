"""Per-conversation state: which token ids (and images) a session's KV cache holds, and how much of a new prompt
can reuse it.

Every ``session_id`` keeps a KV cache plus the ids whose keys/values it holds; a new request reuses the longest
common prefix of (id, image) pairs and prefills only what is new. The replies the model generated are spliced back
in place of their re-tokenised text, so a follow-up question reuses the whole conversation.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from .llama import KVCache


@dataclass
class Reply:
    start: int  # index in the session's sequence where the reply begins (right after "Assistant:")
    ids: list[int]  # generated ids whose text is the emitted text (no EOS, no stop-string tail)
    text: str


@dataclass
class Session:
    cache: KVCache | None  # None: holds no memory (new, evicted, or between anonymous requests)
    ids: list[int] = field(default_factory=list)  # tokens whose keys/values are in `cache`, in order
    keys: list[str | None] = field(default_factory=list)  # image key per position (None = text)
    replies: list[Reply] = field(default_factory=list)

    def reset(self) -> None:
        self.ids, self.keys, self.replies = [], [], []


class LRU(OrderedDict):
    """A dict that remembers use order and drops the least recently used entries past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(0, capacity)

    def get_touch(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value):
        """Insert; returns the evicted values (oldest first)."""
        self[key] = value
        self.move_to_end(key)
        evicted = []
        while len(self) > self.capacity:
            evicted.append(self.popitem(last=False)[1])
        return evicted


def image_runs(ids: Sequence[int], image_id: int, per_image: int) -> list[int]:
    """Start positions of each image's run of ``per_image`` placeholder ids (adjacent images split evenly)."""
    starts, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == image_id:
            j = i
            while j < n and ids[j] == image_id:
                j += 1
            if (j - i) % per_image:
                raise ValueError(f"a run of {j - i} image tokens at {i} is not a multiple of {per_image}")
            starts.extend(range(i, j, per_image))
            i = j
        else:
            i += 1
    return starts


def position_keys(ids: Sequence[int], image_keys: Sequence[str], image_id: int, per_image: int) -> list[str | None]:
    """Per-position image identity: the 576 placeholders of every image are the same ids, so prefix reuse must
    compare (id, key) pairs or a different image at the same place would be served from a stale cache."""
    keys: list[str | None] = [None] * len(ids)
    starts = image_runs(ids, image_id, per_image)
    if len(starts) != len(image_keys):
        raise ValueError(f"{len(starts)} image runs but {len(image_keys)} image keys")
    for s, k in zip(starts, image_keys):
        keys[s:s + per_image] = [k] * per_image
    return keys


def splice_replies(ids: list[int], keys: list[str | None], session: Session, eos_id: int,
                   decode) -> tuple[list[int], list[str | None], list[Reply]]:
    """Put the ids the model generated back in place of the re-tokenised text of its replies.

    The new prompt tokenises each earlier assistant reply from its text, which may split differently from the ids
    the model produced (and holds in the KV cache). Walking the session's replies in order, each one whose
    preceding tokens match the session's sequence exactly and whose text matches (up to surrounding whitespace,
    which the chat template strips) is replaced by the stored ids + EOS. Returns the new (ids, keys) and the
    replies that still apply."""
    out, out_keys, kept = [], [], []
    p = 0
    for rep in session.replies:
        need = rep.start - len(out)
        if need < 0 or p + need > len(ids):
            break
        if ids[p:p + need] != session.ids[len(out):rep.start] or keys[p:p + need] != session.keys[len(out):rep.start]:
            break
        try:
            e = ids.index(eos_id, p + need)
        except ValueError:
            break
        if decode(ids[p + need:e]).strip() != rep.text.strip():
            break
        out += ids[p:p + need] + rep.ids + [eos_id]
        out_keys += keys[p:p + need] + [None] * (len(rep.ids) + 1)
        kept.append(rep)
        p = e + 1
    return out + ids[p:], out_keys + keys[p:], kept


def reusable_prefix(ids: Sequence[int], keys: Sequence[str | None], session: Session, runs: Sequence[int],
                    per_image: int) -> int:
    """Length of the cached prefix to keep: the longest common prefix of (id, image key) pairs, at most
    ``len(ids) - 1`` (the last prompt token must run to produce logits) and never inside an image."""
    n = min(len(ids) - 1, len(session.ids))
    i = 0
    while i < n and ids[i] == session.ids[i] and keys[i] == session.keys[i]:
        i += 1
    for s in runs:
        if s < i < s + per_image:
            return s
    return i
