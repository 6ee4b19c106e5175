"""Dataset-scale throughput of ``--manifest`` jobs: the planned pipeline vs the previous path, one program.

    python -m benchmarks.manifest [--work-dir DIR] [--files 500] [--batch-size 4] [--max-new-tokens 8]

Builds once under ``--work-dir`` (cached for later runs): a small random checkpoint whose weights matter
(``tests/support/official.py``) and a manifest of ``--files`` recordings of mixed durations, 1 s to 10 min
(espeak-ng sentences joined with 0.2–2 s of silence; wav at 8, 16 and 22.05 kHz and flac at 44.1 kHz, so
decoding includes resampling). Then transcribes the manifest twice, each with a fresh model object and no
persistent compilation cache:

- **planned** (``qasr_jax.batch_jobs``): length-sorted batches over the whole manifest, ``--workers`` threads
  decoding the next batches while the model runs the current one;
- **previous**: the manifest in groups of max(4 × batch, 64) items in file order, each group decoded in the
  model's thread and then sorted and batched (``file_order_groups``, kept here as the baseline).

Reported per path: padding waste (padded audio-seconds the encoder computed over vs real audio-seconds), the time
the device waited for the host (wall time outside the model's generate calls), compile time, and throughput in
audio-seconds per second of wall time, with and without compile time, each with ``os.getloadavg()`` taken when
that run ended (this machine is shared, so the load says how much of it the run had). The two paths' texts are
compared (items are independent of their batch company, so they must agree). Prints a Markdown table and writes
``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from benchmarks import common

SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the quiet river bank today.",
    "Speech recognition turns spoken language into written text.",
    "Modern systems listen to an audio signal and predict the words one token at a time.",
    "They are trained on many thousands of hours of recordings in dozens of languages.",
    "Please remember to bring the blue folder to the meeting on Thursday morning.",
    "The weather will be cloudy in the north with light rain expected by the evening.",
    "Seven large ships sailed slowly past the old lighthouse before sunrise.",
    "Numbers such as forty two and nineteen eighty four are read out in full.",
    "A good recipe needs fresh bread, some butter, and a little patience.",
    "Hi.",
)
# (share of files, shortest, longest seconds): mostly short clips, a long tail up to 10 minutes.
DURATION_MIX = ((0.55, 1.0, 15.0), (0.30, 15.0, 60.0), (0.11, 60.0, 180.0), (0.04, 180.0, 600.0))
# (share of files, sample rate, format)
FORMATS = ((0.4, 16000, "wav"), (0.3, 22050, "wav"), (0.2, 44100, "flac"), (0.1, 8000, "wav"))


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser("benchmarks.manifest", __doc__, epilog=True)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "qasr_bench_manifest"),
                        help="where the checkpoint and audio are built and cached (default %(default)s)")  # fmt: skip
    parser.add_argument(
        "--files", type=int, default=500, help="recordings in the manifest (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the durations and formats")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="decoder rows per batch, both paths (default %(default)s; 10-min rows take ~1.7 GB "
                             "each on the CPU)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=8, metavar="N",
                        help="token budget per chunk (default %(default)s; a random model rarely stops)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="decoding threads of the planned path")
    parser.add_argument("--checkpoint", metavar="DIR", help="use this checkpoint instead of the small one")
    parser.add_argument("--only", choices=("planned", "previous"), default=None, help="run one path only")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    return parser


# --------------------------------------------------------------------------------------------------------------
# Inputs


def draw(rng: np.random.Generator, table: tuple[tuple[Any, ...], ...]) -> tuple[Any, ...]:
    shares = np.array([row[0] for row in table])
    return table[int(rng.choice(len(table), p=shares / shares.sum()))][1:]


def build_manifest(work_dir: str, files: int, seed: int) -> str:
    """A manifest of ``files`` recordings (built once per (files, seed); reused afterwards)."""
    import soundfile
    import soxr

    speech = common.speech
    audio_dir = os.path.join(work_dir, f"audio-{seed}")
    manifest = os.path.join(work_dir, f"manifest-{files}-{seed}.jsonl")
    if os.path.exists(manifest):
        return manifest
    os.makedirs(audio_dir, exist_ok=True)
    native = 22050  # espeak-ng's rate
    utterances = [speech.synth(text, sr=native) for text in SENTENCES]
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(files):
        low, high = draw(rng, DURATION_MIX)
        seconds = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        rate, fmt = draw(rng, FORMATS)
        path = os.path.join(audio_dir, f"{i:04d}-{seconds:.1f}s-{rate}.{fmt}")
        if not os.path.exists(path):
            pieces, total = [], 0
            while total < seconds * native:
                piece = utterances[int(rng.integers(len(utterances)))]
                gap = np.zeros(int(rng.uniform(0.2, 2.0) * native), np.float32)
                pieces += [piece, gap]
                total += len(piece) + len(gap)
            samples = np.concatenate(pieces)[: int(seconds * native)]
            if rate != native:
                samples = soxr.resample(samples, native, rate)
            soundfile.write(path + ".tmp", samples, rate, format=fmt.upper(), subtype="PCM_16")
            os.replace(path + ".tmp", path)
        lines.append(json.dumps({"id": f"rec-{i:04d}", "path": os.path.relpath(path, work_dir)}))
    with open(manifest + ".tmp", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(manifest + ".tmp", manifest)
    return manifest


# --------------------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class DeviceLog:
    """What the model's generate calls did: time inside them, real and padded audio-seconds of their batches."""

    seconds: float = 0.0
    calls: int = 0
    real_seconds: float = 0.0
    padded_seconds: float = 0.0
    ladder_seconds: float = 0.0  # each row padded only to its own length's bucket: the floor of any batching

    def watch(self, model: Any) -> None:
        """Record every ``model.decode_batch`` call (the call itself runs unchanged)."""
        from qasr_jax import audio

        decode_batch = model.decode_batch

        def timed(requests: Any, options: Any = None, adapters: Any = None) -> Any:
            engine = model.engine(options)
            shape = engine.batch_shape(requests, model.max_batch)
            self.real_seconds += sum(len(r.samples) for r in requests) / audio.SAMPLE_RATE
            self.padded_seconds += shape.rows * shape.frames * audio.HOP_LENGTH / audio.SAMPLE_RATE
            hop_seconds = audio.HOP_LENGTH / audio.SAMPLE_RATE
            self.ladder_seconds += sum(engine.batch_shape([r], 1).frames * hop_seconds for r in requests)
            started = time.perf_counter()
            try:
                return decode_batch(requests, options, adapters)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        model.decode_batch = timed


def file_order_groups(model: Any, jobs: Sequence[Any], batch_size: int) -> Iterator[tuple[Any, Any]]:
    """The previous path, ``(job, ASRTranscription)`` as each finishes: the jobs in groups of
    max(4 × batch, 64) in file order, each group's files handed to the model, which decodes and batches them."""
    group_size = max(4 * batch_size, 64)
    for start in range(0, len(jobs), group_size):
        group = list(jobs[start : start + group_size])
        for index, result in model.iter_transcribe([job.path for job in group]):
            yield group[index], result


def run_path(name: str, args: argparse.Namespace, checkpoint: str, manifest: str) -> dict[str, Any]:
    from qasr_jax import batch_jobs
    from qasr_jax.asr import Qwen3ASRModel

    jobs = batch_jobs.read_manifest(manifest)
    model = Qwen3ASRModel.from_pretrained(checkpoint, max_inference_batch_size=args.batch_size,
                                          max_new_tokens=args.max_new_tokens, compilation_cache=False)  # fmt: skip
    log = DeviceLog()
    log.watch(model)
    texts: dict[str, str] = {}
    errors = 0
    stats = batch_jobs.PipelineStats()
    load_before = os.getloadavg()
    started = time.perf_counter()
    if name == "planned":
        seconds = batch_jobs.job_seconds(jobs)
        plan = batch_jobs.plan_batches(seconds, args.batch_size, model.max_chunk_seconds)
        results = ((jobs[i], r) for i, r in batch_jobs.run_batches(model, jobs, plan, workers=args.workers,
                                                                     stats=stats))  # fmt: skip
    else:
        results = file_order_groups(model, jobs, args.batch_size)
    for job, result in results:
        errors += result.error is not None
        texts[job.id] = result.text
    wall = time.perf_counter() - started
    load = os.getloadavg()
    compile_seconds = model.compile_seconds
    out = {
        "path": name,
        "items": len(texts),
        "errors": errors,
        "audio_seconds": log.real_seconds,
        "padded_seconds": log.padded_seconds,
        "padding_waste": 1 - log.real_seconds / log.padded_seconds if log.padded_seconds else 0.0,
        "ladder_padding_waste": 1 - log.real_seconds / log.ladder_seconds if log.ladder_seconds else 0.0,
        "batches": log.calls,
        "buckets": model.compile_count,
        "wall_seconds": wall,
        "compile_seconds": compile_seconds,
        "device_busy_seconds": log.seconds - compile_seconds,
        "device_waits_for_host_seconds": wall - log.seconds,
        "throughput": log.real_seconds / wall,
        "throughput_without_compile": log.real_seconds / (wall - compile_seconds),
        "loadavg_before": load_before,
        "loadavg": load,
    }
    if name == "planned":
        out.update(
            pipeline_host_wait_seconds=stats.host_wait_seconds, decode_thread_seconds=stats.load_seconds
        )
    out["texts"] = texts
    return out


def table(runs: list[dict[str, Any]]) -> str:
    def load(run: dict[str, Any]) -> str:
        return common.load_average(run["loadavg"], "/")

    rows = [
        ("audio (s)", lambda r: f"{r['audio_seconds']:.0f}"),
        ("padded audio (s)", lambda r: f"{r['padded_seconds']:.0f}"),
        ("padding waste", lambda r: f"{100 * r['padding_waste']:.1f}%"),
        ("of which the length buckets alone force", lambda r: f"{100 * r['ladder_padding_waste']:.1f}%"),
        ("batches / compiled buckets", lambda r: f"{r['batches']} / {r['buckets']}"),
        ("wall (s)", lambda r: f"{r['wall_seconds']:.1f}"),
        ("compile (s)", lambda r: f"{r['compile_seconds']:.1f}"),
        ("device busy, compile excluded (s)", lambda r: f"{r['device_busy_seconds']:.1f}"),
        ("device waits for host (s)", lambda r: f"{r['device_waits_for_host_seconds']:.1f}"),
        (
            "  of which waiting for decoded audio (s)",
            lambda r: f"{r.get('pipeline_host_wait_seconds', r['device_waits_for_host_seconds']):.1f}",
        ),
        ("throughput (audio-s/s)", lambda r: f"{r['throughput']:.1f}"),
        ("throughput without compile (audio-s/s)", lambda r: f"{r['throughput_without_compile']:.1f}"),
    ]
    header = "| figure | " + " | ".join(f"{r['path']} | load 1/5/15 min" for r in runs) + " |"
    lines = [header, "|---|" + "---|---|" * len(runs)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(f"{cell(r)} | {load(r)}" for r in runs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    print(f"load before building: {os.getloadavg()}", file=sys.stderr)
    started = time.perf_counter()
    checkpoint = args.checkpoint or common.small_checkpoint(args.work_dir)
    manifest = build_manifest(args.work_dir, args.files, args.seed)
    print(f"inputs ready in {time.perf_counter() - started:.0f} s: {manifest}", file=sys.stderr)
    names = [args.only] if args.only else ["planned", "previous"]
    runs = []
    for name in names:
        print(f"{name}: running (load {os.getloadavg()})", file=sys.stderr)
        runs.append(run_path(name, args, checkpoint, manifest))
        print(f"{name}: {runs[-1]['wall_seconds']:.1f} s", file=sys.stderr)
    print(f"{args.files} files, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"{args.workers} decoding threads, {os.cpu_count()} CPUs")  # fmt: skip
    print(table(runs))
    if len(runs) == 2:
        a, b = (run["texts"] for run in runs)
        same = sum(a[k] == b.get(k) for k in a)
        print(f"texts equal in both paths: {same}/{len(a)}")
        print(f"speed-up: {runs[0]['throughput'] / runs[1]['throughput']:.2f}x "
              f"(without compile {runs[0]['throughput_without_compile'] / runs[1]['throughput_without_compile']:.2f}x)")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([{k: v for k, v in run.items() if k != "texts"} for run in runs], handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
