"""Convert a Qwen3-ASR / ForcedAligner checkpoint (a dir or a Hub model name) into an Orbax checkpoint dir that
loads by itself.

DST gets the params as an Orbax checkpoint (``DST/params``) plus the config, tokenizer and processor files, so
``qasr_jax.load_pretrained(DST)`` and the transcription programs accept it directly.

``--verify`` then reloads both and compares every tensor bit for bit; given a DST that already holds a conversion,
it only compares (a copied or older conversion against its source). Exit status: 0 when identical, 1 on any
difference (the report names the tensors and files), 2 when a checkpoint cannot be read or DST is taken.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

from qasr_jax.conversion import convert_checkpoint, verify_conversion
from qasr_jax.errors import QasrError
from qasr_jax.hub import resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", metavar="SRC",
                        help="checkpoint: released (thinker.*) or -hf layout, safetensors; a local dir or a Hugging "
                             "Face Hub model name such as Qwen/Qwen3-ASR-0.6B (fetched into the hub cache; "
                             "HF_HUB_OFFLINE=1 reads only the cache)")  # fmt: skip
    parser.add_argument("dst", metavar="DST", help="output dir (must not exist or be empty)")
    parser.add_argument("--revision", metavar="REV", default=None,
                        help="the branch, tag or commit of a Hub model name SRC (default: main)")  # fmt: skip
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="store params in this dtype (default: keep the checkpoint's)")  # fmt: skip
    parser.add_argument("--verify", action="store_true",
                        help="reload SRC and DST and compare every tensor (only that when DST already holds a "
                             "conversion); exit 1 on any difference")  # fmt: skip
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    # SRC as a local dir, looked up when first needed (a taken DST is refused before any download) and once.
    src = functools.cache(lambda: resolve_model(args.src, args.revision))

    try:
        if args.verify and os.path.isdir(args.dst) and os.listdir(args.dst):
            print(f"{os.path.abspath(args.dst)} exists: verifying it against {args.src}", file=sys.stderr)
        else:
            convert_checkpoint(src(), args.dst, dtype=args.dtype)
            print(f"wrote {os.path.abspath(args.dst)} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.verify:
            report = verify_conversion(src(), args.dst, dtype=args.dtype)
            print(report.summary())
            return 0 if report.ok else 1
    except QasrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
