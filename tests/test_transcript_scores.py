"""What a transcript reports beside its text: token log-probabilities recorded by the decode loop, and why
decoding stopped.

The log-probabilities are checked against the official model (``qwen_asr``'s transformers backend) on the small
random-weight checkpoint whose weights matter: the official thinker is run with teacher forcing on the prompt
plus the tokens we generated, and the log-softmax of its fp32 logits at each generated token must equal what the
decode loop recorded.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from qasr_jax import audio as audio_io
from qasr_jax import demo as demo_models
from qasr_jax import text as text_io
from qasr_jax.asr import ASRTranscription, Qwen3ASRModel
from qasr_jax.batch_jobs import Job
from qasr_jax.engine import DecodeOptions, DecodeResult
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
        model.config, model.params, model.tokenizer, max_new_tokens=MAX_NEW,
        decode_options=DecodeOptions(eos_token_ids=(ids[k],)),
    )  # fmt: skip
    [stopped] = stopping.transcribe(wav, language="English")
    assert list(stopped.token_ids) == ids[: k + 1]
    assert stopped.finish_reason is FinishReason.STOP and not stopped.truncated
    np.testing.assert_allclose(stopped.token_logprobs, budgeted.token_logprobs[: k + 1], rtol=0, atol=1e-5)
    # A budget of exactly k + 1 tokens that ends on the end token is a stop, not a length.
    exact = Qwen3ASRModel(
        model.config, model.params, model.tokenizer, max_new_tokens=k + 1,
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
        return decode_segment(tokenizer, DecodeResult(ids, stopped, [-0.25] * len(ids)), piece, None)

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


# --------------------------------------------------------------------------------------------------------------
# Word confidences: the mean probability of the tokens each word spans

REPO = Path(__file__).resolve().parent.parent
# The shipped demo models (a trained ASR model and its aligner), so the words are real English and German words
# with real times, on the example clips they transcribe.
EXAMPLES = [str(path) for path in sorted((REPO / "examples").glob("*.wav"))]


@pytest.fixture(scope="module")
def demo() -> Qwen3ASRModel:
    return Qwen3ASRModel.from_pretrained(
        demo_models.default_model_path(), forced_aligner=demo_models.default_aligner_path()
    )


@pytest.fixture(scope="module")
def demo_results(demo) -> list[ASRTranscription]:
    return demo.transcribe(EXAMPLES)


def hand_token_spans(tokenizer, ids) -> list[tuple[int, int]]:
    """Each token's characters in the decoded text, by decoding every prefix: token k adds the characters between
    the previous prefix's text and its own. (Valid where no character is split between tokens: every prefix
    must decode to whole characters.)"""
    ends = []
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        assert "\ufffd" not in prefix
        ends.append(len(prefix))
    return list(zip([0, *ends[:-1]], ends))


def hand_confidences(tokenizer, segment, words, shift: int = 0) -> list[tuple[float, int]]:
    """Each word's mean token probability, and how many tokens it spans, from the segment's ids and
    log-probabilities alone: the text is found after ``<asr_text>`` in the decoded ids, each word is its run of
    the text (the words' lengths in order), and a token counts for a word when its characters overlap the word's.
    ``shift`` pairs each token's span with the log-probability of the token ``shift`` places later (a deliberate
    misalignment, for the negative control)."""
    raw = tokenizer.decode(segment.token_ids, skip_special_tokens=True)
    header, body = raw.split("<asr_text>", 1)
    offset = len(header) + len("<asr_text>") + len(body) - len(body.lstrip())
    assert raw[offset : offset + len(segment.text)] == segment.text
    spans = hand_token_spans(tokenizer, segment.token_ids)
    logprobs = list(segment.logprobs[shift:]) + [0.0] * shift
    out, position = [], offset
    for word in words:
        start, end = position, position + len(word.text)
        overlapping = [math.exp(p) for (a, b), p in zip(spans, logprobs) if a < b and a < end and b > start]
        out.append((sum(overlapping) / len(overlapping), len(overlapping)))
        position = end
    return out


def test_word_confidences_are_the_mean_probability_of_the_tokens_each_word_spans(demo, demo_results):
    spanning = 0
    misaligned = []
    for result in demo_results:
        assert result.error is None and result.finish_reason is FinishReason.STOP
        [segment] = result.segments
        words = result.words
        # The words are the text: they concatenate back to it, one per whitespace-separated word here.
        assert "".join(word.text for word in words) == result.text
        assert [word.text.strip() for word in words] == result.text.split()
        expected = hand_confidences(demo.tokenizer, segment, words)
        assert [word.confidence for word in words] == pytest.approx(
            [c for c, _ in expected], rel=0, abs=1e-12
        )
        assert all(0 < word.confidence <= 1 for word in words)
        spanning += sum(count > 1 for _, count in expected)
        shifted = hand_confidences(demo.tokenizer, segment, words, shift=1)
        misaligned.append(max(abs(a - b) for (a, _), (b, _) in zip(shifted, expected)))
    # Words of several tokens (a number: " ", "3", "0"; a word and its full stop: " garage", ".") are among them.
    assert spanning >= 2
    assert max(misaligned) > 1e-9  # a one-token misalignment would not pass the 1e-12 comparison

    # What the command line and manifest jobs write: the same words, with the same confidences.
    from infer.transcribe import result_record

    record = result_record(Job("a", EXAMPLES[0]), demo_results[0])
    assert record["words"] == [{"text": w.text, "confidence": w.confidence} for w in demo_results[0].words]
    assert json.loads(json.dumps(record))["words"] == record["words"] and "time_stamps" not in record


def test_aligned_words_carry_the_same_confidences(demo, demo_results):
    timed = demo.transcribe(EXAMPLES[:2], return_time_stamps=True)
    for result, plain in zip(timed, demo_results[:2]):
        assert result.text == plain.text and result.time_stamps.error is None
        items = result.time_stamps.items
        # The aligner's words are the text's word units, in order; each carries the word's confidence.
        assert [item.text for item in items] == text_io.split_words(result.text, result.language)
        assert len(items) == len(result.words) >= 3
        assert [item.confidence for item in items] == [word.confidence for word in result.words]
        assert [item.confidence for item in items] == pytest.approx(
            [word.confidence for word in plain.words], rel=0, abs=1e-6
        )
        from infer.transcribe import result_record

        record = result_record(Job("a", EXAMPLES[0]), result)
        assert [w["confidence"] for w in record["time_stamps"]] == [item.confidence for item in items]
        assert "words" not in record  # with times, the words are the time stamps


def test_token_spans_follow_split_characters_punctuation_and_the_repetition_cut(model):
    """``decode_segment`` on outputs whose tokens split characters (Chinese: one token ends inside a character the
    next completes), with punctuation, a forced language and a cut repetition: each token's characters and each
    word's confidence, by hand."""
    tokenizer = model.tokenizer
    piece = audio_io.AudioPiece(np.zeros(32000, np.float32), 16000, 0, 16000)

    def segment(raw: str, forced: str | None):
        ids = tokenizer.encode(raw)
        logprobs = [-0.05 * (k + 1) for k in range(len(ids))]  # every token its own value
        return ids, decode_segment(tokenizer, DecodeResult(ids, True, logprobs), piece, forced)

    # "今天天气很好" encodes as "今", "天天" + the first bytes of "气", the rest of "气" + "很好", "。".
    ids, zh = segment("language Chinese<asr_text>今天天气很好。我们走吧！", None)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # some character is split between two tokens
    assert zh.text == "今天天气很好。我们走吧！" and zh.language == "Chinese"
    # Each word is one character (with the punctuation after it); a token counts for every word it touches.
    assert [w.text for w in zh.words] == ["今", "天", "天", "气", "很", "好。", "我", "们", "走", "吧！"]
    # Each token's bytes through transformers' own byte-level table (GPT-2's bytes_to_unicode).
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    data = [bytes(byte_of[c] for c in tokenizer.id_to_token(i)) for i in ids]
    position, expected = len(b"language Chinese<asr_text>"), []
    char_bytes = [len(w.text.encode()) for w in zh.words]
    for size in char_bytes:
        overlapping, offset = [], 0
        for k, chunk in enumerate(data):
            if chunk and offset < position + size and offset + len(chunk) > position:
                overlapping.append(math.exp(zh.logprobs[k]))
            offset += len(chunk)
        expected.append(sum(overlapping) / len(overlapping))
        position += size
    assert [w.confidence for w in zh.words] == pytest.approx(expected, rel=0, abs=1e-12)
    assert len(set(expected)) > 5

    # A forced language: the whole output is text; the header is not generated.
    ids, en = segment("  Hello, world. It's 20 degrees!", "English")
    assert en.text == "Hello, world. It's 20 degrees!" and en.token_spans[0][0] == 0
    assert [w.text for w in en.words] == ["Hello,", " world.", " It's", " 20", " degrees!"]
    assert "".join(tokenizer.decode([i]) for i in ids).strip() == en.text
    # The characters of each token in the text, by hand (no character is split here).
    spans = hand_token_spans(tokenizer, ids)
    assert [(max(a - 2, 0), max(b - 2, 0)) for a, b in spans] == list(en.token_spans)  # less the 2 spaces

    # A runaway repetition the repair cuts: tokens of the cut copies produce no text and count for no word.
    ids, cut = segment("language English<asr_text>yes " + "no " * 40 + "end", None)
    assert cut.finish_reason is FinishReason.REPETITION and cut.text == "yes no end"
    kept = [k for k, (a, b) in enumerate(cut.token_spans) if a < b]
    assert len(kept) < len(ids) - 30  # most "no" tokens are cut
    assert "".join(w.text for w in cut.words) == cut.text and len(cut.words) == 3
    assert [w.text.strip() for w in cut.words] == ["yes", "no", "end"]
    assert all(w.confidence is not None for w in cut.words)
    # Punctuation alone: one piece, no aligner word.
    _, dots = segment("language English<asr_text>...", None)
    assert [w.text for w in dots.words] == ["..."] and dots.word_pieces[0] == []


def test_decode_with_spans_equals_decoding_every_prefix(model):
    """The byte-level spans of ``Tokenizer.decode_with_spans`` against the slow definition (decode each prefix),
    on random ids: broken characters, special tokens skipped, added tokens."""
    tokenizer = model.tokenizer
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = [int(i) for i in rng.integers(0, len(tokenizer), rng.integers(0, 24))]
        for skip in (True, False):
            text, spans = tokenizer.decode_with_spans(ids, skip_special_tokens=skip)
            assert text == tokenizer.decode(ids, skip_special_tokens=skip)
            assert spans == tokenizer._spans_by_prefixes(ids, skip, text)


# --------------------------------------------------------------------------------------------------------------
# Streaming updates carry the scores of the tokens behind their text

STREAM_CHUNK = 1.0


def test_stream_updates_carry_the_scores_of_one_shot_decoding_of_the_same_audio(model, clips):
    """Without a prefix (``unfixed_chunk_num`` past the stream's chunks) an update decodes the audio so far from the
    bare prompt, as ``transcribe`` does: the same tokens and the same log-probabilities (two compiled programs:
    1e-4)."""
    wav = clips[1]  # 4.9 s: four 1-s chunks and a tail
    state = model.init_streaming_state(unfixed_chunk_num=100, chunk_size_sec=STREAM_CHUNK)
    model.streaming_transcribe(wav, state)
    model.finish_streaming_transcribe(state)
    assert len(state.updates) == 5
    for update in state.updates:
        seen = round(update.audio_seconds * 16000)
        [alone] = model.transcribe((wav[:seen], 16000))
        assert update.text == alone.text and update.prefix == ""
        assert list(update.token_ids) == alone.token_ids and len(update.logprobs) == MAX_NEW
        np.testing.assert_allclose(update.logprobs, alone.token_logprobs, rtol=0, atol=1e-4)
        assert update.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4)
        assert update.segment.finish_reason is alone.finish_reason
    assert state.avg_logprob == state.updates[-1].avg_logprob
    assert state.token_ids == state.updates[-1].token_ids


def test_stream_updates_keep_the_scores_of_their_prefix_tokens(model, clips):
    """With the official rollback, an update's text is its prefix (the previous output less its last tokens)
    plus what it generates: its tokens are the prefix's, with the log-probabilities recorded by the updates that
    generated them, then its own."""
    wav = clips[1]
    # The test model's tokens are long ("\n\n\n<unused_N>") and re-encode as many short ones: a rollback of 40
    # re-encoded tokens drops about two generated ones and cuts inside the one before.
    state = model.init_streaming_state(unfixed_chunk_num=1, unfixed_token_num=40, chunk_size_sec=STREAM_CHUNK)
    generated: list[list[float]] = []
    original = model.streamer.complete_update

    def spy(pending, generation):
        generated.append(list(generation.logprobs))
        return original(pending, generation)

    model.streamer.complete_update = spy
    try:
        model.streaming_transcribe(wav, state)
        model.finish_streaming_transcribe(state)
    finally:
        del model.streamer.complete_update
    assert len(state.updates) == 5 and all(u.prefix for u in state.updates[1:])
    decode = model.tokenizer.decode

    def starts(ids) -> list[int]:  # where each token's text starts in their decoded text
        return [len(decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids))]

    # Where each token of the previous update begins in its raw text (the first update has no prefix).
    positions = starts(state.updates[0].token_ids)
    assert state.updates[0].raw == decode(state.updates[0].token_ids, skip_special_tokens=True)
    dropped = cut_inside = 0
    for previous, update, own in zip(state.updates, state.updates[1:], generated[1:]):
        carried = len(update.token_ids) - len(own)
        assert update.raw.startswith(update.prefix) and previous.raw.startswith(update.prefix)
        # The carried tokens: those of the previous update whose text starts inside the prefix ...
        assert carried == sum(position < len(update.prefix) for position in positions) > 0
        assert update.token_ids[:carried] == previous.token_ids[:carried]
        assert update.logprobs[:carried] == previous.logprobs[:carried]  # the scores they were generated with
        # ... then the update's own tokens, whose text follows the prefix.
        assert list(update.logprobs[carried:]) == own
        assert update.raw == update.prefix + decode(update.token_ids[carried:], skip_special_tokens=True)
        assert update.avg_logprob == pytest.approx(float(np.mean(update.logprobs)), abs=1e-12)
        dropped += carried < len(previous.token_ids)
        # The last carried token may reach past the prefix: the rollback re-encodes the text and can cut inside a
        # generated token, which counts whole.
        end = positions[carried] if carried < len(positions) else len(previous.raw)
        cut_inside += end > len(update.prefix)
        positions = positions[:carried] + [
            len(update.prefix) + position for position in starts(update.token_ids[carried:])
        ]
    assert dropped >= 3 and cut_inside >= 3  # rollbacks that dropped generated tokens and cut inside one
    assert state.updates[-1].final and state.avg_logprob == state.updates[-1].avg_logprob
