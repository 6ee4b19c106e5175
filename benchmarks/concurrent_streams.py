"""How many live streams this machine keeps real-time: ``StreamScheduler`` steps over N concurrent streams.

    python -m benchmarks.concurrent_streams --model small --streams 1,2,4,8          # a quick look
    python -m benchmarks.concurrent_streams --streams 1,2,4,8                        # ASR-0.6B config, random weights

For each N, N streams (the same speech from different offsets) are each brought to ``--stream-seconds`` minus
``--updates`` chunks in one update (``warm_start``), then every stream gets its next chunk at once and each step
(the N updates batched: encoder windows, prefill, greedy decoding) is timed, less compile time; the mean over
``--updates`` steps is reported (4 steps of 2 s: one 8-s encoder window's cycle, whose first update also
recomputes the window just completed). At steady state each stream's update waits for that step, so N streams
are real-time when a step takes at most one chunk's duration on average. Beside it: the same updates run one stream at a time
(``StreamingTranscriber``, N × one update), which is what one stream per call gives — the official code serves one
stream per vLLM call.

Token budget: ``--max-new-tokens`` per update (random weights never end their output, so every update generates
all of them, and the text prefix grows by that much less the rollback per update; ``--empty-prefix`` gives no
update a prefix, which isolates the audio part). The load average (1/5/15 min) is printed: the figures mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks import common
from benchmarks.common import SAMPLE_RATE, load_average


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser("benchmarks.concurrent_streams", __doc__)
    common.add_streaming_arguments(parser)
    parser.add_argument("--streams", default="1,2,4,8", help="concurrent stream counts (default %(default)s)")
    parser.add_argument("--stream-seconds", type=float, default=24.0,
                        help="stream length at the timed updates (default %(default)s)")  # fmt: skip
    parser.add_argument("--updates", type=int, default=4, help="timed steps per stream count (mean)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    if not counts or counts[0] < 1:
        raise SystemExit("--streams takes positive counts")

    from qasr_jax.asr import Qwen3ASRModel
    from qasr_jax.serve.streams import StreamScheduler

    path = common.checkpoint_dir(args)
    asr = Qwen3ASRModel.from_pretrained(path, max_new_tokens=args.max_new_tokens, dtype=args.dtype)
    transcriber = asr.streamer
    programs = transcriber.engine.programs
    chunk = round(args.chunk_seconds * SAMPLE_RATE)
    total = round(args.stream_seconds * SAMPLE_RATE)
    warm = total - args.updates * chunk
    unfixed = {"unfixed_chunk_num": 1 << 30} if args.empty_prefix else {}
    if warm < chunk:
        raise SystemExit("--stream-seconds must leave at least one chunk before the timed updates")
    speech_all = common.speech_clip(args.stream_seconds + 3.0 * max(counts))

    def audio(i: int) -> np.ndarray:
        return speech_all[3 * i * SAMPLE_RATE :][:total]  # stream i starts 3 s further into the speech

    def timed(fn) -> float:
        compiled, started = programs.seconds, time.perf_counter()
        fn()
        return time.perf_counter() - started - (programs.seconds - compiled)

    # One stream at a time: the cost of one update alone (what N streams cost served one per call: N times it).
    # The first pass also compiles what the program cache does not count (the log-mel of each length).
    for _ in range(2):
        state = transcriber.init_state(chunk_size_sec=args.chunk_seconds, **unfixed)
        transcriber.warm_start(state, audio(0)[:warm])
        alone = statistics.mean(
            timed(lambda s=start, st=state: transcriber.transcribe(audio(0)[s : s + chunk], st))
            for start in range(warm, total, chunk)
        )
    prefix = "no text prefix" if args.empty_prefix else "official prefix rule"
    print(f"# {path}; chunk {args.chunk_seconds:g} s; streams at {args.stream_seconds:g} s; budget "
          f"{args.max_new_tokens} tokens; {prefix}; {args.dtype}; load average before: {load_average()}", flush=True)  # fmt: skip
    header = ("streams", "step s", "per stream s", "real-time", "one at a time s", "batched speed-up",
              "prefilled/update", "enc chunks/update")  # fmt: skip
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    sustained = 0
    for n in counts:
        engine = StreamScheduler(transcriber, max_streams=n, max_batch=n)
        streams = [engine.open(chunk_size_sec=args.chunk_seconds, **unfixed) for _ in range(n)]
        for i, stream in enumerate(streams):
            transcriber.warm_start(stream.state, audio(i)[:warm])
        steps = []
        for start in range(warm, total, chunk):
            for i, stream in enumerate(streams):
                engine.feed(stream, audio(i)[start : start + chunk])
            steps.append(timed(engine.step))
        step = statistics.mean(steps)
        updates = [u for s in streams for u in s.updates[1:]]
        real_time = step <= args.chunk_seconds
        if real_time:
            sustained = n
        row = (str(n), f"{step:.3f}", f"{step / n:.3f}", "yes" if real_time else "no", f"{n * alone:.3f}",
               f"{n * alone / step:.2f}x", f"{statistics.mean(u.stats.prefilled_tokens for u in updates):.0f}",
               f"{statistics.mean(u.stats.encoder_chunks for u in updates):.1f}")  # fmt: skip
        print("| " + " | ".join(row) + " |", flush=True)
        for stream in streams:
            engine.close(stream)
    print(f"# one update alone: {alone:.3f} s; concurrent real-time streams ({args.chunk_seconds:g}-s chunks, of "
          f"those tried): {sustained}; load average after: {load_average()}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
