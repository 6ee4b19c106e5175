"""What a transcript tells you beyond its text: how sure the model was, and why decoding stopped.

A ``Segment`` is one decoded chunk of audio: where it lies, its language and text, the ids the model generated
(the ``language X<asr_text>`` header, the text and the end token when there is one) with the log-probability of
each (``qasr_jax.engine`` records them in the decode loop), and ``finish_reason``. Two numbers summarise it, as
the Whisper family reports them: ``avg_logprob`` (mean log-probability of the generated ids) and
``compression_ratio`` (text bytes over their zlib-compressed size; loops and runaway repetitions compress well,
so a high ratio is a second repetition signal beside ``finish_reason``).

Each segment's ``words`` say how sure the model was of each word: the text is cut into one piece per word (the
aligner's word units, ``text.split_words``; each piece takes the whitespace before its word and the punctuation
after it, so the pieces concatenate back to the text), and a word's ``confidence`` is the mean probability,
``exp(log-probability)`` averaged, of the generated tokens whose text overlaps its piece (Whisper's word
``probability``). A token that spans two words (a Chinese token of two characters) counts for both. The same
numbers go into the forced aligner's words when it runs (``with_word_confidences``).

``decode_segment`` turns a ``DecodeResult`` into a ``Segment``; the transcription API, manifest jobs and the server
all make their segments with it, so they report the same values for the same audio.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import functools
import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from qasr_jax import audio as audio_io
from qasr_jax import text as text_io
from qasr_jax.aligner import ForcedAlignResult
from qasr_jax.engine import DecodeResult
from qasr_jax.errors import MissingExtraError


class FinishReason(str, enum.Enum):
    """Why a chunk's (or an item's) decoding ended.

    STOP: the model emitted an end token. LENGTH: the token budget ran out first (the text may be cut short;
    ``truncated``). REPETITION: the output ran into a repetition that the repair (``text.repair_repetitions``,
    the official post-processing) cut back, whether decoding then hit the budget or not. ERROR: the item failed.
    NO_SPEECH: the voice-activity detector (``qasr_jax.vad``, opt-in) found no speech, so nothing was decoded.
    """

    NO_SPEECH = "no_speech"
    STOP = "stop"
    LENGTH = "length"
    REPETITION = "repetition"
    ERROR = "error"


# An item reports the most telling reason among its chunks (no_speech only when every chunk has no speech).
_SEVERITY = (
    FinishReason.NO_SPEECH,
    FinishReason.STOP,
    FinishReason.LENGTH,
    FinishReason.REPETITION,
    FinishReason.ERROR,
)


def compression_ratio(text: str) -> float:
    """UTF-8 bytes of ``text`` over their zlib-compressed size (Whisper's ``compression_ratio``); 0.0 for ""."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def mean_logprob(logprobs: Sequence[float]) -> float | None:
    """The mean of ``logprobs``, or None when there are none (no measurement, not a perfect score)."""
    return sum(logprobs) / len(logprobs) if len(logprobs) else None


@dataclasses.dataclass(frozen=True)
class Word:
    """One word of a transcript: its piece of the text (the whitespace before it and the punctuation after it
    included, so a text's words concatenate back to it) and ``confidence``, the mean probability of the
    generated tokens whose text overlaps the piece (None when no token's log-probability is known)."""

    text: str
    confidence: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "confidence": self.confidence}


def word_units(text: str, language: str | None) -> list[str]:
    """The aligner's word units of ``text`` in ``language`` (``text.split_words``, as ``Qwen3ForcedAligner``
    splits a chunk's text); Japanese and Korean without their segmenter installed split as the other languages
    do (the aligner would fail on them; a words list still has words)."""
    try:
        return text_io.split_words(text, language)
    except MissingExtraError:
        return text_io.split_words(text, None)


def word_confidence(
    start: int, end: int, token_spans: Sequence[tuple[int, int]], logprobs: Sequence[float]
) -> float | None:
    """Mean of ``exp(logprob)`` over the tokens whose characters ``token_spans[k]`` overlap ``[start, end)``;
    None when none does (or the spans are unknown)."""
    if len(token_spans) != len(logprobs):
        return None
    probabilities = [
        math.exp(logprob)
        for (first, last), logprob in zip(token_spans, logprobs)
        if first < last and first < end and last > start
    ]
    return sum(probabilities) / len(probabilities) if probabilities else None


@dataclasses.dataclass(frozen=True)
class Segment:
    """One chunk: start/end in seconds on the item's time line, language, text, the generated ids with
    their log-probabilities (natural log), why decoding ended, and whether it ended on an end token (``stopped``;
    a chunk whose repetition was cut may have stopped or not). ``no_speech``: the voice-activity detector's
    estimate, the fraction of the chunk's 32 ms windows it scored as non-speech; None when it did not run (a
    chunk it found no speech in is not decoded: ``no_speech_segment``).

    ``token_spans``: per generated id, the characters of ``text`` it produced, ``(start, end)``; empty for ids
    outside the text (the ``language X<asr_text>`` header, the end token, a repetition the repair cut). Empty
    altogether when unknown (then words have no confidence).
    """

    start: float
    end: float
    language: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: FinishReason
    stopped: bool
    token_spans: tuple[tuple[int, int], ...] = ()
    no_speech: float | None = None

    @functools.cached_property
    def word_pieces(self) -> tuple[list[str], list[tuple[int, int]]]:
        """The text's word units and the piece of the text each word takes ``[(start, end)]``: one piece per
        unit, or one piece for a text without any (punctuation only), none for an empty text."""
        units = word_units(self.text, self.language)
        pieces = text_io.word_pieces(units, self.text) if units else None
        if pieces is None:
            units, pieces = [], [(0, len(self.text))] if self.text else []
        return units, pieces

    @property
    def words(self) -> list[Word]:
        """The text as words with their confidences (see ``Word``)."""
        return [
            Word(self.text[start:end], word_confidence(start, end, self.token_spans, self.logprobs))
            for start, end in self.word_pieces[1]
        ]

    @property
    def avg_logprob(self) -> float | None:
        return mean_logprob(self.logprobs)

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text)

    @property
    def truncated(self) -> bool:
        """Decoding used the whole token budget without an end token."""
        return not self.stopped

    def to_dict(self) -> dict[str, Any]:
        """The segment as JSON-ready values (finish_reason as its name; no_speech only when measured)."""
        values = {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "language": self.language,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "logprobs": list(self.logprobs),
            "avg_logprob": self.avg_logprob,
            "compression_ratio": self.compression_ratio,
            "finish_reason": self.finish_reason.value,
        }
        if self.no_speech is not None:
            values["no_speech"] = self.no_speech
        return values


def decode_segment(
    tokenizer: text_io.Tokenizer,
    generation: DecodeResult,
    piece: audio_io.AudioPiece,
    forced_language: str | None,
    no_speech: float | None = None,
) -> Segment:
    """The ``Segment`` of one chunk's generation: its ids decoded and parsed (``text.parse_model_output``),
    placed on the item's time line by ``piece``, with the detector's ``no_speech`` estimate when it ran."""
    raw, spans = tokenizer.decode_with_spans(generation.token_ids, skip_special_tokens=True)
    return segment_of_output(
        raw, generation.token_ids, generation.logprobs, spans, generation.stopped, forced_language,
        piece.start / piece.sample_rate, (piece.start + piece.num_samples) / piece.sample_rate, no_speech,
    )  # fmt: skip


def segment_of_output(
    raw: str,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    raw_spans: Sequence[tuple[int, int]],
    stopped: bool,
    forced_language: str | None,
    start: float,
    end: float,
    no_speech: float | None = None,
) -> Segment:
    """The ``Segment`` of a raw model output ``raw`` (``language X<asr_text>text``, or the text alone with a
    forced language) made of ``token_ids``, each with its log-probability and the characters of ``raw`` it
    produced (``raw_spans``, as ``Tokenizer.decode_with_spans`` gives them)."""
    parsed = text_io.parse_model_output(raw, forced_language)
    if parsed.repaired:
        reason = FinishReason.REPETITION
    else:
        reason = FinishReason.STOP if stopped else FinishReason.LENGTH
    # A token's characters in the text: those of its raw characters that parsing kept (offsets increase).
    offsets = parsed.offsets
    spans = tuple(
        (bisect.bisect_left(offsets, first), bisect.bisect_left(offsets, last)) for first, last in raw_spans
    )
    return Segment(
        start=start,
        end=end,
        language=parsed.language,
        text=parsed.text,
        token_ids=tuple(int(i) for i in token_ids),
        logprobs=tuple(float(p) for p in logprobs),
        finish_reason=reason,
        stopped=stopped,
        token_spans=spans if len(spans) == len(token_ids) else (),
        no_speech=no_speech,
    )


def no_speech_segment(piece: audio_io.AudioPiece, no_speech: float) -> Segment:
    """The ``Segment`` of a chunk the voice-activity detector found no speech in: not decoded, so no language,
    text or tokens."""
    return Segment(
        start=piece.start / piece.sample_rate,
        end=(piece.start + piece.num_samples) / piece.sample_rate,
        language="",
        text="",
        token_ids=(),
        logprobs=(),
        finish_reason=FinishReason.NO_SPEECH,
        stopped=True,
        no_speech=no_speech,
    )


def with_word_confidences(alignment: Any, segments: Sequence[Segment]) -> Any:
    """The forced aligner's words for ``segments`` (``Qwen3ForcedAligner.align_transcripts`` over their chunks
    and texts) with each word's ``confidence`` from the segment it came from (``Segment.words``).

    The aligner's words are the segments' word units in order; an alignment that does not hold exactly those
    (one of its pieces failed: ``error`` is set) is returned as it is, without confidences.
    """
    if not isinstance(alignment, ForcedAlignResult) or alignment.error is not None:
        return alignment
    units = [unit for segment in segments for unit in segment.word_pieces[0]]
    confidences = [
        word.confidence for segment in segments if segment.word_pieces[0] for word in segment.words
    ]
    if [item.text for item in alignment.items] != units:
        return alignment
    items = [dataclasses.replace(item, confidence=c) for item, c in zip(alignment.items, confidences)]
    return ForcedAlignResult(items, alignment.error)


def item_finish_reason(segments: Iterable[Segment], failed: bool = False) -> FinishReason:
    """An item's reason: ERROR when it failed, else the most telling of its segments' (REPETITION over LENGTH
    over STOP over NO_SPEECH)."""
    if failed:
        return FinishReason.ERROR
    return max((s.finish_reason for s in segments), key=_SEVERITY.index, default=FinishReason.STOP)


__all__ = [
    "FinishReason",
    "Segment",
    "Word",
    "compression_ratio",
    "decode_segment",
    "item_finish_reason",
    "mean_logprob",
    "no_speech_segment",
    "segment_of_output",
    "with_word_confidences",
    "word_confidence",
    "word_units",
]
