"""Forced-alignment throughput, ours vs the official PyTorch aligner, on the same random-weight checkpoint.

    python -m benchmarks.aligner [--aligner aligner-0.6b] [--clip-seconds 30] [--batch-sizes 1,8] [--repeats 1]

Builds (once, cached under --workdir) a checkpoint at the released ForcedAligner-0.6B config with random weights
using the official code, then aligns batches of 30 s speech clips (espeak-ng speech tiled to length, with the
words it speaks) and reports audio-seconds aligned per second of wall time at each batch size, for
``qasr_jax.aligner.Qwen3ForcedAligner`` (its programs compiled beforehand, untimed) and the
official ``Qwen3ForcedAligner.align`` as it runs on this machine, with the ratio ours/official. Needs the test
extra (torch, transformers, qwen-asr) and espeak-ng.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import common

MODELS = ("aligner-0.6b", "small")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aligner", choices=MODELS, default="aligner-0.6b",
                        help="released ForcedAligner-0.6B sizes, or the tiny test config (default %(default)s)")  # fmt: skip
    parser.add_argument(
        "--clip-seconds", type=float, default=30.0, help="length of each clip (default %(default)s)"
    )
    parser.add_argument(
        "--batch-sizes", default="1,8", help="comma-separated batch sizes (default %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed calls per batch size and side, alternating sides; median reported")  # fmt: skip
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="our compute dtype"
    )
    parser.add_argument(
        "--workdir", default=common.WORKDIR, help="where the random-weight checkpoint is cached"
    )
    parser.add_argument("--skip-official", action="store_true", help="time only ours")
    parser.add_argument("--official-windows", action="store_true",
                        help="run the official encoder with its attention windows wired in (it ignores them on CPU)")  # fmt: skip


def _defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser.parse_args([])


def _seconds(call: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    call(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def _load_ours(path: str, dtype: str, max_batch_size: int) -> Callable[[list, list], Any]:
    from qasr_jax.aligner import Qwen3ForcedAligner

    aligner = Qwen3ForcedAligner.from_pretrained(path, dtype=dtype, max_batch_size=max_batch_size)

    def align(audios: list, texts: list, compile_only: bool = False) -> Any:
        if compile_only:
            return aligner.precompile(audios, texts, "English")
        return aligner.align(audios, texts, "English", strict=True)

    return align


def _load_official(path: str, windows: bool) -> Callable[[list, list], Any]:
    import torch
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForcedAligner as OfficialAligner

    official = common.official
    torch.set_num_threads(os.cpu_count() or 1)
    aligner = OfficialAligner.from_pretrained(path, dtype=torch.float32)

    def align(audios: list, texts: list) -> Any:
        with official.official_encoder_windows() if windows else contextlib.nullcontext():
            return aligner.align(audio=audios, text=texts, language=["English"] * len(audios))

    return align


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the benchmark and print its table; one row per batch size (audio-seconds per second, both sides).

    Missing attributes of ``args`` take this program's defaults, so a driver can pass a partial namespace.
    """
    options = vars(_defaults()) | {k: v for k, v in vars(args).items() if v is not None}
    sizes = sorted({int(s) for s in str(options["batch_sizes"]).split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--batch-sizes must list positive integers, got {options['batch_sizes']!r}")
    clip_seconds = float(options["clip_seconds"])

    import jax

    model = "small-aligner" if options["aligner"] == "small" else options["aligner"]
    path = common.random_checkpoint(model, options["workdir"])
    samples, text = common.speech_and_text(clip_seconds)
    # Each clip starts at a different point of the speech so that no two rows are the same.
    clips = [(np.roll(samples, 16000 * k), 16000) for k in range(sizes[-1])]
    batches = {size: (clips[:size], [text] * size) for size in sizes}

    aligners = {"ours": _load_ours(path, options["dtype"], sizes[-1])}
    if not options["skip_official"]:
        aligners["official"] = _load_official(path, options["official_windows"])
    seconds: dict[str, dict[int, list[tuple[float, float]]]] = {
        name: {n: [] for n in sizes} for name in aligners
    }
    for size in sizes:
        audios, texts = batches[size]
        aligners["ours"](audios, texts, compile_only=True)
        # Alternating the two sides gives both the same share of a machine that others may be using.
        for _ in range(max(1, options["repeats"])):
            for name, align in aligners.items():
                seconds[name][size].append(_seconds(align, audios, texts))

    rows = []
    for size in sizes:
        audio_seconds = size * clip_seconds
        row: dict[str, Any] = {"batch": size, "audio_seconds": audio_seconds}
        for name, times in seconds.items():
            wall = statistics.median(t for t, _ in times[size])
            cpu = statistics.median(c for _, c in times[size])
            row[f"{name}_wall_s"], row[f"{name}_cpu_s"] = wall, cpu
            row[f"{name}_audio_s_per_s"] = audio_seconds / wall
            row[f"{name}_audio_s_per_cpu_s"] = audio_seconds / cpu
        if "official" in seconds:
            row["ratio"] = row["official_wall_s"] / row["ours_wall_s"]
            row["cpu_ratio"] = row["official_cpu_s"] / row["ours_cpu_s"]
        rows.append(row)

    device = jax.devices()[0]
    print(
        f"\nforced aligner ({options['aligner']}, random weights), ours {options['dtype']} on {device.platform} "
        f"({os.cpu_count()} CPU cores), {clip_seconds:g} s clips of {len(text.split())} words; official fp32 "
        f"{'with' if options['official_windows'] else 'without'} encoder windows"
    )
    nan = float("nan")
    print(f"{'':5s} {'audio-seconds per second':^37s}   {'audio-seconds per CPU-second':^37s}".rstrip())
    print((f"{'batch':>5s}" + f" {'ours':>10s} {'official':>10s} {'ours/official':>14s}  " * 2).rstrip())
    for row in rows:
        cells = [f"{row['batch']:5d}"]
        for unit, ratio in (("audio_s_per_s", "ratio"), ("audio_s_per_cpu_s", "cpu_ratio")):
            cells.append(f"{row[f'ours_{unit}']:10.2f} {row.get(f'official_{unit}', nan):10.2f} "
                         f"{row.get(ratio, nan):14.2f} ")  # fmt: skip
        print(" ".join(cells).rstrip())
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.aligner", __doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
