"""Show that adapters learn: the demo Qwen3-ASR adapted to a domain it never heard, by full fine-tuning and by LoRA.

    python -m train.adapt_demo --base models/qwen3-asr-demo --domain data/domain \
        --base-test data/demo/test.jsonl --limit 200 --out data/runs/adapt_demo --json adapt_demo.json

``--domain`` is a ``train.synth`` dir (train.jsonl, test.jsonl), e.g. distorted voices that no split of the demo
data uses (``train.synth --voices``, see train/configs/demo_adapt_full.toml). The program measures the base
model's WER on the domain's test set and on the base domain's (``--base-test``, the first ``--limit`` rows), then
trains on the domain three ways, each from the same base with the same steps, batch and learning-rate schedule
(warmup, cosine decay), each in its own process (``python -m train``):

- full fine-tuning (train/configs/demo_adapt_full.toml: every weight, learning rate 1e-4);
- LoRA rank 8 and rank 32 (train/configs/demo_adapt_lora.toml: the base frozen, adapters on every projection of
  both towers, alpha / rank = 2, learning rate 1e-3);

and reports for each: the trainable parameters (counted from the trained param tree's shapes), the median
seconds per step (from the run's per-step metrics, so compiles and the start fall outside it) with the 1-minute
load average sampled while it trained, the peak resident memory of the training process (its ``ru_maxrss``:
JAX on CPU keeps no device memory statistics), the mean training loss of the last tenth of the steps, and the
WER on both test sets after training. The fine-tuned model is loaded from its export; an adapter is loaded onto
the base (``load_adapter``, PEFT dir) and picked with ``transcribe(..., adapter=NAME)``. Prints the table
(Markdown) and writes it with every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from qasr_jax import adapters as lora
from qasr_jax import compile_cache, weights
from qasr_jax.config import load_config
from qasr_jax.training import load_train_config
from qasr_jax.training.config import TrainConfig
from qasr_jax.training.metrics import read_metrics
from qasr_jax.training.optim import trainable_mask
from train import demo_eval

REPO = Path(__file__).resolve().parent.parent
FULL_CONFIG = REPO / "train" / "configs" / "demo_adapt_full.toml"
LORA_CONFIG = REPO / "train" / "configs" / "demo_adapt_lora.toml"
LOAD_SAMPLE_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of training on the domain: a config and its overrides."""

    name: str
    key: str  # folder and adapter name
    config: Path
    overrides: tuple[str, ...] = ()


METHODS = (
    Method("full fine-tuning", "full", FULL_CONFIG),
    Method("LoRA rank 8", "lora8", LORA_CONFIG, ("adapters.rank=8", "adapters.alpha=16.0")),
    Method("LoRA rank 32", "lora32", LORA_CONFIG, ("adapters.rank=32", "adapters.alpha=64.0")),
)


@dataclasses.dataclass
class Training:
    """What one training process measured."""

    returncode: int
    wall_seconds: float
    peak_rss_bytes: int
    load_averages: list[float]


def trainable_params(cfg: TrainConfig) -> int:
    """Parameters the run updates: the adapters' (LoRA) or every unfrozen param of the model (counted from the
    shapes of the trees the trainer builds)."""
    config = load_config(cfg.model.checkpoint)
    if cfg.adapters.enabled:
        a = cfg.adapters
        tree = lora.abstract_adapters(config, lora.LoraSpec(a.targets, a.rank, a.alpha, a.dropout))
        return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))
    shapes = weights.abstract_params(config)
    mask = trainable_mask(shapes, tuple(cfg.model.freeze))
    leaves = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda s, m: math.prod(s.shape) if m else 0, shapes, mask)
    )
    return int(sum(leaves))


def train_process(argv: Sequence[str], log_path: Path) -> Training:
    """Run ``argv`` (a training command) to its end with output to ``log_path``; its peak RSS from the kernel's
    resource usage of that one child, the load average sampled every few seconds meanwhile."""
    started = time.monotonic()
    loads: list[float] = []
    env = dict(os.environ)
    cache = compile_cache.resolve()
    if cache is not None:
        # The training program compiles a step per batch shape; with the machine's persistent cache a rerun
        # (or a method whose programs another run compiled) skips them. Step times exclude compiles either way.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            loads.append(os.getloadavg()[0])
            time.sleep(LOAD_SAMPLE_SECONDS)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    return Training(proc.returncode, time.monotonic() - started, int(usage.ru_maxrss) * 1024, loads)


def step_seconds(metrics_path: Path) -> list[float]:
    """Seconds of each step after the first, from the times of consecutive per-step train records."""
    records = read_metrics(metrics_path, "train")
    times = [r["time"] for r in sorted(records, key=lambda r: r["step"])]
    return [b - a for a, b in itertools.pairwise(times)]


def tail_loss(metrics_path: Path) -> float:
    """The mean training loss of the last tenth of the steps (at least one)."""
    losses = [r["loss"] for r in sorted(read_metrics(metrics_path, "train"), key=lambda r: r["step"])]
    tail = losses[-max(len(losses) // 10, 1) :]
    return float(sum(tail) / len(tail))


def evaluate(
    model: Any, rows: dict[str, list[demo_eval.HeldOutRow]], adapter: str | None = None
) -> dict[str, Any]:
    """WER report of ``model`` (with ``adapter``) on each named row set."""
    return {name: demo_eval.asr_report(model, subset, adapter=adapter) for name, subset in rows.items()}


def _wer(value: float | None) -> str:
    return "–" if value is None else f"{value:.2%}"


def markdown_table(entries: Sequence[dict[str, Any]]) -> str:
    """The learning table: one row per entry (the base first)."""
    lines = [
        "| model | trainable params | learning rate | s/step (median) | load avg | peak RSS | train loss (last 10%) "
        "| domain test WER | base test WER |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        cells = [
            e["name"],
            f"{e['trainable_params']:,}" if "trainable_params" in e else "–",
            f"{e['learning_rate']:g}" if "learning_rate" in e else "–",
            f"{e['step_seconds_median']:.3f}" if "step_seconds_median" in e else "–",
            f"{e['load_average']:.1f}" if "load_average" in e else "–",
            f"{e['peak_rss_bytes'] / 2**20:,.0f} MiB" if "peak_rss_bytes" in e else "–",
            f"{e['train_loss_tail']:.3f}" if "train_loss_tail" in e else "–",
            _wer(e["domain"]["wer"]),
            _wer(e["base"]["wer"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr,
          flush=True)  # fmt: skip


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """A WER report without the per-utterance failures (kept to the first few)."""
    return {**report, "failures": report["failures"][:5]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.adapt_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--base", required=True, help="the demo ASR checkpoint dir to adapt")
    parser.add_argument(
        "--domain", required=True, help="train.synth dir of the domain (train.jsonl, test.jsonl)"
    )
    parser.add_argument(
        "--base-test", required=True, help="the base domain's held-out JSONL (train.synth test)"
    )
    parser.add_argument("--limit", type=int, help="use only the first N rows of each test set")
    parser.add_argument("--out", required=True, help="run folders (one per method; replaced)")
    parser.add_argument("--json", help="also write the table and every figure here")
    parser.add_argument("--steps", type=int, help="training steps of every method (default: the configs')")
    parser.add_argument(
        "--batch-size", type=int, help="training batch of every method (default: the configs')"
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=32, help="utterances per decode batch (default 32)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 steps of batch 4, 4 test rows: checks the pieces"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.limit = 2, 4, 4

    from qasr_jax.asr import Qwen3ASRModel

    started = time.monotonic()
    domain = Path(args.domain).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = {
        "domain": demo_eval.read_rows(domain / "test.jsonl", args.limit),
        "base": demo_eval.read_rows(args.base_test, args.limit),
    }
    common = [
        f'model.checkpoint="{Path(args.base).resolve()}"',
        f'data.train_manifest="{domain / "train.jsonl"}"',
        'data.eval_manifest=""',  # the program evaluates on the test sets itself
        "run.log_every=1",  # a record per step: the step times
        "run.progress=false",
    ]
    if args.steps is not None:
        common.append(f"run.steps={args.steps}")
    if args.batch_size is not None:
        common.append(f"data.batch_size={args.batch_size}")

    _say(
        f"base {args.base}: WER on {len(rows['domain'])} domain and {len(rows['base'])} base test utterances"
    )
    base_model = Qwen3ASRModel.from_pretrained(args.base, max_inference_batch_size=args.eval_batch_size,
                                               weights_cache=False)  # fmt: skip
    base_reports = evaluate(base_model, rows)
    entries: list[dict[str, Any]] = [
        {"name": "base (before)", "key": "base", **{k: _summary(v) for k, v in base_reports.items()}}
    ]
    _say(f"base: domain WER {base_reports['domain']['wer']:.2%}, base WER {base_reports['base']['wer']:.2%}")

    for method in METHODS:
        run_dir = out / method.key
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: resuming would skip the timed steps
        run_dir.mkdir(parents=True)
        export = run_dir / "export"
        overrides = [*method.overrides, *common, f'run.output_dir="{run_dir}"', f'run.export_dir="{export}"']
        cfg = load_train_config(method.config, overrides)
        _say(f"{method.name}: {cfg.run.steps} steps of batch {cfg.data.batch_size}, learning rate "
             f"{cfg.optim.learning_rate:g}")  # fmt: skip
        training = train_process(
            [sys.executable, "-m", "train", "--config", str(method.config), *overrides], run_dir / "train.log"
        )
        if training.returncode != 0:
            print(f"error: {method.name} failed (exit {training.returncode}); see {run_dir / 'train.log'}",
                  file=sys.stderr)  # fmt: skip
            return 1
        seconds = step_seconds(run_dir / "metrics.jsonl")
        entry: dict[str, Any] = {
            "name": method.name,
            "key": method.key,
            "config": os.path.relpath(method.config, REPO),
            "overrides": list(method.overrides),
            "trainable_params": trainable_params(cfg),
            "learning_rate": cfg.optim.learning_rate,
            "warmup_steps": cfg.optim.warmup_steps,
            "decay": cfg.optim.decay,
            "steps": cfg.run.steps,
            "batch_size": cfg.data.batch_size,
            "wall_seconds": round(training.wall_seconds, 1),
            "peak_rss_bytes": training.peak_rss_bytes,
            "memory": "peak RSS of the training process (ru_maxrss); JAX on CPU has no device memory statistics",
            "train_loss_tail": tail_loss(run_dir / "metrics.jsonl"),
            "export": str(export),
        }
        if seconds:
            entry["step_seconds_median"] = statistics.median(seconds)
        if training.load_averages:
            entry["load_average"] = statistics.fmean(training.load_averages)
        _say(f"{method.name}: trained in {training.wall_seconds:.0f} s; evaluating")
        if cfg.adapters.enabled:
            base_model.load_adapter(method.key, export)
            reports = evaluate(base_model, rows, adapter=method.key)
        else:
            reports = evaluate(Qwen3ASRModel.from_pretrained(export, max_inference_batch_size=args.eval_batch_size,
                                                             weights_cache=False), rows)  # fmt: skip
        entry.update({k: _summary(v) for k, v in reports.items()})
        entries.append(entry)
        _say(
            f"{method.name}: domain WER {reports['domain']['wer']:.2%}, base WER {reports['base']['wer']:.2%}"
        )

    table = markdown_table(entries)
    print(table)
    result = {
        "base_model": str(Path(args.base).resolve()),
        "domain": str(domain),
        "domain_test": str(domain / "test.jsonl"),
        "base_test": str(Path(args.base_test).resolve()),
        "test_utterances": {k: len(v) for k, v in rows.items()},
        "command": "python -m train.adapt_demo " + " ".join(sys.argv[1:] if argv is None else argv),
        "entries": entries,
        "table": table,
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    _say(f"done in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
