"""Many live streams at once: ``StreamScheduler`` runs the updates of every stream with a ready chunk as one
batched step (no web dependencies; the WebSocket server, ``qasr_jax.serve.live``, runs on it).

Each stream follows the official streaming algorithm exactly as ``StreamingTranscriber`` runs it alone: the
same prefixes, features, cached encoder windows and kept KV prefix, computed by the transcriber's host-side
phases (``begin_update``, ``plan_decode``, ``complete_update``). What a step batches:

- encoder: the windows every ready stream must (re)compute, as rows of one encoder call
  (``StreamingTranscriber.encode_windows``);
- decoder: each stream's run (its open window's audio tokens, the prompt's tail, the text prefix) prefilled after
  its kept prefix, every stream a row of one program, then greedy decoding of all rows in one decode state
  (``streaming.decode_updates``: ``Engine.prefill`` with a ``Prefix``, ``Engine.generate``, ``Engine.collect``).
  A lone stream runs the same way, as one row.

Between steps a stream keeps its KV prefix in a cache of its own (``StreamCache``); how the engine lines the
rows up at one write index is in ``qasr_jax.engine.prefill_after_program``.

Streams join (``open``) and leave (``finish``, ``close``) freely. ``feed`` only buffers samples, checked on the
spot: a bad piece raises a typed error and leaves the stream as it was. ``step`` runs one batched update for up to
``max_batch`` ready streams, the longest waiting first, one chunk each; ``start`` runs steps on a thread of its
own as chunks become ready and reports each update through the stream's callback. An error of one stream's own
input (a ``QasrError``) ends that stream alone.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from qasr_jax.errors import AudioTooLongError, QasrError
from qasr_jax.serve.loop import WorkLoop
from qasr_jax.streaming import (
    SAMPLE_RATE,
    ASRStreamingState,
    PendingUpdate,
    StreamingTranscriber,
    StreamStateError,
    StreamUpdate,
    as_pcm,
    decode_updates,
)


class TooManyStreamsError(QasrError, RuntimeError):
    """The engine already serves its ``max_streams`` streams; retry when one has ended."""


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """What a step did to one stream.

    update: the update it ran (None when a finished stream had no tail left to decode, or the stream failed);
    ended: the stream takes no more audio (its final update ran, or it failed); error: the stream's own input
    error that ended it; latency: seconds from the moment its chunk was complete (or finish was asked) to the
    result.
    """

    stream: LiveStream
    update: StreamUpdate | None
    ended: bool
    error: QasrError | None
    latency: float


class LiveStream:
    """One stream of a ``StreamScheduler``: the handle its methods take.

    state: the stream's ``ASRStreamingState`` (language, text, updates, as with the official API); on_event: called
    from the engine's step (its thread under ``start``) with each ``StreamEvent`` of this stream.
    """

    def __init__(
        self, engine: StreamScheduler, stream_id: int, state: ASRStreamingState,
        on_event: Callable[[StreamEvent], None] | None,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.id = stream_id
        self.state = state
        self.on_event = on_event
        self.finishing = False  # finish() was called: no more audio
        self.ended = False  # the final update ran (or the stream failed or was closed)
        self.closed = False
        self.error: QasrError | None = None
        # When each pending update became possible: one entry per complete chunk, one for finish.
        self.ready_times: collections.deque[float] = collections.deque()

    @property
    def language(self) -> str:
        return self.state.language

    @property
    def text(self) -> str:
        return self.state.text

    @property
    def fixed_text(self) -> str:
        return self.state.fixed_text

    @property
    def updates(self) -> list[StreamUpdate]:
        return self.state.updates

    def __repr__(self) -> str:
        return f"LiveStream(id={self.id}, chunks={self.state.chunk_id}, ended={self.ended})"


class StreamScheduler(WorkLoop):
    """Concurrent streams over one ``StreamingTranscriber`` (its model, params, engine and token budget).

    max_streams: streams open at once (``open`` raises ``TooManyStreamsError`` beyond); max_batch: stream updates
    per step (the rest wait for the next); max_stream_seconds: the longest stream (``feed`` raises
    ``AudioTooLongError`` past it; None: no limit); trim_every: steps of the thread between returns of freed heap
    pages to the system, also done whenever it goes idle (0: never; ``qasr_jax.memory``); fault_context: a
    stream whose context is exactly this string makes its step raise as an internal error would (a bug, out of
    memory), so that a server's handling of a failed engine can be exercised; None (the default): never.
    """

    def __init__(
        self,
        transcriber: StreamingTranscriber,
        *,
        max_streams: int = 64,
        max_batch: int = 16,
        max_stream_seconds: float | None = None,
        trim_every: int = 64,
        fault_context: str | None = None,
    ) -> None:
        if max_streams < 1 or max_batch < 1:
            raise ValueError(f"max_streams and max_batch must be >= 1: {max_streams}, {max_batch}")
        if max_stream_seconds is not None and not max_stream_seconds > 0:
            raise ValueError(f"max_stream_seconds must be None or positive, got {max_stream_seconds}")
        super().__init__("qasr-streams", trim_every)
        self.transcriber = transcriber
        self.engine = transcriber.engine
        self.config = transcriber.config
        self.max_streams = max_streams
        self.max_batch = max_batch
        self.max_stream_seconds = max_stream_seconds
        self.steps = 0
        self._streams: dict[int, LiveStream] = {}
        self._ids = itertools.count()
        self.fault_context = fault_context

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- streams join, take audio, leave --

    def open(
        self,
        context: str = "",
        language: str | None = None,
        unfixed_chunk_num: int = 2,
        unfixed_token_num: int = 5,
        chunk_size_sec: float = 2.0,
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> LiveStream:
        """A new stream (the official streaming arguments; ``LanguageError``/``ValueError`` for bad ones)."""
        state = self.transcriber.init_state(
            context, language, unfixed_chunk_num, unfixed_token_num, chunk_size_sec
        )
        with self._lock:
            if self._stopping:
                raise StreamStateError("the streaming engine is stopping and opens no new streams")
            if len(self._streams) >= self.max_streams:
                raise TooManyStreamsError(
                    f"{len(self._streams)} streams are open (the limit); retry when one has ended"
                )
            stream = LiveStream(self, next(self._ids), state, on_event)
            self._streams[stream.id] = stream
        return stream

    def feed(self, stream: LiveStream, pcm16k: Any) -> None:
        """Buffer 16 kHz samples (int16 PCM or floats, any length) for ``stream``; each completed chunk becomes
        an update of a coming step. A bad piece (``InvalidAudioError``), a stream past ``max_stream_seconds``
        (``AudioTooLongError``), or a stream that is not open here (``StreamStateError``) raises and leaves the
        stream as it was."""
        self._check(stream)
        piece = as_pcm(pcm16k)
        with self._lock:
            self._check(stream)
            state = stream.state
            if self.max_stream_seconds is not None:
                total = (len(state.audio_accum) + len(state.buffer) + len(piece)) / SAMPLE_RATE
                if total > self.max_stream_seconds:
                    raise AudioTooLongError(
                        f"stream audio: {total:.2f} s exceeds the limit of {self.max_stream_seconds:g} s"
                    )
            before = len(state.buffer) // state.chunk_size_samples
            if piece.shape[0]:
                state.buffer = np.concatenate([state.buffer, piece])
            now = time.monotonic()
            completed = len(state.buffer) // state.chunk_size_samples - before
            stream.ready_times.extend([now] * completed)
            if completed:
                self._lock.notify_all()

    def finish(self, stream: LiveStream) -> None:
        """No more audio: the buffered tail (if any) is decoded as the stream's final update at a coming step,
        after its complete chunks."""
        self._check(stream)
        with self._lock:
            self._check(stream)
            stream.finishing = True
            stream.ready_times.append(time.monotonic())
            self._lock.notify_all()

    def close(self, stream: LiveStream) -> None:
        """Drop ``stream`` now, finished or not (a client that went away); its pending updates never run."""
        if not isinstance(stream, LiveStream) or stream.engine is not self:
            raise StreamStateError("this stream was not opened by this streaming engine")
        with self._lock:
            stream.closed = stream.ended = True
            stream.ready_times.clear()
            stream.state.finished = True
            self._streams.pop(stream.id, None)

    def _check(self, stream: Any) -> None:
        if not isinstance(stream, LiveStream):
            raise StreamStateError(
                f"expected a LiveStream of StreamScheduler.open(), got {type(stream).__name__}"
            )
        if stream.engine is not self:
            raise StreamStateError(
                "this stream was opened by another streaming engine; feed it to the engine that opened it"
            )
        if stream.error is not None:
            raise StreamStateError(f"this stream ended with an error: {stream.error}")
        if stream.closed:
            raise StreamStateError("this stream was closed")
        if stream.finishing or stream.ended:
            raise StreamStateError("this stream was finished; open a new one")

    # -- steps --

    def ready(self) -> int:
        """Streams with an update to run."""
        with self._lock:
            return sum(1 for s in self._streams.values() if s.ready_times)

    def step(self) -> list[StreamEvent]:
        """One batched update of up to ``max_batch`` ready streams (the longest waiting first); returns the
        events, after calling each stream's ``on_event``."""
        with self._lock:
            ready = sorted(
                (s for s in self._streams.values() if s.ready_times), key=lambda s: s.ready_times[0]
            )
            taken = []
            for stream in ready[: self.max_batch]:
                since = stream.ready_times.popleft()
                state = stream.state
                final = len(state.buffer) < state.chunk_size_samples  # finish() asked, no whole chunk left
                take = len(state.buffer) if final else state.chunk_size_samples
                if take:
                    state.audio_accum = np.concatenate([state.audio_accum, state.buffer[:take]])
                    state.buffer = state.buffer[take:]
                taken.append((stream, since, final, take > 0))
        events: list[StreamEvent] = []
        work: list[tuple[LiveStream, float, PendingUpdate]] = []
        if self.fault_context is not None and any(s.state.context == self.fault_context for s, *_ in taken):
            raise RuntimeError(f"fault injected for a stream with the context {self.fault_context!r}")
        for stream, since, final, has_audio in taken:
            if not has_audio:  # finished on a chunk boundary: nothing left to decode
                events.append(self._end(stream, None, None, since))
                continue
            try:
                work.append((stream, since, self.transcriber.begin_update(stream.state, final)))
            except (
                QasrError
            ) as error:  # this stream's own audio (e.g. shorter than one frame): it fails alone
                events.append(self._end(stream, None, error, since))
        if work:
            pending = [p for _, _, p in work]
            self.transcriber.encode_windows(pending)
            for p in pending:
                self.transcriber.plan_decode(p)
            generations = decode_updates(self.engine, self.transcriber.params, pending)
            for (stream, since, p), generation in zip(work, generations):
                update = self.transcriber.complete_update(p, generation)
                if p.final:
                    events.append(self._end(stream, update, None, since))
                else:
                    events.append(StreamEvent(stream, update, False, None, time.monotonic() - since))
        self.steps += 1
        for event in events:
            if event.stream.on_event is not None and not event.stream.closed:
                event.stream.on_event(event)
        return events

    def run_until_idle(self) -> list[StreamEvent]:
        """Steps until no stream has an update to run; all their events."""
        events = []
        while self.ready():
            events += self.step()
        return events

    def _end(
        self, stream: LiveStream, update: StreamUpdate | None, error: QasrError | None, since: float
    ) -> StreamEvent:
        with self._lock:
            stream.ended = True
            stream.error = error
            stream.state.finished = True
            stream.ready_times.clear()
            self._streams.pop(stream.id, None)
        return StreamEvent(stream, update, True, error, time.monotonic() - since)

    # -- the loop's turns (``WorkLoop``: ``start`` runs steps on a thread of its own while a stream is ready) --

    def _has_work(self) -> bool:
        return any(s.ready_times for s in self._streams.values())

    def _turn(self) -> None:
        self.step()
        self.heap.finished()

    def _fail_open(self, error: BaseException) -> None:
        """Every open stream ends with the loop's error."""
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.ended = True
            if stream.on_event is not None:
                failed = QasrError(f"the streaming engine failed: {error!r}")
                stream.on_event(StreamEvent(stream, None, True, failed, 0.0))


__all__ = [
    "LiveStream",
    "StreamEvent",
    "StreamScheduler",
    "TooManyStreamsError",
]
