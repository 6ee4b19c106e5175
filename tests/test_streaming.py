"""Streaming transcription against the official streaming algorithm.

The reference is the official ``Qwen3ASRModel.init_streaming_state / streaming_transcribe /
finish_streaming_transcribe`` code itself, with its vLLM generation call answered by the official transformers
model (greedy, encoder windows wired in; ``tests/support/official_stream.py``), on a random-weight checkpoint
whose weights matter. After every chunk and after finish, our (language, text) and the prefix each update was
given must equal the official ones. Ours runs incrementally (cached encoder windows, kept KV prefix); the stats
of each update show that it did.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from qasr_jax import streaming
from qasr_jax.asr import Qwen3ASRModel
from qasr_jax.errors import InvalidAudioError, LanguageError
from tests.support import official_stream, speech
from tests.test_asr import cached_small_checkpoint

SR = 16000
MAX_NEW = 12
ZH_TEXT = "今天天气很好我们一起去公园散步吧龘齉爨鬱"  # characters only: no punctuation to fall back on


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return cached_small_checkpoint()


@pytest.fixture(scope="module")
def ours(checkpoint: str) -> Qwen3ASRModel:
    return Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def reference(checkpoint: str):
    return official_stream.official_streamer(checkpoint, MAX_NEW)


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    short, medium, long = speech.speech_clips()
    return {"short": short, "medium": medium, "long": long}


def official_updates(reference, state, calls_before: int) -> list[tuple[str, str, str]]:
    """(prefix, language, text) of each official update since ``calls_before``, from the generation calls the
    official code made: the prefix is its prompt past ``prompt_raw``; its result parses prefix + output."""
    from qwen_asr.inference.utils import parse_asr_output

    out = []
    for call in reference.model.calls[calls_before:]:
        assert call.prompt.startswith(state.prompt_raw)
        prefix = call.prompt[len(state.prompt_raw) :]
        language, text = parse_asr_output(prefix + call.text, user_language=state.force_language)
        out.append((prefix, language, text))
    return out


def stream_both(ours, reference, samples, pieces, convert=None, **kwargs):
    """Feed ``samples`` in pieces of ``pieces`` samples to both; after every call the states must agree.
    Returns (our state, official state, official per-update (prefix, language, text))."""
    mine = ours.init_streaming_state(**kwargs)
    theirs = reference.init_streaming_state(**kwargs)
    assert (mine.prompt_raw, mine.force_language, mine.chunk_size_samples) == (
        theirs.prompt_raw, theirs.force_language, theirs.chunk_size_samples,
    )  # fmt: skip
    first_call = len(reference.model.calls)
    for start in range(0, len(samples), pieces):
        piece = samples[start : start + pieces]
        piece = convert(piece) if convert else piece
        ours.streaming_transcribe(piece, mine)
        reference.streaming_transcribe(piece, theirs)
        assert mine.chunk_id == theirs.chunk_id
        assert (mine.language, mine.text) == (theirs.language, theirs.text), f"after chunk {mine.chunk_id}"
    ours.finish_streaming_transcribe(mine)
    reference.finish_streaming_transcribe(theirs)
    assert (mine.language, mine.text, mine.chunk_id) == (theirs.language, theirs.text, theirs.chunk_id)
    expected = official_updates(reference, theirs, first_call)
    assert [(u.prefix, u.language, u.text) for u in mine.updates] == expected
    return mine, theirs, expected


def to_int16(piece: np.ndarray) -> np.ndarray:
    return np.round(np.clip(piece, -1, 1) * 32767).astype(np.int16)


@pytest.mark.parametrize(
    ("piece_seconds", "convert"),
    [(0.37, to_int16), (1.9, None), (None, None)],
    ids=["0.37s-int16", "1.9s", "whole"],
)
def test_pieces_of_any_length_match_official_after_every_chunk(
    ours, reference, clips, piece_seconds, convert
):
    samples = clips["medium"]  # 4.9 s: two 2-s chunks and a 0.9-s tail
    if convert is not None:
        samples = to_int16(samples).astype(np.float32) / 32768.0  # the same audio either way
    pieces = len(samples) if piece_seconds is None else int(piece_seconds * SR)
    mine, _, expected = stream_both(ours, reference, samples, pieces, convert)
    assert len(expected) == 3 and mine.updates[-1].final
    assert mine.updates[2].prefix != ""  # the third update continued a rolled-back prefix
    assert len({text for _, _, text in expected}) == 3  # every update's text differs: the audio matters


def test_streams_of_several_lengths_match_official(ours, reference, clips):
    for samples, chunk in (
        (clips["short"], 2.0),
        (clips["medium"][: int(3.1 * SR)], 1.0),
        (clips["long"], 2.0),
    ):
        mine, _, expected = stream_both(ours, reference, samples, int(1.3 * SR), chunk_size_sec=chunk)
        assert len(expected) == int(len(samples) / SR / chunk) + 1
    # The 20-s stream: between window boundaries only the open window was encoded and the prompt before it was
    # kept. A window that ends exactly at an update is encoded once more at the next one (its last frame was
    # computed against the stream's end), and a louder chunk moves earlier windows' features (the clamp): those
    # updates recompute whole windows, and every update's result still equals the official one.
    stats = {u.audio_seconds: u.stats for u in mine.updates}
    window = ours.config.audio.window_frames // ours.config.audio.chunk_frames
    for seconds in (12.0, 14.0, 16.0, 20.0):
        assert stats[seconds].encoder_chunks == seconds % 8 or stats[seconds].encoder_chunks == 8
        assert stats[seconds].windows_recomputed == 0
        assert stats[seconds].reused_tokens >= 104 * (
            (seconds * 100 - 1) // 800
        )  # windows before the open one
    assert all(s.encoder_chunks <= window * (1 + s.windows_recomputed) for s in stats.values())
    assert stats[18.0].windows_recomputed >= 1


def test_a_stream_that_gets_louder_recomputes_exactly_the_windows_it_must(ours, reference, clips):
    samples = np.concatenate([clips["long"][: 13 * SR] * 0.02, clips["long"][13 * SR : 16 * SR]])
    mine, _, _ = stream_both(ours, reference, samples, int(1.9 * SR))
    stats = [u.stats for u in mine.updates]
    assert stats[5].windows_recomputed == 0 and stats[5].encoder_chunks == 4  # at 12 s: window 0 cached
    assert stats[6].windows_recomputed == 1  # at 14 s the clip's maximum rose: window 0's features moved
    assert stats[6].reused_tokens < stats[5].reused_tokens


def test_forced_language_and_context_match_official(ours, reference, clips):
    mine, _, _ = stream_both(
        ours, reference, clips["medium"], int(0.7 * SR), language="english", context="Topic: a fox and a dog.",
        chunk_size_sec=1.0,
    )  # fmt: skip
    assert mine.language == "English" and all(u.language == "English" for u in mine.updates)


@dataclasses.dataclass
class ChineseStream:
    """A Chinese stream through both sides: the official updates, ours, and the official generation calls."""

    reference: Any
    mine: Any
    expected: list[tuple[str, str, str]]
    calls: list[official_stream.GenerateCall]


@pytest.fixture(scope="module")
def chinese_stream(checkpoint, tmp_path_factory) -> ChineseStream:
    # Embedding rows of Chinese tokens (whole characters and pieces of them) made larger: the model writes
    # Chinese text and character pieces, so cutting 5 tokens off often lands inside a character, and so does
    # the end of a 12-token budget.
    path = official_stream.favour_tokens(checkpoint, str(tmp_path_factory.mktemp("zh")), ZH_TEXT, gain=2.0)
    ours = Qwen3ASRModel.from_pretrained(path, max_new_tokens=MAX_NEW)
    reference = official_stream.official_streamer(path, MAX_NEW)
    samples = speech.synth(speech.MEDIUM_ZH, voice="cmn")
    mine, _, expected = stream_both(ours, reference, samples, int(0.9 * SR), chunk_size_sec=1.0)
    return ChineseStream(reference, mine, expected, list(reference.model.calls))


def test_chinese_output_whose_rollback_cuts_characters_matches_official(chinese_stream):
    mine, expected = chinese_stream.mine, chinese_stream.expected
    tokenizer = chinese_stream.reference.processor.tokenizer
    cut = [
        "\ufffd" in tokenizer.decode(tokenizer.encode(update.raw)[:-5]) for update in mine.updates[1:-2]
    ]  # the rollback before chunks 2.. (the last one is the final flush, which does not check)
    assert sum(cut) >= 2, "the 5-token cut never landed inside a character"
    assert all("\ufffd" not in prefix for prefix, _, _ in expected[:-1])
    assert any("\u4e00" <= ch <= "\u9fff" for update in mine.updates for ch in update.text)


def test_a_budget_that_ends_inside_a_character_holds_it_back_as_vllm_does(chinese_stream):
    # vLLM's incremental detokeniser (the official streaming backend) reports text only up to the last whole
    # character: the bytes of a character that the token budget cut are held back, not written as U+FFFD.
    tokenizer = chinese_stream.reference.processor.tokenizer
    cut_short = 0
    for update, call in zip(chinese_stream.mine.updates, chinese_stream.calls, strict=True):
        plain = tokenizer.decode(call.token_ids, skip_special_tokens=True)
        assert not call.text.endswith("\ufffd") and plain.startswith(call.text)
        if len(call.token_ids) == MAX_NEW and plain.endswith("\ufffd"):
            cut_short += 1
        assert update.raw == update.prefix + call.text  # ours holds back exactly what vLLM holds back
    assert cut_short >= 2, "no update's budget ended inside a character"


@pytest.mark.parametrize("final", [False, True], ids=["chunk", "finish"])
def test_rollback_that_splits_a_chinese_character_matches_official(ours, reference, clips, final):
    # A stream whose previous output is clean Chinese text; the rollback's token cut splits a character (the
    # test vocabulary's merges cross character boundaries). Per chunk the official code drops more tokens until
    # the prefix decodes cleanly; the final flush keeps the cut as it is.
    raw = "language Chinese<asr_text>" + speech.MEDIUM_ZH
    tokenizer = reference.processor.tokenizer
    ids = tokenizer.encode(raw)
    unfixed = next(k for k in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:-k]))
    audio = clips["medium"][: int((0.6 if final else 1.0) * SR)]
    states = []
    for model, feed, finish in (
        (ours, ours.streaming_transcribe, ours.finish_streaming_transcribe),
        (reference, reference.streaming_transcribe, reference.finish_streaming_transcribe),
    ):
        state = model.init_streaming_state(unfixed_token_num=unfixed, chunk_size_sec=1.0)
        state._raw_decoded, state.chunk_id = raw, 2
        feed(audio, state)
        if final:
            finish(state)
        states.append(state)
    mine, theirs = states
    call = reference.model.calls[-1]
    official_prefix = call.prompt[len(theirs.prompt_raw) :]
    assert mine.updates[-1].prefix == official_prefix
    assert ("\ufffd" in official_prefix) == final
    if final:
        # The prompt ends with U+FFFD, which vLLM's detokeniser held back while priming on the prompt: it comes
        # out in front of the new text.
        assert call.text.startswith("\ufffd")
    assert mine.updates[-1].raw == official_prefix + call.text
    assert (mine.language, mine.text) == (theirs.language, theirs.text)


def test_broken_variants_fail_the_comparison(ours, reference, clips, monkeypatch):
    """Negative controls: a stale encoder window and a missing rollback each break exactness, and each is caught
    by the text comparison at the first update it changes, not by any other assertion."""
    louder = np.concatenate([clips["long"][: 13 * SR] * 0.02, clips["long"][13 * SR : 16 * SR]])
    with monkeypatch.context() as patch:
        patch.setattr(streaming, "window_unchanged", lambda cached, fresh: cached.shape == fresh.shape)
        # The 7th 2-s chunk (12-14 s) is the first with the louder audio: its window's log-mel clamp moved.
        with pytest.raises(AssertionError, match=r"^after chunk 7\n"):
            stream_both(ours, reference, louder, int(1.9 * SR))
    with monkeypatch.context() as patch:
        patch.setattr(streaming, "rollback_prefix", lambda tokenizer, raw, k, final: raw)
        # The 3rd 1-s chunk is the first whose prompt carries a prefix, which the rollback would have cut.
        with pytest.raises(AssertionError, match=r"^after chunk 3\n"):
            stream_both(ours, reference, clips["medium"], int(1.9 * SR), chunk_size_sec=1.0)


def test_incremental_and_refeeding_give_the_same_tokens(ours, clips):
    refeed = streaming.StreamingTranscriber(
        ours.config, ours.params, ours.tokenizer, ours.engine(), lambda _: MAX_NEW,
        incremental=False,
    )  # fmt: skip
    samples = clips["long"][: 13 * SR]
    a = ours.init_streaming_state()
    b = refeed.init_state()
    ours.streaming_transcribe(samples, a)
    refeed.transcribe(samples, b)
    assert [u.raw for u in a.updates] == [u.raw for u in b.updates]
    assert all(u.stats.reused_tokens == 0 for u in b.updates)
    assert b.updates[-1].stats.encoder_chunks == 12 and a.updates[-1].stats.encoder_chunks == 4  # at 12 s


def test_bad_input_gets_a_clear_error_and_other_streams_go_on(ours, checkpoint, clips):
    samples = clips["medium"]
    good = ours.init_streaming_state()
    bad = ours.init_streaming_state()
    ours.streaming_transcribe(samples[:SR], good)
    ours.streaming_transcribe(samples[:SR], bad)
    nan = samples[:SR].copy()
    nan[10] = np.nan
    with pytest.raises(InvalidAudioError, match="NaN or Inf"):
        ours.streaming_transcribe(nan, bad)
    with pytest.raises(InvalidAudioError, match="shape"):
        ours.streaming_transcribe(np.zeros((2, 800), np.float32), bad)
    with pytest.raises(InvalidAudioError, match="dtype int32"):
        ours.streaming_transcribe(np.zeros(800, np.int32), bad)
    with pytest.raises(ValueError, match="chunk_size_sec"):
        ours.init_streaming_state(chunk_size_sec=0)
    with pytest.raises(LanguageError, match="Klingon"):
        ours.init_streaming_state(language="Klingon")
    other = Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=MAX_NEW)
    with pytest.raises(streaming.StreamStateError, match="another model"):
        other.streaming_transcribe(samples[:SR], bad)
    assert len(bad.buffer) == SR and bad.chunk_id == 0  # refused pieces left no trace
    ours.streaming_transcribe(samples[SR:], good)
    ours.finish_streaming_transcribe(good)
    with pytest.raises(streaming.StreamStateError, match="finished"):
        ours.streaming_transcribe(samples[:SR], good)
    clean = ours.init_streaming_state()
    ours.streaming_transcribe(samples, clean)
    ours.finish_streaming_transcribe(clean)
    assert (good.language, good.text) == (clean.language, clean.text)


def test_finish_can_align_the_final_text_to_the_stream(checkpoint, clips, tmp_path_factory):
    from qasr_jax.aligner import Qwen3ForcedAligner
    from tests.support import official

    aligner_dir = official.build_checkpoint(
        tmp_path_factory.mktemp("aligner"), official.small_aligner_config(classify_num=400), seed=3
    )
    asr = Qwen3ASRModel.from_pretrained(checkpoint, forced_aligner=aligner_dir, max_new_tokens=MAX_NEW)
    state = asr.init_streaming_state(chunk_size_sec=1.0)
    asr.streaming_transcribe(clips["medium"], state)
    asr.finish_streaming_transcribe(state, return_time_stamps=True)
    expected = Qwen3ForcedAligner.from_pretrained(aligner_dir).align(
        (clips["medium"], SR), state.text, state.language or None
    )[0]
    assert state.time_stamps.error is None and len(state.time_stamps.items) > 0
    items = state.time_stamps.items
    assert [(w.text, w.start_time, w.end_time) for w in items] == [
        (w.text, w.start_time, w.end_time) for w in expected.items
    ]
    # Each word carries its confidence from the tokens behind the final text.
    final = state.updates[-1].segment
    assert [w.confidence for w in items] == [w.confidence for w in final.words]
    assert all(w.confidence is not None for w in items)
    with pytest.raises(ValueError, match="forced_aligner"):
        Qwen3ASRModel.from_pretrained(checkpoint).finish_streaming_transcribe(state, return_time_stamps=True)


def test_cli_streams_a_file_and_stdin_pcm(ours, checkpoint, clips, tmp_path):
    import json
    import subprocess
    import sys

    import soundfile as sf

    from qasr_jax import audio as audio_io

    path = tmp_path / "talk.wav"
    sf.write(path, clips["medium"], SR, subtype="PCM_16")
    pcm = to_int16(audio_io.load_audio(str(path)))
    base = [sys.executable, "-m", "infer", "stream", "--model", checkpoint, "--max-new-tokens", str(MAX_NEW)]
    jsonl = subprocess.run(
        [*base, str(path), "--format", "jsonl", "--chunk-seconds", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    events = [json.loads(line) for line in jsonl.stdout.splitlines()]
    state = ours.init_streaming_state(chunk_size_sec=1.0)
    ours.streaming_transcribe(audio_io.load_audio(str(path)), state)
    ours.finish_streaming_transcribe(state)
    assert [(e["chunk"], e["text"], e["final"]) for e in events] == [
        (u.chunk_index, u.text, u.final) for u in state.updates
    ]
    assert all(e["stream"] == str(path) and e["latency"] > 0 for e in events)
    assert [e["token_ids"] for e in events] == [list(u.token_ids) for u in state.updates]
    assert [e["avg_logprob"] for e in events] == pytest.approx(
        [u.avg_logprob for u in state.updates], abs=1e-5
    )

    text = subprocess.run([*base, "-"], input=pcm.tobytes(), capture_output=True, check=True).stdout.decode()
    state = ours.init_streaming_state()
    ours.streaming_transcribe(pcm, state)
    ours.finish_streaming_transcribe(state)
    assert text.endswith(
        f"[stdin] final ({state.language or 'unknown'}): {state.text}\n"
    )  # texts may hold newlines
