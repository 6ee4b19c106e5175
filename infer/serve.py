"""python -m infer serve: an OpenAI-compatible transcription server with continuous batching.

    python -m infer serve --model Qwen/Qwen3-ASR-0.6B --port 8000
    curl -F file=@talk.wav http://127.0.0.1:8000/v1/audio/transcriptions
    python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-');
               print(c.audio.transcriptions.create(model='qwen3-asr', file=open('talk.wav', 'rb')).text)"

Routes: POST /v1/audio/transcriptions (json, text, srt, vtt, verbose_json; stream=true for server-sent events),
WS /v1/audio/stream (live streams: a JSON start message, binary PCM frames, a stop message; partial and final
results as JSON), GET /v1/models, GET /health, GET /metrics. SIGTERM (or Ctrl-C) stops taking connections,
finishes the requests in flight and those waiting for a slot, closes live streams (1012) and exits. Requests
never make the server read a path or URL: only uploaded bytes are decoded.

QASR_SERVE_FAULT_CONTEXT=TEXT (for tests of the failure handling): an upload whose prompt, or a live stream whose
context, is exactly TEXT makes the upload scheduler's or the streaming engine's loop fail as a bug would; the
requests it held get 500, the streams 1011, and /health turns 503.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence

import numpy as np

from infer.defaults import REVISION_HELP, model_help, model_or_demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infer serve",
        description="OpenAI-compatible transcription server (continuous batching over the JAX engine).",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="DIR|NAME",
                        help=f"Qwen3-ASR checkpoint: {model_help()} (default: the demo model under models/)")  # fmt: skip
    parser.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    parser.add_argument("--aligner", "--forced-aligner", dest="aligner", metavar="DIR|NAME",
                        help="Qwen3-ForcedAligner checkpoint, for word timestamps in verbose_json and srt/vtt cues: "
                             f"{model_help(aligner=True)}")  # fmt: skip
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="decode slots: requests (chunks) decoded together (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=64, metavar="Q",
                        help="requests that may wait for a slot; more get 429 (default %(default)s)")  # fmt: skip
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require Authorization: Bearer KEY on every route but /health (default: $QASR_API_KEY)")  # fmt: skip
    parser.add_argument("--max-upload-mb", type=float, default=25.0, metavar="M",
                        help="largest upload in MiB (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-audio-seconds", type=float, default=600.0, metavar="S",
                        help="longest audio accepted (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-streams", type=int, default=16, metavar="N",
                        help="live WebSocket streams open at once; more are refused (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-stream-seconds", type=float, default=None, metavar="S",
                        help="longest live stream (default: --max-audio-seconds)")  # fmt: skip
    parser.add_argument("--stream-start-timeout", type=float, default=30.0, metavar="S",
                        help="seconds a live stream may take to send its start message (default %(default)s)")  # fmt: skip
    parser.add_argument("--adapters", nargs="+", default=[], metavar="NAME=DIR",
                        help="LoRA adapters (PEFT adapter dirs) served beside the base model: a request's "
                             "`model` field NAME picks one; rows of different adapters share decode steps")  # fmt: skip
    parser.add_argument("--served-model-name", default="qwen3-asr", metavar="NAME",
                        help="the model id in /v1/models and the accepted 'model' field (default %(default)s)")  # fmt: skip
    parser.add_argument("--step-chunk", type=int, default=8, metavar="K",
                        help="decode steps between admissions of new requests (default %(default)s)")  # fmt: skip
    parser.add_argument("--heap-trim-every", type=int, default=32, metavar="N",
                        help="finished requests between returns of freed heap memory to the system, also done "
                             "whenever the server goes idle; 0: never (default %(default)s)")  # fmt: skip
    parser.add_argument("--mesh", metavar="SPEC", default=None, help="device mesh, e.g. data=2,tensor=4")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="params and compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="token budget per audio chunk (default: grows with the chunk's duration)")  # fmt: skip
    parser.add_argument("--max-chunk-seconds", type=float, default=30.0, metavar="S",
                        help="long audio is split into chunks of at most S seconds, as transcribe splits it "
                             "(default %(default)s; sizes the decode cache)")  # fmt: skip
    parser.add_argument("--vad", action="store_true",
                        help="run the voice-activity detector (the [vad] extra) on uploads: spans without speech "
                             "are not decoded, and verbose_json segments carry no_speech_prob")  # fmt: skip
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                        help="> 1 discourages repeating generated tokens (default %(default)s: off)")  # fmt: skip
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                        help="forbid any N-gram of generated tokens from repeating (default %(default)s: off)")  # fmt: skip
    parser.add_argument("--compilation-cache", metavar="DIR|off", default=None,
                        help="JAX's persistent compilation cache (default: $QASR_COMPILATION_CACHE or "
                             "~/.cache/qasr-jax/xla)")  # fmt: skip
    parser.add_argument("--weights-cache", metavar="DIR|off", default=None,
                        help="converted weights, kept so that a second run maps them instead of converting: a "
                             "directory, or off (default: $QASR_WEIGHTS_CACHE or ~/.cache/qasr-jax/weights)")  # fmt: skip
    return parser


def warm_up(scheduler: object, seconds: float = 1.0, timeout: float = 600.0) -> None:
    """One request through the loop, so the first client does not pay the compilation of the common programs."""
    import threading

    from qasr_jax.serve.scheduler import Upload

    rng = np.random.default_rng(0)
    # The base model's programs, and with adapters loaded those that give rows their adapters.
    for adapter in [None, *list(scheduler.model.adapters)[:1]]:
        done = threading.Event()
        job = Upload((rng.standard_normal(int(seconds * 16000)) * 0.01).astype(np.float32),
                  on_done=lambda _, done=done: done.set(), adapter=adapter)  # fmt: skip
        scheduler.prepare(job, vad=False)  # its noise must reach the decoder to compile the programs
        scheduler.submit(job)
        if not done.wait(timeout) or job.error is not None:
            raise RuntimeError(f"warm-up failed: {job.error or 'timed out'}")


def warm_up_streams(streams: object, seconds: float = 4.0, timeout: float = 600.0) -> None:
    """One short live stream (two chunks and the final update) through the streaming engine's thread, so the
    first WebSocket client does not pay the compilation of the stream programs."""
    import threading

    done = threading.Event()
    failure: list[BaseException] = []

    def on_event(event: object) -> None:
        if event.error is not None:
            failure.append(event.error)
        if event.ended:
            done.set()

    rng = np.random.default_rng(1)
    stream = streams.open(on_event=on_event)
    streams.feed(stream, (rng.standard_normal(int(seconds * 16000)) * 0.01).astype(np.float32))
    streams.finish(stream)
    if not done.wait(timeout) or failure:
        raise RuntimeError(f"stream warm-up failed: {failure[0] if failure else 'timed out'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from qasr_jax.serve.app import ServeConfig, create_app
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from qasr_jax.asr import Qwen3ASRModel
    from qasr_jax.serve.scheduler import Scheduler
    from qasr_jax.serve.streams import StreamScheduler

    api_key = args.api_key if args.api_key is not None else os.environ.get("QASR_API_KEY") or None
    cache = False if args.compilation_cache == "off" else args.compilation_cache
    try:
        model_dir = model_or_demo(args.model)
        aligner_dir = args.aligner
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.revision and not args.model:
        print("error: --revision needs --model NAME", file=sys.stderr)
        return 2
    if not args.stream_start_timeout > 0:
        print("error: --stream-start-timeout must be positive", file=sys.stderr)
        return 2
    if args.mesh is not None:
        import jax

        from qasr_jax.sharding import parse_mesh_spec

        try:
            parse_mesh_spec(args.mesh, jax.device_count())
        except ValueError as error:
            print(f"error: --mesh: {error}", file=sys.stderr)
            return 2
    adapter_dirs = {}
    for item in args.adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"error: --adapters: {item!r} is not NAME=DIR", file=sys.stderr)
            return 2
        if name == args.served_model_name or name in adapter_dirs:
            print(f"error: --adapters: the name {name!r} is taken", file=sys.stderr)
            return 2
        adapter_dirs[name] = path
    fault_context = os.environ.get("QASR_SERVE_FAULT_CONTEXT") or None
    started = time.monotonic()
    from qasr_jax.errors import AdapterError, QasrError

    try:
        model = Qwen3ASRModel.from_pretrained(
            model_dir, forced_aligner=aligner_dir, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
            max_chunk_seconds=args.max_chunk_seconds, repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size, mesh=args.mesh, compilation_cache=cache,
            weights_cache=args.weights_cache, vad=args.vad, revision=args.revision,
        )  # fmt: skip
    except (QasrError, OSError, ValueError, ImportError) as error:
        print(f"error: cannot load the model: {error}", file=sys.stderr)
        return 1

    try:
        for name, path in adapter_dirs.items():
            model.load_adapter(name, path)
    except AdapterError as error:
        print(f"error: --adapters: {error}", file=sys.stderr)
        return 2
    scheduler = Scheduler(model, slots=args.max_batch, max_queue=args.max_queue, step_chunk=args.step_chunk,
                          max_audio_seconds=args.max_audio_seconds, trim_every=args.heap_trim_every,
                          fault_context=fault_context)  # fmt: skip
    scheduler.start()
    streams = StreamScheduler(model.streamer, max_streams=args.max_streams, max_batch=args.max_batch,
                              max_stream_seconds=args.max_stream_seconds or args.max_audio_seconds,
                              trim_every=2 * args.heap_trim_every, fault_context=fault_context)  # fmt: skip
    streams.start()
    warm_up(scheduler)
    warm_up_streams(streams)
    print(
        f"model {model_dir} loaded and warm in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    config = ServeConfig(model_name=args.served_model_name, api_key=api_key,
                         max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         max_audio_seconds=args.max_audio_seconds,
                         stream_start_timeout=args.stream_start_timeout)  # fmt: skip
    app = create_app(model, scheduler, config, streams)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False, timeout_keep_alive=5))  # fmt: skip
    print(f"serving on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM and then raises the signal again; a drained server exits with status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
