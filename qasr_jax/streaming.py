"""Streaming transcription: the official streaming API on the engine, with per-update work bounded by one
encoder window.

The algorithm is the official one (``qwen_asr`` ``init_streaming_state`` / ``streaming_transcribe`` /
``finish_streaming_transcribe``): samples are buffered into chunks of ``chunk_size_sec``; at each chunk the model
sees all audio so far with the chat prompt plus a text prefix — the previous output less its last
``unfixed_token_num`` tokens (more when the cut would split a character; no prefix during the first
``unfixed_chunk_num`` chunks) — and greedy decoding continues the prefix; prefix plus continuation is parsed into
(language, text). ``finish`` flushes the buffered tail the same way.

Fed naively that costs O(stream) per update. Here an update recomputes only what changed, exactly:

- encoder: attention is block-diagonal over windows of ``window_frames`` mel frames (8 s) and the conv front end
  works per 1-s chunk, so a window's output depends on its own features only. Each window's features and
  output are cached; a window is encoded again only when its features differ from the cached ones. That is the
  open (last) window, plus any earlier window whose frames moved because the clip-wide log-mel clamp
  (``max(log_spec, max − 8)``) changed — a louder chunk raises the maximum;
- decoder: the stream keeps its KV cache. Every prompt token before the first audio token of the first
  recomputed window has the same id, embedding and position as in the previous update, so its keys and values
  are kept and the prefill starts there (``Engine.prefill`` with a ``Prefix``): the open window's audio tokens,
  the prompt tail and the text prefix. Greedy decoding then runs in the engine's decode state
  (``Engine.generate``). A lone stream is one row of the same programs that run many streams at once.

The transcriber keeps host-side state only (windows, prompts, prefixes); every device program is the engine's.

``incremental=False`` recomputes everything every update (what the official code does): the baseline of
``benchmarks.stream``, through the same programs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from qasr_jax import audio as audio_io
from qasr_jax import buckets
from qasr_jax import text as text_io
from qasr_jax.config import ThinkerConfig
from qasr_jax.engine import Continuation, DecodeOptions, DecodeResult, Engine, Prefix
from qasr_jax.errors import EmptyAudioError, InvalidAudioError, QasrError
from qasr_jax.model.attention import KVCache
from qasr_jax.transcript import Segment, mean_logprob, segment_of_output

SAMPLE_RATE = audio_io.SAMPLE_RATE


class StreamStateError(QasrError, ValueError):
    """A streaming state that cannot be used here: from another model, already finished, or not a state."""


@dataclasses.dataclass(frozen=True)
class UpdateStats:
    """The work of one update.

    encoder_chunks: 1-s encoder chunks of audio encoded (the open window's, plus those of windows recomputed
    because the log-mel clamp moved their features); windows_encoded / windows_recomputed: windows encoded, and
    of those the complete ones whose cached output went stale; prefilled_tokens: prompt tokens run through the
    decoder; reused_tokens: prompt tokens whose keys/values were kept; generated_tokens; seconds: wall time.
    """

    encoder_chunks: int
    windows_encoded: int
    windows_recomputed: int
    prefilled_tokens: int
    reused_tokens: int
    generated_tokens: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class StreamUpdate:
    """One update of a stream: chunk index, the parsed result, the prefix it was given (the part of the text
    fixed before this update), the raw decoded output, whether it was the final flush, and its cost.

    ``segment``: the tokens behind ``raw`` with their log-probabilities, the text's words with their confidences
    and the finish reason (``qasr_jax.transcript.Segment``, spanning the stream from 0 s): the prefix's tokens
    as the updates that generated them recorded them (a token the rollback cut inside counts whole), then this
    update's. ``token_ids``, ``logprobs`` and ``avg_logprob`` are the segment's.
    """

    chunk_index: int
    audio_seconds: float
    language: str
    text: str
    prefix: str
    raw: str
    final: bool
    stats: UpdateStats
    segment: Segment | None = None

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.segment.token_ids if self.segment is not None else ()

    @property
    def logprobs(self) -> tuple[float, ...]:
        return self.segment.logprobs if self.segment is not None else ()

    @property
    def avg_logprob(self) -> float | None:
        return mean_logprob(self.logprobs)


@dataclasses.dataclass(frozen=True)
class RawTokens:
    """The tokens behind a stream's raw output: ids, their log-probabilities as the decode loop recorded them
    when it generated them, and the characters of the raw text each produced, ``(start, end)``."""

    ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()

    def behind(self, prefix: str) -> RawTokens:
        """The tokens behind ``prefix``, a rolled-back prefix of their raw text: those whose characters start
        inside it, their spans cut at its end (a token the rollback cut inside is kept)."""
        end = len(prefix)
        kept = [k for k, (start, _) in enumerate(self.spans) if start < end]
        return RawTokens(
            tuple(self.ids[k] for k in kept),
            tuple(self.logprobs[k] for k in kept),
            tuple((self.spans[k][0], min(self.spans[k][1], end)) for k in kept),
        )

    def extended(
        self, offset: int, ids: Sequence[int], logprobs: Sequence[float], spans: Sequence[tuple[int, int]]
    ) -> RawTokens:
        """These tokens, then ``ids`` whose spans start at character ``offset`` of the raw text."""
        return RawTokens(
            (*self.ids, *(int(i) for i in ids)),
            (*self.logprobs, *(float(p) for p in logprobs)),
            (*self.spans, *((offset + start, offset + end) for start, end in spans)),
        )


@dataclasses.dataclass
class StreamCache:
    """What a stream keeps between updates (device arrays and host copies).

    window_features: per encoder window, the features ``[n_mels, frames]`` its output was computed from;
    window_embeds: per window, its audio embeddings ``[tokens, hidden]``; kv: the decoder's per-layer caches
    ``[1, kv_heads, cache_len, head_dim]``, slot ``kv_offset + i`` holding token i of ``kv_ids`` (the last
    prompt; where a batched step left them); raw_tokens: the tokens behind the latest raw output, whose scores the next update's prefix keeps.
    """

    window_features: list[np.ndarray] = dataclasses.field(default_factory=list)
    window_embeds: list[np.ndarray] = dataclasses.field(default_factory=list)
    kv: list[KVCache] | None = None
    kv_ids: list[int] = dataclasses.field(default_factory=list)
    kv_offset: int = 0
    raw_tokens: RawTokens = dataclasses.field(default_factory=RawTokens)


@dataclasses.dataclass
class ASRStreamingState:
    """One stream (the official fields first, with the official meanings).

    unfixed_chunk_num: no prefix during the first N chunks; unfixed_token_num: tokens rolled back from the
    previous output to make the prefix; chunk_size_sec / chunk_size_samples: the update period; chunk_id: updates
    so far; buffer: samples not yet in a chunk; audio_accum: the stream so far; prompt_raw: the chat prompt
    (with the forced-language suffix); language / text: the latest result; _raw_decoded: the latest raw output.

    Beyond the official: finished (set by ``finish_streaming_transcribe``); time_stamps: the forced aligner's
    words for the final text (``finish_streaming_transcribe(state, return_time_stamps=True)``); updates: one ``StreamUpdate`` per
    update; cache: the incremental work's state; owner: the transcriber the state belongs to.
    """

    unfixed_chunk_num: int
    unfixed_token_num: int
    chunk_size_sec: float
    chunk_size_samples: int
    chunk_id: int
    buffer: np.ndarray
    audio_accum: np.ndarray
    prompt_raw: str
    context: str
    force_language: str | None
    language: str
    text: str
    _raw_decoded: str
    finished: bool = False
    time_stamps: Any = None
    updates: list[StreamUpdate] = dataclasses.field(default_factory=list)
    cache: StreamCache = dataclasses.field(default_factory=StreamCache, repr=False)
    owner: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def fixed_text(self) -> str:
        """The transcript part of the prefix the latest update was given: text the coming updates keep."""
        return fixed_text(self.updates[-1].prefix, self.force_language) if self.updates else ""

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The tokens behind the latest result (``StreamUpdate.segment``)."""
        return self.updates[-1].token_ids if self.updates else ()

    @property
    def token_logprobs(self) -> tuple[float, ...]:
        return self.updates[-1].logprobs if self.updates else ()

    @property
    def avg_logprob(self) -> float | None:
        """Mean log-probability of the tokens behind the latest result; None before the first update."""
        return mean_logprob(self.token_logprobs)


@dataclasses.dataclass
class PendingUpdate:
    """One stream's update while it runs: set by ``begin_update`` (prefix, the stream's features ``[n_mels,
    frames]``, ``windows``: the encoder windows to encode, and the work they mean) and ``plan_decode`` (``ids``:
    the prompt's ids, ``kept``: how many of them the stream's cache keeps, ``run_ids``: the rest, to prefill after
    them, ``audio``: the run's audio embeddings ``[tokens, hidden]``, the token budget)."""

    state: ASRStreamingState
    final: bool
    started: float
    prefix: str
    samples: int
    frames: int
    features: np.ndarray
    windows: list[int]
    recomputed: int
    chunks: int
    ids: list[int] = dataclasses.field(default_factory=list)
    kept: int = 0
    run_ids: list[int] = dataclasses.field(default_factory=list)
    audio: np.ndarray | None = None
    budget: int = 0


def rollback_prefix(tokenizer: text_io.Tokenizer, raw: str, unfixed_token_num: int, final: bool) -> str:
    """The previous raw output less its last ``unfixed_token_num`` tokens, as the next prompt's prefix.

    Per chunk, more tokens are dropped until the prefix decodes without U+FFFD (a cut inside a character, or
    any earlier broken character). The final flush keeps at least one token and does not check.
    """
    ids = tokenizer.encode(raw)
    if final:
        return tokenizer.decode(ids[: max(1, len(ids) - unfixed_token_num)])
    drop = unfixed_token_num
    while True:
        end = max(0, len(ids) - drop)
        if end == 0:
            return ""
        prefix = tokenizer.decode(ids[:end])
        if "\ufffd" not in prefix:
            return prefix
        drop += 1


def generated_text(tokenizer: text_io.Tokenizer, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text of an update's generated ``ids`` as the official streaming backend (vLLM) reports it.

    vLLM detokenises incrementally. It primes with the end of the prompt (the shortest suffix of 4 to 23 tokens
    that decodes without U+FFFD, else the whole prompt), then emits text whenever the text so far grows and does
    not end with U+FFFD. So the bytes of a character that the budget cut are held back, where a plain decode would
    end with U+FFFD; and what the priming held back (a prompt ending with U+FFFD: the final flush's prefix when
    its cut split a character) comes out in front of the new text. Special tokens are skipped.
    """
    primer = list(prompt_ids)
    if len(primer) > 4:
        primer = next(
            (
                primer[-n:]
                for n in range(4, min(len(primer), 23) + 1)
                if "\ufffd" not in _decode(tokenizer, primer[-n:])
            ),
            primer,
        )
    tokens = primer + list(ids)
    primed = _last_whole_text(tokenizer, tokens, 0, len(primer))
    emitted = _last_whole_text(tokenizer, tokens, len(primer) + 1, len(tokens))
    return "" if emitted is None else emitted[len(primed or "") :]


def _decode(tokenizer: text_io.Tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _last_whole_text(tokenizer: text_io.Tokenizer, tokens: list[int], first: int, last: int) -> str | None:
    """The text of ``tokens[:k]`` for the largest ``k`` in ``[first, last]`` at which it does not end with U+FFFD
    (the last point an incremental detokeniser emitted), or None."""
    for k in range(last, first - 1, -1):
        text = _decode(tokenizer, tokens[:k])
        if not text.endswith("\ufffd"):
            return text
    return None


def fixed_text(prefix: str, force_language: str | None) -> str:
    """The transcript part of an update's prefix (after ``<asr_text>``; all of it with a forced language)."""
    if force_language:
        return text_io.parse_asr_output(prefix, force_language)[1]
    if text_io.ASR_TEXT not in prefix:
        return ""
    return text_io.parse_asr_output(prefix)[1]


def as_pcm(pcm16k: Any) -> np.ndarray:
    """A piece of a stream as float32 samples ``[n]``: int16 PCM scaled by 1/32768, floats as they are.

    Accepts ``[n]``, or ``[n, 1]`` / ``[1, n]`` (one channel). Raises InvalidAudioError for other shapes, sample
    types other than int16 and floats, and NaN/Inf samples.
    """
    if pcm16k is None:
        raise ValueError("pcm16k must not be None.")
    try:
        x = np.asarray(pcm16k)
    except (TypeError, ValueError) as error:
        raise InvalidAudioError(f"stream audio: samples are not a numeric array ({error})") from error
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise InvalidAudioError(
            f"stream audio: expected mono samples of shape [n] (or [n, 1]), got shape {x.shape}"
        )
    if x.dtype == np.int16:
        return x.astype(np.float32) / np.float32(32768.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidAudioError(
            f"stream audio: samples must be int16 PCM or floats in [-1, 1], got dtype {x.dtype}"
        )
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise InvalidAudioError("stream audio: the piece contains NaN or Inf samples")
    return x


class StreamingTranscriber:
    """Streams over one model's params and engine (any number of independent states).

    ``budget(seconds)`` is the token budget of an update over ``seconds`` of audio. ``incremental=False``
    recomputes every window and the whole prompt at every update (the official algorithm's cost).
    """

    def __init__(
        self,
        config: ThinkerConfig,
        params: Any,
        tokenizer: text_io.Tokenizer,
        engine: Engine,
        budget: Callable[[float], int],
        *,
        incremental: bool = True,
    ) -> None:
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.engine = engine
        self.budget = budget
        self.incremental = incremental
        self.window_frames = config.audio.window_frames
        self.window_tokens = config.audio.output_length(self.window_frames)

    @property
    def options(self) -> DecodeOptions:
        return self.engine.options

    # -- the official API --

    def init_state(
        self,
        context: str = "",
        language: str | None = None,
        unfixed_chunk_num: int = 2,
        unfixed_token_num: int = 5,
        chunk_size_sec: float = 2.0,
    ) -> ASRStreamingState:
        if chunk_size_sec is None or float(chunk_size_sec) <= 0:
            raise ValueError(f"chunk_size_sec must be > 0, got: {chunk_size_sec}")
        forced = None
        if language is not None and str(language).strip() != "":
            forced = text_io.normalize_language(str(language))
        text_io.build_prompt_ids(self.tokenizer, 0, context, forced)  # a context holding an audio slot fails
        chunk_samples = max(1, round(float(chunk_size_sec) * SAMPLE_RATE))
        return ASRStreamingState(
            unfixed_chunk_num=int(unfixed_chunk_num),
            unfixed_token_num=int(unfixed_token_num),
            chunk_size_sec=float(chunk_size_sec),
            chunk_size_samples=chunk_samples,
            chunk_id=0,
            buffer=np.zeros((0,), np.float32),
            audio_accum=np.zeros((0,), np.float32),
            prompt_raw=text_io.build_prompt_text(context, forced),
            context=context or "",
            force_language=forced,
            language="",
            text="",
            _raw_decoded="",
            owner=self,
        )

    def transcribe(self, pcm16k: Any, state: ASRStreamingState) -> ASRStreamingState:
        """Buffer ``pcm16k`` (any length) and run one update per completed chunk; returns ``state``."""
        self._check(state)
        piece = as_pcm(pcm16k)
        if piece.shape[0] > 0:
            state.buffer = np.concatenate([state.buffer, piece])
        while state.buffer.shape[0] >= state.chunk_size_samples:
            chunk = state.buffer[: state.chunk_size_samples]
            state.buffer = state.buffer[state.chunk_size_samples :]
            state.audio_accum = np.concatenate([state.audio_accum, chunk])
            self._update(state, final=False)
        return state

    def finish(self, state: ASRStreamingState) -> ASRStreamingState:
        """Run the buffered tail (shorter than a chunk, not padded) as a last update; nothing when it is empty.
        The state accepts no more audio afterwards."""
        self._check(state)
        if state.buffer.shape[0] > 0:
            state.audio_accum = np.concatenate([state.audio_accum, state.buffer])
            state.buffer = np.zeros((0,), np.float32)
            self._update(state, final=True)
        state.finished = True
        return state

    def warm_start(self, state: ASRStreamingState, samples: Any) -> ASRStreamingState:
        """Bring a new stream to ``len(samples)`` in one update, as if those samples had been its chunks so far
        (for benchmarks at a given stream length, or to continue a recording live); the next chunk follows."""
        self._check(state)
        if state.chunk_id or state.buffer.shape[0]:
            raise StreamStateError("warm_start needs a new stream")
        state.audio_accum = as_pcm(samples).copy()
        state.chunk_id = max(0, state.audio_accum.shape[0] // state.chunk_size_samples - 1)
        self._update(state, final=False)
        return state

    def _check(self, state: Any) -> None:
        if state is None:
            raise ValueError("state must not be None. Call init_streaming_state() first.")
        if not isinstance(state, ASRStreamingState):
            raise StreamStateError(
                f"expected the ASRStreamingState of init_streaming_state(), got {type(state).__name__}"
            )
        if state.owner is not self:
            raise StreamStateError(
                "this streaming state was created by another model; continue it with the model that made it"
            )
        if state.finished:
            raise StreamStateError(
                "this stream was finished by finish_streaming_transcribe(); start a new one with "
                "init_streaming_state()"
            )

    # -- one update, in four phases (``StreamScheduler`` runs the middle two for many streams at once) --

    def _update(self, state: ASRStreamingState, final: bool) -> None:
        pending = self.begin_update(state, final)
        self.encode_windows([pending])
        self.plan_decode(pending)
        (generation,) = decode_updates(self.engine, self.params, [pending])
        self.complete_update(pending, generation)

    def begin_update(self, state: ASRStreamingState, final: bool) -> PendingUpdate:
        """The host side of an update over ``state.audio_accum``: the text prefix, the stream's features and the
        encoder windows whose features are not those cached (raises EmptyAudioError for a stream shorter than one
        feature frame)."""
        started = time.perf_counter()
        prefix = ""
        if state.chunk_id >= state.unfixed_chunk_num:
            prefix = rollback_prefix(self.tokenizer, state._raw_decoded, state.unfixed_token_num, final)
        samples = len(state.audio_accum)
        frames = audio_io.num_frames(samples)
        if frames == 0:
            raise EmptyAudioError(
                f"stream audio: {samples} samples is shorter than one feature frame "
                f"({audio_io.HOP_LENGTH} samples at 16 kHz)"
            )
        features = self._features(state.audio_accum, frames)
        cache, wf = state.cache, self.window_frames
        n_windows = -(-frames // wf)
        windows = []
        for w in range(n_windows):
            piece = features[:, w * wf : (w + 1) * wf]
            if (
                self.incremental
                and w < len(cache.window_features)
                and window_unchanged(cache.window_features[w], piece)
            ):
                continue
            windows.append(w)
        del cache.window_features[n_windows:], cache.window_embeds[n_windows:]
        cached = cache.window_features
        recomputed = sum(1 for w in windows if w < len(cached) and cached[w].shape[1] == wf)
        chunk_frames = self.config.audio.chunk_frames
        chunks = sum(-(-min(wf, frames - w * wf) // chunk_frames) for w in windows)
        return PendingUpdate(
            state, final, started, prefix, samples, frames, features, windows, recomputed, chunks
        )

    def encode_windows(self, pending: Sequence[PendingUpdate]) -> None:
        """Encode the windows every update in ``pending`` needs, all in one batch of encoder rows, and store their
        features and outputs in the streams' caches."""
        wf = self.window_frames
        rows_of = [(p, w) for p in pending for w in p.windows]
        if not rows_of:
            return
        rows = buckets.bucket_size(len(rows_of), 1, 4)  # little padding when every window is encoded
        batch = np.zeros((rows, self.config.audio.num_mel_bins, wf), np.float32)
        lengths = np.zeros((rows,), np.int32)
        clip = np.full((rows,), rows_of[0][0].frames, np.int32)  # padding rows: any valid clip length
        for i, (p, w) in enumerate(rows_of):
            piece = p.features[:, w * wf : (w + 1) * wf]
            batch[i, :, : piece.shape[1]] = piece
            lengths[i], clip[i] = piece.shape[1], p.frames
        embeds = self.engine.encode_windows(self.params, batch, lengths, clip)
        for i, (p, w) in enumerate(rows_of):
            cache = p.state.cache
            piece = p.features[:, w * wf : (w + 1) * wf].copy()
            tokens = self.config.audio.output_length(piece.shape[1])
            if w < len(cache.window_features):
                cache.window_features[w], cache.window_embeds[w] = piece, embeds[i, :tokens]
            else:
                cache.window_features.append(piece)
                cache.window_embeds.append(embeds[i, :tokens])

    def plan_decode(self, pending: PendingUpdate) -> None:
        """The prompt of the update (its audio slot expanded), how much of the cached prompt is kept, the run to
        prefill after it with its audio embeddings, and the token budget."""
        cache = pending.state.cache
        first_changed = pending.windows[0] if pending.windows else -(-pending.frames // self.window_frames)
        audio_tokens = self.config.audio.output_length(pending.frames)
        # The prompt string with the prefix is tokenised whole, as the official pipeline does (a prefix can
        # merge with the template's last characters); added tokens split the text first, so the audio slot is
        # one placeholder to expand.
        ids = self.tokenizer.encode(pending.state.prompt_raw + pending.prefix)
        head = ids.index(self.tokenizer.audio_pad_id)
        ids = [*ids[:head], *([self.tokenizer.audio_pad_id] * audio_tokens), *ids[head + 1 :]]
        keep = 0
        if self.incremental and cache.kv_ids:
            common = 0
            limit = min(len(ids), len(cache.kv_ids), head + first_changed * self.window_tokens)
            while common < limit and ids[common] == cache.kv_ids[common]:
                common += 1
            keep = min(common, len(ids) - 1)
        pending.ids, pending.kept, pending.run_ids = ids, keep, ids[keep:]
        pending.audio = self._audio_embeds(cache, max(0, keep - head), audio_tokens)
        pending.budget = int(self.budget(pending.samples / SAMPLE_RATE))

    def complete_update(self, pending: PendingUpdate, generation: DecodeResult) -> StreamUpdate:
        """Parse the update's output into the state, record it (with its work) and advance the chunk count."""
        state = pending.state
        state.cache.kv_ids = pending.ids
        generated = generated_text(self.tokenizer, pending.ids, generation.token_ids)
        state._raw_decoded = pending.prefix + generated
        # The tokens behind the raw output: the prefix's, then the generated ones whose text ends ``generated``
        # (those of a held-back tail are not; text the priming held back may come before theirs).
        full, spans = self.tokenizer.decode_with_spans(generation.token_ids, skip_special_tokens=True)
        behind = len(spans)
        while behind > 0 and not generated.endswith(full[: spans[behind - 1][1]]):
            behind -= 1
        start = len(pending.prefix) + len(generated) - (spans[behind - 1][1] if behind else 0)
        tokens = state.cache.raw_tokens.behind(pending.prefix).extended(
            start, generation.token_ids[:behind], generation.logprobs[:behind], spans[:behind]
        )
        state.cache.raw_tokens = tokens
        segment = segment_of_output(
            state._raw_decoded, tokens.ids, tokens.logprobs, tokens.spans, generation.stopped,
            state.force_language, 0.0, pending.samples / SAMPLE_RATE,
        )  # fmt: skip
        state.language, state.text = segment.language, segment.text
        stats = UpdateStats(
            pending.chunks, len(pending.windows), pending.recomputed, len(pending.run_ids), pending.kept,
            len(generation.token_ids), time.perf_counter() - pending.started,
        )  # fmt: skip
        update = StreamUpdate(
            state.chunk_id, pending.samples / SAMPLE_RATE, state.language, state.text, pending.prefix,
            state._raw_decoded, pending.final, stats, segment,
        )  # fmt: skip
        state.updates.append(update)
        state.chunk_id += 1
        return update

    # -- audio --

    def _features(self, samples: np.ndarray, frames: int) -> np.ndarray:
        """Log-mel of the whole stream ``[n_mels, frames]`` (the clamp is clip-wide), computed in a bucket of
        whole windows."""
        windows = -(-frames // self.window_frames)
        padded = buckets.WINDOW_LADDER.size(windows) * self.window_frames
        wave = np.zeros((1, (padded + 1) * audio_io.HOP_LENGTH), np.float32)
        wave[0, : len(samples)] = samples
        mel, _ = audio_io.log_mel(jnp.asarray(wave), jnp.asarray([len(samples)], jnp.int32), frames=padded)
        return np.asarray(mel[0, :, :frames])

    def _audio_embeds(self, cache: StreamCache, first: int, total: int) -> np.ndarray:
        """Audio embeddings ``[total − first, hidden]`` of tokens ``first..total`` of the stream."""
        start_window = first // self.window_tokens
        joined = np.concatenate(cache.window_embeds[start_window:], axis=0) if cache.window_embeds else None
        if joined is None:
            return np.zeros((0, self.config.text.hidden_size), np.float32)
        offset = first - start_window * self.window_tokens
        return joined[offset : offset + total - first]


def window_unchanged(cached: np.ndarray, fresh: np.ndarray) -> bool:
    """Whether a window's features are exactly those its cached encoder output was computed from."""
    return cached.shape == fresh.shape and np.array_equal(cached, fresh)


def decode_updates(engine: Engine, params: Any, pending: Sequence[PendingUpdate]) -> list[DecodeResult]:
    """The decoder's part of updates (``plan_decode`` done): every update's run prefilled after its stream's kept
    prefix, then greedy decoding of all of them as the rows of one decode state (a lone stream: one row); each
    stream's cache comes back holding its new prompt."""
    requests = [Continuation(p.run_ids, p.audio, p.budget) for p in pending]
    caches = [p.state.cache for p in pending]
    prefix = Prefix([c.kv for c in caches], [p.kept for p in pending], [c.kv_offset for c in caches])
    for cache in caches:
        cache.kv = None  # donated: the decode state holds them now
    state = engine.prefill(params, requests, prefix=prefix)
    state = engine.generate(params, state, max(p.budget for p in pending))
    generations = engine.collect(state, range(len(pending)))
    for cache, (kv, offset) in zip(caches, engine.row_caches(state, len(pending))):
        cache.kv, cache.kv_offset = kv, offset
    return generations


__all__ = [
    "ASRStreamingState",
    "PendingUpdate",
    "RawTokens",
    "StreamCache",
    "StreamStateError",
    "StreamUpdate",
    "StreamingTranscriber",
    "UpdateStats",
    "as_pcm",
    "fixed_text",
    "rollback_prefix",
    "window_unchanged",
]
