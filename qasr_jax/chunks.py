"""An item's audio as chunks to decode, and the chunks' results merged back into the item's.

One plan and one merge for every policy: ``Qwen3ASRModel.transcribe`` (one-shot batches) and the server's uploads
(``qasr_jax.serve.scheduler``) both split an item with ``Qwen3ASRModel.item_chunks`` into ``Chunk``s, decode the
chunks that have speech, give each its ``Segment`` (``finish``) and merge them here, so both give the same text
for the same audio. While a chunk decodes, a server streams its ``partial`` result (``partial_result``,
``text_so_far``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from qasr_jax import audio as audio_io
from qasr_jax import text as text_io
from qasr_jax.engine import DecodeRequest, DecodeResult
from qasr_jax.transcript import Segment, decode_segment, no_speech_segment
from qasr_jax.vad import PlannedPiece, join_texts


@dataclasses.dataclass(eq=False)
class Chunk:
    """One piece of one item's audio: what it belongs to (``owner``: an item's index, a server's upload), its place
    among the item's chunks, its request (None: a span without speech, done when planned), and once decoded its
    ``Segment`` (ids, log-probabilities, finish reason; the detector's ``no_speech`` when it ran). ``partial``:
    (language, text) so far while it decodes."""

    owner: Any
    index: int
    piece: audio_io.AudioPiece
    request: DecodeRequest | None
    segment: Segment | None = None
    no_speech: float | None = None
    partial: tuple[str, str] = ("", "")

    @property
    def done(self) -> bool:
        return self.segment is not None

    @property
    def language(self) -> str:
        return self.segment.language if self.segment is not None else self.partial[0]

    @property
    def text(self) -> str:
        return self.segment.text if self.segment is not None else self.partial[1]

    @property
    def truncated(self) -> bool:
        return self.segment is not None and self.segment.truncated


def plan_item(
    owner: Any, plan: Sequence[PlannedPiece], request_of: Callable[[audio_io.AudioPiece], DecodeRequest]
) -> list[Chunk]:
    """The chunks of an item planned as ``plan`` (``Qwen3ASRModel.plan_chunks``): a request for each piece with
    speech (``request_of``), a finished no-speech segment for each piece without."""
    chunks = []
    for i, planned in enumerate(plan):
        if planned.speech:
            chunks.append(Chunk(owner, i, planned.piece, request_of(planned.piece), no_speech=planned.no_speech))
        else:
            segment = no_speech_segment(planned.piece, planned.no_speech)
            chunks.append(Chunk(owner, i, planned.piece, None, segment, planned.no_speech))
    return chunks


def finish(
    chunk: Chunk, tokenizer: text_io.Tokenizer, result: DecodeResult, forced_language: str | None
) -> None:
    """A decoded chunk's segment from its tokens (parsed as the official pipeline parses them)."""
    chunk.segment = decode_segment(tokenizer, result, chunk.piece, forced_language, chunk.no_speech)


def merged_language(chunks: Sequence[Chunk]) -> str:
    return text_io.merge_languages(c.language for c in chunks)


def merged_text(chunks: Sequence[Chunk]) -> str:
    """The item's text: its chunks' texts joined in order (spans without speech as ``join_texts`` says)."""
    return join_texts((c.text, c.request is not None) for c in chunks)


def text_so_far(chunks: Sequence[Chunk]) -> str:
    """The finished chunks' text in order, then the first unfinished chunk's partial text."""
    parts = []
    for c in chunks:
        parts.append((c.text, c.request is not None))
        if not c.done:
            break
    return join_texts(parts)


def partial_result(raw: str, forced_language: str | None) -> tuple[str, str]:
    """(language, text so far) of an unfinished chunk's raw output: nothing until the ``<asr_text>`` header is
    complete."""
    if forced_language:
        return forced_language, raw.strip()
    if text_io.ASR_TEXT not in raw:
        return "", ""
    return text_io.parse_asr_output(raw, None)


__all__ = [
    "Chunk",
    "finish",
    "merged_language",
    "merged_text",
    "partial_result",
    "plan_item",
    "text_so_far",
]
