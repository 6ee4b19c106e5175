"""``WS /v1/audio/stream`` of ``python -m infer serve`` against a real WebSocket client (the ``websockets``
package) on a free local port.

The truth for every stream is ``StreamingTranscriber`` alone on the same audio, fed the same pieces (itself
proven equal to the official streaming algorithm), on the small random-weight checkpoint whose weights matter.
Concurrent connections share the server's ``StreamScheduler`` steps; bad messages get an error naming the problem
and a close code while the other streams go on. The aligner's words are checked on the same server over both
routes: the live final result and the upload's ``verbose_json``, each against the library's own alignment.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from qasr_jax.asr import Qwen3ASRModel
from qasr_jax.streaming import fixed_text
from qasr_jax.transcript import with_word_confidences
from tests.support import speech
from tests.support.server import running_server
from tests.test_asr import cached_small_checkpoint

SR = 16000
KEY = "live-key-0123456789"
MAX_NEW = 12
START_TIMEOUT = 3.0
SERVER_ARGS = ("--max-new-tokens", str(MAX_NEW), "--max-streams", "3", "--max-stream-seconds", "25",
               "--max-batch", "4", "--stream-start-timeout", str(START_TIMEOUT))  # fmt: skip
TIMEOUT = 300.0


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return cached_small_checkpoint()


@pytest.fixture(scope="module")
def reference(checkpoint: str) -> Qwen3ASRModel:
    return Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def server(checkpoint: str):
    with running_server(checkpoint, *SERVER_ARGS, env={"QASR_API_KEY": KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    short, medium, long = speech.speech_clips()
    return {"short": short, "medium": medium, "long": long}


def url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/audio/stream"


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def int16(samples: np.ndarray) -> np.ndarray:
    return np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)


async def exchange(
    server, messages: list[str | bytes], headers: dict | None = None
) -> tuple[list[dict], int]:
    """Send ``messages`` in order on one connection, then read until the server closes it: every message the
    server sent, and its close code."""
    received = []
    async with connect(url(server), additional_headers=auth() if headers is None else headers,
                       open_timeout=30, close_timeout=10) as ws:  # fmt: skip
        try:
            for message in messages:
                await ws.send(message)
                await asyncio.sleep(0)
        except ConnectionClosed:
            pass  # refused midway: the messages say why
        try:
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))
        except ConnectionClosed:
            pass
    return received, ws.close_code


async def live(
    server, start: dict, frames: list[bytes], headers: dict | None = None
) -> tuple[list[dict], int]:
    """One stream: start, the frames, stop; every message the server sent, and its close code."""
    return await exchange(server, [json.dumps(start), *frames, json.dumps({"type": "stop"})], headers)


def frames_of(samples: np.ndarray, seconds: float, dtype=np.int16) -> list[bytes]:
    n = int(seconds * SR)
    return [samples[i : i + n].astype(dtype).tobytes() for i in range(0, len(samples), n)]


async def live_streams(server, count: int) -> None:
    """Wait until the server's ``qasr_live_streams`` gauge reads ``count`` (an AssertionError after 60 s)."""
    await asyncio.to_thread(server.wait_for_metric, "qasr_live_streams", lambda streams: streams == count)


def alone(reference: Qwen3ASRModel, pieces: list[np.ndarray], **kwargs):
    state = reference.init_streaming_state(**kwargs)
    for piece in pieces:
        reference.streaming_transcribe(piece, state)
    reference.finish_streaming_transcribe(state)
    return state


def test_concurrent_websocket_streams_equal_each_stream_alone(server, reference, clips) -> None:
    long_pcm = int16(clips["long"][: 11 * SR])
    medium = clips["medium"].astype(np.float32)
    jobs = [
        ({"type": "start", "chunk_seconds": 2.0}, frames_of(long_pcm, 0.37), {},
         [long_pcm[i : i + int(0.37 * SR)] for i in range(0, len(long_pcm), int(0.37 * SR))]),
        ({"type": "start", "language": "en", "context": "Topic: a fox.", "chunk_seconds": 1.0, "format": "f32le"},
         frames_of(medium, 0.9, np.float32), {"language": "English", "context": "Topic: a fox.", "chunk_size_sec": 1.0},
         [medium]),
    ]  # fmt: skip

    async def both():
        return await asyncio.gather(*(live(server, start, frames) for start, frames, _, _ in jobs))

    results = asyncio.run(both())
    for (messages, code), (_, _, kwargs, pieces) in zip(results, jobs):
        truth = alone(reference, pieces, **kwargs)
        assert code == 1000
        final = messages[-1]
        assert final["type"] == "final" and (final["language"], final["text"]) == (truth.language, truth.text)
        partials = [m for m in messages if m["type"] == "partial"]
        expected = [u for u in truth.updates if not u.final]
        assert [(m["chunk"], m["language"], m["text"], m["fixed_text"]) for m in partials] == [
            (u.chunk_index, u.language, u.text, fixed_text(u.prefix, truth.force_language)) for u in expected
        ]
        assert all(m["latency"] > 0 for m in partials)
        # The scores of the tokens behind each text (the engine's batched programs round otherwise: 1e-4).
        assert [m["avg_logprob"] for m in partials] == pytest.approx(
            [u.avg_logprob for u in expected], abs=1e-4
        )
        assert final["avg_logprob"] == pytest.approx(truth.avg_logprob, abs=1e-4)
        # No aligner loaded: the text's own words (concatenating back to it), each with its confidence.
        words = truth.updates[-1].segment.words
        assert [w["word"] for w in final["words"]] == [w.text for w in words]
        assert "".join(w["word"] for w in final["words"]) == final["text"] and words
        assert [w["confidence"] for w in final["words"]] == pytest.approx([w.confidence for w in words], abs=1e-4)
        assert all(0.0 < w["confidence"] <= 1.0 for w in final["words"])
    assert results[0][0][-1]["text"] != results[1][0][-1]["text"]
    assert results[1][0][-1]["language"] == "English"


def test_bad_messages_get_an_error_and_a_close_code_while_a_good_stream_goes_on(
    server, reference, clips
) -> None:
    medium = int16(clips["medium"])
    nan = np.full(800, np.nan, np.float32).tobytes()
    bad_starts = [
        ("not json", 1003, "not JSON"),
        (json.dumps({"type": "start", "sample_rate": 44100.5}), 1003, "sample_rate"),
        (json.dumps({"type": "start", "colour": "blue"}), 1003, "unknown field(s) 'colour'"),
        (json.dumps({"type": "start", "language": "Klingon"}), 1003, "Klingon"),
        (json.dumps({"type": "start", "chunk_seconds": 0}), 1003, "chunk_seconds"),
        (json.dumps({"type": "start", "format": "mp3"}), 1003, "format"),
    ]

    async def raw(first: str | bytes, rest: list = (), headers=None) -> tuple[list[dict], int]:
        return await exchange(server, [first, *rest], headers)

    async def scenario():
        good = asyncio.create_task(
            live(server, {"type": "start", "chunk_seconds": 1.0}, frames_of(medium, 0.5))
        )
        outcomes = [await raw(first) for first, _, _ in bad_starts]
        start = json.dumps({"type": "start", "format": "f32le"})
        outcomes.append(await raw(start, [nan]))
        outcomes.append(await raw(start, [b"\x00" * 6]))  # not a whole number of float32 samples
        outcomes.append(await raw(json.dumps({"type": "start"}), [np.zeros(26 * SR, np.int16).tobytes()]))
        outcomes.append(await raw(json.dumps({"type": "start"}), headers={}))
        outcomes.append(await raw(json.dumps({"type": "start"}), headers=auth("wrong")))
        return outcomes, await good

    outcomes, (good_messages, good_code) = asyncio.run(scenario())
    expected = [(code, text) for _, code, text in bad_starts] + [
        (1003, "NaN or Inf"),
        (1003, "not a whole number of f32le samples"),
        (1008, "exceeds the limit of 25 s"),
        (1008, "API key"),
        (1008, "API key"),
    ]
    for (messages, code), (want_code, want_text) in zip(outcomes, expected):
        assert code == want_code, messages
        assert messages and messages[-1]["type"] == "error" and want_text in messages[-1]["message"], messages
    truth = alone(reference, [medium], chunk_size_sec=1.0)
    assert good_code == 1000
    assert (good_messages[-1]["language"], good_messages[-1]["text"]) == (truth.language, truth.text)


def test_streams_past_the_limit_are_refused_and_other_rates_are_resampled(server, clips) -> None:
    async def scenario():
        holders = [await connect(url(server), additional_headers=auth()) for _ in range(3)]
        for ws in holders:
            await ws.send(json.dumps({"type": "start"}))
        await live_streams(server, 3)  # the three streams are open
        async with connect(url(server), additional_headers=auth()) as extra:
            await extra.send(json.dumps({"type": "start"}))
            refused = json.loads(await asyncio.wait_for(extra.recv(), TIMEOUT))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(extra.recv(), TIMEOUT)
        refused_code = extra.close_code
        for ws in holders:
            await ws.close()
        await live_streams(server, 0)  # the abandoned streams left the engine
        import soxr

        pcm8k = int16(soxr.resample(clips["medium"], SR, 8000))
        resampled = await live(server, {"type": "start", "sample_rate": 8000}, [pcm8k.tobytes()])
        return refused, refused_code, resampled

    # The server's warm-up stream ran some steps already.
    steps_before = server.metric("qasr_live_stream_steps_total")
    refused, refused_code, (messages, code) = asyncio.run(scenario())
    assert refused["type"] == "error" and "3 streams are open" in refused["message"] and refused_code == 1008
    assert code == 1000 and messages[-1]["type"] == "final" and messages[-1]["text"]
    assert [m["chunk"] for m in messages if m["type"] == "partial"] == [0, 1]  # 4.9 s: two 2-s chunks
    # Every stream left the engine, the refused and abandoned ones too; only the last one's three updates ran.
    assert server.metric("qasr_live_streams") == 0
    assert server.metric("qasr_live_stream_steps_total") == steps_before + 3


def test_protocol_errors_after_start_and_a_binary_first_frame_close_1003(server) -> None:
    start = json.dumps({"type": "start"})
    pcm = np.zeros(SR // 2, np.int16).tobytes()

    async def scenario():
        return [
            await exchange(server, [pcm]),  # audio before any start message
            await exchange(server, [start, pcm, json.dumps({"type": "pause"})]),  # JSON, but not stop
            await exchange(server, [start, "stop"]),  # text that is not JSON
        ]

    outcomes = asyncio.run(scenario())
    expected = [
        "expected a JSON text message, got a binary frame",
        'after start, send binary PCM frames and then {"type": "stop"}',
        "the message is not JSON",
    ]
    for (messages, code), text in zip(outcomes, expected):
        assert code == 1003, messages
        assert [m["type"] for m in messages] == ["error"] and text in messages[0]["message"], messages
    # Each refused stream left the engine.
    server.wait_for_metric("qasr_live_streams", lambda streams: streams == 0)


def test_stop_with_no_audio_gives_the_empty_stream_result(server, reference) -> None:
    messages, code = asyncio.run(
        exchange(server, [json.dumps({"type": "start"}), json.dumps({"type": "stop"})])
    )
    truth = alone(reference, [])
    assert code == 1000
    # No tokens behind an empty result: no avg_logprob measured.
    assert messages == [
        {"type": "final", "language": truth.language, "text": truth.text, "avg_logprob": None, "words": []}
    ]
    assert truth.text == "" and truth.avg_logprob is None


def test_a_connection_that_sends_no_start_message_is_closed_1008_after_the_start_timeout(server) -> None:
    async def silent() -> tuple[dict, int, float]:
        async with connect(url(server), additional_headers=auth(), open_timeout=30) as ws:
            opened = time.monotonic()
            message = json.loads(await asyncio.wait_for(ws.recv(), START_TIMEOUT + 60))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 60)
            return message, ws.close_code, time.monotonic() - opened

    message, code, waited = asyncio.run(silent())
    assert code == 1008 and message == {
        "type": "error",
        "message": f"no start message within {START_TIMEOUT:g} s",
    }
    assert waited >= START_TIMEOUT - 0.5  # the server waited out the timeout (its clock started at accept)


@pytest.mark.slow
def test_aligners_words_in_the_live_final_result_and_in_verbose_json(checkpoint, reference, clips,
                                                                      tmp_path_factory) -> None:  # fmt: skip
    from qasr_jax.aligner import Qwen3ForcedAligner
    from tests.support import official

    aligner_dir = official.build_checkpoint(
        tmp_path_factory.mktemp("aligner"), official.small_aligner_config(classify_num=400), seed=3
    )
    pcm = int16(clips["medium"])
    upload = tmp_path_factory.mktemp("upload") / "medium.wav"
    sf.write(upload, pcm, SR, subtype="PCM_16")
    with running_server(checkpoint, *SERVER_ARGS, "--aligner", str(aligner_dir)) as server:
        messages, code = asyncio.run(live(server, {"type": "start"}, frames_of(pcm, 0.6), headers={}))
        verbose = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("medium.wav", upload.read_bytes())},
                             data={"response_format": "verbose_json", "timestamp_granularities[]": "word"},
                             timeout=TIMEOUT)  # fmt: skip
    # Over HTTP: the words of transcribe(..., return_time_stamps=True) with the same aligner and options.
    with_aligner = Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=MAX_NEW, max_chunk_seconds=30.0,
                                                 forced_aligner=str(aligner_dir))  # fmt: skip
    [transcribed] = with_aligner.transcribe(str(upload), return_time_stamps=True)
    assert verbose.status_code == 200, verbose.text
    body = verbose.json()
    assert body["text"] == transcribed.text and transcribed.time_stamps.error is None
    items = transcribed.time_stamps.items
    assert [(w["word"], w["start"], w["end"]) for w in body["words"]] == [
        (w.text, w.start_time, w.end_time) for w in items
    ]
    # Each word's confidence: that of transcribe's words (the server's decode rounds its sums otherwise: 1e-5).
    assert [w["confidence"] for w in body["words"]] == pytest.approx([w.confidence for w in items], abs=1e-5)
    assert all(w.confidence is not None for w in items)
    assert len(body["words"]) > 0 and body["words"][-1]["end"] > 0
    truth = alone(reference, [pcm])
    expected = Qwen3ForcedAligner.from_pretrained(aligner_dir).align(
        (pcm.astype(np.float32) / 32768.0, SR), truth.text, truth.language or None
    )[0]
    final = messages[-1]
    assert code == 1000 and (final["language"], final["text"]) == (truth.language, truth.text)
    assert [(w["word"], w["start"], w["end"]) for w in final["words"]] == [
        (w.text, w.start_time, w.end_time) for w in expected.items
    ]
    assert len(final["words"]) > 0
    # Each aligned word's confidence: that of its word in the tokens behind the final text, as the Python API's
    # finish_streaming_transcribe(..., return_time_stamps=True) gives it.
    scored = with_word_confidences(expected, [truth.updates[-1].segment]).items
    assert all(w.confidence is not None for w in scored)
    assert [w["confidence"] for w in final["words"]] == pytest.approx([w.confidence for w in scored], abs=1e-4)
