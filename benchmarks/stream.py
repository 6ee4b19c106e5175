"""Per-update cost of streaming transcription: incremental vs re-feeding everything (the official algorithm).

    python -m benchmarks.stream --model small --stream-seconds 10,20                 # a quick look
    python -m benchmarks.stream --stream-seconds 10,60,300                           # the full size (0.6B)
    python -m benchmarks.stream --stream-seconds 10,60,300 --empty-prefix            # the audio part alone

For each stream length L and each mode, a stream is brought to L − chunk seconds (one update over that audio,
which fills the mode's caches and gives the model a text to continue), then ``--updates`` chunk updates are timed
one by one as ``streaming_transcribe`` runs them. Per update: 1-s encoder chunks encoded, windows recomputed
because the log-mel clamp moved, prompt tokens prefilled and kept, tokens generated, and wall time without
compilation (programs are compiled in the warm-up or their compile time is subtracted). ``incremental`` is
``Qwen3ASRModel``'s streaming; ``refeed`` runs the same programs with nothing kept (every window encoded and the
whole prompt prefilled at every update, as the official code does).

With random weights the model never ends its output, so every update generates ``--max-new-tokens`` and the text
prefix grows by that much per update (real speech: 3–4 tokens per second). ``--empty-prefix`` sets
``unfixed_chunk_num`` past the chunk count, so no update gets a prefix: that isolates the audio part.

The checkpoint: ``--model asr-0.6b`` (default) builds the released Qwen3-ASR-0.6B config with random weights once
under --workdir (the test extra's official code builds it); ``--model small`` the test suite's tiny config;
``--checkpoint DIR`` uses a checkpoint dir. The load average (1/5/15 min) is printed with the table: the
figures mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from benchmarks import common
from benchmarks.common import SAMPLE_RATE


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser("benchmarks.stream", __doc__)
    common.add_streaming_arguments(parser)
    parser.add_argument("--stream-seconds", default="10,60,300",
                        help="comma-separated stream lengths (default %(default)s)")  # fmt: skip
    parser.add_argument("--updates", type=int, default=2, help="timed updates per length and mode (median)")
    parser.add_argument("--modes", default="incremental,refeed", help="modes to run (default %(default)s)")
    return parser


def measure(transcriber, samples: np.ndarray, args: argparse.Namespace) -> list:
    """Warm a stream up to len(samples) − (updates · chunk) seconds in one update, then time each remaining
    chunk's update; the timed updates' ``UpdateStats`` with compile time left out."""
    import dataclasses

    chunk = round(args.chunk_seconds * SAMPLE_RATE)
    timed_samples = args.updates * chunk
    unfixed = 1 << 30 if args.empty_prefix else 2
    state = transcriber.init_state(unfixed_chunk_num=unfixed, chunk_size_sec=args.chunk_seconds)
    warm = len(samples) - timed_samples
    transcriber.warm_start(state, samples[:warm])
    results = []
    for start in range(warm, len(samples), chunk):
        compiled = transcriber.engine.programs.seconds
        transcriber.transcribe(samples[start : start + chunk], state)
        stats = state.updates[-1].stats
        spent = transcriber.engine.programs.seconds - compiled
        results.append(dataclasses.replace(stats, seconds=stats.seconds - spent))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lengths = [float(s) for s in args.stream_seconds.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("incremental", "refeed") for m in modes):
        raise SystemExit("--modes takes incremental and/or refeed")
    modes.sort(key=lambda mode: mode != "refeed")  # the baseline first, for the speed-up column

    from qasr_jax.asr import Qwen3ASRModel
    from qasr_jax.streaming import StreamingTranscriber

    path = common.checkpoint_dir(args)
    asr = Qwen3ASRModel.from_pretrained(path, max_new_tokens=args.max_new_tokens, dtype=args.dtype)
    transcribers = {
        mode: StreamingTranscriber(
            asr.config,
            asr.params,
            asr.tokenizer,
            asr.engine(),
            lambda _: args.max_new_tokens,
            incremental=mode == "incremental",
        )
        for mode in modes
    }
    print(f"# {path}; chunk {args.chunk_seconds:g} s; budget {args.max_new_tokens} tokens; "
          f"{'no text prefix' if args.empty_prefix else 'official prefix rule'}; load average before: "
          f"{common.load_average()}", flush=True)  # fmt: skip
    header = (
        "stream s",
        "mode",
        "enc chunks",
        "recomputed",
        "prefilled",
        "kept",
        "generated",
        "wall s",
        "speed-up",
    )
    rows = []
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    for length in lengths:
        samples = common.speech_clip(length)
        walls = {}
        for mode in modes:
            stats = measure(transcribers[mode], samples, args)
            last = stats[-1]
            walls[mode] = statistics.median(s.seconds for s in stats)
            speedup = ""
            if mode == "incremental" and "refeed" in walls:
                speedup = f"{walls['refeed'] / walls[mode]:.1f}x"
            row = (f"{length:g}", mode, str(last.encoder_chunks), str(last.windows_recomputed),
                   str(last.prefilled_tokens), str(last.reused_tokens), str(last.generated_tokens),
                   f"{walls[mode]:.3f}", speedup)  # fmt: skip
            rows.append(row)
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"# load average after: {common.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
