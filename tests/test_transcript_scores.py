"""What a transcript reports beside its text: token log-probabilities recorded by the decode loop, and why
decoding stopped.

The log-probabilities are checked against the official model (``qwen_asr``'s transformers backend) on the small
random-weight checkpoint whose weights matter: the official thinker is run with teacher forcing on the prompt
plus the tokens we generated, and the log-softmax of its fp32 logits at each generated token must equal what the
decode loop recorded.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from qasr_jax import audio as audio_io
from qasr_jax import text as text_io
from qasr_jax.asr import ASRTranscription, Qwen3ASRModel
from qasr_jax.engine import DecodeOptions, Generation
from qasr_jax.errors import EmptyAudioError
from qasr_jax.transcript import FinishReason, compression_ratio, decode_segment, item_finish_reason
from tests.support import official, speech
from tests.test_asr import cached_small_checkpoint

MAX_NEW = 12


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return cached_small_checkpoint()


@pytest.fixture(scope="module")
def model(checkpoint: str) -> Qwen3ASRModel:
    return Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=MAX_NEW, eos_token_ids=())


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    short, medium, _ = speech.speech_clips()
    return [short, medium]


@pytest.fixture(scope="module")
def reference(checkpoint: str):
    return official.load_official(checkpoint)


def official_logprobs(reference, samples: np.ndarray, prompt: list[int], generated: list[int]) -> np.ndarray:
    """log-softmax (fp32) of the official logits over ``prompt + generated[:-1]``, at the positions that predict
    each generated token: ``[len(generated), vocab]``."""
    import torch

    ids = np.asarray([prompt + generated[:-1]], np.int64)
    logits = official.official_logits(
        reference, ids, np.ones_like(ids), official.official_features([samples])
    )
    rows = torch.from_numpy(logits[0, len(prompt) - 1 :]).to(torch.float32)
    return torch.log_softmax(rows, dim=-1).numpy()


def test_recorded_logprobs_equal_official_log_softmax(reference, model, clips):
    # A batch of two (one row left-padded), one with a forced language: every row's own values.
    languages = [None, "English"]
    results = model.transcribe([(wav, 16000) for wav in clips], language=languages)
    for wav, language, result in zip(clips, languages, results):
        assert result.error is None and len(result.segments) == 1
        [segment] = result.segments
        generated = list(segment.token_ids)
        assert len(generated) == MAX_NEW == len(segment.logprobs)
        prompt = text_io.build_prompt_ids(
            model.tokenizer, model.config.audio.output_length(audio_io.num_frames(len(wav))), "", language
        )
        table = official_logprobs(reference, wav, prompt, generated)
        steps = np.arange(len(generated))
        assert table.argmax(-1).tolist() == generated  # greedy: the official model picks the same tokens
        expected = table[steps, generated]
        recorded = np.asarray(segment.logprobs, np.float32)
        np.testing.assert_allclose(recorded, expected, rtol=0, atol=1e-4)
        # The values carry information: a position off by one, or another token, would not pass.
        assert np.max(np.abs(recorded[1:] - table[steps[:-1], generated[1:]])) > 1e-2
        assert np.max(np.abs(recorded[:-1] - table[steps[1:], generated[:-1]])) > 1e-2
        runner_up = np.argsort(table, axis=-1)[:, -2]
        assert np.min(recorded - table[steps, runner_up]) > 0  # the chosen token is the most likely one
        # Summaries: per chunk and per item, over the same tokens.
        assert result.token_ids == generated and result.token_logprobs == list(segment.logprobs)
        assert segment.avg_logprob == pytest.approx(float(np.mean(recorded)), abs=1e-6)
        assert result.avg_logprob == pytest.approx(segment.avg_logprob, abs=1e-12)


def test_finish_reason_is_length_at_the_budget_and_stop_on_an_end_token(model, clips):
    wav = (clips[1], 16000)
    [budgeted] = model.transcribe(wav, language="English")
    ids = list(budgeted.token_ids)
    assert len(ids) == MAX_NEW
    assert budgeted.finish_reason is FinishReason.LENGTH and budgeted.truncated
    assert [s.finish_reason for s in budgeted.segments] == [FinishReason.LENGTH]

    # Make a token the model generates at step k (for the first time) an end token: it stops right there.
    k = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])
    stopping = Qwen3ASRModel(
        model.config, model.generator.params, model.tokenizer, max_new_tokens=MAX_NEW,
        decode_options=DecodeOptions(eos_token_ids=(ids[k],)),
    )  # fmt: skip
    [stopped] = stopping.transcribe(wav, language="English")
    assert list(stopped.token_ids) == ids[: k + 1]
    assert stopped.finish_reason is FinishReason.STOP and not stopped.truncated
    np.testing.assert_allclose(stopped.token_logprobs, budgeted.token_logprobs[: k + 1], rtol=0, atol=1e-5)
    # A budget of exactly k + 1 tokens that ends on the end token is a stop, not a length.
    exact = Qwen3ASRModel(
        model.config, model.generator.params, model.tokenizer, max_new_tokens=k + 1,
        decode_options=DecodeOptions(eos_token_ids=(ids[k],)),
    )  # fmt: skip
    [at_budget] = exact.transcribe(wav, language="English")
    assert at_budget.finish_reason is FinishReason.STOP and len(at_budget.token_ids) == k + 1

    # A failed item says so.
    [failed] = model.transcribe((np.zeros(10, np.float32), 16000))
    assert isinstance(failed.error, EmptyAudioError)
    assert failed.finish_reason is FinishReason.ERROR and failed.avg_logprob is None and failed.segments == []


def test_repetition_cut_and_compression_ratio(model):
    tokenizer = model.tokenizer
    piece = audio_io.AudioPiece(np.zeros(32000, np.float32), 16000, 32000, 16000)
    loop = "language English<asr_text>" + "to be or not " * 30
    plain = "language English<asr_text>The quick brown fox jumps over the lazy dog."

    def segment(raw: str, stopped: bool):
        ids = tokenizer.encode(raw)
        return decode_segment(tokenizer, Generation(ids, stopped, [-0.25] * len(ids)), piece, None)

    cut = segment(loop, stopped=False)
    assert cut.finish_reason is FinishReason.REPETITION and cut.truncated
    assert 0 < len(cut.text) < len("to be or not " * 30) / 5  # the repair cut the run back
    assert segment(loop, stopped=True).finish_reason is FinishReason.REPETITION
    fine = segment(plain, stopped=False)
    assert fine.finish_reason is FinishReason.LENGTH and fine.language == "English"
    assert segment(plain, stopped=True).finish_reason is FinishReason.STOP
    assert (cut.start, cut.end) == (1.0, 3.0)
    assert fine.avg_logprob == pytest.approx(-0.25)

    # Whisper's definition, and what it tells: a loop compresses far better than speech.
    data = ("to be or not " * 30).encode()
    assert compression_ratio("to be or not " * 30) == len(data) / len(zlib.compress(data))
    assert compression_ratio("to be or not " * 30) > 2.4 > compression_ratio(fine.text)
    assert compression_ratio("") == 0.0

    # An item reports its most telling chunk; a failure overrides everything.
    assert item_finish_reason([fine, cut]) is FinishReason.REPETITION
    assert item_finish_reason([segment(plain, True), fine]) is FinishReason.LENGTH
    assert item_finish_reason([cut], failed=True) is FinishReason.ERROR
    item = ASRTranscription("English", fine.text + cut.text, segments=[fine, cut])
    assert item.finish_reason is FinishReason.REPETITION
    assert len(item.token_ids) == len(fine.token_ids) + len(cut.token_ids) == len(item.token_logprobs)
