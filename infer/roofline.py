"""The fastest this machine can run a transcription benchmark: its arithmetic and memory ceilings, measured, and
the work the model must do, counted from its config.

    python -m infer.roofline --checkpoint DIR [--clip-seconds 30] [--batch 8] [--new-tokens 96]

- ceilings (measured with XLA on this machine, best of several runs): fp32 matrix-multiply GFLOP/s at the shapes
  of the model's prefill, and the rate at which XLA reads 1 GiB from memory (a decode step reads every weight
  once), in GB/s;
- work (counted from the config, lower bounds: only the matrix multiplies, and each weight read once per decode
  step): encoder GFLOP per clip (conv front end + transformer layers + projections), decoder prefill GFLOP for
  the prompt, and bytes read per decode step (weights, the tied head, the KV cache);
- floor: encoder and prefill at the multiply ceiling plus ``new_tokens − 1`` decode steps at the memory ceiling.

``infer.bench`` prints the same floor beside its measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from qasr_jax.config import ThinkerConfig, conv_out_len

SAMPLE_RATE = 16000
HOP = 160


@dataclasses.dataclass(frozen=True)
class Ceilings:
    gemm_gflops: float
    stream_gbps: float


@dataclasses.dataclass(frozen=True)
class Work:
    encoder_gflop_per_clip: float
    prompt_tokens: int
    prefill_gflop: float
    decode_bytes_per_step: float


def measure_ceilings(repeats: int = 5) -> Ceilings:
    """fp32 GEMM GFLOP/s (a [3200, 1024] × [1024, 3072] product, the prefill's MLP shape) and memory-streaming
    GB/s (XLA summing 1 GiB of fp32), each the best of ``repeats``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def best(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - started)
        return min(times)

    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.dot)
    m, k, n = 3200, 1024, 3072
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    gemm = 2 * m * k * n / best(dot, a, b) / 1e9
    del a, b
    # Memory: XLA summing 1 GiB of fp32 (a decode step is bound by reading its weights once).
    w = jnp.asarray(rng.standard_normal((256, 1024, 1024), np.float32))
    stream = w.size * 4 / best(jax.jit(jnp.sum), w) / 1e9
    return Ceilings(gemm, stream)


def encoder_gflop(config: ThinkerConfig, seconds: float) -> float:
    """GFLOP of the audio encoder for one clip: the conv front end per chunk of ``n_window * 2`` frames, the
    transformer layers over the clip's tokens, and the output projections (attention scores left out: they are
    windowed and small)."""
    audio = config.audio
    frames = int(seconds * SAMPLE_RATE) // HOP
    chunk = audio.chunk_frames
    chunks = -(-frames // chunk)
    c, mel = audio.downsample_hidden_size, audio.num_mel_bins
    f1, t1 = conv_out_len(mel), conv_out_len(chunk)
    f2, t2 = conv_out_len(f1), conv_out_len(t1)
    f3, t3 = conv_out_len(f2), conv_out_len(t2)
    conv = 2 * 9 * (f1 * t1 * c + f2 * t2 * c * c + f3 * t3 * c * c) + 2 * t3 * (c * f3) * audio.d_model
    tokens = audio.output_length(frames)
    d, ffn = audio.d_model, audio.encoder_ffn_dim
    layers = audio.encoder_layers * 2 * tokens * (4 * d * d + 2 * d * ffn)
    projections = 2 * tokens * (d * d + d * audio.output_dim)
    return (chunks * conv + layers + projections) / 1e9


def decoder_matmul_params(config: ThinkerConfig) -> int:
    """Weights of the decoder layers' matrix multiplies (norms left out)."""
    text = config.text
    h, inter = text.hidden_size, text.intermediate_size
    q = text.num_attention_heads * text.head_dim
    kv = text.num_key_value_heads * text.head_dim
    return text.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)


def prompt_tokens(checkpoint: str, config: ThinkerConfig, seconds: float) -> int:
    """Length of the ASR prompt for one clip (audio slot expanded), with the checkpoint's tokenizer."""
    from qasr_jax import audio as audio_io
    from qasr_jax import text as text_io

    tokenizer = text_io.Tokenizer.from_pretrained(checkpoint)
    frames = audio_io.num_frames(int(seconds * SAMPLE_RATE))
    return len(text_io.build_prompt_ids(tokenizer, config.audio.output_length(frames)))


def work(config: ThinkerConfig, seconds: float, prompt: int, batch: int, new_tokens: int, itemsize: int = 4) -> Work:
    text = config.text
    params = decoder_matmul_params(config)
    prefill = 2 * params * prompt * batch / 1e9
    head = text.vocab_size * text.hidden_size
    context = prompt + new_tokens // 2  # the KV cache's mean length over the decode steps
    kv_bytes = batch * text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * context * itemsize
    return Work(encoder_gflop(config, seconds), prompt, prefill, (params + head) * itemsize + kv_bytes)


def floor_seconds(w: Work, c: Ceilings, batch: int, new_tokens: int) -> dict[str, float]:
    encoder = batch * w.encoder_gflop_per_clip / c.gemm_gflops
    prefill = w.prefill_gflop / c.gemm_gflops
    decode = (new_tokens - 1) * w.decode_bytes_per_step / (c.stream_gbps * 1e9)
    return {"encoder_s": encoder, "prefill_s": prefill, "decode_s": decode, "total_s": encoder + prefill + decode}


def report(config: ThinkerConfig, seconds: float, prompt: int, batch: int, new_tokens: int, c: Ceilings) -> str:
    w = work(config, seconds, prompt, batch, new_tokens)
    f = floor_seconds(w, c, batch, new_tokens)
    return "\n".join([
        f"ceilings (measured): fp32 GEMM {c.gemm_gflops:.0f} GFLOP/s; weight streaming {c.stream_gbps:.1f} GB/s",
        f"work: encoder {w.encoder_gflop_per_clip:.0f} GFLOP per {seconds:g} s clip; prefill {w.prefill_gflop:.0f} "
        f"GFLOP ({batch} × {w.prompt_tokens} prompt tokens); decode {w.decode_bytes_per_step / 1e9:.2f} GB per step",
        f"floor at b={batch}, {new_tokens} tokens: encoder {f['encoder_s']:.1f} s + prefill {f['prefill_s']:.1f} s + "
        f"decode {f['decode_s']:.1f} s = {f['total_s']:.1f} s",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.roofline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint dir (its config and tokenizer; e.g. one infer.bench built)")  # fmt: skip
    parser.add_argument("--clip-seconds", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    from qasr_jax.config import load_config

    config = load_config(args.checkpoint)
    prompt = prompt_tokens(args.checkpoint, config, args.clip_seconds)
    load = os.getloadavg()[0]
    print(report(config, args.clip_seconds, prompt, args.batch, args.new_tokens, measure_ceilings()))
    print(f"load average (1 min): {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
