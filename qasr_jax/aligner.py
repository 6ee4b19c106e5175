"""Qwen3-ForcedAligner: word timestamps for (audio, text) pairs in one non-autoregressive pass.

For each pair the text is split into words (``text.split_words``), each word gets two ``<timestamp>`` slots
(its start and end), and the thinker runs once over ``<|audio_start|>{audio}<|audio_end|>w1<ts><ts>w2<ts><ts>…``.
The class predicted at a slot, times ``timestamp_segment_time`` (80 ms), is that boundary's time; the sequence of
boundaries is then made monotonic (``text.repair_timestamps``) and reported in seconds rounded to the
millisecond. Results are identical to the official ``Qwen3ForcedAligner.align`` run on each pair alone.

Many pairs run as padded batches: pairs are sorted by length and packed into batches; every batch is padded to a
bucket (rows to a power of two, mel frames to whole attention windows, text tokens to a multiple of 64), so one
compiled program serves every batch of its bucket. Each pair's result is independent of what else is in its
batch.

Problems with one pair (unreadable audio, an unsupported language, audio past the aligner's range) are reported
in that pair's result (``ForcedAlignResult.error``) and never affect the others.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qasr_jax import audio as audio_io
from qasr_jax import audio_files, buckets, compile_cache, sharding
from qasr_jax import text as text_io
from qasr_jax.config import ThinkerConfig, load_config
from qasr_jax.engine import Engine
from qasr_jax.errors import AlignmentError, ConfigError, LanguageError, QasrError
from qasr_jax.hub import resolve_model
from qasr_jax.model import Qwen3ASR

# The transcription pipeline aligns transcripts in pieces of at most this many seconds (the official
# MAX_FORCE_ALIGN_INPUT_SECONDS).
MAX_ALIGN_SECONDS = 180.0
# Shorter audio is zero-padded to this length, the official pipeline's rule for short pieces.
MIN_AUDIO_SECONDS = audio_io.MIN_PIECE_SECONDS
# Text tokens are padded to a multiple of this (one compiled program per multiple).
TEXT_BUCKET_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class ForcedAlignItem:
    """One aligned word (or CJK character): its text and its start/end in seconds; ``confidence``: how sure the
    transcription model was of the word (``qasr_jax.transcript.Word``), when the words came from a
    transcription (None otherwise)."""

    text: str
    start_time: float
    end_time: float
    confidence: float | None = None


@dataclasses.dataclass(frozen=True)
class ForcedAlignResult:
    """The alignment of one (audio, text) pair: its words in order, iterable and indexable.

    ``error`` is set (and ``items`` empty) when the pair could not be aligned; it says which input and why.
    An empty text, or one without letters or digits, aligns to no items and no error.
    """

    items: list[ForcedAlignItem] = dataclasses.field(default_factory=list)
    error: QasrError | None = None

    def __iter__(self) -> Iterator[ForcedAlignItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ForcedAlignItem:
        return self.items[index]

    @property
    def ok(self) -> bool:
        return self.error is None

    def shifted(self, seconds: float) -> ForcedAlignResult:
        """The same words with ``seconds`` added to every time (rounded to the millisecond, as the official
        pipeline offsets the pieces of long audio)."""
        items = [
            dataclasses.replace(
                item,
                start_time=round(item.start_time + seconds, 3),
                end_time=round(item.end_time + seconds, 3),
            )
            for item in self.items
        ]
        return ForcedAlignResult(items, self.error)


def concatenate_results(results: Sequence[ForcedAlignResult | None]) -> ForcedAlignResult | None:
    """The words of several results (pieces of one audio, already shifted) in order; None when there are none.

    The first error among the pieces is kept; words of the other pieces are still returned.
    """
    present = [result for result in results if result is not None]
    items = [item for result in present for item in result.items]
    error = next((result.error for result in present if result.error is not None), None)
    if not items and error is None:
        return None
    return ForcedAlignResult(items, error)


def piece_offsets(pieces: Sequence[audio_io.AudioPiece]) -> list[float]:
    """Start of each piece of one split audio in seconds, summed piece by piece as the official pipeline does
    (so that offsets, and the millisecond rounding after them, agree to the last bit)."""
    offsets = []
    elapsed = 0.0
    for piece in pieces:
        offsets.append(elapsed)
        elapsed += piece.num_samples / float(piece.sample_rate)
    return offsets


@dataclasses.dataclass
class _Pair:
    """One pair ready for the model: its words, token ids (audio slot expanded) and 16 kHz samples."""

    index: int
    words: list[str]
    token_ids: list[int]
    samples: np.ndarray
    frames: int
    audio_tokens: int

    @property
    def text_tokens(self) -> int:
        # Everything after <|audio_start|>, the audio run and <|audio_end|>.
        return len(self.token_ids) - self.audio_tokens - 2


def _is_single_audio(audio: Any) -> bool:
    if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)):
        return True
    # (samples, sample_rate): a pair whose second element is a number.
    return (
        isinstance(audio, tuple)
        and len(audio) == 2
        and isinstance(audio[1], (int, float, np.integer, np.floating))
        and not isinstance(audio[1], bool)
    )


def _as_list(value: Any, single: bool) -> list[Any]:
    return [value] if single else list(value)


def resolve_language(language: str | None) -> str | None:
    """The canonical name of a supported language, or None for "no language" (None or blank).

    Without a language the words are split on whitespace with every CJK ideograph a word of its own (the rule
    of every language but Japanese and Korean). LanguageError for names that are not supported.
    """
    if language is None or not str(language).strip():
        return None
    return text_io.normalize_language(language)


def _detected_language(language: str | None) -> str | None:
    """A language the transcription model reported, or None (plain whitespace splitting) for one that is not
    supported: every language but Japanese and Korean splits that way, so this is what the official pipeline
    does with it too."""
    try:
        return resolve_language(language)
    except LanguageError:
        return None


class Qwen3ForcedAligner:
    """Word timestamps from a Qwen3-ForcedAligner checkpoint.

    ``Qwen3ForcedAligner.from_pretrained(path)`` loads one; ``align(audio, text, language)`` aligns one pair or
    a batch of pairs; ``align_transcripts`` aligns the pieces of split audio and offsets their times.
    """

    def __init__(
        self,
        config: ThinkerConfig,
        params: Any,
        tokenizer: text_io.Tokenizer,
        *,
        dtype: Any = jnp.float32,
        max_batch_size: int = 8,
        max_batch_tokens: int = 16384,
        attention_impl: str = "auto",
        mesh: Mesh | None = None,
        sharding_rules: sharding.Rules = sharding.DEFAULT_RULES,
    ) -> None:
        """
        Args:
            config: an aligner thinker config (``config.is_aligner``).
            params: its parameter tree.
            tokenizer: the checkpoint's tokenizer.
            dtype: compute dtype.
            max_batch_size: most pairs in one forward pass.
            max_batch_tokens: most padded decoder tokens (rows × sequence length) in one forward pass; a longer
                pair still runs, alone.
            attention_impl: attention kernel choice passed to the model ("auto", "xla", "pallas").
            mesh: run on this device mesh (params already placed, e.g. by ``sharding.load_sharded``); each
                batch is split over it as ``sharding_rules`` say.
        """
        if not config.is_aligner or not config.classify_num or not config.timestamp_segment_time:
            raise ConfigError(
                "Qwen3ForcedAligner needs a ForcedAligner checkpoint (a class head, timestamp fields)"
            )
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be positive")
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.timestamp_token_id = int(config.timestamp_token_id)
        self.timestamp_segment_time = float(config.timestamp_segment_time)
        self._model = Qwen3ASR(config, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)
        self.mesh = mesh
        self.sharding_rules = sharding_rules
        # Its programs compile through an engine over the same model: one per batch bucket, keyed by (rows, mel
        # frames, text tokens).
        self.engine = Engine(config, model=self._model, mesh=mesh, sharding_rules=sharding_rules)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: Any = None,
        *,
        max_batch_size: int = 8,
        max_batch_tokens: int = 16384,
        attention_impl: str = "auto",
        mesh: Mesh | str | None = None,
        sharding_rules: Any = None,
        compilation_cache: str | os.PathLike | bool | None = None,
        weights_cache: str | os.PathLike | bool | None = None,
        revision: str | None = None,
    ) -> Qwen3ForcedAligner:
        """Load a ForcedAligner checkpoint (released, "-hf" or Orbax layout) and its tokenizer.

        ``path``: a checkpoint dir, or a Hugging Face Hub model name such as ``Qwen/Qwen3-ForcedAligner-0.6B`` at
        ``revision`` (default ``main``), as in ``Qwen3ASRModel.from_pretrained``. ``dtype`` is the params' and
        computation's dtype (default float32, which reproduces the official fp32 results exactly; bfloat16 is
        faster on accelerators). ``compilation_cache``, ``weights_cache``: as in
        ``Qwen3ASRModel.from_pretrained``.
        """
        compile_cache.enable(compilation_cache)
        path = resolve_model(path, revision)
        # The config first: refusing a transcription checkpoint should not cost loading its weights.
        if not load_config(path).is_aligner:
            raise ConfigError(
                f"{os.fspath(path)}: not a ForcedAligner checkpoint (thinker_config.model_type has no "
                "'forced_aligner'); use Qwen3ASRModel for transcription checkpoints"
            )
        compute_dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
        config, params, mesh, rules = sharding.load_placed(
            path, compute_dtype, mesh, sharding_rules, weights_cache
        )
        tokenizer = text_io.Tokenizer.from_pretrained(path)
        return cls(
            config,
            params,
            tokenizer,
            dtype=compute_dtype,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            attention_impl=attention_impl,
            mesh=mesh,
            sharding_rules=rules,
        )

    # -- limits --

    @property
    def max_seconds(self) -> float:
        """Longest audio the classes can cover: classify_num × timestamp_segment_time (400 s released)."""
        return self.config.classify_num * self.timestamp_segment_time / 1000.0

    @property
    def buckets(self) -> set[tuple[int, int, int]]:
        """The (rows, mel frames, text tokens) batch shapes compiled so far."""
        return {key[0] for key in self.engine.programs.keys()}  # noqa: SIM118 (not a dict)

    @property
    def compiled_programs(self) -> int:
        """Programs compiled so far (one per batch bucket)."""
        return self.engine.programs.count

    def _executable(self, rows: int, frames: int, text_tokens: int) -> Any:
        """The compiled program of one batch bucket, compiled on first use."""
        mesh, rules = self.mesh, self.sharding_rules
        tokens = sharding.batch_struct((rows, self._sequence_length(frames, text_tokens)), jnp.int32, mesh, rules)
        mel = sharding.batch_struct((rows, self.config.audio.num_mel_bins, frames), jnp.float32, mesh, rules)
        mel_mask = sharding.batch_struct((rows, frames), jnp.int32, mesh, rules)
        fn = functools.partial(self._timestamp_classes, text_tokens=text_tokens)
        return self.engine.compile_program(
            (rows, frames, text_tokens), fn, sharding.abstract_arrays(self.params), tokens, tokens, mel, mel_mask
        )

    # -- the device program --

    def _timestamp_classes(
        self,
        params: Any,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        input_features: jax.Array,
        feature_attention_mask: jax.Array,
        text_tokens: int,
    ) -> jax.Array:
        """Predicted class at each of the last ``text_tokens`` positions: ``[batch, text_tokens]`` int32.

        input_ids, attention_mask: ``[batch, seq]``, left-padded, so every row ends with its text.
        input_features: ``[batch, n_mels, frames]``; feature_attention_mask: ``[batch, frames]``.
        """
        batch, seq = input_ids.shape
        # The head only where timestamp slots can be: the text at the end of each row.
        text = jnp.broadcast_to(jnp.arange(seq - text_tokens, seq, dtype=jnp.int32), (batch, text_tokens))
        variables = {"params": params}
        logits = self._model.apply(
            variables, input_ids, attention_mask, input_features, feature_attention_mask, logits_at=text
        )
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    # -- preparing pairs --

    def _prepare(self, index: int, audio: Any, text: str, language: str | None) -> _Pair | ForcedAlignResult:
        """The pair ready for the model, or its result when it needs none (no words) or cannot be aligned."""
        label = audio_files.describe(audio, f"item {index}")
        try:
            canonical = resolve_language(language)
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise AlignmentError(f"{label}: the text must be a string, got {type(text).__name__}")
            try:
                words = text_io.split_words(text, canonical)
            except ImportError as error:
                raise AlignmentError(f"{label}: {error}") from error
            if isinstance(audio, np.ndarray):
                audio = (audio, audio_io.SAMPLE_RATE)
            samples = audio_io.load_audio(audio, name=label)
            seconds = samples.shape[0] / audio_io.SAMPLE_RATE
            if seconds > self.max_seconds:
                raise AlignmentError(
                    f"{label}: the audio lasts {seconds:.2f} s, past the aligner's range of {self.max_seconds:g} s "
                    f"({self.config.classify_num} classes × {self.timestamp_segment_time:g} ms); split it into "
                    f"pieces of at most {MAX_ALIGN_SECONDS:g} s (audio.split_audio) and align each piece's text"
                )
        except QasrError as error:
            return ForcedAlignResult([], error)
        if not words:
            return ForcedAlignResult([])
        min_samples = int(MIN_AUDIO_SECONDS * audio_io.SAMPLE_RATE)
        if samples.shape[0] < min_samples:
            samples = np.pad(samples, (0, min_samples - samples.shape[0]))
        frames = audio_io.num_frames(samples.shape[0])
        audio_tokens = self.config.audio.output_length(frames)
        token_ids = text_io.build_aligner_ids(self.tokenizer, words, audio_tokens)
        if len(token_ids) > self.config.text.max_position_embeddings:
            error = AlignmentError(
                f"{label}: audio and text need {len(token_ids)} tokens, more than the model's "
                f"{self.config.text.max_position_embeddings} positions"
            )
            return ForcedAlignResult([], error)
        return _Pair(index, words, token_ids, samples, frames, audio_tokens)

    # -- batching --

    def _frames_bucket(self, frames: int) -> int:
        # Whole attention windows: the encoder pads to them anyway, so this costs nothing.
        window = self.config.audio.window_frames
        return buckets.round_up(frames, window)

    def _bucket(self, pairs: Sequence[_Pair]) -> tuple[int, int, int]:
        """(rows, mel frames, text tokens) of the batch holding ``pairs``: rows to a power of two, frames to whole
        attention windows, text to a multiple of TEXT_BUCKET_TOKENS."""
        rows = buckets.batch_bucket(min(len(pairs), self.max_batch_size), self.max_batch_size)
        frames = self._frames_bucket(max(pair.frames for pair in pairs))
        text_tokens = buckets.round_up(max(pair.text_tokens for pair in pairs), TEXT_BUCKET_TOKENS)
        return rows, frames, text_tokens

    def _sequence_length(self, frames: int, text_tokens: int) -> int:
        # <|audio_start|>, the audio tokens, <|audio_end|>, then the words and their slots.
        return self.config.audio.output_length(frames) + 2 + text_tokens

    def _batches(self, pairs: list[_Pair]) -> Iterator[list[_Pair]]:
        """Pairs packed into batches, longest first, within max_batch_size and max_batch_tokens."""
        ordered = sorted(
            pairs, key=lambda pair: self._sequence_length(*self._bucket([pair])[1:]), reverse=True
        )
        batch: list[_Pair] = []
        for pair in ordered:
            grown = [*batch, pair]
            rows, frames, text_tokens = self._bucket(grown)
            if batch and (len(grown) > self.max_batch_size or
                          rows * self._sequence_length(frames, text_tokens) > self.max_batch_tokens):  # fmt: skip
                yield batch
                grown = [pair]
            batch = grown
        if batch:
            yield batch

    def _run_batch(self, batch: list[_Pair]) -> list[ForcedAlignResult]:
        rows, frames, text_tokens = self._bucket(batch)
        seq = self._sequence_length(frames, text_tokens)
        # Filler rows repeat the last pair so that every row computes finite numbers; their output is dropped.
        padded = batch + [batch[-1]] * (rows - len(batch))

        input_features, feature_mask = audio_io.features(
            [pair.samples for pair in padded], pad_to_multiple=frames
        )
        input_ids = np.full((rows, seq), self.tokenizer.endoftext_id, dtype=np.int32)
        attention_mask = np.zeros((rows, seq), dtype=np.int32)
        for row, pair in enumerate(padded):
            input_ids[row, seq - len(pair.token_ids) :] = pair.token_ids
            attention_mask[row, seq - len(pair.token_ids) :] = 1

        inputs = sharding.place_batch(
            [
                np.asarray(input_ids, np.int32),
                np.asarray(attention_mask, np.int32),
                np.asarray(input_features, np.float32),
                np.asarray(feature_mask, np.int32),
            ],
            self.mesh,
            self.sharding_rules,
        )
        with sharding.use_mesh(self.mesh, self.sharding_rules):
            classes = self._executable(rows, frames, text_tokens)(self.params, *inputs)
        classes = np.asarray(classes)
        is_slot = input_ids[:, -text_tokens:] == self.timestamp_token_id
        return [self._words_with_times(pair, classes[row][is_slot[row]]) for row, pair in enumerate(batch)]

    def _words_with_times(self, pair: _Pair, slot_classes: np.ndarray) -> ForcedAlignResult:
        """Words with times from the classes predicted at the pair's timestamp slots ([2 · words])."""
        milliseconds = text_io.repair_timestamps(
            slot_classes.astype(np.float64) * self.timestamp_segment_time
        )
        items = [
            ForcedAlignItem(
                word, round(milliseconds[2 * i] / 1000.0, 3), round(milliseconds[2 * i + 1] / 1000.0, 3)
            )
            for i, word in enumerate(pair.words)
        ]
        return ForcedAlignResult(items)

    # -- public API --

    def _prepare_all(self, audio: Any, text: Any, language: Any) -> list[_Pair | ForcedAlignResult]:
        """``align``'s arguments as one prepared pair (or finished result) per pair."""
        single = _is_single_audio(audio)
        audios = _as_list(audio, single)
        texts = _as_list(text, isinstance(text, str) or text is None)
        if language is None or isinstance(language, str):
            languages = [language] * len(audios)
        else:
            languages = list(language)
            if len(languages) == 1:
                languages = languages * len(audios)
        if not (len(audios) == len(texts) == len(languages)):
            raise ValueError(
                f"batch size mismatch: {len(audios)} audios, {len(texts)} texts, {len(languages)} languages"
            )
        return [self._prepare(i, a, t, lang) for i, (a, t, lang) in enumerate(zip(audios, texts, languages))]

    def precompile(
        self, audio: Any, text: str | Sequence[str], language: str | Sequence[str | None] | None
    ) -> int:
        """Compile the programs that ``align`` with these arguments would run, without running the model.

        Returns how many programs were compiled (0 when every bucket was compiled already).
        """
        before = self.engine.programs.count
        pairs = [item for item in self._prepare_all(audio, text, language) if isinstance(item, _Pair)]
        for batch in self._batches(pairs):
            rows, frames, text_tokens = self._bucket(batch)
            self._executable(rows, frames, text_tokens)
            # The feature extractor compiles per batch shape too.
            audio_io.features(
                [np.zeros(frames * audio_io.HOP_LENGTH, np.float32)] * rows, pad_to_multiple=frames
            )
        return self.engine.programs.count - before

    def align(
        self,
        audio: Any,
        text: str | Sequence[str],
        language: str | Sequence[str | None] | None,
        *,
        strict: bool = False,
    ) -> list[ForcedAlignResult]:
        """Align one pair or a batch of pairs; one result per pair, in order.

        Args:
            audio: one audio or a list of them; each a file path, an encoded file's bytes, a ``(samples,
                sample_rate)`` tuple, or a 1-D array of 16 kHz samples.
            text: the transcript of each audio (a string, or a list with one per audio).
            language: the language of each text (one for all, or a list); one of ``text.SUPPORTED_LANGUAGES``
                in any case, or None / "" for plain whitespace splitting. Japanese and Korean use word
                segmenters (the ``ja`` / ``ko`` extras).
            strict: raise the first pair's error instead of reporting it in that pair's result.

        Returns:
            ``ForcedAlignResult`` per pair. A pair whose text has no letters or digits gets no items. A pair
            that cannot be aligned gets ``error`` (AudioError for unreadable audio, LanguageError for an
            unsupported language, AlignmentError for audio longer than ``max_seconds``) and no items; the other
            pairs are unaffected. Audio shorter than 0.5 s is zero-padded to 0.5 s.
        """
        prepared = self._prepare_all(audio, text, language)
        if strict:
            for item in prepared:
                if isinstance(item, ForcedAlignResult) and item.error is not None:
                    raise item.error
        results: list[ForcedAlignResult | None] = [
            item if isinstance(item, ForcedAlignResult) else None for item in prepared
        ]
        pairs = [item for item in prepared if isinstance(item, _Pair)]
        for batch in self._batches(pairs):
            for pair, result in zip(batch, self._run_batch(batch)):
                results[pair.index] = result
        return results  # type: ignore[return-value]

    def align_transcripts(
        self,
        pieces: Sequence[Sequence[audio_io.AudioPiece]],
        texts: Sequence[Sequence[str]],
        languages: Sequence[Sequence[str | None]],
    ) -> list[ForcedAlignResult | None]:
        """Word timestamps for transcribed audio that was split into pieces, times in the original audio.

        Args:
            pieces: per audio, its pieces from ``audio.split_audio(wav, MAX_ALIGN_SECONDS)``.
            texts: per audio, the transcript of each piece.
            languages: per audio, the language of each piece (as detected or forced; None/"" when unknown; a
                name that is not supported is treated as unknown).

        Returns:
            Per audio, the words of all its pieces with times offset to the audio's start, or None when no piece
            has any text (the official ``transcribe(..., return_time_stamps=True)`` behaviour). Pieces with blank
            text are skipped; all other pieces of all audios are aligned together in batches.
        """
        if not (len(pieces) == len(texts) == len(languages)):
            raise ValueError("pieces, texts and languages must have one entry per audio")
        jobs: list[tuple[int, float]] = []
        job_audio, job_text, job_language = [], [], []
        for audio_index, (audio_pieces, piece_texts, piece_languages) in enumerate(
            zip(pieces, texts, languages)
        ):
            if not (len(audio_pieces) == len(piece_texts) == len(piece_languages)):
                raise ValueError(f"audio {audio_index}: pieces, texts and languages differ in length")
            for piece, offset, piece_text, piece_language in zip(
                audio_pieces, piece_offsets(audio_pieces), piece_texts, piece_languages
            ):
                if not piece_text or not piece_text.strip():
                    continue
                jobs.append((audio_index, offset))
                job_audio.append((piece.samples, piece.sample_rate))
                job_text.append(piece_text)
                job_language.append(_detected_language(piece_language))
        per_audio: list[list[ForcedAlignResult]] = [[] for _ in pieces]
        if jobs:
            for (audio_index, offset), result in zip(jobs, self.align(job_audio, job_text, job_language)):
                per_audio[audio_index].append(result.shifted(offset))
        return [concatenate_results(results) for results in per_audio]
