"""Load, compile and forward time of one thinker forward pass, ours vs the official PyTorch model, same checkpoint.

    python -m infer.bench_forward [--model asr-0.6b] [--seconds 30] [--repeats 3] [--dtype float32]

Builds (once, cached under --workdir) a random-weight checkpoint at the released config with the official code,
then times: loading it (ours: safetensors → params; official: ``from_pretrained``), compiling our jitted
forward, and the forward itself (logits for a prompt holding one clip of speech) — the official model both as
it runs on the CPU (attention across the whole clip) and with its encoder windows wired in (what we compute).
Prints a table with the ratio official/ours. Needs the test extra (torch, transformers, qwen-asr).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _speech(seconds: float) -> np.ndarray:
    from tests.support.speech import LONG_EN, synth

    clip = synth(LONG_EN)
    reps = int(np.ceil(seconds * 16000 / len(clip)))
    return np.tile(clip, reps)[: int(seconds * 16000)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.bench_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="asr-0.6b", choices=["asr-0.6b", "asr-1.7b", "aligner-0.6b"])
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length")
    parser.add_argument("--repeats", type=int, default=3, help="forward repeats (median reported)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "qasr_bench"))
    parser.add_argument("--skip-official", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from qasr_jax import load_pretrained
    from qasr_jax.audio import features
    from qasr_jax.model import Qwen3ASR
    from tests.support import official

    ckpt = os.path.join(args.workdir, f"{args.model}-random")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        print(f"building {args.model} checkpoint with random weights in {ckpt} ...", file=sys.stderr)
        official.build_checkpoint(ckpt, official.real_config(args.model), seed=0)

    wav = _speech(args.seconds)
    feats, fmask = features([wav])
    rows = []

    t0 = time.perf_counter()
    config, params = load_pretrained(ckpt)
    jax.block_until_ready(params)
    load_ours = time.perf_counter() - t0

    n_audio = config.audio.output_length(int(fmask.sum()))
    ids, mask = official.make_audio_prompt_ids([n_audio], seed=0)
    model = Qwen3ASR(config)
    fwd = jax.jit(lambda p, i, m, f, fm: model.apply({"params": p}, i, m, f, fm))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, ids, mask, feats, fmask).compile()
    compile_ours = time.perf_counter() - t0
    forward_ours, _ = _timed(
        lambda c=compiled, p=params: jax.block_until_ready(c(p, ids, mask, feats, fmask)), args.repeats
    )
    rows.append(("load (s)", load_ours))
    rows.append(("compile (s)", compile_ours))
    rows.append((f"forward {args.seconds:g} s clip (s)", forward_ours))
    del params, compiled

    ref = {}
    if not args.skip_official:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        torch_model = official.load_official(ckpt, windowed=False)
        ref["load (s)"] = time.perf_counter() - t0
        ref["compile (s)"] = float("nan")
        feats_list = [(feats[0], int(fmask.sum()))]
        ref[f"forward {args.seconds:g} s clip (s)"], _ = _timed(
            lambda: official.official_logits(torch_model, ids, mask, feats_list, windowed=False), args.repeats
        )
        windowed, _ = _timed(
            lambda: official.official_logits(torch_model, ids, mask, feats_list, windowed=True), args.repeats
        )

    print(f"\n{args.model}, random weights, fp32, {jax.devices()[0].platform}, prompt {ids.shape[1]} tokens "
          f"({n_audio} audio)")  # fmt: skip
    print(f"{'':32s} {'qasr-jax':>10s} {'official':>10s} {'official/ours':>14s}")
    for name, ours in rows:
        theirs = ref.get(name, float("nan"))
        ratio = theirs / ours if ours and theirs == theirs else float("nan")
        print(f"{name:32s} {ours:10.2f} {theirs:10.2f} {ratio:14.2f}")
    if ref:
        print(
            f"{'official forward, windows wired in':32s} {'':10s} {windowed:10.2f} {windowed / forward_ours:14.2f}"
        )
    _ = jnp
    return 0


if __name__ == "__main__":
    sys.exit(main())
