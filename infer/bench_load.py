"""Load time and load memory, ours vs the official ``from_pretrained``, on released-layout checkpoints, one run.

    python -m infer.bench_load [--models asr-0.6b,asr-1.7b] [--dtype bfloat16] [--shards 1,3]

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
just before it (imports done), against the bytes of the parameters. The checkpoint files are in the page
cache for every side (each was just written or read), so this is load at memory speed, not cold-disk speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

SIDES = ("official", "ours-converting", "ours-first", "ours-cached")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Make VmHWM (peak RSS) restart from the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def checkpoint(workdir: str, model: str, dtype: str, shards: int) -> tuple[str, int]:
    """The checkpoint dir (built once) and the bytes of its parameters."""
    from tests.support import official

    path = os.path.join(workdir, f"{model}-random-{dtype}-{shards}shards")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"building {model} ({dtype}, {shards} shards) with random weights in {path} ...",
              file=sys.stderr, flush=True)  # fmt: skip
        if shards == 1:
            official.build_checkpoint(path, official.real_config(model), seed=0, dtype=dtype)
        else:
            staging = path + ".one"
            official.build_checkpoint(staging, official.real_config(model), seed=0, dtype=dtype)
            total = os.path.getsize(os.path.join(staging, "model.safetensors"))
            import shutil

            shutil.rmtree(staging)
            official.build_checkpoint(path, official.real_config(model), seed=0, dtype=dtype,
                                      max_shard_bytes=math.ceil(total / shards) + 1)  # fmt: skip
    return path, param_bytes(path, dtype)


def param_bytes(path: str, dtype: str) -> int:
    """The bytes of the model's parameters in ``dtype`` (a tied head counted once)."""
    import numpy as np

    from qasr_jax.config import load_config
    from qasr_jax.weights import abstract_params, flatten_params

    shapes = [leaf.shape for _, leaf in flatten_params(abstract_params(load_config(path)))]
    return sum(int(np.prod(shape)) for shape in shapes) * (2 if dtype == "bfloat16" else 4)


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
            jax.block_until_ready(model.generator.params)
            return model

    before = rss_kib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - started
    peak = rss_kib("VmHWM")
    del model
    return {"load_s": seconds, "peak_rss_increase_gib": (peak - before) / 2**20, "rss_before_gib": before / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.bench_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--models", default="asr-0.6b,asr-1.7b")
    parser.add_argument("--shards", default="1,3", help="shards per model, in the order of --models")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "qasr_bench"))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.dtype, args.cache)))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    shards = [int(s) for s in args.shards.split(",")]
    if len(shards) != len(models):
        parser.error("--shards needs one count per model")
    rows = []
    for model, count in zip(models, shards):
        path, param_bytes = checkpoint(args.workdir, model, args.dtype, count)
        with tempfile.TemporaryDirectory(prefix="qasr-weights-cache-") as cache:
            for side in SIDES:
                load_before = os.getloadavg()[0]
                out = subprocess.run(
                    [sys.executable, "-m", "infer.bench_load", "--worker", side, "--path", path,
                     "--dtype", args.dtype, "--cache", cache],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                result = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((model, count, param_bytes, side, result, load_before))
                print(f"{model} {side}: {result['load_s']:.2f} s (load average {load_before:.2f})",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"\nload of released-layout checkpoints with random weights, {args.dtype} kept, page cache warm\n")
    print("| model | shards | params (GiB) | side | load (s) | peak RSS increase (GiB) | ÷ params | load avg |")
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
