"""Transcription speed, ours vs the official ``qwen_asr`` (transformers backend), same checkpoint and audio, one run.

    python -m benchmarks.transcribe [--clip-seconds 10] [--batch-sizes 1,2] [--new-tokens 16] [--aligner]
    python -m benchmarks.transcribe --clip-seconds 30 --batch-sizes 1,8 --new-tokens 96 --encoder-batch 8   # the full size

Builds (once, cached under --workdir) a random-weight checkpoint at the released Qwen3-ASR-0.6B config with the
official code, then runs each side in its own subprocess (so peak memory is each side's own), one after the
other, on the same clip of speech:

- encoder: audio-seconds per second for a batch of clips, log-mel features included (official: its processor's
  features, then ``get_audio_features``, which encodes clip by clip);
- end to end: ``transcribe`` of ``b`` clips at each batch size with exactly ``--new-tokens`` new tokens each
  (end tokens suppressed on both sides), reported as wall time and generated tokens per second;
- time to first token: ``transcribe`` of one clip with a budget of one token;
- our decode step at each batch size: the end-to-end time less that of the same batch with one new token, per
  remaining step;
- peak memory (max resident set size of the side's process) and our compile time (the official code runs
  eagerly and compiles nothing).

Timings are the median of --repeats runs; our compile time is measured on its own (programs are compiled ahead of
time, then run) and left out of the run times. The official model runs as shipped: on the CPU its encoder attends across the whole clip rather than within 8 s windows.
``--aligner`` also runs the forced-aligner benchmark (``benchmarks.aligner``) afterwards. Needs the test extra (torch,
transformers, qwen-asr) for the official side and the checkpoint build.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import common
from benchmarks.common import EOS_TOKEN_IDS, SAMPLE_RATE, median_seconds


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser("benchmarks.transcribe", __doc__)
    common.add_checkpoint_arguments(parser)
    parser.add_argument(
        "--clip-seconds", type=float, default=10.0, help="length of each clip (default %(default)s)"
    )
    parser.add_argument("--batch-sizes", default="1,2",
                        help="comma-separated batch sizes for end-to-end runs (default %(default)s)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=16,
                        help="tokens generated per clip end to end (default %(default)s)")  # fmt: skip
    parser.add_argument("--encoder-batch", type=int, default=2,
                        help="clips per encoder-throughput run (default %(default)s)")  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per measurement (default %(default)s)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="params and compute dtype on both sides (default %(default)s)")  # fmt: skip
    parser.add_argument("--skip-official", action="store_true", help="time ours only")
    parser.add_argument("--aligner", action="store_true", help="also run the forced-aligner benchmark")
    parser.add_argument("--worker", choices=("ours", "official"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def batch_sizes(args: argparse.Namespace) -> list[int]:
    sizes = [int(s) for s in str(args.batch_sizes).split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit("--batch-sizes needs positive integers")
    return sizes


def run_ours(args: argparse.Namespace, checkpoint: str, clip: np.ndarray) -> dict[str, float]:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from qasr_jax import audio as audio_io
    from qasr_jax.asr import Qwen3ASRModel
    from qasr_jax.model import Qwen3ASR

    out: dict[str, float] = {}
    started = time.perf_counter()
    loaded = Qwen3ASRModel.from_pretrained(checkpoint, dtype=args.dtype)
    jax.block_until_ready(loaded.params)
    out["load_s"] = time.perf_counter() - started
    config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    dtype = jnp.dtype(args.dtype).type

    # Encoder: log-mel + encoder over a batch of clips, one compiled program.
    model = Qwen3ASR(config, dtype=dtype, param_dtype=dtype)
    frames = audio_io.num_frames(len(clip))

    def encode(p, waveforms, lengths):
        features, valid = audio_io.log_mel(waveforms, lengths, frames=frames)
        mask = (jnp.arange(frames)[None, :] < valid[:, None]).astype(jnp.int32)
        return model.apply({"params": p}, features, mask, method=Qwen3ASR.encode_audio)[0]

    n = args.encoder_batch
    waveforms = jnp.asarray(np.stack([np.pad(clip, (0, 160))] * n))
    lengths = jnp.full((n,), len(clip), jnp.int32)
    started = time.perf_counter()
    encoder = jax.jit(encode).lower(params, waveforms, lengths).compile()
    out["encoder_compile_s"] = time.perf_counter() - started
    seconds = median_seconds(lambda: jax.block_until_ready(encoder(params, waveforms, lengths)), args.repeats)
    out["encoder_audio_s_per_s"] = n * len(clip) / SAMPLE_RATE / seconds

    suppress_eos = dataclasses.replace(loaded.decode_options, suppress_token_ids=EOS_TOKEN_IDS)

    def engine(batch: int, new_tokens: int) -> Qwen3ASRModel:
        # The loaded params, shared: a model object per setting, each with its own compiled programs.
        return Qwen3ASRModel(config, params, tokenizer, max_inference_batch_size=batch, max_new_tokens=new_tokens,
                             dtype=dtype, decode_options=suppress_eos)  # fmt: skip

    compile_s = 0.0
    for batch in batch_sizes(args):
        audio = [(clip, SAMPLE_RATE)] * batch
        for tokens, key in ((args.new_tokens, f"e2e_b{batch}_s"), (1, f"prefill_b{batch}_s")):
            asr = engine(batch, tokens)
            out[key] = median_seconds(
                lambda asr=asr, audio=audio: asr.transcribe(audio), args.repeats,
                lambda asr=asr: asr.compile_seconds,
            )  # fmt: skip
            compile_s += asr.compile_seconds
        if args.new_tokens > 1:
            # The run with one new token is everything but the decode steps: the rest is new_tokens − 1 steps.
            steps = args.new_tokens - 1
            out[f"decode_step_b{batch}_ms"] = (
                1000 * (out[f"e2e_b{batch}_s"] - out[f"prefill_b{batch}_s"]) / steps
            )
    asr = engine(1, 1)
    out["ttft_s"] = median_seconds(lambda: asr.transcribe((clip, SAMPLE_RATE)), args.repeats,
                                   lambda: asr.compile_seconds)  # fmt: skip
    out["compile_s"] = compile_s + asr.compile_seconds
    out["peak_memory_gb"] = common.peak_rss_gb()
    if args.dtype == "float32":
        ceilings = common.measure_ceilings()
        prompt = common.prompt_tokens(checkpoint, config, args.clip_seconds)
        out["gemm_gflops"], out["stream_gbps"] = ceilings.gemm_gflops, ceilings.stream_gbps
        out["encoder_gflop_per_clip"] = common.encoder_gflop(config, args.clip_seconds)
        out["encoder_gflops"] = (
            out["encoder_gflop_per_clip"] * out["encoder_audio_s_per_s"] / args.clip_seconds
        )
        for batch in batch_sizes(args):
            out["roofline"] = common.roofline_report(
                config, args.clip_seconds, prompt, batch, args.new_tokens, ceilings
            )
            work = common.work(config, args.clip_seconds, prompt, batch, args.new_tokens)
            floor = common.floor_seconds(work, ceilings, batch, args.new_tokens)
            out[f"floor_e2e_b{batch}_s"] = floor["total_s"]
    return out


def run_official(args: argparse.Namespace, checkpoint: str, clip: np.ndarray) -> dict[str, float]:
    import torch
    from qwen_asr import Qwen3ASRModel as OfficialASRModel

    torch.set_num_threads(os.cpu_count() or 1)
    out: dict[str, float] = {}
    started = time.perf_counter()
    asr = OfficialASRModel.from_pretrained(checkpoint, dtype=getattr(torch, args.dtype))
    out["load_s"] = time.perf_counter() - started
    thinker = asr.model.thinker

    n = args.encoder_batch

    def encode() -> None:
        inputs = asr.processor.feature_extractor(
            [clip] * n, sampling_rate=SAMPLE_RATE, padding=True, truncation=False,
            return_attention_mask=True, return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            thinker.get_audio_features(
                inputs["input_features"].to(thinker.dtype), feature_attention_mask=inputs["attention_mask"]
            )

    out["encoder_audio_s_per_s"] = n * len(clip) / SAMPLE_RATE / median_seconds(encode, args.repeats)

    generate = asr.model.generate
    asr.model.generate = lambda **inputs: generate(**inputs, suppress_tokens=list(EOS_TOKEN_IDS))
    for batch in batch_sizes(args):
        asr.max_inference_batch_size, asr.max_new_tokens = batch, args.new_tokens
        audio = [(clip, SAMPLE_RATE)] * batch
        out[f"e2e_b{batch}_s"] = median_seconds(lambda audio=audio: asr.transcribe(audio), args.repeats)
    asr.max_inference_batch_size, asr.max_new_tokens = 1, 1
    out["ttft_s"] = median_seconds(lambda: asr.transcribe((clip, SAMPLE_RATE)), args.repeats)
    out["peak_memory_gb"] = common.peak_rss_gb()
    return out


def tokens_per_second(measured: dict[str, float], key: str, tokens: int) -> float | None:
    return tokens / measured[key] if key in measured else None


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def table(args: argparse.Namespace, ours: dict[str, float], theirs: dict[str, float]) -> str:
    n_tokens = args.new_tokens
    rows: list[tuple[str, float | None, float | None, bool]] = [
        (f"encoder audio-s/s (b={args.encoder_batch})", ours.get("encoder_audio_s_per_s"),
         theirs.get("encoder_audio_s_per_s"), True),
    ]  # fmt: skip
    for batch in batch_sizes(args):
        key = f"e2e_b{batch}_s"
        rows.append((f"e2e b={batch}, {n_tokens} tok (s)", ours.get(key), theirs.get(key), False))
        rows.append((f"e2e b={batch} tokens/s", tokens_per_second(ours, key, batch * n_tokens),
                     tokens_per_second(theirs, key, batch * n_tokens), True))  # fmt: skip
    for batch in batch_sizes(args):
        rows.append((f"decode step b={batch} (ms)", ours.get(f"decode_step_b{batch}_ms"), None, False))
    rows += [
        ("time to first token (s)", ours.get("ttft_s"), theirs.get("ttft_s"), False),
        ("peak memory (GB)", ours.get("peak_memory_gb"), theirs.get("peak_memory_gb"), False),
        ("compile, all programs (s)", ours.get("compile_s"), None, False),
        ("load (s)", ours.get("load_s"), theirs.get("load_s"), False),
    ]
    lines = ["| metric | qasr-jax | official | ours/official | better |", "|---|---:|---:|---:|---|"]
    for name, mine, other, higher_is_better in rows:
        ratio = f"{mine / other:.2f}" if mine is not None and other else "—"
        lines.append(f"| {name} | {_number(mine)} | {_number(other)} | {ratio} | "
                     f"{'higher' if higher_is_better else 'lower'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        clip = common.speech_clip(args.clip_seconds)
        runner = run_ours if args.worker == "ours" else run_official
        common.write_result(args.result, runner(args, args.checkpoint, clip))
        return 0

    import jax

    checkpoint = common.checkpoint_dir(args)
    forwarded = [a for a in argv if a != "--aligner"]
    if not args.checkpoint:
        forwarded += ["--checkpoint", checkpoint]
    print(f"{args.model} (random weights), {args.dtype}, {jax.devices()[0].device_kind} "
          f"({os.cpu_count()} CPUs), {args.clip_seconds:g} s clips", file=sys.stderr, flush=True)  # fmt: skip
    load_start = os.getloadavg()[0]
    ours = common.run_worker("benchmarks.transcribe", *forwarded, "--worker", "ours")
    load_between = os.getloadavg()[0]
    theirs = {}
    if not args.skip_official:
        theirs = common.run_worker("benchmarks.transcribe", *forwarded, "--worker", "official")
    print(f"\n{args.model}, random weights, {args.dtype}, {args.clip_seconds:g} s clips, "
          f"{args.new_tokens} new tokens (end tokens suppressed), {jax.devices()[0].device_kind}\n")  # fmt: skip
    print(table(args, ours, theirs))
    if "roofline" in ours:
        print(
            f"\nencoder: {ours['encoder_gflops']:.0f} GFLOP/s ({ours['encoder_gflop_per_clip']:.0f} GFLOP per clip)"
        )
        print(f"this machine's floor (benchmarks.roofline), largest batch:\n{ours['roofline']}")
        for batch in batch_sizes(args):
            floor, key = ours.get(f"floor_e2e_b{batch}_s"), f"e2e_b{batch}_s"
            if floor and key in theirs:
                print(f"e2e b={batch}: the floor is {floor:.1f} s, so no program can beat the official's "
                      f"{theirs[key]:.1f} s by more than {theirs[key] / floor:.2f}× here")  # fmt: skip
    print(f"\nload average (1 min): {load_start:.2f} at the start, {load_between:.2f} between the two sides, "
          f"{os.getloadavg()[0]:.2f} at the end")  # fmt: skip

    if args.aligner:
        print(flush=True)
        shared = ["--clip-seconds", str(args.clip_seconds), "--batch-sizes", args.batch_sizes,
                  "--repeats", str(args.repeats), "--dtype", args.dtype, "--workdir", args.workdir]  # fmt: skip
        common.run_module("benchmarks.aligner", *shared, *(["--skip-official"] if args.skip_official else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
