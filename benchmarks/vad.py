"""What the voice-activity detector (``qasr_jax.vad``) changes: words invented over non-speech, and the time and
WER of a manifest that is half silence.

    python -m benchmarks.vad [--model DIR] [--work-dir DIR] [--seconds 5,30,120] [--manifest-seconds 600]

1. **Non-speech table.** Silence, white noise, a 440 Hz tone, a chord and a C-major arpeggio (a note every
   250 ms, amplitude-modulated: music-like) of each ``--seconds`` length, transcribed with and without the
   detector: the words produced (whitespace-separated) and the item's finish_reason.
2. **Half-silence manifest.** ``--manifest-seconds`` of audio in files of about 20 s, half of it silence:
   sentences of the demo grammar (``train.synth``) spoken by espeak-ng (trimmed to their voiced samples), 2–4 to
   an utterance with 0.2–0.5 s pauses, 2.2–3 s of silence around and between utterances, and whole files of
   silence making up the rest. Transcribed as a ``--manifest`` job does it (``batch_jobs.run_batches``), once
   without and once with the detector, each with a fresh model object and no persistent compilation cache: wall
   time, compile time, the detector's own time (summed over the threads that plan items), the decoded chunks and
   the WER on the speech (the normalisation and edit distance of ``qasr_jax.training.evaluate``), each timing with
   ``os.getloadavg()`` taken when it ended (a shared machine's load says how much of it the run had).

The model defaults to the small random-weight test checkpoint (built once under ``--work-dir``): it writes words
over anything, so its non-speech table is the control, and its WER is that of a model that knows no words (near
100%). ``--model`` takes any checkpoint dir, e.g. the demo recipe's committed ASR export ``train/stages/asr``,
which knows the demo grammar's words. The token budget is ``--max-new-tokens`` per chunk (default 16 for the
table; the manifest uses the duration-scaled default, 32 + 12 per second of chunk, which a random model always
uses up, as a model inventing text over silence would).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import common

KINDS = ("silence", "white noise", "tone 440 Hz", "chord", "arpeggio")
FILE_SECONDS = 20.0


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser("benchmarks.vad", __doc__, epilog=True)
    parser.add_argument("--model", metavar="DIR", help="checkpoint dir (default: the small test checkpoint)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "qasr_bench_vad"),
                        help="where the checkpoint and audio are built and cached (default %(default)s)")  # fmt: skip
    parser.add_argument("--seconds", default="5,30,120",
                        help="lengths of the non-speech inputs, comma-separated (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                        help="token budget per chunk in the non-speech table (default %(default)s)")  # fmt: skip
    parser.add_argument("--manifest-seconds", type=float, default=600.0, metavar="S",
                        help="audio in the half-silence manifest; 0 skips it (default %(default)s)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="decoder rows per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentences and silences")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    return parser


def non_speech(kind: str, seconds: float, seed: int = 0) -> np.ndarray:
    """``seconds`` of one of ``KINDS`` at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    if kind == "silence":
        samples = np.zeros_like(t)
    elif kind == "white noise":
        samples = np.clip(0.3 * rng.standard_normal(t.shape), -1, 1)
    elif kind == "tone 440 Hz":
        samples = 0.5 * np.sin(2 * np.pi * 440 * t)
    elif kind == "chord":
        samples = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0))
    else:
        notes = 261.63 * 2 ** (np.array([0, 4, 7, 12, 7, 4]) / 12)
        melody = notes[(t / 0.25).astype(int) % len(notes)]
        samples = np.sin(2 * np.pi * np.cumsum(melody) / 16000) * (0.3 + 0.2 * np.cos(2 * np.pi * 4 * t))
    return samples.astype(np.float32)


def load_model(checkpoint: str, max_new_tokens: int | None, batch_size: int) -> Any:
    from qasr_jax.asr import Qwen3ASRModel

    return Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=max_new_tokens,
                                         max_inference_batch_size=batch_size, compilation_cache=False)  # fmt: skip


def non_speech_table(checkpoint: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = load_model(checkpoint, args.max_new_tokens, args.batch_size)
    rows = []
    for seconds in (float(s) for s in args.seconds.split(",")):
        inputs = [(non_speech(kind, seconds), 16000) for kind in KINDS]
        for vad in (False, True):
            for kind, result in zip(KINDS, model.transcribe(inputs, vad=vad)):
                rows.append({"input": kind, "seconds": seconds, "vad": vad, "words": len(result.text.split()),
                             "finish_reason": result.finish_reason.value})  # fmt: skip
        print(f"non-speech {seconds:g} s done (load {os.getloadavg()})", file=sys.stderr)
    return rows


def build_manifest(work_dir: str, total_seconds: float, seed: int) -> tuple[str, dict[str, str]]:
    """The half-silence manifest (built once per arguments) and each file's reference text."""
    import soundfile

    from train.synth import english_sentence, sentence_text

    directory = os.path.join(work_dir, f"half-silence-v3-{total_seconds:g}-{seed}")
    manifest = os.path.join(directory, "manifest.jsonl")
    references = os.path.join(directory, "references.json")
    if os.path.exists(manifest) and os.path.exists(references):
        with open(references, encoding="utf-8") as handle:
            return manifest, json.load(handle)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    sr = 16000

    def sentence() -> tuple[np.ndarray, str]:
        text = sentence_text(english_sentence(rng))
        clip = common.speech.synth(text, sr=sr)
        voiced = np.flatnonzero(np.abs(clip) > 1e-3)
        return clip[voiced[0] : voiced[-1] + 1], text

    def silence(low: float, high: float) -> np.ndarray:
        return np.zeros(int(rng.uniform(low, high) * sr), np.float32)

    # Files of utterances (2–4 sentences with 0.2–0.5 s pauses) between 2.2–3 s of silence, until half the
    # manifest is sentences; then whole files of silence until the rest is.
    files: list[tuple[np.ndarray, str]] = []
    speech = quiet = 0
    while speech < total_seconds / 2 * sr:
        parts, texts = [silence(2.2, 3.0)], []
        while sum(len(p) for p in parts) < FILE_SECONDS * sr:
            for k in range(int(rng.integers(2, 5))):
                clip, text = sentence()
                parts += [silence(0.2, 0.5)] if k else []
                parts.append(clip)
                texts.append(text)
                speech += len(clip)
            parts.append(silence(2.2, 3.0))
        samples = np.concatenate(parts)
        quiet += len(samples) - sum(len(p) for p in parts if p.any())
        files.append((samples, " ".join(texts)))
    while quiet < speech:
        length = max(sr, min(int(FILE_SECONDS * sr), speech - quiet))
        files.append((np.zeros(length, np.float32), ""))
        quiet += length
    order = rng.permutation(len(files))
    lines, texts = [], {}
    for position, index in enumerate(order):
        samples, text = files[index]
        name = f"item-{position:03d}"
        path = os.path.join(directory, f"{name}.wav")
        soundfile.write(path, samples, sr, subtype="PCM_16")
        lines.append(json.dumps({"id": name, "path": path, "duration": len(samples) / sr}))
        texts[name] = text
    with open(references, "w", encoding="utf-8") as handle:
        json.dump(texts, handle, ensure_ascii=False, indent=1)
    with open(manifest, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return manifest, texts


def run_manifest(
    checkpoint: str, manifest: str, references: dict[str, str], vad: bool, batch_size: int
) -> dict:
    from qasr_jax import batch_jobs
    from qasr_jax.training.evaluate import edit_distance, normalize_text
    from qasr_jax.vad import SpeechDetector

    model = load_model(checkpoint, None, batch_size)
    detector_seconds = [0.0]
    if vad:
        model.speech_detector = SpeechDetector()
        activity = model.speech_detector.activity

        def timed(samples: np.ndarray) -> Any:
            started = time.perf_counter()
            try:
                return activity(samples)
            finally:
                detector_seconds[0] += time.perf_counter() - started

        model.speech_detector.activity = timed
    jobs = batch_jobs.read_manifest(manifest)
    seconds = batch_jobs.job_seconds(jobs)
    plan = batch_jobs.plan_batches(seconds, batch_size, model.max_chunk_seconds)
    chunks = errors = words = 0
    started = time.perf_counter()
    for index, result in batch_jobs.run_batches(model, jobs, plan, workers=2):
        job = jobs[index]
        assert result.error is None, result.error
        chunks += sum(s.finish_reason.value != "no_speech" for s in result.segments)
        reference = normalize_text(references[job.id]).split()
        errors += edit_distance(reference, normalize_text(result.text).split())
        words += len(reference)
    wall = time.perf_counter() - started
    return {"vad": vad, "files": len(jobs), "audio_seconds": sum(seconds), "wall_seconds": wall,
            "compile_seconds": model.compile_seconds, "detector_seconds": detector_seconds[0],
            "decoded_chunks": chunks, "wer": errors / max(words, 1), "reference_words": words,
            "loadavg": os.getloadavg()}  # fmt: skip


def print_non_speech(rows: list[dict[str, Any]]) -> None:
    print("| input | length (s) | words without the detector | words with it | finish_reason with it |")
    print("|---|---:|---:|---:|---|")
    keyed = {(r["input"], r["seconds"], r["vad"]): r for r in rows}
    for seconds in dict.fromkeys(r["seconds"] for r in rows):
        for kind in KINDS:
            without, with_vad = keyed[(kind, seconds, False)], keyed[(kind, seconds, True)]
            print(
                f"| {kind} | {seconds:g} | {without['words']} | {with_vad['words']} | {with_vad['finish_reason']} |"
            )


def print_manifest(runs: list[dict[str, Any]]) -> None:
    first = runs[0]
    print(f"\nhalf-silence manifest: {first['files']} files, {first['audio_seconds']:.0f} s of audio, "
          f"{first['reference_words']} reference words")  # fmt: skip
    print(
        "| detector | wall (s) | compile (s) | wall − compile (s) | detector, thread time (s) | decoded chunks | WER | load 1/5/15 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in runs:
        print(f"| {'on' if r['vad'] else 'off'} | {r['wall_seconds']:.1f} | {r['compile_seconds']:.1f} | "
              f"{r['wall_seconds'] - r['compile_seconds']:.1f} | {r['detector_seconds']:.1f} | "
              f"{r['decoded_chunks']} | {100 * r['wer']:.1f}% | {common.load_average(r['loadavg'], '/')} |")  # fmt: skip
    if len(runs) == 2:
        off, on = runs
        warm = (off["wall_seconds"] - off["compile_seconds"]) / (on["wall_seconds"] - on["compile_seconds"])
        print(f"speed-up with the detector: {off['wall_seconds'] / on['wall_seconds']:.2f}x "
              f"({warm:.2f}x without compile time)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    checkpoint = args.model or common.small_checkpoint(args.work_dir)
    print(f"model {checkpoint}; {os.cpu_count()} CPUs; load before: {os.getloadavg()}", file=sys.stderr)
    out: dict[str, Any] = {"model": checkpoint, "non_speech": non_speech_table(checkpoint, args)}
    print(f"model: {checkpoint}; non-speech table: {args.max_new_tokens} new tokens per chunk")
    print_non_speech(out["non_speech"])
    if args.manifest_seconds > 0:
        manifest, references = build_manifest(args.work_dir, args.manifest_seconds, args.seed)
        out["manifest"] = []
        for vad in (False, True):
            out["manifest"].append(run_manifest(checkpoint, manifest, references, vad, args.batch_size))
            print(f"manifest, detector {'on' if vad else 'off'}: {out['manifest'][-1]['wall_seconds']:.1f} s "
                  f"(load {os.getloadavg()})", file=sys.stderr)  # fmt: skip
        print_manifest(out["manifest"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(out, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
