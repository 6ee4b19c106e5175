"""Forced-alignment throughput, ours vs the official PyTorch aligner, on the same random-weight checkpoint.

    python -m infer.bench_aligner [--aligner aligner-0.6b] [--clip-seconds 30] [--batch-sizes 1,8] [--repeats 1]

Builds (once, cached under --workdir) a checkpoint at the released ForcedAligner-0.6B config with random weights
using the official code, then aligns batches of 30 s speech clips (espeak-ng speech tiled to length, with the
words it speaks) and reports audio-seconds aligned per second of wall time at each batch size, for
``qasr_jax.aligner.Qwen3ForcedAligner`` (after one untimed call that compiles the batch's program) and the
official ``Qwen3ForcedAligner.align`` as it runs on this machine, with the ratio ours/official. Needs the test
extra (torch, transformers, qwen-asr) and espeak-ng.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

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
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per batch size, median reported")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="our compute dtype"
    )
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "qasr_bench"),
                        help="where the random-weight checkpoint is cached")  # fmt: skip
    parser.add_argument("--skip-official", action="store_true", help="time only ours")
    parser.add_argument("--official-windows", action="store_true",
                        help="run the official encoder with its attention windows wired in (it ignores them on CPU)")  # fmt: skip


def _defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser.parse_args([])


def _median_seconds(call: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speech_clip(seconds: float) -> tuple[np.ndarray, str]:
    """``seconds`` of espeak-ng English speech (a paragraph repeated) and the words it speaks (16 kHz float32)."""
    from tests.support.speech import LONG_EN, synth

    clip = synth(LONG_EN)
    repeats = int(np.ceil(seconds * 16000 / len(clip)))
    samples = np.tile(clip, repeats)[: int(seconds * 16000)]
    words = LONG_EN.split() * repeats
    spoken = max(1, round(len(words) * len(samples) / (len(clip) * repeats)))
    return samples, " ".join(words[:spoken])


def checkpoint_dir(model: str, workdir: str) -> str:
    """The random-weight checkpoint for ``model``, built with the official code on first use."""
    from tests.support import official

    path = os.path.join(workdir, f"{model}-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"building the {model} checkpoint with random weights in {path} ...", file=sys.stderr)
        config = official.real_config(model) if model != "small" else official.small_aligner_config()
        official.build_checkpoint(path, config, seed=0)
    return path


def _ours(path: str, dtype: str, batches: dict[int, tuple[list, list]], repeats: int) -> dict[int, float]:
    from qasr_jax.aligner import Qwen3ForcedAligner

    aligner = Qwen3ForcedAligner.from_pretrained(path, dtype=dtype, max_batch_size=max(batches))
    seconds = {}
    for size, (audios, texts) in batches.items():
        aligner.align(audios, texts, "English", strict=True)  # compiles this batch's program
        seconds[size] = _median_seconds(lambda a=audios, t=texts: aligner.align(a, t, "English"), repeats)
    return seconds


def _official(
    path: str, batches: dict[int, tuple[list, list]], repeats: int, windows: bool
) -> dict[int, float]:
    import contextlib

    import torch
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForcedAligner as OfficialAligner

    from tests.support import official

    torch.set_num_threads(os.cpu_count() or 1)
    aligner = OfficialAligner.from_pretrained(path, dtype=torch.float32)
    seconds = {}
    with official.official_encoder_windows() if windows else contextlib.nullcontext():
        for size, (audios, texts) in batches.items():
            seconds[size] = _median_seconds(
                lambda a=audios, t=texts: aligner.align(audio=a, text=t, language=["English"] * len(a)),
                repeats,
            )
    return seconds


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

    path = checkpoint_dir(options["aligner"], options["workdir"])
    samples, text = speech_clip(clip_seconds)
    # Each clip starts at a different point of the speech so that no two rows are the same.
    clips = [(np.roll(samples, 16000 * k), 16000) for k in range(sizes[-1])]
    batches = {size: (clips[:size], [text] * size) for size in sizes}

    ours = _ours(path, options["dtype"], batches, options["repeats"])
    gc.collect()
    theirs = {}
    if not options["skip_official"]:
        theirs = _official(path, batches, options["repeats"], options["official_windows"])

    rows = []
    for size in sizes:
        audio_seconds = size * clip_seconds
        row = {"batch": size, "ours_audio_s_per_s": audio_seconds / ours[size], "ours_seconds": ours[size]}
        if size in theirs:
            row["official_audio_s_per_s"] = audio_seconds / theirs[size]
            row["official_seconds"] = theirs[size]
            row["ratio"] = theirs[size] / ours[size]
        rows.append(row)

    device = jax.devices()[0]
    print(
        f"\nforced aligner ({options['aligner']}, random weights), ours {options['dtype']} on {device.platform} "
        f"({os.cpu_count()} CPU cores), {clip_seconds:g} s clips of {len(text.split())} words; official fp32 "
        f"{'with' if options['official_windows'] else 'without'} encoder windows"
    )
    print(f"{'batch':>5s} {'ours (audio s/s)':>17s} {'official (audio s/s)':>21s} {'ours/official':>14s}")
    for row in rows:
        theirs_rate = row.get("official_audio_s_per_s", float("nan"))
        ratio = row.get("ratio", float("nan"))
        print(f"{row['batch']:5d} {row['ours_audio_s_per_s']:17.2f} {theirs_rate:21.2f} {ratio:14.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.bench_aligner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
