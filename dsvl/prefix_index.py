"""Automatic prefix reuse for stateless API clients.

An OpenAI-style client sends the whole conversation with every request. The engine already reuses a
session's KV cache and image features for whatever prefix a new request shares with that session; what a
stateless client lacks is the session id. `PrefixIndex` supplies it: after each answer it records the
conversation (messages + the answer) under a chained hash of its messages' canonical content (text, and
images by content hash), and a later request whose messages extend a recorded conversation gets that
conversation's session. The index is only a hint: the engine compares token ids and image keys itself, so
a wrong or stale guess costs a prefill, never a wrong answer. Bounded: least recently used entries go first
(and the engine keeps only its few most recent sessions' caches anyway)."""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from typing import Sequence


def chain(digests: Sequence[str]) -> list[str]:
    """Key of every prefix: out[k] identifies messages[:k + 1] (order and content)."""
    out, h = [], ""
    for d in digests:
        h = hashlib.sha256(f"{h}|{d}".encode()).hexdigest()
        out.append(h)
    return out


class PrefixIndex:
    """Conversation-prefix key -> engine session id. Used from one thread (the server's event loop)."""

    def __init__(self, capacity: int = 1024, prefix: str = "api-") -> None:
        self.capacity = max(1, capacity)
        self._keys: OrderedDict[str, str] = OrderedDict()
        self._ids = (f"{prefix}{i}" for i in itertools.count(1))

    def session_for(self, digests: Sequence[str]) -> tuple[str, int]:
        """(session id, number of leading messages it is known to hold): the session of the longest recorded
        prefix of these messages, else a new session (0)."""
        keys = chain(digests)
        for k in range(len(keys) - 1, -1, -1):
            sid = self._keys.get(keys[k])
            if sid is not None:
                self._keys.move_to_end(keys[k])
                return sid, k + 1
        return next(self._ids), 0

    def record(self, digests: Sequence[str], session_id: str) -> None:
        """The session now holds these messages (a request's, and then the same plus the answer)."""
        if not digests:
            return
        key = chain(digests)[-1]
        self._keys[key] = session_id
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)
