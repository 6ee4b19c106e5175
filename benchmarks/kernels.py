"""Time the windowed-attention kernel against its XLA reference on batches of 30 s clips.

    python -m benchmarks.kernels                      # sizes for the platform JAX runs on
    python -m benchmarks.kernels --clips 1 8 64 --dtype bfloat16 --backward

Shapes are the encoder's at the released 0.6B config: 14 heads × 64 head_dim, 104-token windows, 13 tokens per
second of audio, so a 30 s clip is 390 tokens in 4 windows (the last holding 78). On TPU/GPU the defaults are
real batch sizes in bf16 and the kernel runs compiled; on CPU they are tiny, in fp32, and the kernel runs in the
Pallas interpreter, so CPU numbers only show that the program works, not how fast the kernel is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.common import clip_window_lengths, jax_median_ms
from qasr_jax.kernels.backend import platform
from qasr_jax.kernels.windowed_attention import windowed_attention_pallas, windowed_attention_xla

WINDOW = 104  # tokens per attention window at the released config (8 s)
HEADS = 14
HEAD_DIM = 64


def benchmark_windowed_attention(
    num_clips: int, clip_seconds: int, dtype: jnp.dtype, impl: str, backward: bool, repeats: int
) -> dict[str, float]:
    """Forward (and optionally forward+backward) time of one implementation on one batch of clips."""
    lengths = jnp.asarray(clip_window_lengths(num_clips, clip_seconds, WINDOW))
    shape = (lengths.shape[0], WINDOW, HEADS, HEAD_DIM)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    if impl == "xla":
        attention = windowed_attention_xla
    else:
        attention = functools.partial(windowed_attention_pallas, interpret=platform() == "cpu")

    forward = jax.jit(attention)
    result = {"forward_ms": jax_median_ms(lambda: forward(q, k, v, lengths), repeats)}
    if backward:

        def loss(q, k, v):
            return jnp.sum(attention(q, k, v, lengths).astype(jnp.float32))

        forward_backward = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        result["forward_backward_ms"] = jax_median_ms(lambda: forward_backward(q, k, v), repeats)
    return result


def main(argv: list[str] | None = None) -> None:
    on_cpu = platform() == "cpu"
    parser = common.argument_parser("benchmarks.kernels", __doc__)
    parser.add_argument("--clips", type=int, nargs="+", default=[1, 2] if on_cpu else [1, 8, 32, 128])
    parser.add_argument("--seconds", type=int, default=30, help="length of every clip")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32" if on_cpu else "bfloat16"
    )
    parser.add_argument("--impls", nargs="+", choices=["xla", "pallas"], default=["xla", "pallas"])
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--repeats", type=int, default=3 if on_cpu else 20)
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    note = " — Pallas in interpret mode: not a kernel timing" if on_cpu else ""
    print(
        f"device: {device.device_kind} ({platform()}), dtype {args.dtype}, {args.seconds} s clips, "
        f"{HEADS} heads × {HEAD_DIM} head_dim, window {WINDOW}{note}"
    )
    header = f"{'clips':>6} {'windows':>8} {'impl':>7} {'fwd ms':>10} {'audio s/s':>12}"
    if args.backward:
        header += f" {'fwd+bwd ms':>11} {'audio s/s':>12}"
    print(header)
    for num_clips in args.clips:
        num_windows = len(clip_window_lengths(num_clips, args.seconds, WINDOW))
        audio_seconds = num_clips * args.seconds
        for impl in args.impls:
            timing = benchmark_windowed_attention(
                num_clips, args.seconds, jnp.dtype(args.dtype), impl, args.backward, args.repeats
            )
            row = f"{num_clips:>6} {num_windows:>8} {impl:>7} {timing['forward_ms']:>10.3f}"
            row += f" {audio_seconds / (timing['forward_ms'] / 1e3):>12.0f}"
            if args.backward:
                fwd_bwd = timing["forward_backward_ms"]
                row += f" {fwd_bwd:>11.3f} {audio_seconds / (fwd_bwd / 1e3):>12.0f}"
            print(row)


if __name__ == "__main__":
    main()
