"""The OpenAI-compatible HTTP API over the continuous-batching scheduler (FastAPI; ``qasr-jax[serve]``).

Routes: ``POST /v1/audio/transcriptions`` (multipart; json, text, srt, vtt, verbose_json; ``stream=true`` gives
server-sent ``transcript.text.delta`` … ``transcript.text.done`` events), ``WS /v1/audio/stream`` (live streams
over the ``StreamScheduler``; ``qasr_jax.serve.live``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text). Errors have the OpenAI shape ``{"error": {"message", "type", "param",
"code"}}``. Uploads are read as bytes only: a request never makes the server open a path or a URL.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
from typing import Any

from qasr_jax.errors import MissingExtraError

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.requests import HTTPConnection
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise MissingExtraError(
        f"the server needs FastAPI, uvicorn and python-multipart ({_error}): pip install 'qasr-jax[serve]'"
    ) from None

from qasr_jax import audio as audio_io
from qasr_jax import text as text_io
from qasr_jax.asr import Qwen3ASRModel
from qasr_jax.errors import AudioError, LanguageError, PromptError, QasrError
from qasr_jax.formats import render
from qasr_jax.memory import heap_stats
from qasr_jax.serve.live import add_live_route
from qasr_jax.serve.scheduler import QueueFullError, Scheduler, ShuttingDownError, Upload
from qasr_jax.serve.streams import StreamScheduler
from qasr_jax.transcript import with_word_confidences

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
ALLOWED_FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "stream",
                  "timestamp_granularities[]", "timestamp_granularities", "chunking_strategy", "include[]"}  # fmt: skip

# ISO 639-1 (and a few 639-3) codes of the supported languages.
ISO_LANGUAGES = {
    "zh": "Chinese", "en": "English", "yue": "Cantonese", "ar": "Arabic", "de": "German", "fr": "French",
    "es": "Spanish", "pt": "Portuguese", "id": "Indonesian", "it": "Italian", "ko": "Korean", "ru": "Russian",
    "th": "Thai", "vi": "Vietnamese", "ja": "Japanese", "tr": "Turkish", "hi": "Hindi", "ms": "Malay",
    "nl": "Dutch", "sv": "Swedish", "da": "Danish", "fi": "Finnish", "pl": "Polish", "cs": "Czech",
    "fil": "Filipino", "tl": "Filipino", "fa": "Persian", "el": "Greek", "ro": "Romanian", "hu": "Hungarian",
    "mk": "Macedonian",
}  # fmt: skip
LOG = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclasses.dataclass
class ServeConfig:
    """What the server allows (the command line's options)."""

    model_name: str = "qwen3-asr"
    api_key: str | None = None
    max_upload_bytes: int = 25 * 1024 * 1024
    max_audio_seconds: float = 600.0
    max_fields: int = 16
    max_field_bytes: int = 4096
    stream_start_timeout: float = 30.0


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds, self.counts, self.sum, self.total = bounds, [0] * (len(bounds) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.total += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{label}"}} {running}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.audio_seconds = 0.0
        self.latency = Histogram()
        self.first_token = Histogram()

    def count(self, status: int) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def render(self, scheduler: Scheduler, streams: StreamScheduler | None = None) -> str:
        with self.lock:
            lines = ["# TYPE qasr_requests_total counter"]
            lines += [f'qasr_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            busy = scheduler.busy_slots
            stats = scheduler.stats
            occupancy = stats.busy_slot_steps / stats.slot_steps if stats.slot_steps else 0.0
            lines += [
                "# TYPE qasr_queue_depth gauge", f"qasr_queue_depth {scheduler.queue_depth}",
                "# TYPE qasr_slots_busy gauge", f"qasr_slots_busy {busy}",
                "# TYPE qasr_slots gauge", f"qasr_slots {scheduler.slots}",
                "# TYPE qasr_batch_occupancy gauge", f"qasr_batch_occupancy {occupancy:.6f}",
                "# TYPE qasr_requests_cancelled_total counter", f"qasr_requests_cancelled_total {stats.cancelled}",
                "# TYPE qasr_decode_steps_total counter", f"qasr_decode_steps_total {stats.steps}",
                "# TYPE qasr_audio_seconds_total counter", f"qasr_audio_seconds_total {self.audio_seconds:.3f}",
                "# TYPE qasr_request_latency_seconds histogram",
                *self.latency.lines("qasr_request_latency_seconds"),
                "# TYPE qasr_time_to_first_token_seconds histogram",
                *self.first_token.lines("qasr_time_to_first_token_seconds"),
                "# TYPE qasr_heap_trims_total counter", f"qasr_heap_trims_total {scheduler.heap.trims}",
                "# TYPE qasr_heap_trim_seconds_total counter",
                f"qasr_heap_trim_seconds_total {scheduler.heap.seconds:.6f}",
            ]  # fmt: skip
            heap = heap_stats()
            if heap is not None:
                lines += ["# TYPE qasr_heap_bytes gauge"]
                lines += [f'qasr_heap_bytes{{kind="{kind}"}} {value}' for kind, value in heap.items()]
            if streams is not None:
                lines += [
                    "# TYPE qasr_live_streams gauge", f"qasr_live_streams {streams.open_streams}",
                    "# TYPE qasr_live_stream_steps_total counter", f"qasr_live_stream_steps_total {streams.steps}",
                ]  # fmt: skip
        return "\n".join(lines) + "\n"


def parse_language(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    name = ISO_LANGUAGES.get(value.lower(), value)
    try:
        return text_io.normalize_language(name)
    except LanguageError as error:
        raise ApiError(400, f"language: {error}", param="language", code="unsupported_language") from None


def _segments(job: Upload) -> list[dict[str, Any]]:
    """verbose_json segments, one per chunk: the generated ids, their mean log-probability and the text's
    compression ratio (``qasr_jax.transcript``), and ``no_speech_prob`` only when the server runs the
    voice-activity detector (``--vad``): the fraction of the chunk's 32 ms windows it scored as non-speech
    (chunks it found no speech in are not decoded: no tokens, ``finish_reason`` no_speech)."""
    segments = []
    for i, chunk in enumerate(job.chunks):
        start = chunk.piece.start / audio_io.SAMPLE_RATE
        end = (chunk.piece.start + chunk.piece.num_samples) / audio_io.SAMPLE_RATE
        entry = {"id": i, "seek": 0, "start": round(start, 3), "end": round(end, 3), "text": chunk.text,
                 "temperature": 0.0}  # fmt: skip
        if chunk.segment is not None:
            entry.update(tokens=list(chunk.segment.token_ids), avg_logprob=chunk.segment.avg_logprob,
                         compression_ratio=chunk.segment.compression_ratio,
                         finish_reason=chunk.segment.finish_reason.value)  # fmt: skip
            if chunk.segment.no_speech is not None:
                entry["no_speech_prob"] = chunk.segment.no_speech
        segments.append(entry)
    return segments


def _cues_without_words(job: Upload, kind: str) -> str:
    """srt/vtt with one cue per chunk when no aligner gives word times."""
    from qasr_jax.formats import Cue, cues_to_srt, cues_to_vtt

    # A cue is one line of text: blank lines would end it early.
    cues = [
        Cue(s["start"], s["end"], (" ".join(s["text"].split()),)) for s in _segments(job) if s["text"].strip()
    ]
    return cues_to_srt(cues) if kind == "srt" else cues_to_vtt(cues)


def create_app(
    model: Qwen3ASRModel, scheduler: Scheduler, config: ServeConfig, streams: StreamScheduler | None = None
) -> FastAPI:
    """The app over ``scheduler`` (uploads) and, when given, ``streams`` (the WebSocket live route)."""
    metrics = Metrics()
    ready = threading.Event()
    aligner_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        ready.set()
        yield
        await asyncio.to_thread(scheduler.stop)
        if streams is not None:
            await asyncio.to_thread(streams.stop, 60.0)

    app = FastAPI(title="qasr-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def key_matches(connection: HTTPConnection) -> bool:
        """Whether the connection may use the routes: no key is set, or its Authorization header holds it
        (compared in constant time)."""
        if config.api_key is None:
            return True
        header = connection.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(given.encode(), config.api_key.encode())

    def check_key(request: Request) -> None:
        """Every route but /health needs the key when one is set."""
        if not key_matches(request):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           code="invalid_api_key", kind="authentication_error")  # fmt: skip

    @app.exception_handler(404)
    async def not_found(_: Request, __: Exception) -> JSONResponse:
        return ApiError(404, "no such route", code="not_found").response()

    @app.exception_handler(405)
    async def wrong_method(_: Request, __: Exception) -> JSONResponse:
        return ApiError(405, "method not allowed on this route", code="method_not_allowed").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not ready.is_set() or scheduler.failure is not None:
            return JSONResponse(
                {"status": "starting" if scheduler.failure is None else "failed"}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        try:
            check_key(request)
        except ApiError as error:
            return error.response()
        return PlainTextResponse(metrics.render(scheduler, streams), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except ApiError as error:
            return error.response()
        names = [config.model_name, *model.adapters]  # the base, then each loaded adapter by its name
        entries = [{"id": name, "object": "model", "created": 0, "owned_by": "qasr-jax"} for name in names]
        return JSONResponse({"object": "list", "data": entries})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        try:
            check_key(request)
            response = await _transcribe(request)
        except ApiError as error:
            response = error.response()
        except Exception as error:  # a bug: answered in the API's error shape, and logged
            LOG.exception("transcription request failed")
            response = ApiError(
                500, f"internal error: {error!r}", code="internal_error", kind="server_error"
            ).response()
        metrics.count(response.status_code)
        return response

    async def _read_form(request: Request) -> Any:
        declared = request.headers.get("content-length")
        limit = config.max_upload_bytes + config.max_fields * config.max_field_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"upload of {int(declared)} bytes exceeds the limit of {config.max_upload_bytes} "
                                "bytes", param="file", code="file_too_large")  # fmt: skip
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                400,
                "the body must be multipart/form-data with a 'file' field",
                param="file",
                code="invalid_body",
            )
        received = bytearray()
        async for part in request.stream():
            received += part
            if len(received) > limit:
                raise ApiError(413, f"upload exceeds the limit of {config.max_upload_bytes} bytes", param="file",
                               code="file_too_large")  # fmt: skip
        request._body = bytes(received)  # the form parser reads the body we already hold
        try:
            return await request.form(max_files=1, max_fields=config.max_fields,
                                      max_part_size=config.max_field_bytes)  # fmt: skip
        except (
            Exception
        ) as error:  # Starlette raises its own parse errors (malformed multipart, too many fields)
            detail = getattr(error, "detail", None) or str(error) or type(error).__name__
            raise ApiError(400, f"malformed multipart body: {detail}", code="invalid_multipart") from None

    async def _transcribe(request: Request) -> Response:
        form = await _read_form(request)
        for key in form:
            if key not in ALLOWED_FIELDS:
                raise ApiError(400, f"unknown field {key!r}", param=key, code="unknown_field")

        def field(name: str, default: str | None = None) -> str | None:
            value = form.get(name, default)
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"{name} must be a text field, not a file", param=name)
            return value

        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(
                400, "the 'file' field (the audio file) is missing", param="file", code="missing_file"
            )
        response_format = (field("response_format", "json") or "json").strip()
        if response_format not in RESPONSE_FORMATS:
            raise ApiError(400, f"response_format {response_format!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                           param="response_format", code="invalid_response_format")  # fmt: skip
        stream = (field("stream", "false") or "false").strip().lower()
        if stream not in ("true", "false", "1", "0"):
            raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
        stream_on = stream in ("true", "1")
        granularities = [g for key in ("timestamp_granularities[]", "timestamp_granularities")
                         for g in form.getlist(key)]  # fmt: skip
        for g in granularities:
            if g not in ("word", "segment"):
                raise ApiError(400, f"timestamp_granularities: {g!r} is not word or segment",
                               param="timestamp_granularities")  # fmt: skip
        words_wanted = "word" in granularities
        if words_wanted and response_format != "verbose_json":
            raise ApiError(400, "timestamp_granularities[]=word needs response_format=verbose_json",
                           param="timestamp_granularities")  # fmt: skip
        if words_wanted and model.forced_aligner is None:
            raise ApiError(400, "word timestamps need a forced aligner; start the server with --aligner DIR",
                           param="timestamp_granularities", code="aligner_not_loaded")  # fmt: skip
        if stream_on and response_format not in ("json", "text"):
            raise ApiError(400, "stream=true gives text events; use response_format json or text",
                           param="stream")  # fmt: skip
        name = field("model")
        if name is not None and name not in (config.model_name, "whisper-1", *model.adapters):
            served = [config.model_name, *model.adapters]
            raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists {served}",
                           param="model", code="model_not_found")  # fmt: skip
        adapter = name if name in model.adapters else None
        language = parse_language(field("language"))
        context = field("prompt", "") or ""

        data = await upload.read()
        filename = upload.filename or "upload"
        try:
            samples = await asyncio.to_thread(
                audio_io.load_audio, data, name=f"file {filename!r}", max_seconds=config.max_audio_seconds
            )
        except AudioError as error:
            raise ApiError(400, str(error), param="file", code=_code(error)) from None
        job = Upload(samples, context=context, language=language, adapter=adapter)
        try:
            # In a thread: the voice-activity detector, when it runs, takes a while for long audio.
            await asyncio.to_thread(scheduler.prepare, job)
        except (AudioError, PromptError) as error:
            raise ApiError(400, str(error), param="file" if isinstance(error, AudioError) else "prompt",
                           code=_code(error)) from None  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str | None] = asyncio.Queue()
        done = loop.create_future()

        def on_done(j: Upload) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(j))
            loop.call_soon_threadsafe(events.put_nowait, None)

        def on_update(j: Upload) -> None:
            loop.call_soon_threadsafe(events.put_nowait, j.partial_text)

        job.on_done = on_done
        job.on_update = on_update if stream_on else None
        try:
            scheduler.submit(job)
        except QueueFullError as error:
            raise ApiError(429, str(error), code="queue_full", kind="rate_limit_error") from None
        except ShuttingDownError as error:
            if scheduler.failure is not None:
                raise ApiError(503, f"the transcription engine failed ({scheduler.failure!r}); restart the server",
                               code="engine_failed", kind="server_error") from None  # fmt: skip
            raise ApiError(503, str(error), code="shutting_down", kind="server_error") from None
        metrics.audio_seconds += job.duration

        if stream_on:
            return StreamingResponse(_sse(job, events, done), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        while not done.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), 0.25)
            if not done.done() and await request.is_disconnected():
                job.cancel()
                raise ApiError(499, "client closed the request", code="client_closed")
        _raise_failure(job)
        _observe_latency(job)
        return await _render(job, response_format, words_wanted)

    def _observe_latency(job: Upload) -> None:
        if job.first_token_at is not None:
            metrics.first_token.observe(job.first_token_at - job.submitted)
        metrics.latency.observe(time.monotonic() - job.submitted)

    async def _sse(job: Upload, events: asyncio.Queue, done: asyncio.Future) -> Any:
        sent = ""
        try:
            while True:
                text = await events.get()
                if text is None:
                    break
                if text.startswith(sent) and len(text) > len(sent):
                    delta, sent = text[len(sent) :], text
                    yield _event({"type": "transcript.text.delta", "delta": delta, "logprobs": None})
            _raise_failure(job)
            final = job.text
            if final.startswith(sent) and len(final) > len(sent):
                yield _event({"type": "transcript.text.delta", "delta": final[len(sent) :], "logprobs": None})
            _observe_latency(job)
            yield _event({"type": "transcript.text.done", "text": final, "logprobs": None,
                          "usage": _usage(job)})  # fmt: skip
        except ApiError as error:
            yield _event({"type": "error", "error": {"message": error.message, "type": error.kind,
                                                      "param": error.param, "code": error.code}})  # fmt: skip
        finally:
            if not job.finished:
                job.cancel()  # the client went away mid-stream

    def _raise_failure(job: Upload) -> None:
        if job.error is not None:
            raise ApiError(
                500, f"transcription failed: {job.error}", code="internal_error", kind="server_error"
            )

    async def _render(job: Upload, response_format: str, words_wanted: bool) -> Response:
        text = job.text
        if response_format == "text":
            return PlainTextResponse(text + "\n")
        if response_format == "json":
            return JSONResponse({"text": text, "usage": _usage(job)})
        words = None
        if model.forced_aligner is not None and (words_wanted or response_format in ("srt", "vtt")):
            words = await asyncio.to_thread(_align, job)
        if response_format in ("srt", "vtt"):
            body = (
                render(response_format, words.items, text=text)
                if words
                else _cues_without_words(job, response_format)
            )
            media = "application/x-subrip" if response_format == "srt" else "text/vtt"
            return Response(body, media_type=f"{media}; charset=utf-8")
        body: dict[str, Any] = {"task": "transcribe", "language": job.detected_language,
                                "duration": round(job.duration, 3), "text": text, "segments": _segments(job),
                                "usage": _usage(job)}  # fmt: skip
        if words_wanted:
            body["words"] = _words(words or [])
        return JSONResponse(body)

    def _align_stream(samples: Any, text: str, language: str, segment: Any) -> list[dict[str, Any]]:
        """Words of a live stream's final text on its time line, each with its confidence from ``segment``."""
        with aligner_lock:
            [result] = model.forced_aligner.align((samples, audio_io.SAMPLE_RATE), text, language or None)
        result = with_word_confidences(result, [segment] if segment is not None else [])
        return _words(result.items)

    def _align(job: Upload) -> Any:
        """The job's words on its time line, each with its confidence from the chunk it came from."""
        with aligner_lock:
            [result] = model.forced_aligner.align_transcripts(
                [[c.piece for c in job.chunks]],
                [[c.text for c in job.chunks]],
                [[c.language for c in job.chunks]],
            )
        return with_word_confidences(result, [c.segment for c in job.chunks if c.segment is not None])

    def live_language(value: str | None) -> str | None:
        try:
            return parse_language(value)
        except ApiError as error:
            raise ValueError(error.message) from None

    if streams is not None:
        add_live_route(app, streams, key_matches=key_matches, parse_language=live_language,
                       align=_align_stream if model.forced_aligner is not None else None,
                       max_context=config.max_field_bytes, start_timeout=config.stream_start_timeout)  # fmt: skip
    return app


def _words(items: Any) -> list[dict[str, Any]]:
    return [
        {"word": w.text, "start": w.start_time, "end": w.end_time, "confidence": w.confidence} for w in items
    ]


def _usage(job: Upload) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(job.duration, 3)}


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _code(error: QasrError) -> str:
    name = type(error).__name__.removesuffix("Error")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_") or "invalid_audio"


__all__ = ["ISO_LANGUAGES", "RESPONSE_FORMATS", "ApiError", "ServeConfig", "create_app", "parse_language"]
