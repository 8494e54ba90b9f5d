"""`python -m dsvl chat IMAGE... "question"`: one answer streamed to stdout; without a question, an
interactive chat on stdin (follow-ups reuse the engine's cache). Commands: /image PATH attaches an image to
the next question, /reset starts over, /exit (or end of input) quits. Ctrl-C stops an answer.

Answers go to stdout and nothing else does (prompts, notices and --stats go to stderr), so the output can
be piped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from .cli_common import add_model_flags, load_engine

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
HELP = "Commands: /image PATH (attach to the next question), /reset (new conversation), /exit. Ctrl-C stops an answer."
SESSION = "terminal"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsvl chat", description="Chat with the model in the terminal.")
    p.add_argument("items", nargs="*", metavar="IMAGE... [QUESTION]",
                   help="image files, then the question; without a question the chat is interactive")
    add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print each answer's token counts and speed to stderr")
    return p


def split_items(items: list[str]) -> tuple[list[Path], str | None]:
    """(images, question or None). The last item is the question unless it is a file; every other item must
    be an existing file."""
    question = None
    if items and not Path(items[-1]).is_file():
        if items[-1].lower().endswith(IMAGE_SUFFIXES) and " " not in items[-1]:
            raise SystemExit(f"No such image file: {items[-1]}")
        question = items.pop()
    missing = [i for i in items if not Path(i).is_file()]
    if missing:
        raise SystemExit(f"No such image file: {missing[0]}")
    return [Path(i) for i in items], question


class Chat:
    """One conversation with the engine: the messages so far and the images waiting for the next question."""

    def __init__(self, engine: Any, params: dict, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 show_stats: bool = False) -> None:
        self.engine, self.params, self.out, self.err, self.show_stats = engine, params, out, err, show_stats
        self.messages: list[dict] = []
        self.pending: list[Path] = []

    def ask(self, question: str) -> bool:
        """Stream the answer to `question` (with the pending images); False when the request was refused."""
        content = [{"type": "image", "path": str(p)} for p in self.pending] + [{"type": "text", "text": question}]
        turn = {"role": "user", "content": content}
        try:
            stream = self.engine.stream([*self.messages, turn], session_id=SESSION, **self.params)
        except ValueError as e:  # dsvl.ImageError, dsvl.ContextOverflowError, a bad sampling setting
            print(f"Refused: {e}", file=self.err, flush=True)
            return False
        try:
            for delta in stream:
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            print(" [stopped]", file=self.err, flush=True)
        finally:
            stream.close()
        self.out.write("\n")
        self.out.flush()
        self.messages += [turn, {"role": "assistant", "content": stream.text}]
        self.pending = []
        if self.show_stats:
            s = stream.stats
            print(f"[{s.prompt_tokens} prompt tokens, {s.reused_tokens} from cache, {s.new_tokens} new, first token "
                  f"{s.ttft_s or 0:.2f} s, {s.decode_tokens_per_s or 0:.1f} tokens/s, {s.stop_reason}]",
                  file=self.err, flush=True)
        return True

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.engine.end_session(SESSION)
            self.messages, self.pending = [], []
            print("New conversation.", file=self.err, flush=True)
        elif name == "/image":
            path = Path(arg.strip()).expanduser()
            if not arg.strip() or not path.is_file():
                print(f"No such image file: {arg.strip() or '(none given)'}", file=self.err, flush=True)
            else:
                self.pending.append(path)
                print(f"Image {len(self.pending)} attached to the next question: {path.name}", file=self.err,
                      flush=True)
        else:
            print(HELP, file=self.err, flush=True)
        return True

    def interact(self, stdin: TextIO = sys.stdin) -> None:
        tty = stdin.isatty()
        print(HELP, file=self.err, flush=True)
        while True:
            if tty:
                print("> ", end="", file=self.err, flush=True)
            try:
                line = stdin.readline()
            except KeyboardInterrupt:
                print(file=self.err)
                continue
            if not line:
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.ask(line)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    images, question = split_items(list(args.items))
    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be positive")
    engine = load_engine(args)
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    chat = Chat(engine, params, show_stats=args.stats)
    chat.pending = images
    if question is not None:
        raise SystemExit(0 if chat.ask(question) else 1)
    chat.interact()
