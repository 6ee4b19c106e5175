"""The fastest this machine can run a transcription benchmark: its arithmetic and memory ceilings, measured, and
the work the model must do, counted from its config.

    python -m benchmarks.roofline --checkpoint DIR [--clip-seconds 30] [--batch 8] [--new-tokens 96]

- ceilings (measured with XLA on this machine, best of several runs): fp32 matrix-multiply GFLOP/s at the shapes
  of the model's prefill, and the rate at which XLA reads 1 GiB from memory (a decode step reads every weight
  once), in GB/s;
- work (counted from the config, lower bounds: only the matrix multiplies, and each weight read once per decode
  step): encoder GFLOP per clip (conv front end + transformer layers + projections), decoder prefill GFLOP for
  the prompt, and bytes read per decode step (weights, the tied head, the KV cache);
- floor: encoder and prefill at the multiply ceiling plus ``new_tokens − 1`` decode steps at the memory ceiling.

``benchmarks.transcribe`` prints the same floor beside its measurements. The model of the ceilings and the work
is in ``benchmarks.common``.
"""

from __future__ import annotations

import os

from benchmarks import common


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.roofline", __doc__)
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint dir (its config and tokenizer; e.g. one benchmarks.transcribe built)")  # fmt: skip
    parser.add_argument("--clip-seconds", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    from qasr_jax.config import load_config

    config = load_config(args.checkpoint)
    prompt = common.prompt_tokens(args.checkpoint, config, args.clip_seconds)
    load = os.getloadavg()[0]
    ceilings = common.measure_ceilings()
    print(common.roofline_report(config, args.clip_seconds, prompt, args.batch, args.new_tokens, ceilings))
    print(f"load average (1 min): {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
