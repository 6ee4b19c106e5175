"""Qwen3ForcedAligner against the official aligner, on a random-weight checkpoint whose weights matter.

The reference is the official ``Qwen3ForcedAligner.align`` run on each pair alone (a batch of one, so the
official feature padding cannot leak between pairs) with its encoder's attention windows wired in; ours runs
all pairs in one padded batch. Timestamps must be identical, not close.
"""

from __future__ import annotations

import numpy as np
import pytest

from qasr_jax import audio as audio_io
from qasr_jax.aligner import (
    MAX_ALIGN_SECONDS,
    ForcedAlignItem,
    ForcedAlignResult,
    Qwen3ForcedAligner,
    concatenate_results,
    piece_offsets,
)
from qasr_jax.errors import AlignmentError, AudioError, LanguageError
from tests.support import official, speech

MIXED_ZH_EN = "今天天气很好, we walk to the park 公园散步吧。"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 400 classes × 80 ms = 32 s of range: every clip below fits and the classes spread over it.
    config = official.small_aligner_config(classify_num=400)
    return official.build_checkpoint(tmp_path_factory.mktemp("aligner"), config, seed=3)


@pytest.fixture(scope="module")
def official_aligner(checkpoint: str):
    import torch
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForcedAligner as OfficialAligner

    return OfficialAligner.from_pretrained(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def aligner(checkpoint: str) -> Qwen3ForcedAligner:
    return Qwen3ForcedAligner.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[np.ndarray, str, str]]:
    """(16 kHz samples, text, language): 0.7 s, 5 s and 19 s of English (the last spans three encoder
    windows), Chinese, and Chinese speech with a mixed Chinese/English, a Japanese and a Korean text."""
    zh = speech.synth(speech.MEDIUM_ZH, voice="cmn")
    return [
        (speech.synth(speech.SHORT_EN), speech.SHORT_EN, "English"),
        (speech.synth(speech.MEDIUM_EN), speech.MEDIUM_EN, "English"),
        (speech.synth(speech.LONG_EN), speech.LONG_EN, "English"),
        (zh, speech.MEDIUM_ZH, "Chinese"),
        (zh, MIXED_ZH_EN, "chinese"),
        # The word segmenters of Japanese (nagisa) and Korean (soynlp) on the same speech.
        (zh, "今日はいい天気ですね。公園に行きましょう。", "Japanese"),
        (zh, "오늘은 날씨가 좋네요. 공원에 갑시다.", "Korean"),
    ]


def as_tuples(result) -> list[tuple[str, float, float]]:
    return [(item.text, item.start_time, item.end_time) for item in result]


def official_align_alone(
    official_aligner, pairs, windowed: bool = True
) -> list[list[tuple[str, float, float]]]:
    results = []
    for samples, text, language in pairs:
        if windowed:
            with official.official_encoder_windows():
                (result,) = official_aligner.align(audio=(samples, 16000), text=text, language=language)
        else:
            (result,) = official_aligner.align(audio=(samples, 16000), text=text, language=language)
        results.append(as_tuples(result))
    return results


@pytest.fixture(scope="module")
def official_results(official_aligner, pairs) -> list[list[tuple[str, float, float]]]:
    return official_align_alone(official_aligner, pairs)


@pytest.fixture(scope="module")
def batched_results(aligner, pairs) -> list[ForcedAlignResult]:
    return aligner.align(
        [(s, 16000) for s, _, _ in pairs], [t for _, t, _ in pairs], [lang for *_, lang in pairs]
    )


def test_batched_timestamps_match_official_item_by_item(batched_results, official_results, aligner):
    assert [result.error for result in batched_results] == [None] * len(batched_results)
    assert [as_tuples(result) for result in batched_results] == official_results
    # One padded forward pass for the whole batch.
    assert len(aligner.buckets) == 1 and aligner.compiled_programs == 1


def test_reference_is_a_demanding_one(official_results):
    """The weights make times vary by word, the repair interpolates, and the CJK/Latin word split is exercised."""
    starts = [start for result in official_results for _, start, _ in result]
    assert len(set(starts)) >= 20
    # Interpolated repairs give times off the 80 ms grid.
    assert any(round(t * 1000) % 80 for result in official_results for _, s, e in result for t in (s, e))
    assert [word for word, _, _ in official_results[4]][:7] == ["今", "天", "天", "气", "很", "好", "we"]
    assert [word for word, _, _ in official_results[5]][:2] == ["今日", "は"]
    assert [word for word, _, _ in official_results[6]][:2] == ["오늘", "은"]


def test_parity_fails_without_encoder_windows(official_aligner, pairs, batched_results):
    """The official encoder attending across the whole 19 s clip (its unpatched CPU behaviour) gives other
    times: the comparison above sees the windows."""
    (unwindowed,) = official_align_alone(official_aligner, pairs[2:3], windowed=False)
    assert unwindowed != as_tuples(batched_results[2])


def test_one_program_per_bucket(aligner, pairs, batched_results):
    fresh = Qwen3ForcedAligner(aligner.config, aligner.params, aligner.tokenizer)
    assert fresh.precompile([(s, 16000) for s, _, _ in pairs], [t for _, t, _ in pairs], "English") == 1
    # Six pairs (padded to the same eight rows as seven) in another order: no new program, same results.
    subset = [pairs[4], pairs[2], pairs[0], pairs[1], pairs[1], pairs[6]]
    again = fresh.align(
        [(s, 16000) for s, _, _ in subset], [t for _, t, _ in subset], [g for *_, g in subset]
    )
    assert fresh.compiled_programs == 1 and fresh.buckets == aligner.buckets
    expected = {id(p): as_tuples(r) for p, r in zip(pairs, batched_results)}
    assert [as_tuples(r) for r in again] == [expected[id(p)] for p in subset]


def test_results_do_not_depend_on_batching(aligner, pairs, batched_results):
    """Batches of at most three rows (and an odd one out): the same times as one batch of seven."""
    small_batches = Qwen3ForcedAligner(aligner.config, aligner.params, aligner.tokenizer, max_batch_size=3)
    results = small_batches.align(
        [(s, 16000) for s, _, _ in pairs], [t for _, t, _ in pairs], [g for *_, g in pairs]
    )
    assert [as_tuples(r) for r in results] == [as_tuples(r) for r in batched_results]
    assert sorted(rows for rows, _, _ in small_batches.buckets) == [1, 3, 3]


def test_bad_items_fail_alone_with_typed_errors(aligner, pairs, batched_results, tmp_path):
    good_samples, good_text, _ = pairs[1]
    too_long = np.zeros(int((aligner.max_seconds + 1) * 16000), np.float32)
    results = aligner.align(
        [
            (good_samples, 16000),
            (good_samples, 16000),
            (good_samples, 16000),
            str(tmp_path / "missing.wav"),
            (too_long, 16000),
            (good_samples, 16000),
            (good_samples, 16000),
        ],
        [good_text, "", "… !? —", "hello", "hello", "hello", good_text],
        ["English", "English", "English", "English", "English", "Klingon", "English"],
    )
    assert as_tuples(results[0]) == as_tuples(batched_results[1])
    assert as_tuples(results[6]) == as_tuples(batched_results[1])
    # No words: nothing to align, and nothing wrong.
    assert (results[1].items, results[1].error) == ([], None)
    assert (results[2].items, results[2].error) == ([], None)
    assert isinstance(results[3].error, AudioError) and "missing.wav" in str(results[3].error)
    assert isinstance(results[4].error, AlignmentError) and "32 s" in str(results[4].error)
    assert isinstance(results[5].error, LanguageError) and "Klingon" in str(results[5].error)
    assert all(len(results[i]) == 0 for i in (3, 4, 5))

    with pytest.raises(LanguageError):
        aligner.align((good_samples, 16000), "hello", "Klingon", strict=True)
    with pytest.raises(ValueError, match="mismatch"):
        aligner.align([(good_samples, 16000)] * 2, ["a", "b", "c"], "English")


def test_short_audio_is_padded_to_half_a_second(aligner, official_aligner, pairs):
    samples = pairs[0][0][:3200]  # 0.2 s
    padded = np.pad(samples, (0, 8000 - samples.shape[0]))
    tiny = np.full(40, 0.1, np.float32)  # less than one feature frame
    ours = aligner.align([samples, tiny], ["Hi there", "Hi"], "English")
    (reference,) = official_align_alone(official_aligner, [(padded, "Hi there", "English")])
    assert as_tuples(ours[0]) == reference
    assert ours[1].error is None and [item.text for item in ours[1]] == ["Hi"]


def test_transcript_pieces_match_official_offsets(aligner, official_aligner, pairs):
    """Pieces of split audio aligned and shifted into the original timeline as the official transcribe does."""
    from qwen_asr.inference.qwen3_asr import Qwen3ASRModel as OfficialASR
    from qwen_asr.inference.utils import split_audio_into_chunks

    wav = np.concatenate([pairs[1][0], pairs[3][0], pairs[0][0]])
    # Pieces of about 4 s, cut within ±1 s of the target (the default ±5 s is meant for 180 s pieces).
    chunks = split_audio_into_chunks(wav, 16000, 4.0, search_expand_sec=1.0)
    pieces = audio_io.split_audio(wav, 4.0, search_seconds=1.0)
    assert 3 <= len(pieces) == len(chunks) <= 4
    texts = ["the quick brown fox", "", "今天天气很好", "我们去公园"][: len(pieces)]
    texts += ["Hi"] * (len(pieces) - len(texts))
    # Detected languages may be unknown ("") or unsupported; both split on whitespace, as officially.
    languages = ["Martian", "English", "Chinese", ""][: len(pieces)]
    languages += ["English"] * (len(pieces) - len(languages))

    (merged,) = aligner.align_transcripts([pieces], [texts], [languages])

    shifted = []
    with official.official_encoder_windows():
        for (chunk, offset), text, language in zip(chunks, texts, languages):
            if text.strip():
                (result,) = official_aligner.align(audio=(chunk, 16000), text=text, language=language)
                shifted.append(OfficialASR._offset_align_result(None, result, offset))
    reference = OfficialASR._merge_align_results(None, shifted)
    assert as_tuples(merged) == as_tuples(reference)
    assert piece_offsets(pieces) == [offset for _, offset in chunks]
    assert aligner.align_transcripts([pieces], [[""] * len(pieces)], [languages]) == [None]


def test_result_helpers():
    result = ForcedAlignResult([ForcedAlignItem("a", 0.1, 0.2), ForcedAlignItem("b", 0.3, 0.4)])
    assert as_tuples(result.shifted(2.5)) == [("a", 2.6, 2.7), ("b", 2.8, 2.9)]
    assert result[1].text == "b" and len(result) == 2 and result.ok
    assert concatenate_results([None, result, ForcedAlignResult([])]).items == result.items
    assert concatenate_results([None, ForcedAlignResult([])]) is None
    assert MAX_ALIGN_SECONDS == 180.0


def test_transcription_checkpoints_are_refused_before_loading(tmp_path):
    import json

    from qasr_jax.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps(official.small_asr_config()))
    with pytest.raises(ConfigError, match="not a ForcedAligner"):
        Qwen3ForcedAligner.from_pretrained(tmp_path)


def test_align_command_writes_what_the_library_computes(checkpoint, aligner, tmp_path):
    """``python -m infer align`` end to end (a subprocess) against the library call and the VTT writer."""
    import os
    import subprocess
    import sys

    from qasr_jax import formats

    wav_path = speech.synth_wav(speech.MEDIUM_EN)
    text_file = tmp_path / "transcript.txt"
    text_file.write_text(speech.MEDIUM_EN + "\n", encoding="utf-8")
    output = tmp_path / "out.vtt"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "infer", "align", wav_path, str(text_file), "--model", checkpoint,
               "--language", "English", "--output", str(output), "--max-line-chars", "20"]  # fmt: skip
    completed = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr

    (result,) = aligner.align(wav_path, speech.MEDIUM_EN, "English", strict=True)
    expected = formats.to_vtt(result, speech.MEDIUM_EN, formats.CueOptions(max_chars_per_line=20))
    assert output.read_text(encoding="utf-8") == expected
    assert len(result) == len(speech.MEDIUM_EN.split())


def test_align_command_reports_bad_inputs(checkpoint, capsys, tmp_path):
    import json

    from infer.align import main

    assert main([str(tmp_path / "missing.wav"), "hello", "--model", checkpoint, "--language", "English"]) == 1
    assert "missing.wav: no such audio file" in capsys.readouterr().err
    wav_path = speech.synth_wav(speech.SHORT_EN)
    assert main([wav_path, "hello", "--model", checkpoint, "--language", "Klingon"]) == 1
    assert "unsupported language 'Klingon'" in capsys.readouterr().err
    # No words: an empty but well-formed document.
    assert main([wav_path, "?!", "--model", checkpoint, "--language", "English", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "audio": wav_path,
        "language": "English",
        "text": "?!",
        "words": [],
    }
