"""What a transcript tells you beyond its text: how sure the model was, and why decoding stopped.

A ``Segment`` is one decoded chunk of audio: where it lies, its language and text, the ids the model generated
(the ``language X<asr_text>`` header, the text and the end token when there is one) with the log-probability of
each (``qasr_jax.engine`` records them in the decode loop), and ``finish_reason``. Two numbers summarise it, as
the Whisper family reports them: ``avg_logprob`` (mean log-probability of the generated ids) and
``compression_ratio`` (text bytes over their zlib-compressed size; loops and runaway repetitions compress well,
so a high ratio is a second repetition signal beside ``finish_reason``).

``decode_segment`` turns a ``Generation`` into a ``Segment``; the transcription API, manifest jobs and the server
all make their segments with it, so they report the same values for the same audio.
"""

from __future__ import annotations

import dataclasses
import enum
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from qasr_jax import audio as audio_io
from qasr_jax import text as text_io
from qasr_jax.engine import Generation


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
class Segment:
    """One chunk: start/end in seconds on the item's time line, language, text, the generated ids with
    their log-probabilities (natural log), why decoding ended, and whether it ended on an end token (``stopped``;
    a chunk whose repetition was cut may have stopped or not). ``no_speech``: the voice-activity detector's
    estimate, the fraction of the chunk's 32 ms windows it scored as non-speech; None when it did not run (a
    chunk it found no speech in is not decoded: ``no_speech_segment``)."""

    start: float
    end: float
    language: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: FinishReason
    stopped: bool
    no_speech: float | None = None

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
    generation: Generation,
    piece: audio_io.AudioPiece,
    forced_language: str | None,
    no_speech: float | None = None,
) -> Segment:
    """The ``Segment`` of one chunk's generation: its ids decoded and parsed (``text.parse_model_output``),
    placed on the item's time line by ``piece``, with the detector's ``no_speech`` estimate when it ran."""
    raw = tokenizer.decode(generation.token_ids, skip_special_tokens=True)
    parsed = text_io.parse_model_output(raw, forced_language)
    if parsed.repaired:
        reason = FinishReason.REPETITION
    else:
        reason = FinishReason.STOP if generation.stopped else FinishReason.LENGTH
    return Segment(
        start=piece.start / piece.sample_rate,
        end=(piece.start + piece.num_samples) / piece.sample_rate,
        language=parsed.language,
        text=parsed.text,
        token_ids=tuple(int(i) for i in generation.token_ids),
        logprobs=tuple(float(p) for p in generation.logprobs),
        finish_reason=reason,
        stopped=generation.stopped,
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


def item_finish_reason(segments: Iterable[Segment], failed: bool = False) -> FinishReason:
    """An item's reason: ERROR when it failed, else the most telling of its segments' (REPETITION over LENGTH
    over STOP over NO_SPEECH)."""
    if failed:
        return FinishReason.ERROR
    return max((s.finish_reason for s in segments), key=_SEVERITY.index, default=FinishReason.STOP)


__all__ = [
    "FinishReason",
    "Segment",
    "compression_ratio",
    "decode_segment",
    "item_finish_reason",
    "mean_logprob",
    "no_speech_segment",
]
