"""Audio decoding throughput and memory, ours vs the official loader, in the same run.

    python -m benchmarks.decode [--minutes 10] [--long-hours 2] [--formats wav,flac,mp3,m4a,opus]

For each format a ``--minutes`` long file (44.1 kHz stereo for wav/flac/mp3/m4a, 48 kHz for opus) of espeak-ng
speech is written, then loaded to 16 kHz mono by ``qasr_jax.audio.load_audio`` and by the official
``normalize_audio_input`` (librosa, with its FFmpeg fallback for m4a). Printed: audio-seconds decoded per second
of wall time on one core (the process is pinned to CPU 0), and the load average. Then a ``--long-hours``
MP3 is loaded in a fresh process and its peak resident memory is printed beside the size of the 16 kHz result.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

from benchmarks import common

FORMATS = {
    "wav": ("wav", None, 44100),
    "flac": ("flac", "flac", 44100),
    "mp3": ("mp3", "mp3", 44100),
    "m4a": ("ipod", "aac", 44100),
    "opus": ("ogg", "libopus", 48000),
}


def speech(seconds: float, rate: int) -> np.ndarray:
    """[time, 2] float32: espeak-ng sentences repeated to ``seconds``, the second channel a quieter copy."""
    speech = common.speech
    mono = common.tiled(speech.synth(speech.LONG_EN, sr=rate), int(seconds * rate))
    return np.stack([mono, 0.5 * mono], axis=1)


def write(path: str, fmt: str, samples: np.ndarray, rate: int) -> str:
    container, codec, _ = FORMATS[fmt]
    if codec is None:
        import soundfile as sf

        sf.write(path, samples, rate, subtype="PCM_16")
        return path
    return common.media.encode(path, samples, rate, container, codec)


def peak_memory_child(path: str) -> None:
    """Run in a fresh process: load ``path`` and print peak RSS (MB) and the result's size (MB)."""
    from qasr_jax import audio

    before = common.proc_status_kib("VmRSS") / 1024
    samples = audio.load_audio(path)
    peak = common.proc_status_kib("VmHWM") / 1024  # this process's own peak
    print(f"{before:.0f} {peak:.0f} {samples.nbytes / 2**20:.0f} {len(samples) / 16000:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.decode", __doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--long-hours", type=float, default=2.0, help="0 skips the memory measurement")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--no-official", action="store_true")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {0})

    from qasr_jax import audio

    official = None
    if not args.no_official:
        import importlib.util

        spec = importlib.util.find_spec("qwen_asr")
        utils = os.path.join(spec.submodule_search_locations[0], "inference", "utils.py")
        module_spec = importlib.util.spec_from_file_location("qwen_asr_official_utils", utils)
        official = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(official)

    seconds = args.minutes * 60
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"{'format':8s} {'ours audio-s/s':>15s} {'official audio-s/s':>19s}")
    with tempfile.TemporaryDirectory() as directory:
        for fmt in [f for f in args.formats.split(",") if f]:
            rate = FORMATS[fmt][2]
            path = write(os.path.join(directory, f"speech.{fmt}"), fmt, speech(seconds, rate), rate)
            ours = common.best_seconds(lambda p=path: audio.load_audio(p), 2)
            theirs = float("nan")
            if official:
                theirs = common.best_seconds(lambda p=path: official.normalize_audio_input(p), 2)
            print(
                f"{fmt:8s} {seconds / ours:15.0f} {seconds / theirs:19.0f}   (load {os.getloadavg()[0]:.2f})"
            )
        if args.long_hours > 0:
            long_seconds = args.long_hours * 3600
            long_path = os.path.join(directory, "long.mp3")
            block = speech(600.0, 44100)
            tiled = common.tiled(block, int(long_seconds * 44100))
            common.media.encode(long_path, tiled, 44100, "mp3", "mp3", bit_rate=128000)
            del tiled
            size = os.path.getsize(long_path) / 2**20
            out = common.run_module(
                "benchmarks.decode", "--peak-memory-child", long_path, capture=True
            ).split()
            before, peak, result, decoded = (float(v) for v in out)
            stereo = long_seconds * 44100 * 2 * 4 / 2**20
            print(
                f"{args.long_hours:g} h 44.1 kHz stereo mp3 ({size:.0f} MB, {decoded:.0f} s decoded): peak RSS "
                f"{peak:.0f} MB ({before:.0f} MB before loading); the 16 kHz result is {result:.0f} MB, the "
                f"decoded stereo float32 would be {stereo:.0f} MB   (load {os.getloadavg()[0]:.2f})"
            )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-memory-child":
        peak_memory_child(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
