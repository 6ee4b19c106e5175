"""Many live streams at once: ``StreamingEngine`` runs the updates of every stream with a ready chunk as one
batched step.

Each stream follows the official streaming algorithm exactly as ``StreamingTranscriber`` runs it alone: the
same prefixes, features, cached encoder windows and kept KV prefix, computed by the transcriber's own host-side
phases (``begin_update``, ``plan_decode``, ``complete_update``). What a step batches:

- encoder: the windows every ready stream must (re)compute, as rows of one encoder call
  (``StreamingTranscriber.encode_windows``);
- decoder: each stream's run (its open window's audio tokens, the prompt's tail, the text prefix) prefilled after
  its kept prefix, every stream a row of one program (``extend_rows_program``); then greedy decoding of all rows
  in one decode state (``Engine.generate``) and ``Engine.collect``.

Between steps a stream keeps its KV prefix in a cache of its own, ``[1, kv_heads, cache_len, head_dim]`` per
layer (``StreamCache``, the transcriber's layout, its tokens from slot ``kv_offset``). A step stacks the ready streams' caches
as the rows of a decode state. Rows keep different numbers of tokens and prefill runs of different lengths, while
the engine's rows share one cache write index, so the program moves row b's kept tokens to end at a common slot
K (keys carry their own positions: moving them changes no key or value), writes every run at K, then moves each
row right by its run's padding, so that every row's sequence ends at one slot where decoding continues. After
decoding, each row goes back to its stream where it is (its tokens from slot ``StreamCache.kv_offset``); the
next step moves it again. A move is one contiguous copy per row.

Streams join (``open``) and leave (``finish``, ``close``) freely. ``feed`` only buffers samples, checked on the
spot: a bad piece raises a typed error and leaves the stream as it was. ``step`` runs one batched update for up to
``max_batch`` ready streams, the longest waiting first, one chunk each; ``start`` runs steps on a thread of its
own as chunks become ready and reports each update through the stream's callback. An error of one stream's own
input (a ``QasrError``) ends that stream alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax import buckets, sharding
from qasr_jax.engine import (
    DecodeOptions,
    DecodeState,
    Generation,
    is_eos,
    min_slots,
    next_token,
    token_logprob,
)
from qasr_jax.errors import AudioTooLongError, QasrError
from qasr_jax.memory import HeapTrimmer
from qasr_jax.model import Qwen3ASR, decode_layer_params, extend_cache
from qasr_jax.model.attention import KVCache
from qasr_jax.model.decoder import CACHE_SEQ_AXIS, cache_length, layer_cache_shape
from qasr_jax.streaming import (
    MIN_CACHE_LEN,
    SAMPLE_RATE,
    ASRStreamingState,
    PendingUpdate,
    StreamingTranscriber,
    StreamStateError,
    StreamUpdate,
    as_pcm,
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
    """One stream of a ``StreamingEngine``: the handle its methods take.

    state: the stream's ``ASRStreamingState`` (language, text, updates, as with the official API); on_event: called
    from the engine's step (its thread under ``start``) with each ``StreamEvent`` of this stream.
    """

    def __init__(
        self, engine: StreamingEngine, stream_id: int, state: ASRStreamingState,
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


class StreamingEngine:
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
        self.transcriber = transcriber
        self.engine = transcriber.engine
        self.config = transcriber.config
        self.max_streams = max_streams
        self.max_batch = max_batch
        self.max_stream_seconds = max_stream_seconds
        self.steps = 0
        self.failure: BaseException | None = None
        self._streams: dict[int, LiveStream] = {}
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.heap = HeapTrimmer(trim_every)
        self.fault_context = fault_context

    @property
    def options(self) -> DecodeOptions:
        return self.engine.options

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
                f"expected a LiveStream of StreamingEngine.open(), got {type(stream).__name__}"
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
            generations = self._decode_rows(pending)
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

    # -- the thread --

    def start(self) -> None:
        """Run steps on a thread of its own whenever a stream has an update to run."""
        self._thread = threading.Thread(target=self._loop, name="qasr-streams", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Run the updates already possible, then end the thread; no new streams open meanwhile."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    idle = not any(s.ready_times for s in self._streams.values())
                if idle:
                    self.heap.idle()
                with self._lock:
                    while not any(s.ready_times for s in self._streams.values()):
                        if self._stopping:
                            return
                        self._lock.wait(0.5)
                self.step()
                self.heap.finished()
                self.heap.due()
        except BaseException as error:  # a bug or out of memory: every open stream ends with it
            self.failure = error
            with self._lock:
                self._stopping = True
                streams = list(self._streams.values())
                self._streams.clear()
            for stream in streams:
                stream.ended = True
                if stream.on_event is not None:
                    failed = QasrError(f"the streaming engine failed: {error!r}")
                    stream.on_event(StreamEvent(stream, None, True, failed, 0.0))
            raise

    # -- the batched decoder work --

    def _decode_rows(self, pending: Sequence[PendingUpdate]) -> list[Generation]:
        """Prefill every update's run after its kept prefix and decode them all greedily, as the rows of one
        decode state; each stream's cache comes back holding its new prompt from slot ``kv_offset``."""
        transcriber, cfg = self.transcriber, self.config.text
        n = len(pending)
        rows = buckets.bucket_size(n, 1, 2)
        slots = max(rows, min_slots())
        run_len = buckets.PROMPT_LADDER.size(max(len(p.run) for p in pending))
        window_tokens = transcriber.window_tokens
        windows = max(1, max(-(-len(p.audio) // window_tokens) for p in pending))
        audio_len = buckets.WINDOW_LADDER.size(windows) * window_tokens
        max_new = buckets.STEP_LADDER.size(max(p.budget for p in pending))
        top = max(p.keep for p in pending)
        held = [cache_length(p.state.cache.kv[0]) for p in pending if p.state.cache.kv is not None]
        cache_len = max([buckets.bucket_size(top + run_len + max_new, MIN_CACHE_LEN, 2), *held])

        ids = np.full((rows, run_len), self.options.pad_token_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        keeps = np.zeros((rows,), np.int32)
        offsets = np.zeros((rows,), np.int32)
        budgets = np.ones((rows,), np.int32)
        audio = np.zeros((rows, audio_len, cfg.hidden_size), np.float32)
        for b, p in enumerate(pending):
            ids[b, : len(p.run)] = p.run
            lengths[b], keeps[b], budgets[b] = len(p.run), p.keep, p.budget
            offsets[b] = p.state.cache.kv_offset
            audio[b, : len(p.audio)] = p.audio
        caches = [transcriber.grow_cache(p.state.cache.kv, cache_len) for p in pending]
        for p in pending:
            p.state.cache.kv = None  # the stacked copy holds them now
        stacked = self._stack_program(n, rows, cache_len)(caches)
        del caches
        extend = self._extend_program(rows, slots, cache_len, run_len, audio_len, max_new)
        placed = sharding.place_batch([keeps, offsets, ids, lengths, audio, budgets], self.engine.mesh,
                                      self.engine.sharding_rules)  # fmt: skip
        state = extend(transcriber.params, stacked, *placed)
        state = self.engine.generate(transcriber.params, state, int(budgets[:n].max()))
        generations = self.engine.collect(state, range(n))
        split = self._split_program(n, slots, cache_len)(state.caches)
        starts = jax.device_get(state.kv_start)
        for b, (p, kv) in enumerate(zip(pending, split)):
            p.state.cache.kv, p.state.cache.kv_offset = kv, int(starts[b])
        return generations

    def _layer_struct(self, rows: int, cache_len: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(layer_cache_shape(self.config.text, rows, cache_len), self.engine.dtype)

    def _stack_program(self, n: int, rows: int, cache_len: int) -> Any:
        layers = self.config.text.num_hidden_layers
        one = self._layer_struct(1, cache_len)
        args = self.engine.abstract([[{"k": one, "v": one} for _ in range(layers)] for _ in range(n)], True)
        fn = functools.partial(stack_rows, rows)
        return self.engine.compile_program(("streams-stack", n, rows, cache_len), fn, args, state_out=True)

    def _split_program(self, n: int, slots: int, cache_len: int) -> Any:
        layer = self._layer_struct(slots, cache_len)
        args = self.engine.abstract(
            [{"k": layer, "v": layer} for _ in range(self.config.text.num_hidden_layers)], True
        )
        fn = functools.partial(split_rows, n)
        return self.engine.compile_program(("streams-split", n, slots, cache_len), fn, args, state_out=True)

    def _extend_program(
        self, rows: int, slots: int, cache_len: int, run_len: int, audio_len: int, max_new: int
    ) -> Any:
        key = ("streams-extend", rows, slots, cache_len, run_len, audio_len, max_new, self.options)
        fn = functools.partial(extend_rows_program, self.engine.model, self.options, max_new, slots)
        mesh, rules = self.engine.mesh, self.engine.sharding_rules
        layer = self._layer_struct(rows, cache_len)
        vector = sharding.batch_struct((rows,), jnp.int32, mesh, rules)
        return self.engine.compile_program(
            key, fn, sharding.abstract_arrays(self.transcriber.params),
            self.engine.abstract([{"k": layer, "v": layer} for _ in range(self.config.text.num_hidden_layers)], True),
            vector, vector, sharding.batch_struct((rows, run_len), jnp.int32, mesh, rules), vector,
            sharding.batch_struct((rows, audio_len, self.config.text.hidden_size), jnp.float32, mesh, rules), vector,
            donate=(1,), state_out=True,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The programs


def roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Each row's cache slots moved right by its own ``shift`` (cyclically): ``x [rows, kv, cache_len, hd]``,
    ``shift [rows]``. One contiguous slice per row of the cache laid out twice (a per-element gather is much
    slower on the CPU)."""
    length = x.shape[CACHE_SEQ_AXIS]
    doubled = jnp.concatenate([x, x], axis=CACHE_SEQ_AXIS)
    rows = [
        jax.lax.dynamic_slice_in_dim(
            doubled[b : b + 1], jnp.mod(-shift[b], length), length, axis=CACHE_SEQ_AXIS
        )
        for b in range(x.shape[0])
    ]
    return jnp.concatenate(rows, axis=0)


def pad_rows(x: jax.Array, rows: int, value: Any = 0) -> jax.Array:
    """``x`` with rows of ``value`` appended up to ``rows`` (axis 0)."""
    if x.shape[0] >= rows:
        return x
    return jnp.concatenate([x, jnp.full((rows - x.shape[0], *x.shape[1:]), value, x.dtype)], axis=0)


def stack_rows(rows: int, streams: list[list[KVCache]]) -> list[KVCache]:
    """The caches of ``len(streams)`` streams (per layer ``[1, kv, cache_len, hd]``) as the first rows of one
    cache of ``rows`` rows (the rest zeros)."""
    return [
        {name: pad_rows(jnp.concatenate([stream[layer][name] for stream in streams], axis=0), rows)
         for name in ("k", "v")}
        for layer in range(len(streams[0]))
    ]  # fmt: skip


def split_rows(n: int, caches: list[KVCache]) -> list[list[KVCache]]:
    """The first ``n`` rows of a decode state's caches, each as a stream's own cache (per layer
    ``[1, kv, cache_len, hd]``, its tokens where the state has them)."""
    return [[{name: layer[name][b : b + 1] for name in ("k", "v")} for layer in caches] for b in range(n)]


def extend_rows_program(
    model: Qwen3ASR,
    options: DecodeOptions,
    max_new: int,
    slots: int,
    params: Any,
    caches: list[KVCache],
    keeps: jax.Array,
    offsets: jax.Array,
    ids: jax.Array,
    lengths: jax.Array,
    audio: jax.Array,
    budgets: jax.Array,
) -> DecodeState:
    """Every row's run ``ids[b, :lengths[b]]`` (its audio slots taking ``audio[b]`` in order) prefilled after the
    ``keeps[b]`` tokens its cache holds from slot ``offsets[b]``, and a decode state of ``slots`` slots (the rows,
    then empty ones) that continues them all.

    caches: per layer ``[rows, kv, cache_len, hd]``. Row b's kept tokens are moved to end at slot K = max(keeps),
    the runs are written at K (right-padded), then row b is moved right by its padding, so that every row's
    sequence ends at the state's shared index K + run_len (what falls off a row's end is past its sequence and is
    overwritten by decoding or never seen).
    """
    rows, run_len = ids.shape
    top = jnp.max(keeps)
    caches = [
        {name: roll_rows(layer[name], top - keeps - offsets) for name in ("k", "v")} for layer in caches
    ]
    x = model.apply({"params": params}, ids, audio, method=Qwen3ASR.embed_inputs)
    positions = keeps[:, None] + jnp.arange(run_len, dtype=jnp.int32)[None, :]
    layer_params = decode_layer_params(model, params)
    logits, caches = extend_cache(
        model, params, layer_params, x, positions, top - keeps, caches, top, lengths - 1
    )
    caches = [
        {name: pad_rows(roll_rows(layer[name], run_len - lengths), slots) for name in ("k", "v")}
        for layer in caches
    ]
    first = next_token(logits, jnp.zeros((rows, 1), jnp.int32), jnp.int32(0), None, options)
    first_logprob = pad_rows(token_logprob(logits, first), slots)
    ended = pad_rows(is_eos(first, options), slots)
    first = pad_rows(first, slots, options.pad_token_id)
    budgets = pad_rows(budgets, slots)  # empty slots: no budget, never live
    tokens = jnp.full((slots, max_new), options.pad_token_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((slots, max_new), jnp.float32).at[:, 0].set(first_logprob)
    seen = None
    if options.tracks_seen:
        seen = jax.nn.one_hot(first, model.config.text.vocab_size, dtype=bool)
    index = top + run_len
    return DecodeState(
        caches=caches,
        index=index,
        kv_start=index - pad_rows(lengths + keeps, slots),
        positions=pad_rows(keeps + lengths, slots),
        last_token=first,
        tokens=tokens,
        logprobs=logprobs,
        counts=jnp.ones((slots,), jnp.int32),
        budgets=budgets,
        live=~ended & (budgets > 1),
        stopped=ended,
        seen=seen,
    )


__all__ = [
    "LiveStream",
    "StreamEvent",
    "StreamingEngine",
    "TooManyStreamsError",
    "extend_rows_program",
    "pad_rows",
    "roll_rows",
    "split_rows",
    "stack_rows",
]
