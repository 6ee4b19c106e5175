"""Many concurrent streams through ``StreamScheduler`` against each stream run alone.

The truth for every stream is ``StreamingTranscriber`` on that stream alone, fed the same pieces (itself proven
equal to the official streaming algorithm in ``tests/test_streaming.py``), on the small random-weight checkpoint
whose weights matter, with espeak-ng speech. Streams of 1–30 s, fed in irregular pieces, join and leave at
different times; one has a forced language and a context, one gets louder (the log-mel clamp moves). After every
update and after finish, each stream's (language, text), prefix and chunk index must equal its lone run's, while
the engine ran the updates of several streams in each step.
"""

from __future__ import annotations

import numpy as np
import pytest

from qasr_jax.asr import Qwen3ASRModel
from qasr_jax.engine import Engine
from qasr_jax.errors import AudioTooLongError, EmptyAudioError, InvalidAudioError
from qasr_jax.serve.streams import StreamScheduler, TooManyStreamsError
from qasr_jax.streaming import StreamingTranscriber, StreamStateError
from tests.support import speech
from tests.test_asr import cached_small_checkpoint

SR = 16000


def budget(seconds: float) -> int:
    """Token budgets that differ between streams of different lengths (rows of one step get their own)."""
    return 6 + int(seconds) // 3


@pytest.fixture(scope="module")
def model() -> Qwen3ASRModel:
    return Qwen3ASRModel.from_pretrained(cached_small_checkpoint())


@pytest.fixture(scope="module")
def transcriber(model: Qwen3ASRModel) -> StreamingTranscriber:
    return StreamingTranscriber(model.config, model.params, model.tokenizer, model.engine(),
                                budget)  # fmt: skip


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    short, medium, long = speech.speech_clips()
    thirty = np.concatenate([long, medium * 0.5, long])[: 30 * SR]
    louder = np.concatenate([long[: 11 * SR] * 0.03, long[11 * SR : 15 * SR]])
    return {"short": short, "medium": medium, "long": long, "thirty": thirty, "louder": louder}


def pieces(samples: np.ndarray, sizes: list[float]) -> list[np.ndarray]:
    """``samples`` cut into pieces of the given durations, cycled (irregular feeding)."""
    out, start, i = [], 0, 0
    while start < len(samples):
        n = max(1, int(sizes[i % len(sizes)] * SR))
        out.append(samples[start : start + n])
        start, i = start + n, i + 1
    return out


def alone(transcriber: StreamingTranscriber, feed: list[np.ndarray], **kwargs):
    state = transcriber.init_state(**kwargs)
    for piece in feed:
        transcriber.transcribe(piece, state)
    transcriber.finish(state)
    return state


def updates_of(state) -> list[tuple]:
    return [(u.chunk_index, u.language, u.text, u.prefix, u.final) for u in state.updates]


@pytest.mark.slow
def test_concurrent_streams_equal_each_stream_alone(transcriber, clips):
    # name: (audio, piece sizes in s, the round it joins, open() arguments)
    plan = {
        "thirty": (clips["thirty"], [0.37, 1.9, 2.6, 0.8], 0, {}),
        "long": (clips["long"], [1.9], 2, {}),
        "forced": (clips["medium"], [0.7, 0.25], 1,
                   {"language": "english", "context": "Topic: a fox and a dog.", "chunk_size_sec": 1.0}),
        "short": (clips["short"], [5.0], 4, {}),
        "one-second": (clips["medium"][: int(1.2 * SR)], [0.5], 6, {"chunk_size_sec": 1.0}),
        "louder": (clips["louder"], [2.3, 1.1], 3, {}),
    }  # fmt: skip
    feeds = {name: pieces(audio, sizes) for name, (audio, sizes, _, _) in plan.items()}
    truth = {name: alone(transcriber, feeds[name], **plan[name][3]) for name in plan}

    engine = StreamScheduler(transcriber, max_batch=8)
    streams, step_sizes, seen = {}, [], {name: 0 for name in plan}

    def check(events) -> None:
        step_sizes.append(len(events))
        for event in events:
            name = next(n for n, s in streams.items() if s is event.stream)
            assert event.error is None
            if event.update is not None:
                # After every update the stream is where its lone run was after the same chunk.
                expected = truth[name].updates[seen[name]]
                assert event.update.chunk_index == expected.chunk_index, name
                assert (event.update.language, event.update.text, event.update.prefix) == (
                    expected.language, expected.text, expected.prefix,
                ), f"{name} after chunk {expected.chunk_index}"  # fmt: skip
                seen[name] += 1

    for round_ in range(max(len(f) + plan[n][2] for n, f in feeds.items()) + 1):
        for name, (_, _, joins, kwargs) in plan.items():
            k = round_ - joins
            if k == 0:
                streams[name] = engine.open(**kwargs)
            if 0 <= k < len(feeds[name]):
                engine.feed(streams[name], feeds[name][k])
            elif k == len(feeds[name]):
                engine.finish(streams[name])  # leaves while others go on
        check(engine.step())  # one step per round: streams with several chunks waiting catch up later
    while engine.ready():
        check(engine.step())

    for name, stream in streams.items():
        assert stream.ended and stream.error is None
        assert updates_of(stream.state) == updates_of(truth[name]), name
        assert (stream.language, stream.text) == (truth[name].language, truth[name].text)
        # The same work as alone: cached windows and the kept prefix hold inside a batch too.
        assert [work(u) for u in stream.updates] == [work(u) for u in truth[name].updates], name
    assert truth["forced"].language == "English"
    assert len(truth["thirty"].updates) == 15 and not truth["thirty"].updates[-1].final  # ends on a boundary
    assert len({s.text for s in streams.values()}) == len(streams)  # the audio matters
    assert max(step_sizes) >= 5  # most streams updated in one batched step
    assert engine.open_streams == 0
    at14 = next(u for u in streams["thirty"].updates if u.audio_seconds == 14.0)
    assert at14.stats.encoder_chunks == 6 and at14.stats.reused_tokens >= 104  # only the open window
    assert max(u.stats.windows_recomputed for u in streams["louder"].updates) >= 1  # the clamp moved


def work(update) -> tuple[int, ...]:
    s = update.stats
    return (s.encoder_chunks, s.windows_encoded, s.windows_recomputed, s.prefilled_tokens, s.reused_tokens,
            s.generated_tokens)  # fmt: skip


def test_a_bad_stream_gets_a_typed_error_and_the_others_go_on(transcriber, model, clips):
    engine = StreamScheduler(transcriber, max_streams=3, max_stream_seconds=10.0)
    good, bad = engine.open(), engine.open(chunk_size_sec=1.0)
    audio = clips["medium"]
    engine.feed(good, audio[: 3 * SR])
    engine.feed(bad, audio[:SR])
    nan = audio[:SR].copy()
    nan[5] = np.inf
    with pytest.raises(InvalidAudioError, match="NaN or Inf"):
        engine.feed(bad, nan)
    with pytest.raises(InvalidAudioError, match="shape"):
        engine.feed(bad, np.zeros((2, 800), np.float32))
    with pytest.raises(InvalidAudioError, match="dtype int32"):
        engine.feed(bad, np.zeros(800, np.int32))
    with pytest.raises(AudioTooLongError, match="exceeds the limit of 10 s"):
        engine.feed(bad, np.zeros(10 * SR, np.float32))
    with pytest.raises(StreamStateError, match="LiveStream"):
        engine.feed(bad.state, audio[:SR])
    other = StreamScheduler(model.streamer)
    with pytest.raises(StreamStateError, match="another streaming engine"):
        other.feed(bad, audio[:SR])
    tiny = engine.open()
    with pytest.raises(TooManyStreamsError, match="3 streams are open"):
        engine.open()
    engine.feed(tiny, audio[:100])  # shorter than one feature frame
    engine.finish(tiny)
    with pytest.raises(StreamStateError, match="finished"):
        engine.feed(tiny, audio[:SR])
    assert len(bad.state.buffer) == SR and bad.state.chunk_id == 0  # refused pieces left no trace

    events = engine.run_until_idle()
    failed = [e for e in events if e.stream is tiny]
    assert len(failed) == 1 and isinstance(failed[0].error, EmptyAudioError) and failed[0].ended
    with pytest.raises(StreamStateError, match="ended with an error"):
        engine.feed(tiny, audio[:SR])
    engine.feed(good, audio[3 * SR :])
    engine.finish(good)
    engine.feed(bad, audio[SR : 2 * SR])
    engine.finish(bad)
    engine.run_until_idle()
    for stream, kwargs, feed in (
        (good, {}, [audio[: 3 * SR], audio[3 * SR :]]),
        (bad, {"chunk_size_sec": 1.0}, [audio[:SR], audio[SR : 2 * SR]]),
    ):
        expected = alone(transcriber, feed, **kwargs)
        assert updates_of(stream.state) == updates_of(expected)


def test_rows_not_aligned_to_the_shared_index_fail_the_comparison(transcriber, model, clips, monkeypatch):
    """Negative control: without moving each row's kept tokens and run to the shared write index, streams that
    keep different prefixes attend to the wrong cache slots, and their results differ from their lone runs."""
    from qasr_jax import engine as engine_module

    feeds = {"long": pieces(clips["long"][: 12 * SR], [1.0]), "medium": pieces(clips["medium"], [0.5])}
    truth = {name: alone(transcriber, feed) for name, feed in feeds.items()}
    monkeypatch.setattr(engine_module, "roll_rows", lambda x, shift: x)
    fresh = Engine(model.config, options=transcriber.options)  # programs compiled with the broken rows
    engine = StreamScheduler(
        StreamingTranscriber(model.config, transcriber.params, model.tokenizer, fresh, budget)
    )
    streams = {name: engine.open() for name in feeds}
    for k in range(max(len(f) for f in feeds.values())):
        for name, feed in feeds.items():
            if k < len(feed):
                engine.feed(streams[name], feed[k])
        engine.step()
    for stream in streams.values():
        engine.finish(stream)
    engine.run_until_idle()
    assert any(updates_of(streams[name].state) != updates_of(truth[name]) for name in feeds)
