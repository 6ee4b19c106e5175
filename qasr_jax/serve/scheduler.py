"""Continuous batching for a server's uploads: many transcription jobs share the engine's slots.

One thread owns the engine (``qasr_jax.serve.loop``). Its turns:

1. admit: waiting chunks are prefilled one by one (up to the number of free slots), each in its own length
   bucket, and inserted into free slots, while the slots already decoding keep their state — a request arriving
   mid-decode joins at the next step boundary;
2. generate a few steps (``step_chunk``) for every live slot;
3. collect the slots that finished, decode and parse their tokens (with their log-probabilities, fetched in the
   same transfer) into a ``Segment``, and complete a job once all its chunks are in;
4. free the cache before the oldest live sequence when the shared index nears the end (``Engine.reclaim``);
5. give freed heap pages back to the system after every ``trim_every`` finished jobs and whenever the loop goes
   idle (``qasr_jax.memory``), so the resident set stays flat under sustained traffic.

A job (``Upload``) is one uploaded audio: it is split into chunks as ``Qwen3ASRModel.transcribe`` splits it (same
rule, same prompts, same token budgets, same merge: ``Qwen3ASRModel.item_chunks`` and ``qasr_jax.chunks``), and its
chunks spread over slots. With the model's voice-activity detector, chunks without speech are done when planned
and never take a slot; a job with no speech at all completes at the loop's next turn. A request's tokens depend only on itself (see
``qasr_jax.engine``), so the text equals ``transcribe``'s for the same audio and options.

``submit`` refuses a job with ``QueueFullError`` when ``max_queue`` jobs already wait for slots (back-pressure);
``Upload.cancel`` (a client that went away) drops its waiting chunks and frees its slots at the next boundary.
Nothing here knows about HTTP.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from qasr_jax import audio as audio_io
from qasr_jax import buckets
from qasr_jax import text as text_io
from qasr_jax.asr import Qwen3ASRModel, default_token_budget
from qasr_jax.chunks import Chunk, finish, merged_language, merged_text, partial_result, text_so_far
from qasr_jax.engine import Engine, result_of
from qasr_jax.errors import EmptyAudioError, PromptError, QasrError
from qasr_jax.serve.loop import WorkLoop


class QueueFullError(QasrError, RuntimeError):
    """The server's queue of waiting requests is full; retry later."""


class ShuttingDownError(QasrError, RuntimeError):
    """The scheduler is stopping and takes no new jobs."""


class Upload:
    """One transcription request: its chunks, and callbacks for progress and completion.

    on_update(job): called (from the scheduler thread) when the streamed text grows; on_done(job): once, when all
    chunks are in, the job failed, or it was cancelled. ``text``/``language`` are the merged result.
    """

    def __init__(
        self,
        samples: np.ndarray,
        *,
        context: str = "",
        language: str | None = None,
        on_update: Callable[[Upload], None] | None = None,
        on_done: Callable[[Upload], None] | None = None,
        adapter: str | None = None,
    ) -> None:
        self.samples = samples
        self.context = context
        self.language = language
        self.adapter = adapter  # a loaded adapter's name (``Qwen3ASRModel.load_adapter``); None: the base model
        self.on_update = on_update
        self.on_done = on_done
        self.chunks: list[Chunk] = []
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.partial_text = ""  # finished chunks in order plus the first unfinished one's text so far

    @property
    def duration(self) -> float:
        return len(self.samples) / audio_io.SAMPLE_RATE

    @property
    def text(self) -> str:
        return merged_text(self.chunks)

    @property
    def detected_language(self) -> str:
        return merged_language(self.chunks)

    @property
    def truncated(self) -> bool:
        return any(c.truncated for c in self.chunks)

    def cancel(self) -> None:
        """The client went away: its chunks leave the queue and its slots are freed at the next boundary."""
        self.cancelled = True


@dataclasses.dataclass
class Stats:
    """Counters the server's /metrics reads (updated by the scheduler thread)."""

    steps: int = 0
    busy_slot_steps: int = 0  # sum over generate calls of busy slots × steps asked
    slot_steps: int = 0
    cancelled: int = 0


class Scheduler(WorkLoop):
    """The continuous-batching loop over ``model``'s engine and params (see the module docstring).

    slots: decode slots (requests decoded together); max_queue: jobs that may wait for slots before ``submit``
    refuses; step_chunk: decode steps between admissions; max_chunk_seconds: the split of long audio (the
    model's own by default); max_audio_seconds: the longest upload (sizes the cache with max_chunk_seconds);
    trim_every: finished jobs between returns of freed heap pages to the system (0: never; see module docstring);
    fault_context: a job whose context is exactly this string makes the loop raise as an internal error would (a
    bug, out of memory), so that a server's handling of a failed loop can be exercised; None (the default): never.
    """

    def __init__(
        self,
        model: Qwen3ASRModel,
        *,
        slots: int = 8,
        max_queue: int = 64,
        step_chunk: int = 8,
        max_audio_seconds: float = 600.0,
        trim_every: int = 32,
        fault_context: str | None = None,
    ) -> None:
        if slots < 1 or max_queue < 0 or step_chunk < 1:
            raise ValueError(
                f"slots and step_chunk must be >= 1 and max_queue >= 0: {slots}, {step_chunk}, {max_queue}"
            )
        super().__init__("qasr-scheduler", trim_every)
        self.model = model
        self.tokenizer = model.tokenizer
        self.params = model.params
        self.engine: Engine = model.engine()
        self.slots = slots
        self.max_queue = max_queue
        self.step_chunk = step_chunk
        self.max_audio_seconds = float(max_audio_seconds)
        self.chunk_seconds = min(model.max_chunk_seconds, self.max_audio_seconds)
        # The largest prompt and token budget any chunk can have fix the state's shape. A split cuts at the
        # quietest point up to SPLIT_SEARCH_SECONDS past the nominal length, so a chunk can be that much longer.
        longest_seconds = min(self.chunk_seconds + audio_io.SPLIT_SEARCH_SECONDS, self.max_audio_seconds)
        longest = int(longest_seconds * audio_io.SAMPLE_RATE)
        audio_tokens = model.config.audio.output_length(audio_io.num_frames(longest))
        prompt = text_io.build_prompt_ids(self.tokenizer, audio_tokens, "", None)
        self.max_context_tokens = 256
        self.max_prompt = buckets.PROMPT_LADDER.size(len(prompt) + self.max_context_tokens + 8)
        self.max_new = buckets.STEP_LADDER.size(self._budget(longest_seconds))
        self.cache_len = 2 * (self.max_prompt + self.max_new) + step_chunk
        self.stats = Stats()
        self._waiting: collections.deque[Chunk] = collections.deque()
        self._waiting_jobs: dict[int, Upload] = {}
        self._ready: collections.deque[Upload] = collections.deque()  # submitted with nothing to decode
        self._slot_chunk: list[Chunk | None] = [None] * slots
        self._admitting: list[Chunk] = []  # taken from the queue, not yet in a slot
        self.fault_context = fault_context
        self._state: Any = None

    # -- outside the loop --

    def _budget(self, seconds: float) -> int:
        return self.model.max_new_tokens or default_token_budget(seconds)

    def prepare(self, job: Upload, *, vad: bool = True) -> None:
        """Split ``job``'s audio and build its chunks' prompts (raises a QasrError for unusable input), with the
        model's voice-activity detector when it has one and ``vad`` is True (a warm-up passes False: its noise
        must reach the decoder)."""
        slot = self.model.adapter_slot(job.adapter)
        if audio_io.num_frames(len(job.samples)) == 0:
            raise EmptyAudioError(
                f"{len(job.samples)} samples is shorter than one feature frame ({audio_io.HOP_LENGTH} samples)"
            )
        detector = self.model.speech_detector if vad else None
        chunks = self.model.item_chunks(
            job, job.samples, job.context, job.language, slot, self.model.max_chunk_seconds, detector
        )
        for chunk in chunks:
            tokens = len(chunk.request.prompt_ids) if chunk.request is not None else 0
            if tokens > self.max_prompt:
                raise PromptError(f"the prompt has {tokens} tokens; at most {self.max_prompt} fit")
        job.chunks = chunks

    @property
    def queue_depth(self) -> int:
        return len(self._waiting_jobs)

    @property
    def busy_slots(self) -> int:
        return sum(c is not None for c in self._slot_chunk)

    def submit(self, job: Upload) -> None:
        """Queue a prepared job; ``QueueFullError`` when ``max_queue`` jobs already wait."""
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting_jobs) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting_jobs)} requests are waiting (the limit); retry later"
                )
            pending = [c for c in job.chunks if not c.done]
            if pending:
                self._waiting_jobs[id(job)] = job
                self._waiting.extend(pending)
            else:
                self._ready.append(job)
            self._lock.notify()

    def start(self) -> None:
        self._state = self.engine.init_state(self.slots, self.cache_len, self.max_new, start=self.max_prompt)
        super().start()

    # -- the loop's turns --

    def _has_work(self) -> bool:
        return bool(self._waiting or self._ready or self.busy_slots)

    def _turn(self) -> None:
        with self._lock:
            ready = list(self._ready)
            self._ready.clear()
        for job in ready:
            self._finish(job, None)
        self._admit()
        if self.busy_slots:
            self._step()

    def _fail_open(self, error: BaseException) -> None:
        """Every job still open fails with the loop's error."""
        with self._lock:
            chunks = [*self._waiting, *self._admitting, *(c for c in self._slot_chunk if c)]
            jobs = {id(c.owner): c.owner for c in chunks}
            self._waiting.clear()
        for job in jobs.values():
            self._finish(job, error)

    def _admit(self) -> None:
        free = [s for s, c in enumerate(self._slot_chunk) if c is None]
        # A cancelled job's chunks in slots stop counting: their slots are overwritten by the next insert.
        for s, c in enumerate(self._slot_chunk):
            if c is not None and c.owner.cancelled:
                self._slot_chunk[s] = None
                free.append(s)
                self._finish(c.owner, None)
        with self._lock:
            batch: list[Chunk] = []
            while self._waiting and len(batch) < len(free):
                chunk = self._waiting.popleft()
                if chunk.owner.cancelled:
                    self._waiting_jobs.pop(id(chunk.owner), None)
                    self._finish(chunk.owner, None)
                    continue
                batch.append(chunk)
                if not any(c.owner is chunk.owner for c in self._waiting):
                    self._waiting_jobs.pop(id(chunk.owner), None)
        if not batch:
            return
        self._admitting = batch
        self._state, _ = self.engine.reclaim(self._state, self.max_prompt)
        # One prefill per chunk, in its own length bucket: no chunk pads to a longer neighbour, and the programs
        # are those of one request at a time whatever the concurrency (traffic never compiles a new batch shape
        # mid-service). Decoding is where the slots are shared.
        for slot, chunk in zip(sorted(free), batch):
            if self.fault_context is not None and chunk.owner.context == self.fault_context:
                raise RuntimeError(f"fault injected for a job with the context {self.fault_context!r}")
            adapters = self.model.adapter_stack if chunk.request.adapter else None
            prefilled = self.engine.prefill(self.params, [chunk.request], adapters=adapters)
            self._state = self.engine.insert(self._state, prefilled, [slot])
            self._slot_chunk[slot] = chunk
        self._admitting = []
        self._harvest()  # a chunk can end on its first token

    def _step(self) -> None:
        index = int(jax.device_get(self._state.index))
        if index + self.step_chunk > self.cache_len:
            self._state, shift = self.engine.reclaim(self._state, self.max_prompt)
            if shift == 0:
                raise RuntimeError(f"decode cache of {self.cache_len} is full and nothing can be freed")
        busy = self.busy_slots
        # Slots of different adapters decode in the same step; without any, the base program runs.
        adapters = self.model.adapter_stack if any(c and c.request.adapter for c in self._slot_chunk) else None
        self._state = self.engine.generate(self.params, self._state, self.step_chunk, adapters)
        self.stats.steps += self.step_chunk
        self.stats.busy_slot_steps += busy * self.step_chunk
        self.stats.slot_steps += self.slots * self.step_chunk
        self._harvest()

    def _harvest(self) -> None:
        state = self._state
        live, counts, tokens, logprobs, stopped = jax.device_get(
            (state.live, state.counts, state.tokens, state.logprobs, state.stopped)
        )
        touched: dict[int, Upload] = {}
        for slot, chunk in enumerate(self._slot_chunk):
            if chunk is None:
                continue
            job = chunk.owner
            if job.first_token_at is None and counts[slot] > 0:
                job.first_token_at = time.monotonic()
            if live[slot] and job.on_update is None:
                continue
            if not live[slot]:
                finish(chunk, self.tokenizer, result_of(tokens, logprobs, counts, stopped, slot), job.language)
                self._slot_chunk[slot] = None
            else:
                raw = self.tokenizer.decode(tokens[slot, : counts[slot]].tolist(), skip_special_tokens=True)
                chunk.partial = partial_result(raw, job.language)
            touched[id(job)] = job
        for job in touched.values():
            if all(c.done for c in job.chunks):
                self._finish(job, None)
            elif job.on_update is not None and not job.cancelled:
                text = text_so_far(job.chunks)
                if text != job.partial_text and not text.endswith("\ufffd"):
                    job.partial_text = text
                    job.on_update(job)

    def _finish(self, job: Upload, error: BaseException | None) -> None:
        if job.finished:
            return
        job.finished = True
        job.error = error
        self.heap.finished()
        if job.cancelled:
            self.stats.cancelled += 1
        if job.on_done is not None:
            job.on_done(job)
        # The callbacks close over their caller's state (a server's future holds the job as its result): dropping
        # them breaks that cycle, so a finished job's audio is freed as soon as its caller lets go of it instead of
        # waiting for Python's rare oldest-generation collection.
        job.on_done = job.on_update = None


__all__ = ["QueueFullError", "Scheduler", "ShuttingDownError", "Stats", "Upload"]
