"""Qwen3ASRModel against the official ``qwen_asr.Qwen3ASRModel`` (transformers backend), on a random-weight
checkpoint whose weights matter.

The reference runs each item alone (``max_inference_batch_size=1``: the official feature padding would otherwise
leak between items) with its encoder's attention windows wired in; ours runs all items in one padded batch. The
generated token ids, the prompts they follow, and the parsed language/text must be identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qasr_jax import audio as audio_io
from qasr_jax.asr import ASRTranscription, Qwen3ASRModel, default_token_budget
from qasr_jax.engine import DecodeResult
from qasr_jax.errors import AudioError, AudioFileNotFoundError, EmptyAudioError, LanguageError, QasrError
from tests.support import official, speech

EOS = list(official.EOS_TOKEN_IDS)
CACHE_ROOT = Path(tempfile.gettempdir()) / "qasr_test_checkpoints"


def cached_small_checkpoint(seed: int = 0) -> str:
    """The small ASR checkpoint dir for ``seed``, built once and shared by test files and runs.

    Keyed by the config and the source of the helpers that write it, so a change to either builds a new one.
    """
    config = official.small_asr_config()
    support = Path(official.__file__).parent
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode())
    for name in ("official.py", "vocab.py"):
        digest.update((support / name).read_bytes())
    path = CACHE_ROOT / f"asr-small-{seed}-{digest.hexdigest()[:12]}"
    if not (path / "config.json").exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE_ROOT))
        official.build_checkpoint(staging, config, seed=seed)
        with contextlib.suppress(OSError):  # another process may have finished the same build first
            os.replace(staging, path)
    return str(path)


def seconds(samples: np.ndarray, duration: float) -> np.ndarray:
    return samples[: int(duration * audio_io.SAMPLE_RATE)]


@contextlib.contextmanager
def spy_generations(model: Qwen3ASRModel) -> Iterator[dict[tuple[int, ...], list[int]]]:
    """Within the block, record every generated row as {prompt ids: generated ids}."""
    captured: dict[tuple[int, ...], list[int]] = {}
    original = model.decode_batch

    def generate(requests, options=None, adapters=None):
        out = original(requests, options, adapters=adapters)
        for request, generation in zip(requests, out):
            captured[tuple(int(i) for i in request.prompt_ids)] = generation.token_ids
        return out

    model.decode_batch = generate
    try:
        yield captured
    finally:
        del model.decode_batch


def official_transcribe(
    reference,
    audio,
    context,
    language,
    max_new_tokens: int,
    suppress_eos: bool,
    return_time_stamps: bool = False,
):
    """The official transcribe, item by item, encoder windows wired in (its aligner's too); (results, {prompt
    ids: new ids})."""
    captured: dict[tuple[int, ...], list[int]] = {}
    generate = reference.model.generate

    def recording_generate(**inputs):
        extra = {"suppress_tokens": EOS} if suppress_eos else {}
        out = generate(**inputs, **extra)
        prompt = inputs["input_ids"]
        for row, ids in zip(prompt.tolist(), out.sequences[:, prompt.shape[1] :].tolist()):
            captured[tuple(row)] = ids
        return out

    reference.model.generate = recording_generate
    reference.max_new_tokens = max_new_tokens
    try:
        with official.official_encoder_windows():
            results = reference.transcribe(
                audio, context=context, language=language, return_time_stamps=return_time_stamps
            )
    finally:
        del reference.model.generate
    return results, captured


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return cached_small_checkpoint()


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    short, medium, long = speech.speech_clips()
    return {"short": short, "medium": medium, "long": long}


@pytest.fixture(scope="module")
def reference(checkpoint: str):
    import torch
    from qwen_asr import Qwen3ASRModel as OfficialASRModel

    return OfficialASRModel.from_pretrained(checkpoint, max_inference_batch_size=1, dtype=torch.float32)


@pytest.fixture(scope="module")
def job_model(checkpoint: str) -> Qwen3ASRModel:
    """Batches of two, 8 tokens per chunk, end tokens suppressed (every row generates all 8)."""
    return Qwen3ASRModel.from_pretrained(
        checkpoint, max_inference_batch_size=2, max_new_tokens=8, suppress_tokens=EOS
    )


@pytest.fixture(scope="module")
def mixed_job(clips) -> list[np.ndarray]:
    """Six clips in three batches of two; the two middle batches share a bucket."""
    medium = clips["medium"]
    return [
        seconds(medium, 4.9),
        seconds(medium, 4.7),
        seconds(medium, 4.3),
        seconds(medium, 4.1),
        clips["short"],
        seconds(clips["short"], 0.6),
    ]


@pytest.fixture(scope="module")
def mixed_results(job_model, mixed_job):
    with spy_generations(job_model) as generated:
        results = job_model.transcribe([(wav, 16000) for wav in mixed_job])
    return results, generated, job_model.compile_count


def test_token_ids_and_text_match_official_item_by_item(checkpoint, clips, reference):
    # 0.7 s, 5 s and 20 s (three encoder windows) of speech; with and without context and a forced language.
    cases = [
        (clips["short"], "", None),
        (clips["medium"], "Context: a fox, a dog and a river.", None),
        (clips["long"], "", "English"),
        (clips["medium"], "Speaker: Qwen.", "chinese"),
    ]
    audio = [(wav, 16000) for wav, _, _ in cases]
    contexts = [context for _, context, _ in cases]
    languages = [language for _, _, language in cases]
    ours = Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=32, suppress_tokens=EOS)
    with spy_generations(ours) as generated:
        results = ours.transcribe(audio, context=contexts, language=languages)
    expected, expected_ids = official_transcribe(reference, audio, contexts, languages, 32, suppress_eos=True)

    assert ours.compile_count == 1  # one padded batch of four
    assert set(generated) == set(expected_ids)  # identical prompts, audio runs included
    for prompt, ids in expected_ids.items():
        assert len(ids) == 32
        assert generated[prompt] == ids
    # A demanding reference: the tokens depend on the audio and prompt, not a copy loop of one token.
    assert all(len(set(ids)) >= 8 for ids in expected_ids.values())
    assert len({tuple(ids[:8]) for ids in expected_ids.values()}) == len(cases)
    for ours_result, official_result in zip(results, expected):
        assert (ours_result.language, ours_result.text) == (official_result.language, official_result.text)
        assert ours_result.truncated and ours_result.error is None
    assert [r.language for r in results[2:]] == ["English", "Chinese"]  # forced languages are reported


def test_long_audio_splits_and_merges_like_official(checkpoint, clips, reference, monkeypatch):
    import qwen_asr.inference.qwen3_asr as official_pipeline

    # 4.9 s of speech with a 2 s limit: the quietest 100 ms within ±5 s of the target is near the end, so
    # the cut leaves a 0.34 s tail, which both pipelines zero-pad to 0.5 s.
    limit = 2.0
    monkeypatch.setattr(official_pipeline, "MAX_ASR_INPUT_SECONDS", limit)
    audio = [(clips["medium"], 16000), (clips["short"], 16000)]
    ours = Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=12, max_chunk_seconds=limit)
    with spy_generations(ours) as generated:
        results = ours.transcribe(audio, context="Topic: animals.")
    expected, expected_ids = official_transcribe(
        reference, audio, "Topic: animals.", None, 12, suppress_eos=False
    )

    pieces = audio_io.split_audio(clips["medium"], limit)
    assert [len(p.samples) > p.num_samples for p in pieces] == [False, True]
    assert len(expected_ids) == 3  # two chunks + the short clip, each decoded on its own by the reference
    assert generated == expected_ids
    for ours_result, official_result in zip(results, expected):
        assert (ours_result.language, ours_result.text) == (official_result.language, official_result.text)


def test_compilations_stay_within_buckets_and_are_reused(job_model, mixed_results):
    results, _, compiled = mixed_results
    assert all(r.error is None for r in results)
    shapes = job_model.compiled_shapes
    assert compiled == len(set(shapes)) == 2  # three batches, two buckets


def test_rerunning_a_job_compiles_nothing(job_model, mixed_job, mixed_results):
    results, _, compiled = mixed_results
    again = job_model.transcribe([(wav, 16000) for wav in mixed_job])
    assert job_model.compile_count == compiled
    assert again == results


def test_bad_items_fail_alone_and_batch_company_does_not_matter(
    job_model, mixed_job, mixed_results, tmp_path
):
    results, generated, compiled = mixed_results
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a sound file")
    audio = [
        str(tmp_path / "missing.wav"),
        (mixed_job[1], 16000),
        str(not_audio),
        (np.zeros(0, np.float32), 16000),
        (mixed_job[5], 16000),
        (np.zeros(100, np.float32), 16000),  # shorter than one feature frame
    ]
    with spy_generations(job_model) as regenerated:
        out = job_model.transcribe(audio)

    for index in (0, 2, 3, 5):
        assert isinstance(out[index].error, QasrError) and out[index].text == "" and out[index].language == ""
    assert isinstance(out[0].error, AudioFileNotFoundError) and "missing.wav" in str(out[0].error)
    assert isinstance(out[2].error, AudioError)
    assert isinstance(out[3].error, EmptyAudioError) and isinstance(out[5].error, EmptyAudioError)
    # The two good clips now share a batch with each other instead of their earlier partners, in the same
    # bucket: the same tokens and results.
    assert job_model.compile_count == compiled
    assert same_result(out[1], results[1]) and same_result(out[4], results[5])
    assert all(generated[prompt] == ids for prompt, ids in regenerated.items())


def same_result(a: ASRTranscription, b: ASRTranscription, atol: float = 1e-5) -> bool:
    """Equal in everything, the token log-probabilities up to ``atol``: another batch bucket is another compiled
    program, whose float sums may round differently (tokens, text and the rest are exact)."""

    def without_logprobs(result: ASRTranscription) -> ASRTranscription:
        return dataclasses.replace(
            result, segments=[dataclasses.replace(s, logprobs=()) for s in result.segments]
        )

    close = len(a.token_logprobs) == len(b.token_logprobs) and np.allclose(
        a.token_logprobs, b.token_logprobs, rtol=0, atol=atol
    )
    return without_logprobs(a) == without_logprobs(b) and close


def test_arguments_are_checked_like_official(job_model, clips):
    audio = [(clips["short"], 16000)] * 2
    with pytest.raises(ValueError, match="Batch size mismatch: audio=2, context=3"):
        job_model.transcribe(audio, context=["a", "b", "c"])
    with pytest.raises(ValueError, match="Batch size mismatch: audio=2, language=3"):
        job_model.transcribe(audio, language=["English"] * 3)
    with pytest.raises(LanguageError, match="Klingon"):
        job_model.transcribe(audio, language="Klingon")
    with pytest.raises(ValueError, match="requires `forced_aligner`"):
        job_model.transcribe(audio, return_time_stamps=True)
    assert job_model.transcribe([]) == []
    assert "Cantonese" in job_model.get_supported_languages()


@pytest.fixture(scope="module")
def aligner_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 400 classes × 80 ms = 32 s of range, as in tests/test_aligner.py.
    config = official.small_aligner_config(classify_num=400)
    return official.build_checkpoint(tmp_path_factory.mktemp("aligner"), config, seed=3)


def word_times(result) -> list[tuple[str, float, float]]:
    return [(item.text, item.start_time, item.end_time) for item in result.time_stamps.items]


def test_timestamps_match_official_transcribe_with_its_aligner(
    checkpoint, aligner_checkpoint, clips, reference, monkeypatch
):
    """``transcribe(..., return_time_stamps=True)`` end to end (real decode, real aligner) against the official
    ``transcribe`` with its forced aligner, encoder windows wired into both official models. Word times must be
    identical, not close: each is a class index × 80 ms, offset by its chunk's start and rounded to the
    millisecond, so a parity error shows as whole 80-ms steps or another repair, never as rounding noise."""
    import qwen_asr.inference.qwen3_asr as official_pipeline
    import torch
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForcedAligner as OfficialAligner

    # With a 2-s limit the 4.9-s clip is cut at its quietest 100 ms near the end: the 0.34-s tail is transcribed
    # and aligned alone, and its words are shifted by the tail's start (4.555 s).
    limit = 2.0
    monkeypatch.setattr(official_pipeline, "MAX_FORCE_ALIGN_INPUT_SECONDS", limit)
    monkeypatch.setattr(
        reference, "forced_aligner", OfficialAligner.from_pretrained(aligner_checkpoint, dtype=torch.float32)
    )
    audio = [(clips["medium"], 16000), (clips["short"], 16000)]
    languages = ["English", "Chinese"]  # forced, so that every chunk has text to align
    ours = Qwen3ASRModel.from_pretrained(
        checkpoint, forced_aligner=aligner_checkpoint, max_new_tokens=12, max_chunk_seconds=limit
    )
    results = ours.transcribe(audio, language=languages, return_time_stamps=True)
    expected, _ = official_transcribe(
        reference, audio, "", languages, 12, suppress_eos=False, return_time_stamps=True
    )

    assert [p.start for p in audio_io.split_audio(clips["medium"], limit)] == [0, 72884]
    assert [(r.language, r.text) for r in results] == [(e.language, e.text) for e in expected]
    official_times = [[(i.text, i.start_time, i.end_time) for i in e.time_stamps.items] for e in expected]
    assert [word_times(r) for r in results] == official_times
    # A demanding reference: many words, spread over many distinct times.
    assert [len(times) for times in official_times] == [24, 12]
    assert len({t for times in official_times for _, start, end in times for t in (start, end)}) >= 20


def test_token_budget_grows_with_duration_and_truncation_is_flagged(job_model, clips):
    assert default_token_budget(0.0) == 32
    assert default_token_budget(30.0) == 32 + 360
    assert default_token_budget(1200.0) > 1200 * 10  # faster than any speaker
    assert ASRTranscription("English", "hi").truncated is False

    scaled = Qwen3ASRModel(
        job_model.config, job_model.params, job_model.tokenizer, max_chunk_seconds=2.0
    )
    budgets = []

    def generate(
        requests, options=None, adapters=None
    ):  # stands in for the decode: chunk 0 of the long item hits its budget
        budgets.extend(r.max_new_tokens for r in requests)
        return [DecodeResult([15, 16], stopped=r.max_new_tokens != max(budgets)) for r in requests]

    scaled.decode_batch = generate
    out = scaled.transcribe([(clips["medium"], 16000), (clips["short"], 16000)])
    pieces = audio_io.split_audio(clips["medium"], 2.0) + audio_io.split_audio(clips["short"], 2.0)
    assert sorted(budgets) == sorted(default_token_budget(len(p.samples) / 16000) for p in pieces)
    assert [r.truncated for r in out] == [True, False]
