"""``python -m infer align AUDIO TEXT_OR_FILE [--model DIR|NAME] --language L``: word timestamps for one recording.

Writes JSON (words with start/end seconds), SRT or WebVTT subtitles, or a label track (txt) to stdout or
``--output``. The format defaults to the output file's extension, else JSON. Exit status: 0 on success, 1 when
the pair cannot be aligned or the model cannot be loaded (the reason goes to stderr), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from infer.defaults import REVISION_HELP, model_help
from qasr_jax import formats
from qasr_jax.errors import QasrError

_EXTENSION_FORMATS = {".json": "json", ".srt": "srt", ".vtt": "vtt", ".txt": "txt"}


def add_cue_arguments(parser: argparse.ArgumentParser) -> None:
    """The subtitle cue options (shared by every program that writes SRT/WebVTT)."""
    defaults = formats.CueOptions()
    group = parser.add_argument_group("subtitle cues (srt, vtt)")
    group.add_argument("--max-cue-seconds", type=float, default=defaults.max_duration,
                       help="longest cue (default %(default)s)")  # fmt: skip
    group.add_argument("--max-line-chars", type=int, default=defaults.max_chars_per_line,
                       help="longest line in characters (default %(default)s)")  # fmt: skip
    group.add_argument("--max-lines", type=int, default=defaults.max_lines,
                       help="lines per cue (default %(default)s)")  # fmt: skip
    group.add_argument("--pause-seconds", type=float, default=defaults.max_pause,
                       help="a pause this long between words starts a new cue (default %(default)s)")  # fmt: skip
    group.add_argument("--min-cue-seconds", type=float, default=defaults.min_duration,
                       help="shorter cues are extended where there is room (default %(default)s)")  # fmt: skip
    group.add_argument("--no-sentence-split", action="store_true",
                       help="do not end cues at sentence ends")  # fmt: skip


def cue_options(args: argparse.Namespace) -> formats.CueOptions:
    return formats.CueOptions(
        max_duration=args.max_cue_seconds,
        max_chars_per_line=args.max_line_chars,
        max_lines=args.max_lines,
        max_pause=args.pause_seconds,
        split_sentences=not args.no_sentence_split,
        min_duration=args.min_cue_seconds,
    )


def output_format(requested: str | None, output: str | None) -> str:
    """The requested format, else the one the output file's extension names, else JSON."""
    if requested:
        return requested
    if output:
        return _EXTENSION_FORMATS.get(os.path.splitext(output)[1].lower(), "json")
    return "json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infer align",
        description="Word timestamps for a recording and its transcript (Qwen3-ForcedAligner).",
    )
    parser.add_argument("audio", help="audio file (wav, flac, ogg, mp3, ...)")
    parser.add_argument("text", metavar="TEXT_OR_FILE",
                        help="the transcript, or a UTF-8 text file holding it, or - for stdin")  # fmt: skip
    parser.add_argument("--model", metavar="DIR|NAME",
                        help=f"Qwen3-ForcedAligner checkpoint: {model_help(aligner=True)} (default: the demo "
                             "aligner under models/, which knows only synthetic English and German speech)")  # fmt: skip
    parser.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    parser.add_argument("--language", required=True,
                        help="language of the transcript, e.g. English, Chinese, Japanese")  # fmt: skip
    parser.add_argument("--format", choices=formats.FORMATS,
                        help="output format (default: from --output's extension, else json)")  # fmt: skip
    parser.add_argument("--output", help="file to write (default: stdout)")
    parser.add_argument("--compilation-cache", metavar="DIR|off", default=None,
                        help="JAX's persistent compilation cache: a directory, or off (default: $QASR_COMPILATION_CACHE "
                             "or ~/.cache/qasr-jax/xla), so a second run compiles nothing")  # fmt: skip
    parser.add_argument("--weights-cache", metavar="DIR|off", default=None,
                        help="converted weights, kept so that a second run maps them instead of converting: a "
                             "directory, or off (default: $QASR_WEIGHTS_CACHE or ~/.cache/qasr-jax/weights)")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="params and compute dtype (default %(default)s)")  # fmt: skip
    add_cue_arguments(parser)
    return parser


def read_text(argument: str) -> str:
    """The transcript: stdin for "-", a file's contents when the argument names a file, else the argument."""
    if argument == "-":
        return sys.stdin.read()
    if os.path.isfile(argument):
        with open(argument, encoding="utf-8") as handle:
            return handle.read()
    return argument


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = cue_options(args)
    except ValueError as error:
        parser.error(str(error))
    if args.revision and not args.model:
        parser.error("--revision needs --model NAME")
    fmt = output_format(args.format, args.output)
    try:
        text = read_text(args.text)
    except (OSError, UnicodeDecodeError) as error:
        print(f"error: cannot read the transcript {args.text}: {error}", file=sys.stderr)
        return 1

    from infer.defaults import model_or_demo
    from qasr_jax.aligner import Qwen3ForcedAligner

    try:
        model_dir = model_or_demo(args.model, aligner=True)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        aligner = Qwen3ForcedAligner.from_pretrained(
            model_dir,
            dtype=args.dtype,
            compilation_cache=args.compilation_cache,
            weights_cache=args.weights_cache,
            revision=args.revision,
        )
        (result,) = aligner.align(args.audio, text, args.language, strict=True)
    except QasrError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    rendered = formats.render(
        fmt,
        result,
        text=text.strip(),
        language=args.language,
        options=options,
        metadata={"audio": args.audio},
    )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(rendered)
    else:
        sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
