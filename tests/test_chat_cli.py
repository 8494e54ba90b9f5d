"""`python -m dsvl chat` as a person uses it from a shell: a one-shot question about two images, and an
interactive session driven through a pipe (follow-ups reuse the cache, /image, /reset, /exit)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from servehelpers import CAT, CUP, REPO

from dsvl.chat import split_items


def run_chat(checkpoint, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dsvl", "chat", "--model", str(checkpoint), "--device", "cpu", "--dtype", "float32",
           "--quantization", "none", "--temperature", "0", "--max-new-tokens", "6", "--stats", *args]
    return subprocess.run(cmd, cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300)


def stats(stderr: str) -> list[tuple[int, int]]:
    """(prompt tokens, tokens from cache) of each answer."""
    return [(int(a), int(b)) for a, b in re.findall(r"\[(\d+) prompt tokens, (\d+) from cache", stderr)]


def test_one_shot_with_two_images_streams_one_answer(tiny_checkpoint):
    r = run_chat(tiny_checkpoint, str(CAT), str(CUP), "Compare the two pictures.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.endswith("\n")
    [(prompt, cached)] = stats(r.stderr)
    assert prompt > 2 * 576 and cached == 0


def test_interactive_session_through_a_pipe(tiny_checkpoint):
    script = f"Hello\n/image {CAT}\nWhat is in the picture?\nAnd the colour?\n/image /no/such.png\n/reset\nHi\n/exit\nnever\n"
    r = run_chat(tiny_checkpoint, stdin=script)
    assert r.returncode == 0, r.stderr
    s = stats(r.stderr)
    assert len(s) == 4, r.stderr  # "never" after /exit is not answered
    assert s[1][0] > s[0][0] + 576 and s[1][1] >= s[0][0] - 1  # the image joins; the first turn comes from cache
    assert s[2][1] >= s[1][0]  # the follow-up re-reads neither the image nor the earlier turns
    assert s[3][1] == 0 and s[3][0] < 576  # /reset: a new conversation without the image
    assert "No such image file: /no/such.png" in r.stderr
    assert not any(w in r.stdout for w in ("New conversation", "attached", "prompt tokens", "Commands"))  # answers only


def test_arguments_split_into_images_and_question(tmp_path):
    assert split_items([str(CAT), "What is it?"]) == ([CAT], "What is it?")
    assert split_items([str(CAT)]) == ([CAT], None)
    assert split_items([]) == ([], None)
    with pytest.raises(SystemExit, match="No such image file"):
        split_items([str(tmp_path / "missing.png"), "Question?"])
    with pytest.raises(SystemExit, match="No such image file"):
        split_items([str(CAT), str(tmp_path / "missing.jpg")])
