"""Load time and load memory, ours vs the official ``from_pretrained``, on released-layout checkpoints, one run.

    python -m benchmarks.load [--models asr-0.6b,asr-1.7b] [--dtype bfloat16] [--shards 1,3]

Builds (once, cached under --workdir) a random-weight checkpoint per model at its released config with the
official code, stored in ``--dtype`` (the released checkpoints are bf16) and split into the given number of
safetensors shards with a shard index, as released. Then each load runs in a fresh process, one after the
other, and keeps the checkpoint's dtype (bf16 stays bf16):

- official: ``qwen_asr.Qwen3ASRModel.from_pretrained(dir, dtype=...)`` (model, processor and tokenizer);
- ours, converting: ``Qwen3ASRModel.from_pretrained(dir, dtype=..., weights_cache=False)``, the safetensors
  read tensor by tensor straight into the stacked per-layer arrays;
- ours, first load: the same with an empty converted-weights cache (converts, then writes the cache entry);
- ours, cached: a second process with that cache (maps the converted files).

For each: wall time of the call, and the process's peak resident memory during the call above what it held
just before it (imports done), against the bytes of the parameters. The official loader maps the safetensors
files and reads a weight's pages when the model first uses it; converting reads every byte during the call;
the cached load maps its files and, like the official one, reads them on first use. Before each side the
checkpoint's files are read once, so every side finds them in the page cache.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

from benchmarks import common

SIDES = ("official", "ours-converting", "ours-first", "ours-cached")


def reset_peak() -> None:
    """Make VmHWM (peak RSS) restart from the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def checkpoint(workdir: str, model: str, dtype: str, shards: int) -> tuple[str, int, int]:
    """The checkpoint dir (built once), the bytes of its parameters and its number of safetensors files."""
    path = os.path.join(workdir, f"{model}-random-{dtype}-{shards}shards")
    limit = None
    if shards > 1:
        parsed = common.thinker_config(model)
        itemsize = 2 if dtype == "bfloat16" else 4
        head = parsed.text.vocab_size * parsed.text.hidden_size * itemsize  # the largest tensor
        stored = _count(parsed) * itemsize + head
        # Shards hold whole tensors: each but the last is filled to more than stored / shards.
        limit = math.ceil(stored / shards) + head
    common.build_once(path, common.official_config(model), f"{model} ({dtype}, {shards} shards)", dtype=dtype,
                      max_shard_bytes=limit)  # fmt: skip
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    return path, param_bytes(path, dtype), len(files)


def _count(config) -> int:
    import numpy as np

    from qasr_jax.weights import abstract_params, flatten_params

    return sum(int(np.prod(leaf.shape)) for _, leaf in flatten_params(abstract_params(config)))


def param_bytes(path: str, dtype: str) -> int:
    """The bytes of the model's parameters in ``dtype`` (a tied head counted once)."""
    from qasr_jax.config import load_config

    return _count(load_config(path)) * (2 if dtype == "bfloat16" else 4)


def _read_through(path: str) -> None:
    """Read every file of the checkpoint once, so each side starts with it in the page cache."""
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as handle:
            while handle.read(1 << 24):
                pass


def worker(side: str, path: str, dtype: str, cache: str) -> dict:
    if side == "official":
        import torch
        from qwen_asr import Qwen3ASRModel

        torch.set_num_threads(os.cpu_count() or 1)

        def load():
            return Qwen3ASRModel.from_pretrained(path, dtype=getattr(torch, dtype))
    else:
        import jax

        from qasr_jax.asr import Qwen3ASRModel

        setting = {"ours-converting": False, "ours-first": cache, "ours-cached": cache}[side]

        def load():
            model = Qwen3ASRModel.from_pretrained(path, dtype=dtype, weights_cache=setting,
                                                  compilation_cache=False)  # fmt: skip
            jax.block_until_ready(model.params)
            return model

    before = common.proc_status_kib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - started
    peak = common.proc_status_kib("VmHWM")
    del model
    return {
        "load_s": seconds,
        "peak_rss_increase_gib": (peak - before) / 2**20,
        "rss_before_gib": before / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.load", __doc__)
    parser.add_argument("--models", default="asr-0.6b,asr-1.7b")
    parser.add_argument("--shards", default="1,3", help="shards per model, in the order of --models")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--workdir", default=common.WORKDIR)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        common.write_result(args.result, worker(args.worker, args.path, args.dtype, args.cache))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    shards = [int(s) for s in args.shards.split(",")]
    if len(shards) != len(models):
        parser.error("--shards needs one count per model")
    rows = []
    for model, count in zip(models, shards):
        path, param_bytes, count = checkpoint(args.workdir, model, args.dtype, count)
        with tempfile.TemporaryDirectory(prefix="qasr-weights-cache-") as cache:
            for side in SIDES:
                _read_through(path)
                load_before = os.getloadavg()[0]
                result = common.run_worker("benchmarks.load", "--worker", side, "--path", path,
                                           "--dtype", args.dtype, "--cache", cache)  # fmt: skip
                rows.append((model, count, param_bytes, side, result, load_before))
                print(f"{model} {side}: {result['load_s']:.2f} s (load average {load_before:.2f})",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(
        f"\nload of released-layout checkpoints with random weights, {args.dtype} kept, files in the page cache\n"
    )
    print(
        "| model | shards | params (GiB) | side | load (s) | peak RSS increase (GiB) | ÷ params | load avg |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for model, count, param_bytes, side, result, load_avg in rows:
        gib = param_bytes / 2**30
        peak = result["peak_rss_increase_gib"]
        print(f"| {model} | {count} | {gib:.2f} | {side} | {result['load_s']:.2f} | {peak:.2f} | "
              f"{peak / gib:.2f} | {load_avg:.2f} |")  # fmt: skip
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
