"""``python -m infer transcribe``: speech to text for audio files, or for a manifest of them as a resumable job.

Two ways to name the audio, run the same way: the whole list is planned at once (length-sorted batches, lengths
from the file headers) and threads decode the next batches' audio while the model runs.

- ``FILE ...``: paths, http(s) URLs, or ``-`` for a file's bytes on stdin (``--raw-pcm RATE`` for headerless
  16-bit PCM). The results, in input order, go to stdout or ``--output`` as txt (one line per file), json (a
  list of objects) or jsonl (one object per line).
- ``--manifest LIST``: one item per line, either a path or a JSON object ``{"id": ..., "path": ...}`` with
  optional ``"context"``, ``"language"`` and ``"duration"`` (seconds). Results are appended to ``--output``
  (default ``LIST.results.jsonl``) as JSONL, each with its
  ``"id"``, in the order they finish; a rerun skips the ids already written there. Failed items are not
  written, so a rerun retries them. With ``--distributed`` (or ``--coordinator``), the same command on every
  host of a multi-host run transcribes that process's share into a part file next to the output, and process 0
  merges the parts when all are done (the output's folder must be one every host sees).

Failed items are reported on stderr with their error after every other item is written, and the exit status is
then 1 (2 for bad arguments). Items whose text hit the token budget are written with ``"truncated": true`` and
warned about.

A json/jsonl record also says how sure the model was and why decoding stopped: ``"finish_reason"`` (stop,
length, repetition or error), ``"avg_logprob"`` (mean log-probability of the generated tokens; null when none),
``"compression_ratio"`` (of the text, zlib) and ``"segments"``, one per decoded chunk, each with its time span,
text, ``"token_ids"`` and their ``"logprobs"``, and the same three summaries. Each word has a ``"confidence"``,
the mean probability of the tokens it spans: in ``"time_stamps"`` with --timestamps, else in ``"words"``
(``{"text", "confidence"}``, the words with their spaces and punctuation, which concatenate back to the text).

Manifest jobs can filter for pseudo-labelling: with ``--min-avg-logprob X`` and/or ``--max-compression-ratio Y``
an item whose avg_logprob is below X (or that has none) or whose compression ratio is above Y is written to the
``--rejected`` file instead of the output (default: beside it, ``.jsonl`` → ``.rejected.jsonl``), with a
``"rejected"`` list of ``{"filter", "threshold", "value"}``. Every item that finishes is in exactly one of the
two files, and a rerun skips the ids of both (delete the rejected file to judge its items again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from infer.defaults import REVISION_HELP, model_help

if TYPE_CHECKING:
    from qasr_jax.batch_jobs import AudioReader, Job, PlannedBatch

FORMATS = ("txt", "json", "jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infer transcribe",
        description="Speech to text with a Qwen3-ASR checkpoint.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="audio files (wav, flac, ogg, mp3, m4a, opus, mp4/mkv/webm video, ...), http(s) URLs, "
                             "or - for audio bytes on stdin")  # fmt: skip
    parser.add_argument("--raw-pcm", type=int, default=None, metavar="RATE",
                        help="the audio (FILEs, stdin or a manifest's files) is headerless signed 16-bit little-endian "
                             "mono PCM at RATE Hz")  # fmt: skip
    parser.add_argument("--max-audio-seconds", type=float, default=None, metavar="S",
                        help="refuse audio longer than S seconds (that item fails; the others go on)")  # fmt: skip
    parser.add_argument("--model", metavar="DIR|NAME",
                        help=f"Qwen3-ASR checkpoint: {model_help()} (default: the demo model under models/, which "
                             "knows only synthetic English and German speech)")  # fmt: skip
    parser.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    parser.add_argument("--manifest", metavar="LIST",
                        help="file listing the audio, one path or JSON object {\"id\", \"path\", \"context\", "
                             "\"language\"} per line; relative paths are relative to the manifest's folder")  # fmt: skip
    parser.add_argument("--language", metavar="L",
                        help="force the output language (e.g. English, Chinese); default: detect per file")  # fmt: skip
    parser.add_argument("--context", metavar="TEXT", default="",
                        help="context text for the system prompt (names, terms, topic) for every file")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="audio chunks decoded together (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="token budget per audio chunk (default: grows with the chunk's duration)")  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format for FILE mode (default txt; a manifest always writes jsonl)")  # fmt: skip
    parser.add_argument("--output", metavar="PATH",
                        help="file to write (FILE mode: default stdout; manifest: default LIST.results.jsonl, "
                             "appended to)")  # fmt: skip
    parser.add_argument("--compilation-cache", metavar="DIR|off", default=None,
                        help="JAX's persistent compilation cache: a directory, or off (default: $QASR_COMPILATION_CACHE "
                             "or ~/.cache/qasr-jax/xla), so a second run compiles nothing")  # fmt: skip
    parser.add_argument("--weights-cache", metavar="DIR|off", default=None,
                        help="converted weights, kept so that a second run maps them instead of converting: a "
                             "directory, or off (default: $QASR_WEIGHTS_CACHE or ~/.cache/qasr-jax/weights)")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="params and compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")  # fmt: skip
    parser.add_argument("--max-chunk-seconds", type=float, default=1200.0, metavar="S",
                        help="long audio is split into chunks of at most S seconds (default %(default)s)")  # fmt: skip
    parser.add_argument("--vad", action="store_true",
                        help="run the voice-activity detector (the [vad] extra): long audio is cut in non-speech, "
                             "spans without speech are not decoded (no speech at all: finish_reason no_speech), "
                             "and segments carry a no_speech estimate")  # fmt: skip
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                        help="> 1 discourages repeating generated tokens (default %(default)s: off)")  # fmt: skip
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                        help="forbid any N-gram of generated tokens from repeating (default %(default)s: off)")  # fmt: skip
    parser.add_argument("--forced-aligner", metavar="DIR|NAME",
                        help=f"Qwen3-ForcedAligner checkpoint, for --timestamps: {model_help(aligner=True)} "
                             "(default without --model: the demo aligner under models/)")  # fmt: skip
    parser.add_argument("--timestamps", action="store_true",
                        help="add word timestamps (needs --forced-aligner; json/jsonl output)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="threads decoding and resampling the next batches' audio while the model runs "
                             "(default %(default)s)")  # fmt: skip
    parser.add_argument("--max-batch-seconds", type=float, default=None, metavar="S",
                        help="at most S padded audio-seconds per batch (fewer rows for long audio, to bound "
                             "memory; default: --batch-size rows whatever their length)")  # fmt: skip
    parser.add_argument("--mesh", metavar="SPEC",
                        help="split each batch over this process's devices, e.g. data=4 or data=2,tensor=2 "
                             "(default: one device)")  # fmt: skip
    parser.add_argument("--distributed", action="store_true",
                        help="manifest: one process of a multi-host run, found from the cluster (TPU pod slice, "
                             "SLURM, ...); each process transcribes its share and process 0 merges the results")  # fmt: skip
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="manifest: one process of a multi-host run whose process 0 listens at HOST:PORT "
                             "(with --num-processes and --process-id)")  # fmt: skip
    parser.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes of the run")
    parser.add_argument("--process-id", type=int, default=None, metavar="I",
                        help="this process's index in [0, N) (0 merges the results)")  # fmt: skip
    parser.add_argument("--min-avg-logprob", type=float, default=None, metavar="X",
                        help="manifest: items whose avg_logprob is below X (a log-probability, <= 0) go to the "
                             "--rejected file instead of the output")  # fmt: skip
    parser.add_argument("--max-compression-ratio", type=float, default=None, metavar="Y",
                        help="manifest: items whose text's compression ratio is above Y (> 0; e.g. 2.4) go to "
                             "the --rejected file instead of the output")  # fmt: skip
    parser.add_argument("--rejected", metavar="PATH",
                        help="manifest: where items that fail a filter are appended, with their reasons "
                             "(default: beside the output, .jsonl -> .rejected.jsonl)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def result_record(job: Job, result: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": job.id,
        "path": job.path,
        "language": result.language,
        "text": result.text,
    }
    if result.truncated:
        record["truncated"] = True
    record["finish_reason"] = result.finish_reason.value
    if not result.error:
        record["avg_logprob"] = result.avg_logprob
        record["compression_ratio"] = result.compression_ratio
        record["segments"] = [segment.to_dict() for segment in result.segments]
        if result.time_stamps is None:
            record["words"] = [word.to_dict() for word in result.words]
    if result.time_stamps is not None:
        from qasr_jax import formats

        record["time_stamps"] = formats.words_to_dicts(result.time_stamps)
    if result.error:
        record["error"] = f"{type(result.error).__name__}: {result.error}"
    return record


def plan_jobs(
    jobs: Sequence[Job], args: argparse.Namespace, reader: AudioReader
) -> tuple[list[float | None], list[PlannedBatch]]:
    """Each job's duration (None when unknown) and the batches the whole list runs in."""
    from qasr_jax import batch_jobs
    from qasr_jax.asr import MAX_ALIGN_CHUNK_SECONDS

    seconds = batch_jobs.job_seconds(jobs, probe=reader.probe_seconds)
    max_chunk = args.max_chunk_seconds
    if args.timestamps:  # the aligner's limit, as the model splits for timestamps
        max_chunk = min(max_chunk, MAX_ALIGN_CHUNK_SECONDS)
    return seconds, batch_jobs.plan_batches(seconds, args.batch_size, max_chunk, args.max_batch_seconds)


class Progress:
    """Files and audio-seconds done, on stderr (a tqdm bar, or nothing)."""

    def __init__(self, jobs: Sequence[Job], seconds: Sequence[float | None], enabled: bool) -> None:
        """``seconds``: each job's duration (None when unknown: it counts as a file, not as audio)."""
        self.seconds = {job.id: s or 0.0 for job, s in zip(jobs, seconds)} if enabled else {}
        self.total_seconds = sum(self.seconds.values())
        self.done_seconds = 0.0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(jobs), unit="file", file=sys.stderr, dynamic_ncols=True)
            self._show()

    def _show(self) -> None:
        self.bar.set_postfix_str(f"audio {self.done_seconds:.1f}/{self.total_seconds:.1f} s")

    def advance(self, job: Job) -> None:
        if self.bar is not None:
            self.done_seconds += self.seconds.get(job.id, 0.0)
            self._show()
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_results(records: list[dict[str, Any]], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump(records, out, ensure_ascii=False, indent=2)
        out.write("\n")
    elif fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        for record in records:
            out.write(" ".join(record.get("text", "").split()) + "\n")


def report(
    failures: list[tuple[Job, str]], truncated: list[Job], rejected: tuple[int, str] | None = None
) -> int:
    """Warnings, the rejected count and its file (``(count, path)``), then failures; the exit status."""
    for job in truncated:
        print(f"warning: {job.id}: the text reached the token budget and may be cut short "
              f"(raise --max-new-tokens)", file=sys.stderr)  # fmt: skip
    if rejected is not None and rejected[0]:
        print(f"{rejected[0]} item(s) failed the filters and went to {rejected[1]}", file=sys.stderr)
    for job, error in failures:
        print(f"error: {job.id}: {error}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} item(s) failed", file=sys.stderr)
        return 1
    return 0


def load_model(args: argparse.Namespace, mesh: Any = None) -> Any:
    """The model the arguments name (the demo model by default), or None after printing why it cannot load."""
    from infer.defaults import model_or_demo
    from qasr_jax.asr import Qwen3ASRModel
    from qasr_jax.errors import QasrError

    try:
        if args.timestamps and not args.model:
            args.forced_aligner = model_or_demo(args.forced_aligner, aligner=True, option="--forced-aligner")
        args.model = model_or_demo(args.model)
        return Qwen3ASRModel.from_pretrained(
            args.model,
            forced_aligner=args.forced_aligner,
            max_inference_batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            max_chunk_seconds=args.max_chunk_seconds,
            max_audio_seconds=args.max_audio_seconds,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            compilation_cache=args.compilation_cache,
            weights_cache=args.weights_cache,
            mesh=mesh,
            vad=args.vad,
            revision=args.revision,
        )
    except (QasrError, OSError, ValueError, ImportError) as error:
        print(f"error: cannot load the model: {error}", file=sys.stderr)
        return None


def start_processes(args: argparse.Namespace) -> bool:
    """Join a multi-process run (``jax.distributed.initialize``) when asked to; True when this one did."""
    if not (args.distributed or args.coordinator):
        return False
    import jax

    if args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    else:
        jax.distributed.initialize()  # the cluster's own settings: TPU pod slices, SLURM, Open MPI, ...
    return True


def barrier(name: str) -> None:
    """Wait until every process of the run gets here (nothing to do with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_mesh(spec: str | None) -> Any:
    """A mesh over this process's devices (each process transcribes its own share of the manifest)."""
    if spec is None:
        return None
    import jax

    from qasr_jax import sharding

    return sharding.make_mesh(spec, jax.local_devices())


def model_on_mesh(args: argparse.Namespace) -> Any:
    """The model on the ``--mesh`` of this process's devices, or the exit code when there is none: 2 for a bad
    mesh, 1 when the model cannot be loaded (the error is printed)."""
    try:
        mesh = local_mesh(args.mesh)
    except ValueError as error:
        print(f"error: --mesh: {error}", file=sys.stderr)
        return 2
    model = load_model(args, mesh)
    return 1 if model is None else model


def run_manifest(args: argparse.Namespace) -> int:
    """A manifest job: plan it, transcribe this process's share, append results; process 0 merges the parts."""
    import jax

    from qasr_jax import batch_jobs

    try:
        jobs = batch_jobs.read_manifest(args.manifest)
    except UnicodeDecodeError as error:
        print(f"error: --manifest {args.manifest}: not UTF-8 text ({error})", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: --manifest {args.manifest}: {error.strerror or error}", file=sys.stderr)
        return 1
    except ValueError as error:  # names the manifest and its line
        print(f"error: {error}", file=sys.stderr)
        return 1
    output = args.output or args.manifest + ".results.jsonl"
    rejected_output = args.rejected or batch_jobs.rejected_path(output)
    if os.path.abspath(rejected_output) == os.path.abspath(output):
        print("error: --rejected must name another file than the output", file=sys.stderr)
        return 2
    index, count = jax.process_index(), jax.process_count()
    # Items in the rejected file finished too: each item goes to exactly one of the two files.
    done = batch_jobs.finished_ids(output) | batch_jobs.finished_ids(rejected_output)
    barrier("qasr manifest: results read")  # every process sees the same finished ids before anyone writes
    jobs = [job for job in jobs if job.id not in done]
    if done and index == 0:
        print(f"skipping {len(done)} item(s) already in {output} or {rejected_output}", file=sys.stderr)
    failures: list[tuple[Job, str]] = []
    truncated: list[Job] = []
    rejected = 0
    if jobs:
        model = model_on_mesh(args)
        if isinstance(model, int):
            return model
        reader = batch_jobs.AudioReader(args.raw_pcm)  # a manifest names files: "-" is no stdin there
        seconds, plan = plan_jobs(jobs, args, reader)
        mine = batch_jobs.process_share(plan, index, count)
        positions = [i for batch in mine for i in batch.items]
        progress = Progress(
            [jobs[i] for i in positions], [seconds[i] for i in positions], enabled=not args.no_progress
        )
        sink = batch_jobs.ResultsFile(output if count == 1 else batch_jobs.part_path(output, index, count))
        side = None
        if args.quality is not None:
            side_path = rejected_output if count == 1 else batch_jobs.part_path(rejected_output, index, count)
            side = batch_jobs.ResultsFile(side_path)
        try:
            for position, result in batch_jobs.run_batches(
                model, jobs, mine, context=args.context, language=args.language,
                return_time_stamps=args.timestamps, reader=reader, workers=args.workers,
            ):  # fmt: skip
                job = jobs[position]
                progress.advance(job)
                if result.error:
                    failures.append((job, f"{type(result.error).__name__}: {result.error}"))
                    continue  # not written: a rerun retries it
                if result.truncated:
                    truncated.append(job)
                reasons = args.quality.reasons(result) if args.quality is not None else []
                if reasons and side is not None:
                    side.write({**result_record(job, result), "rejected": reasons})
                    rejected += 1
                else:
                    sink.write(result_record(job, result))
        finally:
            progress.close()
            sink.close(sync=True)
            if side is not None:
                side.close(sync=True)
    barrier("qasr manifest: parts written")
    if index == 0:
        for path in (output, rejected_output):
            if batch_jobs.part_files(path):
                batch_jobs.merge_parts(path)
    barrier("qasr manifest: merged")
    return report(failures, truncated, (rejected, rejected_output))


def run_files(args: argparse.Namespace) -> int:
    """FILE mode: the files as one job, planned and run as a manifest's are; every result, a failed file's
    with its error, written in the order of the arguments once all are done."""
    from qasr_jax import batch_jobs

    jobs = [batch_jobs.Job(path, path) for path in args.files]
    model = model_on_mesh(args)
    if isinstance(model, int):
        return model
    stdin = sys.stdin.buffer if batch_jobs.STDIN_PATH in args.files else None
    reader = batch_jobs.AudioReader(args.raw_pcm, stdin=stdin)
    seconds, plan = plan_jobs(jobs, args, reader)
    results: list[Any] = [None] * len(jobs)
    progress = Progress(jobs, seconds, enabled=not args.no_progress)
    try:
        for position, result in batch_jobs.run_batches(
            model, jobs, plan, context=args.context, language=args.language,
            return_time_stamps=args.timestamps, reader=reader, workers=args.workers,
        ):  # fmt: skip
            progress.advance(jobs[position])
            results[position] = result
    finally:
        progress.close()
    failures = [(job, f"{type(r.error).__name__}: {r.error}") for job, r in zip(jobs, results) if r.error]
    truncated = [job for job, r in zip(jobs, results) if r.truncated and not r.error]
    records = [result_record(job, result) for job, result in zip(jobs, results)]
    fmt = args.format or "txt"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            write_results(records, fmt, out)
    else:
        write_results(records, fmt, sys.stdout)
    return report(failures, truncated)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.files) == bool(args.manifest):
        parser.error("give either audio FILEs or --manifest LIST (one of them)")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.raw_pcm is not None and args.raw_pcm <= 0:
        parser.error("--raw-pcm RATE must be a positive sample rate")
    if args.files.count("-") > 1:
        parser.error("stdin (-) can be given once")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.timestamps and not args.forced_aligner and args.model:
        parser.error("--timestamps needs --forced-aligner DIR|NAME")
    if args.revision and not args.model:
        parser.error("--revision needs --model NAME")
    if args.manifest and args.format not in (None, "jsonl"):
        parser.error("a manifest job writes jsonl")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.max_batch_seconds is not None and not args.max_batch_seconds > 0:
        parser.error("--max-batch-seconds must be positive")
    if args.coordinator and (args.num_processes is None or args.process_id is None):
        parser.error("--coordinator needs --num-processes and --process-id")
    if (args.distributed or args.coordinator) and not args.manifest:
        parser.error("a multi-process run needs --manifest LIST")
    filters = args.min_avg_logprob is not None or args.max_compression_ratio is not None
    if (filters or args.rejected) and not args.manifest:
        parser.error(
            "--min-avg-logprob, --max-compression-ratio and --rejected filter a manifest job (--manifest)"
        )
    if args.rejected and not filters:
        parser.error("--rejected needs a filter: --min-avg-logprob X and/or --max-compression-ratio Y")
    args.quality = None
    if filters:
        from qasr_jax.batch_jobs import QualityFilter

        try:
            args.quality = QualityFilter(args.min_avg_logprob, args.max_compression_ratio)
        except ValueError as error:  # "min_avg_logprob must be ..." names the option
            parser.error("--" + str(error).replace("_", "-"))
    if args.language:
        from qasr_jax.text import normalize_language

        try:
            args.language = normalize_language(args.language)
        except ValueError as error:
            parser.error(str(error))

    if args.manifest:
        distributed = start_processes(args)
        try:
            return run_manifest(args)
        finally:
            if distributed:
                import jax

                jax.distributed.shutdown()

    return run_files(args)


if __name__ == "__main__":
    sys.exit(main())
