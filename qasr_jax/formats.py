"""Timestamped words to files: SRT and WebVTT subtitles, JSON, and plain-text label tracks.

Words are anything with ``text``, ``start_time`` and ``end_time`` (seconds): a ``ForcedAlignResult`` or a list
of its items. The aligner's words lose their punctuation; given the text they came from, each word is found in
it again (in order), so cues show the text as written, punctuation, spacing and all. Without the text, words
are joined with spaces, except between characters of scripts written without them (Chinese, Japanese, Thai).

Subtitle cues are built greedily, word by word: a word starts a new cue when adding it would make the cue last
longer than ``max_duration``, when it follows a pause of at least ``max_pause``, when the previous word ends a
sentence, or when the cue's text would no longer fit in ``max_lines`` lines of ``max_chars_per_line``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

from qasr_jax.text import is_cjk_ideograph, word_pieces

FORMATS = ("json", "srt", "vtt", "txt")

# Characters that end a sentence (Latin, CJK full-width, Devanagari, Arabic, Greek question mark, ellipsis).
SENTENCE_END = frozenset(".!?。！？．…।؟;")
# Closing quotes and brackets may follow the sentence's final mark.
_CLOSERS = frozenset("\"'”’»)]}」』】）")


class TimedWord(Protocol):
    text: str
    start_time: float
    end_time: float


@dataclasses.dataclass(frozen=True)
class CueOptions:
    """How words are grouped into subtitle cues.

    max_duration: longest cue in seconds (a single longer word still gets a cue of its own).
    max_chars_per_line: longest line in characters (a single longer word still gets a line of its own).
    max_lines: lines per cue.
    max_pause: a silence of at least this many seconds between two words starts a new cue.
    split_sentences: a word that ends a sentence ends its cue (needs the text; punctuation is not in the words).
    min_duration: shorter cues are extended to this many seconds where the next cue leaves room.
    """

    max_duration: float = 6.0
    max_chars_per_line: int = 42
    max_lines: int = 2
    max_pause: float = 1.0
    split_sentences: bool = True
    min_duration: float = 0.5

    def __post_init__(self) -> None:
        if self.max_duration <= 0 or self.max_chars_per_line < 1 or self.max_lines < 1:
            raise ValueError("max_duration, max_chars_per_line and max_lines must be positive")
        if self.max_pause < 0 or self.min_duration < 0:
            raise ValueError("max_pause and min_duration must not be negative")


@dataclasses.dataclass(frozen=True)
class Cue:
    """One subtitle cue: start and end in seconds and its lines of text."""

    start: float
    end: float
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class _Piece(NamedTuple):
    """A word as displayed: its text (with the punctuation around it) and what separates it from the previous
    word ("" or " ")."""

    separator: str
    text: str


# --------------------------------------------------------------------------------------------------------------
# Words back to displayed text


def _written_without_spaces(char: str) -> bool:
    code = ord(char)
    return (
        is_cjk_ideograph(char)
        or 0x3040 <= code <= 0x30FF  # Hiragana, Katakana
        or 0x31F0 <= code <= 0x31FF  # Katakana phonetic extensions
        or 0xFF66 <= code <= 0xFF9F  # half-width Katakana
        or 0x0E00 <= code <= 0x0EFF  # Thai, Lao
        or 0x1000 <= code <= 0x109F  # Myanmar
        or 0x1780 <= code <= 0x17FF  # Khmer
    )


def _joined_pieces(words: Sequence[str]) -> list[_Piece]:
    pieces = []
    for index, word in enumerate(words):
        separator = ""
        if index > 0 and word and words[index - 1]:
            joined = _written_without_spaces(words[index - 1][-1]) and _written_without_spaces(word[0])
            separator = "" if joined else " "
        pieces.append(_Piece(separator, word))
    return pieces


def _pieces_from_text(words: Sequence[str], text: str) -> list[_Piece] | None:
    """Each word with the text around it (``text.word_pieces``: the space before it, the punctuation after)."""
    pieces = word_pieces(words, text)
    if pieces is None:
        return None
    out = []
    for index, (start, end) in enumerate(pieces):
        raw = text[start:end]
        separator = " " if index > 0 and raw[:1].isspace() else ""
        out.append(_Piece(separator, " ".join(raw.split())))
    return out


def display_pieces(words: Sequence[str], text: str | None = None) -> list[tuple[str, str]]:
    """``(separator, displayed text)`` of each word: taken from ``text`` when the words came from it, else the
    word itself separated by a space where its script uses spaces."""
    pieces = _pieces_from_text(words, text) if text else None
    return _joined_pieces(words) if pieces is None else pieces


def _ends_sentence(piece: _Piece) -> bool:
    stripped = piece.text.rstrip("".join(_CLOSERS))
    return bool(stripped) and stripped[-1] in SENTENCE_END


# --------------------------------------------------------------------------------------------------------------
# Cues


def _greedy_lines(pieces: Sequence[_Piece], max_chars: int) -> list[list[_Piece]]:
    lines: list[list[_Piece]] = []
    width = 0
    for piece in pieces:
        added = len(piece.separator) + len(piece.text)
        if lines and width + added <= max_chars:
            lines[-1].append(piece)
            width += added
        else:
            lines.append([piece])
            width = len(piece.text)
    return lines


def _line_text(pieces: Sequence[_Piece]) -> str:
    return "".join(piece.separator + piece.text for piece in pieces).strip()


def wrap_lines(pieces: Sequence[_Piece], max_chars: int) -> list[str]:
    """The pieces broken into lines of at most ``max_chars`` (a longer piece gets a line of its own); two lines
    are balanced so that the longer of them is as short as possible."""
    lines = _greedy_lines(pieces, max_chars)
    if len(lines) == 2:
        flat = [*lines[0], *lines[1]]
        best = None
        for cut in range(1, len(flat)):
            top, bottom = _line_text(flat[:cut]), _line_text(flat[cut:])
            if len(top) <= max_chars and len(bottom) <= max_chars:
                width = max(len(top), len(bottom))
                if best is None or width < best[0]:
                    best = (width, [top, bottom])
        if best is not None:
            return best[1]
    return [_line_text(line) for line in lines]


def group_cues(
    words: Iterable[TimedWord], text: str | None = None, options: CueOptions | None = None
) -> list[Cue]:
    """Subtitle cues from timed words (see the module docstring for the rules).

    ``text`` is the text the words were aligned from: given, cues show it as written (punctuation included)
    and sentence ends can end cues.
    """
    options = options or CueOptions()
    timed = list(words)
    if not timed:
        return []
    pieces = display_pieces([word.text for word in timed], text)

    groups: list[list[int]] = []
    for index, word in enumerate(timed):
        if groups:
            group = groups[-1]
            previous = group[-1]
            candidate = [pieces[i] for i in [*group, index]]
            starts_new = (
                word.end_time - timed[group[0]].start_time > options.max_duration
                or word.start_time - timed[previous].end_time >= options.max_pause
                or (options.split_sentences and _ends_sentence(pieces[previous]))
                or len(_greedy_lines(candidate, options.max_chars_per_line)) > options.max_lines
            )
            if not starts_new:
                group.append(index)
                continue
        groups.append([index])

    cues = []
    for number, group in enumerate(groups):
        start = timed[group[0]].start_time
        end = max(timed[group[-1]].end_time, start)
        if end - start < options.min_duration:
            # Longer where it does not run into the next cue.
            limit = timed[groups[number + 1][0]].start_time if number + 1 < len(groups) else float("inf")
            end = max(end, min(start + options.min_duration, limit))
        lines = wrap_lines([pieces[i] for i in group], options.max_chars_per_line)
        cues.append(Cue(start, end, tuple(lines)))
    return cues


# --------------------------------------------------------------------------------------------------------------
# Writers


def _milliseconds(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """``HH:MM:SS.mmm`` (``,`` as the marker for SRT); hours keep counting past 99."""
    total = _milliseconds(seconds)
    hours, rest = divmod(total, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


def cues_to_srt(cues: Sequence[Cue]) -> str:
    """SubRip: numbered blocks of ``start --> end`` and text, separated by blank lines."""
    blocks = []
    for number, cue in enumerate(cues, start=1):
        # "-->" inside text would read as a timing line.
        body = cue.text.replace("-->", "->")
        blocks.append(
            f"{number}\n{format_timestamp(cue.start, ',')} --> {format_timestamp(cue.end, ',')}\n{body}\n"
        )
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def cues_to_vtt(cues: Sequence[Cue]) -> str:
    """WebVTT: the ``WEBVTT`` header, then ``start --> end`` and escaped text per cue."""
    blocks = ["WEBVTT\n"]
    for cue in cues:
        timing = f"{format_timestamp(cue.start)} --> {format_timestamp(cue.end)}"
        blocks.append(f"{timing}\n{_vtt_escape(cue.text)}\n")
    return "\n".join(blocks)


def to_srt(words: Iterable[TimedWord], text: str | None = None, options: CueOptions | None = None) -> str:
    return cues_to_srt(group_cues(words, text, options))


def to_vtt(words: Iterable[TimedWord], text: str | None = None, options: CueOptions | None = None) -> str:
    return cues_to_vtt(group_cues(words, text, options))


def words_to_dicts(words: Iterable[TimedWord]) -> list[dict[str, Any]]:
    """``[{"text", "start", "end"}]`` with times in seconds, and ``"confidence"`` for words that have one (the
    words of a transcription; ``qasr_jax.transcript.Word``)."""
    dicts = []
    for word in words:
        entry = {"text": word.text, "start": word.start_time, "end": word.end_time}
        confidence = getattr(word, "confidence", None)
        if confidence is not None:
            entry["confidence"] = confidence
        dicts.append(entry)
    return dicts


def to_json(
    words: Iterable[TimedWord],
    text: str | None = None,
    language: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """A JSON object: ``metadata`` fields, then ``language`` and ``text`` when given, then ``words``
    (``[{"text", "start", "end"}]``, seconds)."""
    document: dict[str, Any] = dict(metadata or {})
    if language is not None:
        document["language"] = language
    if text is not None:
        document["text"] = text
    document["words"] = words_to_dicts(words)
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def to_txt(words: Iterable[TimedWord]) -> str:
    """A label track (Audacity's text format): ``start<TAB>end<TAB>word`` per line, seconds."""
    return "".join(f"{word.start_time:.3f}\t{word.end_time:.3f}\t{word.text}\n" for word in words)


def render(
    fmt: str,
    words: Iterable[TimedWord],
    *,
    text: str | None = None,
    language: str | None = None,
    options: CueOptions | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Timed words in one of ``FORMATS``: "json", "srt", "vtt" or "txt" (a label track)."""
    if fmt == "json":
        return to_json(words, text=text, language=language, metadata=metadata)
    if fmt == "srt":
        return to_srt(words, text, options)
    if fmt == "vtt":
        return to_vtt(words, text, options)
    if fmt == "txt":
        return to_txt(words)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
