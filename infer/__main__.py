"""``python -m infer COMMAND ...``: ``transcribe`` (speech to text) or ``align`` (word timestamps)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

USAGE = """usage: python -m infer {transcribe,align,stream,serve} ...

commands:
  transcribe  speech to text for audio files or a manifest of them (python -m infer transcribe --help)
  align       word timestamps for one recording and its transcript (python -m infer align --help)
  stream      live transcription of files or of PCM on stdin (python -m infer stream --help)
  serve       OpenAI-compatible transcription server (python -m infer serve --help)

--model takes a local checkpoint directory or a Hugging Face Hub model name such as Qwen/Qwen3-ASR-0.6B (fetched
once into the hub cache; --revision picks a branch, tag or commit; HF_HUB_OFFLINE=1 reads only the cache).
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    # Each command imports its own dependencies only when it runs.
    if command == "transcribe":
        from infer.transcribe import main as command_main
    elif command == "align":
        from infer.align import main as command_main
    elif command == "stream":
        from infer.stream import main as command_main
    elif command == "serve":
        from infer.serve import main as command_main
    else:
        print(f"{USAGE}\nerror: unknown command {command!r}", file=sys.stderr)
        return 2
    return command_main(rest)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # The reader went away (``... | head``): stop quietly, as command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
