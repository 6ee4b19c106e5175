"""``python -m infer stream``: live transcription of audio files or of 16 kHz PCM on stdin.

    python -m infer stream talk.wav [--chunk-seconds 2] [--realtime]          # the evolving transcript
    arecord -f S16_LE -r 16000 -c 1 | python -m infer stream -                # a microphone
    ffmpeg -i talk.mkv -f s16le -ac 1 -ar 16000 - | python -m infer stream - --format jsonl

Each file is fed to the model chunk by chunk as if it were live (``--realtime`` waits for each chunk's time to
pass); ``-`` reads headerless s16le mono 16 kHz PCM from stdin until it ends. Text output prints one line per
update (the stream's time and its current text) and a final line per stream; ``--format jsonl`` writes one event
per update: stream id, chunk index, audio seconds, language, text, the fixed prefix (text no later chunk
rewrites), the update's latency and work, whether it is the final one, and the tokens behind the text with their
log-probabilities and their mean (``avg_logprob``; the prefix's tokens as the updates that generated them scored
them).

Exit status: 0 when every stream ran to its end; 1 when the model cannot be loaded or a stream failed (a file
that cannot be read or decoded: the others still run, and the error names it on stderr); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import numpy as np

from infer.defaults import REVISION_HELP, model_help

SAMPLE_RATE = 16000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infer stream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="audio files, or - for s16le 16 kHz PCM on stdin"
    )
    parser.add_argument("--model", metavar="DIR|NAME",
                        help=f"Qwen3-ASR checkpoint: {model_help()} (default: the demo model)")  # fmt: skip
    parser.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    parser.add_argument(
        "--chunk-seconds", type=float, default=2.0, metavar="S", help="update period (default 2)"
    )
    parser.add_argument("--realtime", action="store_true", help="feed files no faster than they play")
    parser.add_argument("--format", choices=("text", "jsonl"), default="text", help="output (default text)")
    parser.add_argument("--language", metavar="L", help="force the language (default: detected)")
    parser.add_argument("--context", metavar="TEXT", default="", help="context text for the system prompt")
    parser.add_argument("--unfixed-chunk-num", type=int, default=2, metavar="N",
                        help="chunks decoded without a text prefix (default 2)")  # fmt: skip
    parser.add_argument("--unfixed-token-num", type=int, default=5, metavar="N",
                        help="tokens of the previous text rewritten at each chunk (default 5)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="token budget per update (default: grows with the stream's length)")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    return parser


def pieces_of_file(path: str, chunk: int, realtime: bool) -> Iterator[np.ndarray]:
    """The decoded file (16 kHz mono) in pieces of ``chunk`` samples, at playback pace with ``realtime``."""
    from qasr_jax import audio as audio_io

    samples = audio_io.load_audio(path)
    started = time.monotonic()
    for start in range(0, len(samples), chunk):
        if realtime:
            time.sleep(max(0.0, started + (start + chunk) / SAMPLE_RATE - time.monotonic()))
        yield samples[start : start + chunk]


def pieces_of_stdin(stream: Any, chunk: int) -> Iterator[np.ndarray]:
    """s16le PCM from a binary stream, in pieces of up to ``chunk`` samples as they arrive."""
    pending = b""
    while True:
        data = stream.read1(2 * chunk) if hasattr(stream, "read1") else stream.read(2 * chunk)
        if not data:
            break
        pending += data
        whole = len(pending) // 2 * 2
        if whole:
            yield np.frombuffer(pending[:whole], dtype="<i2").astype(np.int16)
            pending = pending[whole:]


def event(stream_id: str, update: Any, fixed: str) -> dict[str, Any]:
    return {
        "stream": stream_id,
        "chunk": update.chunk_index,
        "audio_seconds": round(update.audio_seconds, 3),
        "language": update.language,
        "text": update.text,
        "fixed": fixed,
        "final": update.final,
        "latency": round(update.stats.seconds, 4),
        "encoder_chunks": update.stats.encoder_chunks,
        "prefilled_tokens": update.stats.prefilled_tokens,
        "avg_logprob": update.avg_logprob,
        "token_ids": list(update.token_ids),
        "logprobs": list(update.logprobs),
    }


def run_stream(
    model: Any, stream_id: str, pieces: Iterator[np.ndarray], args: argparse.Namespace, out: TextIO
):
    """Feed one stream; print its updates as they happen. Returns the final state."""
    from qasr_jax.streaming import fixed_text

    state = model.init_streaming_state(
        context=args.context, language=args.language, unfixed_chunk_num=args.unfixed_chunk_num,
        unfixed_token_num=args.unfixed_token_num, chunk_size_sec=args.chunk_seconds,
    )  # fmt: skip
    shown = 0

    def show() -> None:
        nonlocal shown
        for update in state.updates[shown:]:
            fixed = fixed_text(update.prefix, state.force_language)
            if args.format == "jsonl":
                out.write(json.dumps(event(stream_id, update, fixed), ensure_ascii=False) + "\n")
            elif update.final:
                out.write(f"[{stream_id}] final ({update.language or 'unknown'}): {update.text}\n")
            else:
                out.write(f"[{stream_id}] {update.audio_seconds:7.1f}s  {update.text}\n")
            out.flush()
        shown = len(state.updates)

    for piece in pieces:
        model.streaming_transcribe(piece, state)
        show()
    model.finish_streaming_transcribe(state)
    show()
    if (
        not state.updates or not state.updates[-1].final
    ):  # the stream ended on a chunk boundary: no tail update
        if args.format == "jsonl":
            record = {"stream": stream_id, "chunk": state.chunk_id, "audio_seconds": round(len(state.audio_accum) / SAMPLE_RATE, 3),
                      "language": state.language, "text": state.text, "fixed": state.text, "final": True, "latency": 0.0}  # fmt: skip
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write(f"[{stream_id}] final ({state.language or 'unknown'}): {state.text}\n")
        out.flush()
    return state


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.chunk_seconds > 0:
        parser.error("--chunk-seconds must be positive")
    if args.files.count("-") > 1:
        parser.error("stdin (-) can be given once")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.revision and not args.model:
        parser.error("--revision needs --model NAME")
    if args.language:
        from qasr_jax.text import normalize_language

        try:
            args.language = normalize_language(args.language)
        except ValueError as error:
            parser.error(str(error))

    from infer.defaults import model_or_demo
    from qasr_jax.asr import Qwen3ASRModel
    from qasr_jax.errors import QasrError

    try:
        model = Qwen3ASRModel.from_pretrained(
            model_or_demo(args.model),
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            revision=args.revision,
        )
    except (QasrError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    chunk = max(1, round(args.chunk_seconds * SAMPLE_RATE))
    failures = 0
    for path in args.files:
        try:
            if path == "-":
                run_stream(model, "stdin", pieces_of_stdin(sys.stdin.buffer, chunk), args, sys.stdout)
            else:
                run_stream(model, path, pieces_of_file(path, chunk, args.realtime), args, sys.stdout)
        except QasrError as error:  # a bad file fails alone
            failures += 1
            print(f"error: {path}: {error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
