"""Load, compile and forward time of one thinker forward pass, ours vs the official PyTorch model, same checkpoint.

    python -m benchmarks.forward [--model asr-0.6b] [--seconds 30] [--repeats 3] [--dtype float32]

Builds (once, cached under --workdir) a random-weight checkpoint at the released config with the official code,
then times: loading it (ours: safetensors → params; official: ``from_pretrained``), compiling our jitted
forward, and the forward itself (logits for a prompt holding one clip of speech) — the official model both as
it runs on the CPU (attention across the whole clip) and with its encoder windows wired in (what we compute).
Prints a table with the ratio official/ours. Needs the test extra (torch, transformers, qwen-asr).
"""

from __future__ import annotations

import os
import sys
import time

from benchmarks import common
from benchmarks.common import median_seconds


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.forward", __doc__)
    parser.add_argument("--model", default="asr-0.6b", choices=["asr-0.6b", "asr-1.7b", "aligner-0.6b"])
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length")
    parser.add_argument("--repeats", type=int, default=3, help="forward repeats (median reported)")
    parser.add_argument("--workdir", default=common.WORKDIR)
    parser.add_argument("--skip-official", action="store_true")
    args = parser.parse_args(argv)

    import jax

    from qasr_jax import load_pretrained
    from qasr_jax.audio import features
    from qasr_jax.model import Qwen3ASR

    official = common.official
    ckpt = common.random_checkpoint(args.model, args.workdir)
    wav = common.speech_clip(args.seconds)
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
    forward_ours = median_seconds(
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
        ref[f"forward {args.seconds:g} s clip (s)"] = median_seconds(
            lambda: official.official_logits(torch_model, ids, mask, feats_list, windowed=False), args.repeats
        )
        windowed = median_seconds(
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
