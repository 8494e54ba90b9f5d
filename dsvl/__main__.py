"""`python -m dsvl serve ...` (OpenAI-compatible API) and `python -m dsvl chat ...` (terminal chat)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m dsvl {serve,chat} [flags]

  serve   the model behind an OpenAI-compatible API (/v1/chat/completions)
  chat    IMAGE... "question" streams one answer; without a question, an interactive chat

`python -m dsvl serve --help` and `python -m dsvl chat --help` list the flags."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "serve":
        from .serve import main as run
    elif command == "chat":
        from .chat import main as run
    else:
        print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if command in ("-h", "--help") else 2)
    run(rest)


if __name__ == "__main__":
    main()
