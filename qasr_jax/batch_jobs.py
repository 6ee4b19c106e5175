"""Dataset-scale transcription jobs: a manifest planned as a whole, audio decoded ahead, work split over processes.

A job is a list of ``Job`` items: a manifest's (``read_manifest``), or the files named on a command line. An
``AudioReader`` says how a job's path becomes audio: a file or http(s) URL, ``-`` for the bytes of standard input,
or headerless 16-bit PCM at a given rate. Running a job:

1. **Plan globally** (``plan_batches``): every item's duration comes from its file header (``probe_seconds``, no
   decoding) or from the manifest's ``"duration"``; items are sorted by length over the whole manifest and cut
   into batches of at most ``batch_size`` decoder rows (an item over the chunk limit takes one row per chunk),
   longest first, so a batch pads its audio to little more than its longest item. Items whose length cannot
   be read from the header go last, in manifest order.
2. **Split by process** (``process_share``): with several JAX processes (a TPU pod slice, multi-GPU hosts), the
   planned batches are dealt to the processes by padded audio-seconds, the same way on every process, so each
   decodes only its own audio.
3. **Decode ahead** (``run_batches``): a host thread pool decodes and resamples the audio of the next batches
   while the device runs the current one; ``PipelineStats`` records how long the device waited for the host.
   Results come out batch by batch as they complete, each with its ``Job`` (so with the manifest id).

Results files (``ResultsFile``) are JSONL, one object per finished item with its ``"id"``; a rerun skips the ids
already there, so a killed job resumes without loss or duplicates. With several processes each writes its own
part file next to the output (``part_path``) and process 0 merges the parts into the output once every process
is done (``merge_parts``); the parts of a killed run count as finished on the rerun.

Quality filters (``QualityFilter``) route results for pseudo-labelling: an item whose ``avg_logprob`` is below
a minimum, or whose ``compression_ratio`` is above a maximum, goes to a side file (``rejected_path`` beside the
output by default) with the filters it failed and its measured values, and not to the output. Every finished
item is in exactly one of the two files, and both count as finished on a rerun.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np

from qasr_jax import audio as audio_io
from qasr_jax import audio_files
from qasr_jax.errors import AudioDecodeError, EmptyAudioError, QasrError

# Decoded audio held ahead of the device, in batches.
DEFAULT_PREFETCH_BATCHES = 2
# The job path that stands for standard input (when the reader is given one).
STDIN_PATH = "-"


@dataclasses.dataclass(frozen=True)
class Job:
    """One audio to transcribe: its id in the output, where it is, and per-item prompt options.

    ``seconds``: its duration when the manifest gives one (``"duration"``), else None (read from the header).
    """

    id: str
    path: str
    context: str | None = None
    language: str | None = None
    seconds: float | None = None


def read_manifest(path: str) -> list[Job]:
    """Jobs from a manifest: a path per line, or a JSON object with "path" (or "audio") and optional "id",
    "context", "language", "duration" (seconds). Blank lines and lines starting with # are skipped; ids default
    to the path; relative paths are relative to the manifest's folder.

    Raises ValueError naming the manifest line for a line that is not valid, and for a repeated id.
    """
    base = os.path.dirname(os.path.abspath(path))
    jobs: list[Job] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            seconds = None
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
                audio_path = entry.get("path", entry.get("audio"))
                if not isinstance(audio_path, str):
                    raise ValueError(f'{path}:{number}: a JSON line needs a "path" string')
                job_id = str(entry.get("id", audio_path))
                context, language = entry.get("context"), entry.get("language")
                if "duration" in entry:
                    seconds = entry["duration"]
                    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
                        raise ValueError(f'{path}:{number}: "duration" must be a number of seconds ≥ 0')
                    seconds = float(seconds)
            else:
                audio_path, job_id, context, language = line, line, None, None
            resolved = audio_path if os.path.isabs(audio_path) else os.path.join(base, audio_path)
            jobs.append(Job(job_id, resolved, context, language, seconds))
    seen: set[str] = set()
    for job in jobs:
        if job.id in seen:
            raise ValueError(f"{path}: id {job.id!r} appears more than once")
        seen.add(job.id)
    return jobs


def probe_seconds(path: str) -> float | None:
    """A file's duration from its header (libsndfile, else FFmpeg's container header), without decoding it;
    None when neither can tell, or ``path`` is not a local file (URLs are not fetched twice; stdin is not read).
    An item of unknown length is planned last; any error is reported when it is decoded."""
    import soundfile

    if not os.path.isfile(path):
        return None

    try:
        return float(soundfile.info(path).duration)
    except (soundfile.SoundFileError, OSError, RuntimeError, ValueError, TypeError):
        pass
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(path) as container:
            if container.duration is not None and container.duration > 0:
                return container.duration / 1e6  # av.time_base: microseconds
            for stream in container.streams.audio:
                if stream.duration is not None and stream.time_base is not None:
                    return float(stream.duration * stream.time_base)
    except (av.FFmpegError, OSError, ValueError, TypeError):
        return None
    return None


def job_seconds(
    jobs: Sequence[Job], probe: Callable[[str], float | None] = probe_seconds
) -> list[float | None]:
    """Each job's duration: the manifest's, else its header's (None when unknown)."""
    return [job.seconds if job.seconds is not None else probe(job.path) for job in jobs]


class AudioReader:
    """How a job's path becomes audio: a file path or http(s) URL (``audio.load_audio``), or ``-`` for the bytes
    of ``stdin`` when one is given; with ``raw_pcm_rate`` each input is headerless signed 16-bit little-endian
    mono PCM at that rate instead of an audio file.

    Standard input can be read only once: its bytes are read by the first load that asks for them (from any
    worker thread) and kept for the run.
    """

    def __init__(self, raw_pcm_rate: int | None = None, stdin: BinaryIO | None = None) -> None:
        if raw_pcm_rate is not None and raw_pcm_rate <= 0:
            raise ValueError(f"raw_pcm_rate must be a positive sample rate, got {raw_pcm_rate}")
        self.raw_pcm_rate = raw_pcm_rate
        self._stdin = stdin
        self._stdin_bytes: bytes | None = None
        self._lock = threading.Lock()

    def is_stdin(self, path: str) -> bool:
        return path == STDIN_PATH and self._stdin is not None

    def _read_stdin(self) -> bytes:
        with self._lock:
            if self._stdin_bytes is None:
                self._stdin_bytes = self._stdin.read()
            return self._stdin_bytes

    def load(self, path: str, max_seconds: float | None = None) -> np.ndarray:
        """``path``'s audio as mono 16 kHz float32 samples; errors as ``audio.load_audio`` raises them, named by
        the path (``<stdin>`` for standard input)."""
        stdin = self.is_stdin(path)
        name = "<stdin>" if stdin else None
        if self.raw_pcm_rate is None:
            source = self._read_stdin() if stdin else path
            return audio_io.load_audio(source, name=name, max_seconds=max_seconds)
        label = name or audio_files.describe(path, "<input>")
        if stdin:
            data = self._read_stdin()
        else:
            data = audio_files.read_source(path, label)  # a local path, or a URL's bytes
            if isinstance(data, str):
                with open(data, "rb") as handle:
                    data = handle.read()
        samples = audio_files.raw_pcm(data, label)
        return audio_io.load_audio((samples, self.raw_pcm_rate), name=label, max_seconds=max_seconds)

    def probe_seconds(self, path: str) -> float | None:
        """``path``'s duration without decoding it (``probe_seconds``; raw PCM by its file size); None for
        standard input, URLs and anything else whose length cannot be told up front."""
        if self.is_stdin(path):
            return None
        if self.raw_pcm_rate is None:
            return probe_seconds(path)
        if not os.path.isfile(path):
            return None
        return os.path.getsize(path) // 2 / self.raw_pcm_rate


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """Items decoded together: positions in the job list, and the rows and padded seconds they are planned at.

    rows: decoder rows (one per chunk of each item). seconds: the longest chunk's planned length (every row of
    the batch is padded to about this). ``None`` for a batch of items whose length was unknown.
    """

    items: tuple[int, ...]
    rows: int
    seconds: float | None

    @property
    def cost(self) -> float:
        """Planned padded audio-seconds (what the device computes over); unknown lengths count as 30 s a row."""
        return self.rows * (self.seconds if self.seconds is not None else 30.0)


def chunk_count(seconds: float, max_chunk_seconds: float) -> int:
    """Chunks an item of ``seconds`` is split into (``audio.split_audio`` cuts near every ``max_chunk_seconds``)."""
    return max(1, math.ceil(seconds / max_chunk_seconds - 1e-9))


def plan_batches(
    seconds: Sequence[float | None],
    batch_size: int,
    max_chunk_seconds: float,
    max_batch_seconds: float | None = None,
) -> list[PlannedBatch]:
    """Batches over the whole job list: items sorted by chunk length (longest first), at most ``batch_size``
    rows per batch; with ``max_batch_seconds``, also at most that many padded audio-seconds per batch (rows then
    a power of two, the engine's row buckets). Unknown lengths (None) come last, in order, ``batch_size`` rows
    at a time. Ties keep manifest order, so the plan is the same on every process."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    known = [i for i, s in enumerate(seconds) if s is not None]
    unknown = [i for i, s in enumerate(seconds) if s is None]

    def chunk_seconds(i: int) -> float:
        s = float(seconds[i])
        return s / chunk_count(s, max_chunk_seconds)

    known.sort(key=lambda i: (-chunk_seconds(i), i))
    plan: list[PlannedBatch] = []
    items: list[int] = []
    rows = 0
    for i in known:
        need = chunk_count(float(seconds[i]), max_chunk_seconds)
        longest = chunk_seconds(items[0]) if items else chunk_seconds(i)
        limit = row_limit(batch_size, longest, max_batch_seconds)
        if items and rows + need > limit:
            plan.append(PlannedBatch(tuple(items), rows, longest))
            items, rows = [], 0
        items.append(i)
        rows += need
    if items:
        plan.append(PlannedBatch(tuple(items), rows, chunk_seconds(items[0])))
    for start in range(0, len(unknown), batch_size):
        group = tuple(unknown[start : start + batch_size])
        plan.append(PlannedBatch(group, len(group), None))
    return plan


def row_limit(batch_size: int, seconds: float, max_batch_seconds: float | None) -> int:
    """Rows a batch of chunks of ``seconds`` may have: ``batch_size``, or with ``max_batch_seconds`` the largest
    power of two whose padded audio fits (at least one row)."""
    if max_batch_seconds is None or seconds <= 0:
        return batch_size
    fits = max(1, int(max_batch_seconds // max(seconds, 1e-9)))
    return min(batch_size, 1 << (fits.bit_length() - 1))


def process_share(plan: Sequence[PlannedBatch], index: int, count: int) -> list[PlannedBatch]:
    """The batches of process ``index`` of ``count``: each batch in plan order goes to the process with the least
    planned cost so far (the lowest index on ties), so every process computes the same split."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count})")
    load = [0.0] * count
    mine = []
    for batch in plan:
        owner = min(range(count), key=lambda p: (load[p], p))
        load[owner] += batch.cost
        if owner == index:
            mine.append(batch)
    return mine


# --------------------------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class PipelineStats:
    """What a run did: batches and items, the audio decoded, and where the time went.

    host_wait_seconds: the driver blocked waiting for decoded audio (the device had nothing to run).
    model_seconds: inside the model's transcription calls (device work, prompt building and text decoding).
    load_seconds: decoding and resampling, summed over the worker threads.
    """

    batches: int = 0
    items: int = 0
    audio_seconds: float = 0.0
    host_wait_seconds: float = 0.0
    model_seconds: float = 0.0
    load_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Loaded:
    """One item's decoded 16 kHz samples, or why it could not be decoded, and how long decoding took."""

    samples: np.ndarray | None
    error: QasrError | None
    seconds: float


def load_job(job: Job, max_seconds: float | None = None, reader: AudioReader | None = None) -> Loaded:
    """Decode ``job``'s audio to mono 16 kHz (with ``reader``, default: ``job.path`` is a file or URL); a bad
    file is that item's error, named by its path."""
    started = time.perf_counter()
    reader = reader if reader is not None else AudioReader()
    try:
        samples = reader.load(job.path, max_seconds=max_seconds)
        if audio_io.num_frames(len(samples)) == 0:
            raise EmptyAudioError(
                f"{job.path}: {len(samples)} samples is shorter than one feature frame "
                f"({audio_io.HOP_LENGTH} samples at 16 kHz)"
            )
    except QasrError as error:
        return Loaded(None, error, time.perf_counter() - started)
    except OSError as error:
        return Loaded(
            None, AudioDecodeError(f"{job.path}: cannot read ({error})"), time.perf_counter() - started
        )
    return Loaded(samples, None, time.perf_counter() - started)


def run_batches(
    model: Any,
    jobs: Sequence[Job],
    plan: Iterable[PlannedBatch],
    *,
    context: str = "",
    language: str | None = None,
    return_time_stamps: bool = False,
    reader: AudioReader | None = None,
    workers: int = 2,
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
    stats: PipelineStats | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(index in jobs, ASRTranscription)`` for every item of ``plan``, batch by batch, as they complete (the
    index tells apart jobs that are equal: the same file named twice).

    ``model`` is a ``Qwen3ASRModel``. ``reader`` reads each job's audio (default: paths and URLs). ``workers``
    threads decode the audio of up to ``prefetch_batches`` batches ahead of the one the model is running.
    ``context``/``language`` apply to items that do not set their own. An item that cannot be decoded is yielded
    with its error; the rest of its batch goes on.
    """
    from qasr_jax.asr import ASRTranscription

    stats = stats if stats is not None else PipelineStats()
    reader = reader if reader is not None else AudioReader()
    max_seconds = getattr(model, "max_audio_seconds", None)
    pending: collections.deque[tuple[PlannedBatch, list[concurrent.futures.Future]]] = collections.deque()
    batches = iter(plan)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="qasr-load") as pool:

        def submit_next() -> None:
            batch = next(batches, None)
            if batch is not None:
                futures = [pool.submit(load_job, jobs[i], max_seconds, reader) for i in batch.items]
                pending.append((batch, futures))

        for _ in range(max(1, prefetch_batches) + 1):
            submit_next()
        while pending:
            batch, futures = pending.popleft()
            waited = time.perf_counter()
            loaded = [future.result() for future in futures]
            stats.host_wait_seconds += time.perf_counter() - waited
            submit_next()  # keep the pool busy while the model runs this batch
            stats.batches += 1
            stats.load_seconds += sum(item.seconds for item in loaded)
            good = []
            for position, item in zip(batch.items, loaded):
                if item.error is not None:
                    stats.items += 1
                    yield position, ASRTranscription("", "", error=item.error)
                else:
                    good.append((position, item.samples))
            if not good:
                continue
            stats.audio_seconds += sum(len(s) for _, s in good) / audio_io.SAMPLE_RATE
            kept = [jobs[position] for position, _ in good]
            started = time.perf_counter()
            results = model.iter_transcribe(
                [(samples, audio_io.SAMPLE_RATE) for _, samples in good],
                context=[job.context if job.context is not None else context for job in kept],
                language=[job.language if job.language is not None else language for job in kept],
                return_time_stamps=return_time_stamps,
            )
            for index, result in results:
                stats.model_seconds += time.perf_counter() - started
                stats.items += 1
                yield good[index][0], result
                started = time.perf_counter()
            stats.model_seconds += time.perf_counter() - started
            del good, loaded


# --------------------------------------------------------------------------------------------------------------
# Quality filters


@dataclasses.dataclass(frozen=True)
class QualityFilter:
    """Thresholds a result must meet to be kept (None: no such filter).

    min_avg_logprob: the lowest mean log-probability of the generated tokens (a log-probability: ≤ 0); an item
    with no generated tokens has no ``avg_logprob`` and fails it. max_compression_ratio: the highest zlib
    compression ratio of the text (> 0; runaway repetitions compress well, Whisper's default is 2.4).

    Raises ValueError naming the threshold for a value that is not a finite number in its range.
    """

    min_avg_logprob: float | None = None
    max_compression_ratio: float | None = None

    def __post_init__(self) -> None:
        low, high = self.min_avg_logprob, self.max_compression_ratio
        if low is not None and not (math.isfinite(low) and low <= 0):
            raise ValueError(f"min_avg_logprob must be a finite log-probability ≤ 0, got {low!r}")
        if high is not None and not (math.isfinite(high) and high > 0):
            raise ValueError(f"max_compression_ratio must be a finite number > 0, got {high!r}")

    def reasons(self, result: Any) -> list[dict[str, Any]]:
        """The filters ``result`` (an ``ASRTranscription``) fails: ``{"filter", "threshold", "value"}`` each, in
        the order min_avg_logprob, max_compression_ratio; [] when it passes."""
        failed = []
        if self.min_avg_logprob is not None:
            value = result.avg_logprob
            if value is None or value < self.min_avg_logprob:
                failed.append(
                    {"filter": "min_avg_logprob", "threshold": self.min_avg_logprob, "value": value}
                )
        if self.max_compression_ratio is not None:
            value = result.compression_ratio
            if value > self.max_compression_ratio:
                failed.append(
                    {
                        "filter": "max_compression_ratio",
                        "threshold": self.max_compression_ratio,
                        "value": value,
                    }
                )
        return failed


def rejected_path(output: str) -> str:
    """The side file for results that fail the quality filters, beside ``output``: ``X.jsonl`` →
    ``X.rejected.jsonl`` (any other name gets ``.rejected.jsonl`` appended)."""
    return output.removesuffix(".jsonl") + ".rejected.jsonl"


# --------------------------------------------------------------------------------------------------------------
# Results files


def part_path(output: str, index: int, count: int) -> str:
    """The part file process ``index`` of ``count`` writes its results to."""
    return f"{output}.part-{index:05d}-of-{count:05d}"


def part_files(output: str) -> list[str]:
    """Every part file next to ``output`` (from any process count), sorted."""
    return sorted(glob.glob(glob.escape(output) + ".part-*-of-*"))


def read_records(path: str) -> list[dict[str, Any]]:
    """The finished records of a results JSONL file: objects with an ``"id"`` and no ``"error"``; a torn last line
    from an interrupted run is ignored."""
    records: list[dict[str, Any]] = []
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "id" in entry and not entry.get("error"):
                records.append(entry)
    return records


def finished_ids(output: str) -> set[str]:
    """Ids already finished: in ``output`` and in any part file a multi-process run left next to it."""
    return {str(r["id"]) for path in (output, *part_files(output)) for r in read_records(path)}


class ResultsFile:
    """A JSONL results file opened for appending, one line per record, flushed as written.

    A torn last line (a run killed mid-write) is cut off first, so the next record starts on a line of its own.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        _drop_torn_tail(path)
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self, sync: bool = False) -> None:
        if sync:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        self._handle.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _drop_torn_tail(path: str) -> None:
    if not os.path.exists(path):
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def merge_parts(output: str) -> int:
    """Append the records of every part file that are not yet in ``output`` (one per id), make the output
    durable, then delete the parts. Returns how many records were added. Safe to repeat after a crash."""
    done = {str(r["id"]) for r in read_records(output)}
    parts = part_files(output)
    added = 0
    with ResultsFile(output) as sink:
        for part in parts:
            for record in read_records(part):
                if str(record["id"]) not in done:
                    sink.write(record)
                    done.add(str(record["id"]))
                    added += 1
        sink.close(sync=True)
    for part in parts:
        os.remove(part)
    return added


__all__ = [
    "DEFAULT_PREFETCH_BATCHES",
    "STDIN_PATH",
    "AudioReader",
    "Job",
    "Loaded",
    "PipelineStats",
    "PlannedBatch",
    "QualityFilter",
    "ResultsFile",
    "chunk_count",
    "finished_ids",
    "job_seconds",
    "load_job",
    "merge_parts",
    "part_files",
    "part_path",
    "plan_batches",
    "probe_seconds",
    "process_share",
    "read_manifest",
    "read_records",
    "rejected_path",
    "row_limit",
    "run_batches",
]
