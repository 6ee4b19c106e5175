"""The voice-activity detector (``qasr_jax.vad``, opt-in): silence, noise and tones are not decoded, speech padded
with silence keeps its words, long audio is cut in the silences, ``no_speech`` estimates reach the results and the
server's verbose_json, and without the detector nothing changes.

The model is the small random-weight checkpoint: it writes words over anything it is given, so every input here
gives text without the detector (the control) and must give none with it.
"""

from __future__ import annotations

import itertools
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from qasr_jax import audio as audio_io
from qasr_jax.asr import Qwen3ASRModel
from qasr_jax.transcript import FinishReason
from qasr_jax.vad import WINDOW_SAMPLES, SpeechDetector, join_texts
from tests.support import speech
from tests.support.server import running_server
from tests.test_asr import cached_small_checkpoint

SR = audio_io.SAMPLE_RATE
MAX_NEW = 8


def noise_and_tones(seconds: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs with no speech in them, ``seconds`` long."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    notes = 261.63 * 2 ** (np.array([0, 4, 7, 12, 7, 4]) / 12)  # a C-major arpeggio, a note every 250 ms
    melody = notes[(t / 0.25).astype(int) % len(notes)]
    inputs = {
        "silence": np.zeros_like(t),
        "white noise": np.clip(0.3 * rng.standard_normal(t.shape), -1, 1),
        "tone 440 Hz": 0.5 * np.sin(2 * np.pi * 440 * t),
        "chord": sum(0.2 * np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0)),
        "arpeggio": 0.5
        * np.sin(2 * np.pi * np.cumsum(melody) / SR)
        * (0.6 + 0.4 * np.cos(2 * np.pi * 4 * t)),
    }
    return {name: samples.astype(np.float32) for name, samples in inputs.items()}


def words(text: str) -> list[str]:
    return text.split()


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return cached_small_checkpoint()


@pytest.fixture(scope="module")
def model(checkpoint: str) -> Qwen3ASRModel:
    """Chunks of at most 20 s, a few tokens each; the detector only when a call asks for it."""
    return Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=MAX_NEW, max_chunk_seconds=20.0)


@pytest.fixture(scope="module")
def detector() -> SpeechDetector:
    return SpeechDetector()


def count_generated_rows(model: Qwen3ASRModel) -> list[int]:
    """Patch the model's generator to count the rows it decodes; the list's one entry is the count."""
    rows = [0]
    original = model.decode_batch

    def generate(requests, *args, **kwargs):
        rows[0] += len(requests)
        return original(requests, *args, **kwargs)

    model.decode_batch = generate
    return rows


def test_silence_noise_and_tones_give_words_without_the_detector_and_none_with_it(model):
    inputs = noise_and_tones(5.0)
    names = list(inputs)
    batch = [(inputs[name], SR) for name in names]
    without = model.transcribe(batch)
    for name, result in zip(names, without):
        assert len(words(result.text)) > 0, f"{name}: the control gave no words; the test would be vacuous"
    rows = count_generated_rows(model)
    try:
        # The longer ones span several 20 s chunks of the official split; none of it is speech either.
        long = noise_and_tones(65.0, seed=1)
        with_detector = model.transcribe([*batch, *((long[n], SR) for n in names)], vad=True)
    finally:
        del model.decode_batch
    assert rows[0] == 0  # nothing was decoded at all
    for name, result in zip(names + [f"{n}, 65 s" for n in names], with_detector):
        assert result.error is None, name
        assert (result.text, result.language) == ("", ""), name
        assert result.finish_reason is FinishReason.NO_SPEECH, name
        assert result.token_ids == [] and result.avg_logprob is None, name
        assert [s.finish_reason for s in result.segments] == [FinishReason.NO_SPEECH], name
        assert result.segments[0].no_speech == 1.0, name
        assert (result.segments[0].start, result.segments[0].end) == (
            0.0,
            pytest.approx(5.0 if "65" not in name else 65.0),
        )
    # Without the detector the same model is unchanged (the default is off).
    assert [r.text for r in model.transcribe(batch)] == [r.text for r in without]


def padded_speech() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Two espeak-ng sentences (trimmed to their voiced samples) with 3 s, 4 s and 2.5 s of silence around and
    between them; and the [start, end) of each sentence in it."""
    clips = []
    for text in (speech.MEDIUM_EN, "Hello world, this is a test of the detector."):
        clip = speech.synth(text)
        voiced = np.flatnonzero(np.abs(clip) > 1e-3)
        clips.append(clip[voiced[0] : voiced[-1] + 1])
    parts, spans, at = [], [], 0
    for silence, clip in ((3.0, clips[0]), (4.0, clips[1])):
        parts += [np.zeros(int(silence * SR), np.float32), clip]
        spans.append((at + int(silence * SR), at + int(silence * SR) + len(clip)))
        at = spans[-1][1]
    parts.append(np.zeros(int(2.5 * SR), np.float32))
    return np.concatenate(parts), spans


def test_speech_padded_with_silence_keeps_its_words(model):
    samples, spans = padded_speech()
    rows = count_generated_rows(model)
    try:
        [result] = model.transcribe((samples, SR), vad=True)
    finally:
        del model.decode_batch
    segments = result.segments
    decoded = [s for s in segments if s.finish_reason is not FinishReason.NO_SPEECH]
    assert rows[0] == len(decoded) == 2  # one chunk per sentence; the silences are not decoded
    # The segments tile the audio, and each sentence lies wholly inside its decoded chunk.
    assert segments[0].start == 0.0 and segments[-1].end == pytest.approx(len(samples) / SR)
    assert all(a.end == b.start for a, b in itertools.pairwise(segments))
    for segment, (start, end) in zip(decoded, spans):
        assert segment.start * SR <= start and end <= segment.end * SR
        assert segment.end - segment.start < (end - start) / SR + 1.2  # the sentence and its padding, no more
        assert 0.0 <= segment.no_speech < 0.5
    assert all(s.no_speech == 1.0 for s in segments if s not in decoded)
    # Its words: each decoded chunk gives what the model gives for that audio alone, and the item's text joins
    # them with a space for the silence between them.
    alone = model.transcribe([(samples[round(s.start * SR) : round(s.end * SR)], SR) for s in decoded])
    assert [s.text for s in decoded] == [r.text for r in alone]
    assert all(words(r.text) for r in alone)
    assert result.text == join_texts([(decoded[0].text, True), ("", False), (decoded[1].text, True)])
    assert result.finish_reason is not FinishReason.NO_SPEECH and result.language == alone[0].language


def test_long_audio_is_cut_in_the_silences_where_the_quietest_point_cuts_speech(detector):
    """Sentences (voiced samples only) separated by hand-placed gaps of quiet noise: 1 s gaps stay inside a span
    (shorter than the 2 s that ends one) and are where a long span is cut; 3 s gaps are not decoded. The
    official rule, the quietest 100 ms, cuts inside a sentence here: a pause between words is quieter than the
    noise in the gaps."""
    rng = np.random.default_rng(0)
    clip = speech.synth(speech.MEDIUM_EN)
    voiced = np.flatnonzero(np.abs(clip) > 1e-3)
    clip = clip[voiced[0] : voiced[-1] + 1]
    gaps = [1.0, 1.0, 3.0, 1.0, 1.0]
    parts, speech_spans, gap_spans, at = [clip], [(0, len(clip))], [], len(clip)
    for gap in gaps:
        noise = (0.01 * rng.standard_normal(int(gap * SR))).astype(np.float32)
        gap_spans.append((at, at + len(noise)))
        parts += [noise, clip]
        speech_spans.append((at + len(noise), at + len(noise) + len(clip)))
        at += len(noise) + len(clip)
    samples = np.concatenate(parts)
    max_seconds = 8.0
    plan = detector.plan(samples, max_seconds)

    def in_gap(point: int) -> bool:
        return any(a <= point < b for a, b in gap_spans)

    cuts = [p.piece.start for p in plan[1:]]
    assert cuts and all(in_gap(cut) for cut in cuts), [c / SR for c in cuts]
    assert [p.piece.start for p in plan] == [0, *cuts] and plan[-1].piece.start + plan[
        -1
    ].piece.num_samples == len(samples)
    # Every sentence is decoded whole, in one chunk; every chunk fits the official split's bound.
    decoded = [p for p in plan if p.speech]
    for start, end in speech_spans:
        assert any(p.piece.start <= start and end <= p.piece.start + p.piece.num_samples for p in decoded)
    assert all(p.piece.num_samples <= (max_seconds + audio_io.SPLIT_SEARCH_SECONDS) * SR for p in decoded)
    # The 3 s gap (and only it) holds a piece that is not decoded; the 1 s gaps held the cuts of long spans.
    skipped = [p for p in plan if not p.speech]
    assert len(skipped) == 1 and in_gap(skipped[0].piece.start) and skipped[0].no_speech == 1.0
    assert sum(in_gap(c) and not any(c == s.piece.start for s in skipped) for c in cuts) >= 2
    # The control: the quietest-point split cuts inside a sentence on this audio.
    official_cuts = [p.start for p in audio_io.split_audio(samples, max_seconds)[1:]]
    assert any(not in_gap(cut) for cut in official_cuts), [c / SR for c in official_cuts]


def test_detector_scores_windows_from_a_fresh_state_per_item(detector):
    clip = speech.synth(speech.MEDIUM_EN)
    alone = detector.activity(clip)
    detector.activity(np.random.default_rng(0).standard_normal(3 * SR).astype(np.float32))
    again = detector.activity(clip)
    np.testing.assert_array_equal(alone.probs, again.probs)
    assert alone.probs.shape == (-(-len(clip) // WINDOW_SAMPLES),)
    assert (
        alone.no_speech(0, len(clip)) < 0.3
        and detector.activity(np.zeros(SR, np.float32)).no_speech(0, SR) == 1.0
    )


def test_join_texts_spaces_only_across_a_span_without_speech():
    assert join_texts([("a", True), ("b", True)]) == "ab"  # the official merge
    assert join_texts([("end.", True), ("", False), ("Next", True)]) == "end. Next"
    assert join_texts([("end. ", True), ("", False), ("Next", True)]) == "end. Next"
    assert join_texts([("今天", True), ("", False), ("好", True)]) == "今天好"
    assert join_texts([("", False), ("a", True), ("", True), ("", False), ("b", True), ("", False)]) == "a b"


def test_cli_vad_flag_reports_no_speech(checkpoint, tmp_path, capsys):
    from infer import transcribe as cli

    silent = tmp_path / "silence.wav"
    sf.write(silent, np.zeros(4 * SR, np.float32), SR, subtype="PCM_16")
    samples, _ = padded_speech()
    talk = tmp_path / "talk.wav"
    sf.write(talk, samples, SR, subtype="PCM_16")
    common = ["--model", checkpoint, "--max-new-tokens", str(MAX_NEW), "--format", "jsonl", "--no-progress"]
    assert cli.main([str(silent), str(talk), *common, "--vad"]) == 0
    quiet, spoken = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (quiet["text"], quiet["language"], quiet["finish_reason"]) == ("", "", "no_speech")
    assert [s["finish_reason"] for s in quiet["segments"]] == ["no_speech"] and quiet["segments"][0][
        "no_speech"
    ] == 1.0
    assert spoken["text"] and all("no_speech" in s for s in spoken["segments"])
    assert cli.main([str(silent), *common]) == 0
    [control] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert control["text"] and control["finish_reason"] != "no_speech"
    assert all("no_speech" not in s for s in control["segments"])


def test_server_vad_gives_no_speech_prob_in_verbose_json(checkpoint, tmp_path):
    reference = Qwen3ASRModel.from_pretrained(
        checkpoint, max_new_tokens=MAX_NEW, max_chunk_seconds=20.0, vad=True
    )
    samples, _ = padded_speech()
    files = {"silence": np.zeros(6 * SR, np.float32), "talk": samples}
    paths = {}
    for name, audio in files.items():
        paths[name] = tmp_path / f"{name}.wav"
        sf.write(paths[name], audio, SR, subtype="PCM_16")
    args = (
        "--vad",
        "--max-new-tokens",
        str(MAX_NEW),
        "--max-chunk-seconds",
        "20",
        "--max-audio-seconds",
        "60",
    )
    with running_server(checkpoint, *args) as server:
        bodies = {}
        for name, path in paths.items():
            with open(path, "rb") as handle:
                response = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": handle},
                                      data={"response_format": "verbose_json"}, timeout=300)  # fmt: skip
            assert response.status_code == 200, response.text
            bodies[name] = response.json()
    quiet = bodies["silence"]
    assert (quiet["text"], quiet["language"]) == ("", "")
    assert [(s["finish_reason"], s["no_speech_prob"], s["tokens"]) for s in quiet["segments"]] == [
        ("no_speech", 1.0, [])
    ]
    [expected] = reference.transcribe(str(paths["talk"]))
    talk = bodies["talk"]
    assert talk["text"] == expected.text and talk["text"]
    assert len(talk["segments"]) == len(expected.segments) == 5
    for served, segment in zip(talk["segments"], expected.segments):
        assert served["no_speech_prob"] == pytest.approx(segment.no_speech)
        assert served["finish_reason"] == segment.finish_reason.value
        assert served["tokens"] == list(segment.token_ids)
        assert (served["start"], served["end"]) == (round(segment.start, 3), round(segment.end, 3))
