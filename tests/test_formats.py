"""Subtitle, JSON and label-track writers, checked by reading the files back with independent parsers."""

from __future__ import annotations

import datetime
import html
import io
import itertools
import json

import pytest
import srt
import webvtt

from qasr_jax import formats
from qasr_jax.aligner import ForcedAlignItem, ForcedAlignResult
from qasr_jax.formats import Cue, CueOptions
from qasr_jax.text import split_words

_MS = datetime.timedelta(milliseconds=1)
MIXED_TEXT = (
    "Hello, world! This is “quoted” text — with e.g. 3.5 kg & <tags>. 今天天气很好，我们去公园。 Don't stop."
)


def timed(
    words: list[str], step: float = 0.3, length: float = 0.2, start: float = 0.0
) -> list[ForcedAlignItem]:
    """Words every `step` seconds, each lasting `length`."""
    return [
        ForcedAlignItem(w, round(start + step * i, 3), round(start + step * i + length, 3))
        for i, w in enumerate(words)
    ]


def vtt_milliseconds(stamp: str) -> int:
    hours, minutes, seconds = stamp.split(":")
    return round((int(hours) * 3600 + int(minutes) * 60 + float(seconds)) * 1000)


def cue_milliseconds(cues: list[Cue]) -> list[tuple[int, int, str]]:
    return [(round(c.start * 1000), round(c.end * 1000), c.text) for c in cues]


def parsed_srt(document: str) -> list[tuple[int, int, str]]:
    return [(s.start // _MS, s.end // _MS, s.content) for s in srt.parse(document, ignore_errors=False)]


def parsed_vtt(document: str) -> list[tuple[int, int, str]]:
    captions = webvtt.from_buffer(io.StringIO(document)).captions
    return [(vtt_milliseconds(c.start), vtt_milliseconds(c.end), html.unescape(c.text)) for c in captions]


def test_cues_show_the_text_as_written():
    words = split_words(MIXED_TEXT, "English")
    pieces = formats.display_pieces(words, MIXED_TEXT)
    assert "".join(sep + text for sep, text in pieces) == MIXED_TEXT
    cues = formats.group_cues(
        timed(words, step=0.1), MIXED_TEXT, CueOptions(max_chars_per_line=80, max_lines=1)
    )
    assert [c.text for c in cues] == [
        "Hello, world!",
        "This is “quoted” text — with e.g.",
        "3.5 kg & <tags>.",
        "今天天气很好，我们去公园。",
        "Don't stop.",
    ]


def test_without_the_text_words_join_by_script():
    words = ["Hello", "world", "今", "天", "OK", "ありがとう", "ございます"]
    cues = formats.group_cues(timed(words, step=0.1), options=CueOptions(max_chars_per_line=80))
    assert [c.text for c in cues] == ["Hello world 今天 OK ありがとうございます"]
    # A text the words did not come from is not used.
    cues = formats.group_cues(timed(["alpha", "beta"]), "something else entirely")
    assert [c.text for c in cues] == ["alpha beta"]


def test_cues_split_at_the_duration_limit():
    words = [f"w{i}" for i in range(20)]
    cues = formats.group_cues(timed(words, step=0.5, length=0.4), options=CueOptions(max_duration=2.0))
    for cue in cues:
        assert cue.end - cue.start <= 2.0
    # A cue breaks only when the next word would overrun it: 0.0..1.9 holds words 0-3 (word 4 ends at 2.4).
    assert cues[0].text == "w0 w1 w2 w3" and (cues[0].start, cues[0].end) == (0.0, 1.9)
    assert sum(len(c.text.split()) for c in cues) == 20


def test_cues_split_at_pauses():
    items = [*timed(["one", "two", "three"]), *timed(["four", "five"], start=3.0)]
    cues = formats.group_cues(items, options=CueOptions(max_pause=1.0))
    assert [c.text for c in cues] == ["one two three", "four five"]
    assert [c.text for c in formats.group_cues(items, options=CueOptions(max_pause=5.0))] == [
        "one two three four five"
    ]


def test_cues_respect_line_length_and_line_count():
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "and",
        "keeps",
        "running",
        "far",
        "away",
    ]
    options = CueOptions(max_chars_per_line=16, max_lines=2, max_duration=100)
    cues = formats.group_cues(timed(words), options=options)
    for cue in cues:
        assert len(cue.lines) <= 2
        assert all(len(line) <= 16 for line in cue.lines)
    assert " ".join(" ".join(c.lines) for c in cues) == " ".join(words)
    # Each cue holds as many words as its two lines can.
    assert cues[0].lines == ("the quick brown", "fox jumps over")
    # A word longer than a line still gets one.
    (long_cue,) = formats.group_cues(
        timed(["supercalifragilistic"]), options=CueOptions(max_chars_per_line=5)
    )
    assert long_cue.lines == ("supercalifragilistic",)


def test_sentence_ends_end_cues_only_when_asked():
    text = "First one. Second one?"
    items = timed(split_words(text, "English"))
    assert [c.text for c in formats.group_cues(items, text)] == ["First one.", "Second one?"]
    merged = formats.group_cues(items, text, CueOptions(split_sentences=False))
    assert [c.text for c in merged] == ["First one. Second one?"]


def test_short_cues_are_extended_without_overlapping():
    items = [ForcedAlignItem("a", 1.0, 1.0), ForcedAlignItem("b", 1.2, 1.2), ForcedAlignItem("c", 5.0, 5.0)]
    cues = formats.group_cues(items, options=CueOptions(max_pause=0.1, min_duration=0.5))
    assert [(c.start, c.end) for c in cues] == [(1.0, 1.2), (1.2, 1.7), (5.0, 5.5)]
    cues = formats.group_cues(items, options=CueOptions(max_pause=0.1, min_duration=0.0))
    assert [(c.start, c.end) for c in cues] == [(1.0, 1.0), (1.2, 1.2), (5.0, 5.0)]


@pytest.mark.parametrize(
    "options",
    [
        CueOptions(),
        CueOptions(max_chars_per_line=12, max_lines=1),
        CueOptions(max_duration=1.0, max_pause=0.05),
    ],
)
def test_srt_and_vtt_read_back(options):
    words = split_words(MIXED_TEXT, "English")
    # Past an hour, with uneven steps and a pause.
    items = [ForcedAlignItem(w, 3600.0 + 0.37 * i + (2.0 if i > 12 else 0.0), 3600.25 + 0.37 * i) for i, w in
             enumerate(words)]  # fmt: skip
    items = [ForcedAlignItem(i.text, i.start_time, max(i.start_time, i.end_time)) for i in items]
    cues = formats.group_cues(items, MIXED_TEXT, options)
    assert len(cues) >= 3

    document = formats.to_srt(items, MIXED_TEXT, options)
    assert parsed_srt(document) == cue_milliseconds(cues)
    assert [s.index for s in srt.parse(document)] == list(range(1, len(cues) + 1))

    document = formats.to_vtt(items, MIXED_TEXT, options)
    assert document.startswith("WEBVTT\n\n")
    assert parsed_vtt(document) == cue_milliseconds(cues)
    assert "<tags>" not in document  # markup characters are escaped

    # Every word lands in exactly one cue, in order, and cues do not overlap.
    assert all(a.end <= b.start for a, b in itertools.pairwise(cues))
    assert "".join(c.text.replace("\n", "") for c in cues).replace(" ", "") == MIXED_TEXT.replace(" ", "")


def test_timestamps_and_arrows():
    assert formats.format_timestamp(3725.5) == "01:02:05.500"
    assert formats.format_timestamp(0.0004, ",") == "00:00:00,000"
    assert formats.format_timestamp(360000.001) == "100:00:00.001"
    document = formats.cues_to_srt([Cue(0.0, 1.0, ("a --> b",))])
    assert parsed_srt(document) == [(0, 1000, "a -> b")]


def test_empty_input_gives_empty_but_valid_files():
    assert formats.to_srt([]) == ""
    assert list(srt.parse(formats.to_srt([]))) == []
    assert parsed_vtt(formats.to_vtt([])) == []
    assert json.loads(formats.to_json([]))["words"] == []


def test_json_and_label_track():
    result = ForcedAlignResult(timed(["Hello", "world"]))
    document = json.loads(formats.render("json", result, text="Hello, world", language="English",
                                         metadata={"audio": "a.wav"}))  # fmt: skip
    assert document == {
        "audio": "a.wav",
        "language": "English",
        "text": "Hello, world",
        "words": [{"text": "Hello", "start": 0.0, "end": 0.2}, {"text": "world", "start": 0.3, "end": 0.5}],
    }
    assert formats.render("txt", result) == "0.000\t0.200\tHello\n0.300\t0.500\tworld\n"
    with pytest.raises(ValueError, match="unknown format"):
        formats.render("docx", result)
    with pytest.raises(ValueError):
        CueOptions(max_lines=0)
