"""Live transcription over WebSocket: ``WS /v1/audio/stream``, served by the ``StreamScheduler``'s batched steps.

The protocol (one stream per connection):

1. the client sends a JSON start message: ``{"type": "start", "language": null, "context": "",
   "sample_rate": 16000, "chunk_seconds": 2.0, "format": "s16le"}`` (all but ``type`` optional; ``format`` is
   ``s16le`` or ``f32le``; other sample rates from 8 to 48 kHz are resampled to 16 kHz as the audio arrives);
2. then binary frames of mono PCM in that format, of any size;
3. then ``{"type": "stop"}``.

The server answers with ``{"type": "partial", "chunk", "audio_seconds", "language", "text", "fixed_text",
"avg_logprob", "latency"}`` after each chunk's update (``fixed_text``: the part no later update rewrites;
``avg_logprob``: the mean log-probability of the tokens behind the text, ``StreamUpdate.segment``; ``latency``:
seconds from the chunk's last sample to the result) and, after stop, ``{"type": "final", "language", "text",
"avg_logprob", "words"}``, then it closes the connection (1000). ``words``: the final text's words, each with
its ``confidence`` (the mean probability of the tokens it spans); with a forced aligner loaded they are the
aligner's words with their ``start`` and ``end`` on the stream's time line, without one the text's own pieces
(a space before, punctuation after, concatenating back to the text).
A bad message gets ``{"type": "error", "message"}`` naming the problem and a close: 1003 for data it cannot take
(not JSON, a binary first frame, a bad field, a text message other than stop, samples that are not audio), 1008
for what policy refuses (API key, too many streams, a stream too long, no start message within the start
timeout). Other streams go on. When the streaming engine itself fails (a bug, out of memory), every open stream
and every later one gets an error naming the failure and 1011. Every connection's updates run in the engine's
shared steps on its own thread; the event loop only moves messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from qasr_jax import audio as audio_io
from qasr_jax.errors import AudioTooLongError, QasrError
from qasr_jax.serve.streams import LiveStream, StreamEvent, StreamScheduler, TooManyStreamsError
from qasr_jax.streaming import StreamStateError, fixed_text

UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
START_FIELDS = {"type", "language", "context", "sample_rate", "chunk_seconds", "format"}
SAMPLE_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
MIN_CHUNK_SECONDS, MAX_CHUNK_SECONDS = 0.1, 30.0
START_TIMEOUT = 30.0
LOG = logging.getLogger(__name__)


class ProtocolError(Exception):
    """A message the live protocol cannot take: its text goes to the client, then the connection closes."""

    def __init__(self, message: str, code: int = UNSUPPORTED_DATA) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class StartMessage:
    """A validated start message."""

    def __init__(
        self, raw: Any, parse_language: Callable[[str | None], str | None], max_context: int
    ) -> None:
        if not isinstance(raw, dict) or raw.get("type") != "start":
            raise ProtocolError('the first message must be a JSON object {"type": "start", ...}')
        unknown = sorted(set(raw) - START_FIELDS)
        if unknown:
            raise ProtocolError(f"start: unknown field(s) {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(sorted(START_FIELDS))}")  # fmt: skip
        language = raw.get("language")
        if language is not None and not isinstance(language, str):
            raise ProtocolError("start: language must be a string or null")
        try:
            self.language = parse_language(language)
        except ValueError as error:
            raise ProtocolError(f"start: {error}") from None
        self.context = raw.get("context") or ""
        if not isinstance(self.context, str) or len(self.context.encode()) > max_context:
            raise ProtocolError(f"start: context must be a string of at most {max_context} bytes")
        rate = raw.get("sample_rate", audio_io.SAMPLE_RATE)
        if (
            isinstance(rate, bool)
            or not isinstance(rate, int)
            or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE
        ):
            raise ProtocolError(f"start: sample_rate must be an integer from {MIN_SAMPLE_RATE} to "
                                f"{MAX_SAMPLE_RATE} Hz, got {rate!r}")  # fmt: skip
        self.sample_rate = rate
        chunk = raw.get("chunk_seconds", 2.0)
        if (
            isinstance(chunk, bool)
            or not isinstance(chunk, (int, float))
            or not (MIN_CHUNK_SECONDS <= chunk <= MAX_CHUNK_SECONDS)
        ):
            raise ProtocolError(f"start: chunk_seconds must be a number from {MIN_CHUNK_SECONDS} to "
                                f"{MAX_CHUNK_SECONDS}, got {chunk!r}")  # fmt: skip
        self.chunk_seconds = float(chunk)
        fmt = raw.get("format", "s16le")
        if fmt not in SAMPLE_FORMATS:
            raise ProtocolError(f"start: format must be one of {', '.join(SAMPLE_FORMATS)}, got {fmt!r}")
        self.dtype = SAMPLE_FORMATS[fmt]
        self.format = fmt


class Resampler:
    """Frames at the client's rate → 16 kHz float32 samples, as they arrive (soxr's streaming resampler)."""

    def __init__(self, rate: int) -> None:
        import soxr

        self.stream = soxr.ResampleStream(rate, audio_io.SAMPLE_RATE, 1, dtype="float32")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        return self.stream.resample_chunk(samples.astype(np.float32), last=last)


def add_live_route(
    app: FastAPI,
    streams: StreamScheduler,
    *,
    key_matches: Callable[[Any], bool],
    parse_language: Callable[[str | None], str | None],
    align: Callable[[np.ndarray, str, str, Any], list[dict[str, Any]]] | None,
    max_context: int,
    start_timeout: float = START_TIMEOUT,
) -> None:
    """Register ``WS /v1/audio/stream`` on ``app``.

    key_matches(connection): whether its Authorization header holds the API key (the HTTP routes' constant-time
    check); parse_language: an ISO code or a name → the language (ValueError naming a bad one);
    align(samples, text, language, segment): the final result's words on its time line with their confidences
    from ``segment`` (the tokens behind the text; None: no aligner); max_context: the longest
    context in bytes; start_timeout: seconds a connection may take to send its start message.
    """

    @app.websocket("/v1/audio/stream")
    async def live(websocket: WebSocket) -> None:
        await websocket.accept()
        session = LiveSession(websocket, streams, align)
        try:
            if not key_matches(websocket):
                raise ProtocolError("missing or wrong API key (Authorization: Bearer KEY)", POLICY_VIOLATION)
            await session.run(parse_language, max_context, start_timeout)
        except ProtocolError as error:
            await session.refuse(error)
        except WebSocketDisconnect:
            pass
        except Exception as error:  # a bug: the client learns that the server failed, not that it vanished
            LOG.exception("live stream failed")
            await session.refuse(ProtocolError(f"internal error: {error!r}", INTERNAL_ERROR))
        finally:
            session.release()


class LiveSession:
    """One WebSocket connection's stream: receives frames, feeds the engine, sends its events."""

    def __init__(
        self,
        websocket: WebSocket,
        streams: StreamScheduler,
        align: Callable[[np.ndarray, str, str, Any], list[dict[str, Any]]] | None,
    ) -> None:
        self.websocket = websocket
        self.streams = streams
        self.align = align
        self.stream: LiveStream | None = None
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[StreamEvent | ProtocolError | None] = asyncio.Queue()
        self.closed = False

    async def run(
        self, parse_language: Callable[[str | None], str | None], max_context: int, start_timeout: float
    ) -> None:
        try:
            first = await asyncio.wait_for(self.websocket.receive(), start_timeout)
        except asyncio.TimeoutError:
            raise ProtocolError(f"no start message within {start_timeout:g} s", POLICY_VIOLATION) from None
        if first["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(first.get("code", 1000))
        start = StartMessage(self._json(first), parse_language, max_context)
        if self.streams.failure is not None:
            raise ProtocolError(f"the streaming engine failed: {self.streams.failure!r}", INTERNAL_ERROR)
        try:
            self.stream = self.streams.open(
                start.context, start.language, chunk_size_sec=start.chunk_seconds, on_event=self._on_event
            )
        except TooManyStreamsError as error:
            raise ProtocolError(str(error), POLICY_VIOLATION) from None
        except (QasrError, ValueError) as error:
            raise ProtocolError(f"start: {error}") from None
        receiver = asyncio.create_task(self._receive(start))
        try:
            await self._send_events()
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await receiver

    def _on_event(self, event: StreamEvent) -> None:
        """From the engine's thread: hand the event to the event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @staticmethod
    def _json(message: dict[str, Any]) -> Any:
        if message.get("text") is None:
            raise ProtocolError("expected a JSON text message, got a binary frame")
        try:
            return json.loads(message["text"])
        except json.JSONDecodeError as error:
            raise ProtocolError(f"the message is not JSON: {error}") from None

    async def _receive(self, start: StartMessage) -> None:
        """Frames → the engine; stop → finish. A bad message or a gone client ends the stream."""
        resample = Resampler(start.sample_rate) if start.sample_rate != audio_io.SAMPLE_RATE else None
        width = start.dtype.itemsize
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    self.events.put_nowait(None)
                    return
                data = message.get("bytes")
                if data is None:
                    stop = self._json(message)
                    if not isinstance(stop, dict) or stop.get("type") != "stop":
                        raise ProtocolError('after start, send binary PCM frames and then {"type": "stop"}')
                    if resample is not None:
                        await self._call(self.streams.feed, resample(np.zeros((0,), np.float32), last=True))
                    await self._call(self.streams.finish)
                    return
                if len(data) % width:
                    raise ProtocolError(
                        f"a frame of {len(data)} bytes is not a whole number of {start.format} samples "
                        f"({width} bytes each)"
                    )
                samples = np.frombuffer(data, dtype=start.dtype)
                if start.dtype == np.dtype("<i2"):
                    samples = samples.astype(np.int16)  # as_pcm scales int16 PCM
                elif not np.all(np.isfinite(samples)):
                    raise ProtocolError("the frame contains NaN or Inf samples")
                if resample is not None:
                    samples = resample(samples.astype(np.float32) / (32768.0 if width == 2 else 1.0))
                await self._call(self.streams.feed, samples)
        except ProtocolError as error:
            self.events.put_nowait(error)

    async def _call(self, method: Callable[..., None], *args: Any) -> None:
        """An engine call for this stream, off the event loop; its typed errors become protocol errors."""
        try:
            await asyncio.to_thread(method, self.stream, *args)
        except (AudioTooLongError, StreamStateError) as error:
            raise ProtocolError(str(error), POLICY_VIOLATION) from None
        except QasrError as error:
            raise ProtocolError(str(error)) from None

    async def _send_events(self) -> None:
        force = self.stream.state.force_language
        while True:
            item = await self.events.get()
            if item is None:  # the client went away
                return
            if isinstance(item, ProtocolError):
                raise item
            if item.error is not None:
                code = INTERNAL_ERROR if self.streams.failure is not None else UNSUPPORTED_DATA
                raise ProtocolError(f"the stream failed: {item.error}", code)
            update = item.update
            if update is not None and not update.final:
                await self.websocket.send_json({
                    "type": "partial", "chunk": update.chunk_index, "audio_seconds": round(update.audio_seconds, 3),
                    "language": update.language, "text": update.text,
                    "fixed_text": fixed_text(update.prefix, force), "avg_logprob": update.avg_logprob,
                    "latency": round(item.latency, 4),
                })  # fmt: skip
            if item.ended:
                state = self.stream.state
                final: dict[str, Any] = {"type": "final", "language": state.language, "text": state.text,
                                         "avg_logprob": state.avg_logprob}  # fmt: skip
                segment = state.updates[-1].segment if state.updates else None
                if self.align is not None:
                    final["words"] = await asyncio.to_thread(
                        self.align, state.audio_accum, state.text, state.language, segment
                    )
                else:
                    words = segment.words if segment is not None else []
                    final["words"] = [{"word": w.text, "confidence": w.confidence} for w in words]
                await self.websocket.send_json(final)
                await self._close(1000)
                return

    async def refuse(self, error: ProtocolError) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await self.websocket.send_json({"type": "error", "message": error.message})
        await self._close(error.code, error.message)

    async def _close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            # A close frame's reason is at most 123 bytes.
            await self.websocket.close(code, reason.encode()[:120].decode(errors="ignore"))

    def release(self) -> None:
        """The stream leaves the engine (no-op once it ended)."""
        if self.stream is not None and not self.stream.ended:
            self.streams.close(self.stream)


__all__ = ["LiveSession", "ProtocolError", "StartMessage", "add_live_route"]
