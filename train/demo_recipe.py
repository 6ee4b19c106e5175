"""Reproduce the shipped demo models from scratch: synthesis, initial weights, the ASR stages, the aligner,
held-out evaluation and export to models/.

    python -m train.demo_recipe [--data data/demo] [--runs data/runs] [--models models] [--workers 2]

Stages (each one's wall time is recorded in ``<data>/recipe.json``; rerunning the command skips finished stages
and resumes an interrupted training stage from its newest checkpoint):

1. ``synth``: espeak-ng speech (``train.synth``): single words, sentences and phrases voiced word by word with
   exact word times, sentences spoken in one go (continuous), and the held-out val/test splits (unseen sentences,
   unseen voice variants) in both styles;
2. ``init``: the tokenizer-bearing checkpoint dirs and seeded initial weights (``train.demo_init``);
3. ``asr_ctc`` (A): the encoder learns to hear: CTC and per-frame targets, decoder skipped
   (``train/configs/demo_asr_ctc.toml``); its gates stop the recipe if the audio is not used by step 1,000;
4. ``asr_decoder`` (B): the decoder learns to write, encoder frozen (``demo_asr_decoder.toml``);
5. ``asr`` (C): everything together at a low learning rate (``demo_asr.toml``);
6. ``asr_voices`` (D): C goes on with augmented features (spectra stretched as by other vocal tracts,
   SpecAugment masks), to hear voices unlike the training voices (``demo_asr_voices.toml``);
7. ``aligner``: the aligner starts from the trained ASR model and learns the exact word times
   (``train/configs/demo_aligner.toml``);
8. ``evaluate``: the held-out report (``train.evaluate_demo``) on both test manifests;
9. ``export``: the fp32 exports copied to ``<models>/qwen3-asr-demo`` and ``<models>/qwen3-forced-aligner-demo``
   with a model card each.

A finished training stage's export is also copied to ``<stages>/<stage>`` (``train/stages`` by default, small
enough to commit); a recipe started where that copy exists takes it instead of training the stage again, so an
interrupted recipe goes on from its last finished stage on any machine.

Every count and path of the recipe is a constant here or an option, so the shipped models are one command away.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qasr_jax import demo as demo_paths

SYNTH_COUNTS = {
    "train": 8000,  # word-by-word sentences (30% short phrases), exact word times: ASR and aligner
    "train-continuous": 8000,  # sentences spoken in one go: ASR
    "words": 6000,  # single words: the first ASR stage
    "val": 200,
    "val-continuous": 100,
    "test": 400,
    "test-continuous": 400,
}
SEED = 0
CONFIGS = Path(__file__).resolve().parent / "configs"
STAGES = ("synth", "init", "asr_ctc", "asr_decoder", "asr", "asr_voices", "aligner", "evaluate", "export")
# Training stages: (config file, run name).
TRAINING = {
    "asr_ctc": ("demo_asr_ctc.toml", "demo_asr_ctc"),
    "asr_decoder": ("demo_asr_decoder.toml", "demo_asr_decoder"),
    "asr": ("demo_asr.toml", "demo_asr"),
    "asr_voices": ("demo_asr_voices.toml", "demo_asr_voices"),
    "aligner": ("demo_aligner.toml", "demo_aligner"),
}
STAGE_EXPORTS = Path(__file__).resolve().parent / "stages"
FINAL_ASR = "asr_voices"  # the ASR stage whose model is shipped (and the aligner starts from)


def run(command: Sequence[str], log: Path) -> None:
    """Run a program of this repository, its output appended to ``log`` and echoed; fail loudly."""
    print("$ " + " ".join(command), flush=True)
    with open(log, "a", encoding="utf-8") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        sink.flush()
        process = subprocess.Popen(
            [sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            sink.write(line)
            if "Warning" not in line:
                sys.stdout.write(line)
                sys.stdout.flush()
        if process.wait() != 0:
            raise SystemExit(
                f"stage command failed (exit {process.returncode}): {' '.join(command)}; see {log}"
            )


def combine_manifests(parts: Sequence[Path], out: Path) -> None:
    """Concatenate JSONL manifests of one directory into ``out`` (written atomically)."""
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as sink:
        for part in parts:
            sink.write(part.read_text(encoding="utf-8"))
    os.replace(tmp, out)


class Recipe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.data = Path(args.data)
        self.runs = Path(args.runs)
        self.models = Path(args.models)
        self.stages = Path(args.stages)
        self.workers = args.workers
        self.smoke = args.smoke
        self.counts = (
            {name: max(count // 200, 8) for name, count in SYNTH_COUNTS.items()}
            if self.smoke
            else SYNTH_COUNTS
        )
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = self.data / "recipe.log"
        self.state_file = self.data / "recipe.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_file.read_text()) if self.state_file.exists() else {"stages": {}}
        )

    def save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2) + "\n")

    def train_overrides(self, name: str) -> list[str]:
        out = self.runs / name
        overrides = [f'run.output_dir="{out}"', f'run.export_dir="{out / "export"}"']
        if self.smoke:
            # One evaluation batch (the smoke's 16 validation utterances): each evaluation program compiles once.
            overrides += ["run.steps=2", "run.eval_every=2", "run.save_every=2", "data.eval_batch_size=16"]
        return overrides

    # -- stages --

    def synth(self) -> None:
        counts = [f"--{name}={count}" for name, count in self.counts.items()]
        run(["-m", "train.synth", "--out", str(self.data), f"--seed={SEED}", f"--workers={self.workers}",
             *counts], self.log)  # fmt: skip
        d = self.data
        combine_manifests([d / "train.jsonl", d / "train_continuous.jsonl"], d / "train_asr.jsonl")
        combine_manifests(
            [d / "words.jsonl", d / "train.jsonl", d / "train_continuous.jsonl"], d / "train_ctc.jsonl"
        )
        combine_manifests([d / "val.jsonl", d / "val_continuous.jsonl"], d / "val_all.jsonl")

    def init(self) -> None:
        run(["-m", "train.demo_init", "--init-weights", str(self.data)], self.log)

    def train_stage(self, stage: str, checkpoint: Path, train: str, evaluation: str = "val_all") -> None:
        config, name = TRAINING[stage]
        run(["-m", "train", "--config", str(CONFIGS / config), f'model.checkpoint="{checkpoint}"',
             f'data.train_manifest="{self.data / f"{train}.jsonl"}"',
             f'data.eval_manifest="{self.data / f"{evaluation}.jsonl"}"', *self.train_overrides(name)], self.log)  # fmt: skip

    def export_dir(self, stage: str) -> Path:
        return self.runs / TRAINING[stage][1] / "export"

    def asr_ctc(self) -> None:
        self.train_stage("asr_ctc", self.data / "asr_init", "train_ctc")

    def asr_decoder(self) -> None:
        self.train_stage("asr_decoder", self.export_dir("asr_ctc"), "train_asr")

    def asr(self) -> None:
        self.train_stage("asr", self.export_dir("asr_decoder"), "train_asr")

    def asr_voices(self) -> None:
        self.train_stage("asr_voices", self.export_dir("asr"), "train_asr")

    def aligner(self) -> None:
        if not (self.data / "aligner_init" / "model.safetensors").exists() or not self.state.get(
            "aligner_init"
        ):
            run(["-m", "train.demo_init", "--init-weights", str(self.data),
                 "--aligner-from", str(self.export_dir(FINAL_ASR))], self.log)  # fmt: skip
            self.state["aligner_init"] = True
            self.save()
        self.train_stage("aligner", self.data / "aligner_init", "train", "val")

    def evaluate(self) -> None:
        asr = str(self.export_dir(FINAL_ASR))
        aligner = str(self.export_dir("aligner"))
        run(["-m", "train.evaluate_demo", "--manifest", str(self.data / "test.jsonl"),
             "--continuous-manifest", str(self.data / "test_continuous.jsonl"),
             "--asr", asr, "--aligner", aligner, "--json", str(self.data / "heldout.json"),
             "--no-fail"], self.log)  # fmt: skip

    def export(self) -> None:
        report = json.loads((self.data / "heldout.json").read_text())
        for kind, stage in (("asr", FINAL_ASR), ("aligner", "aligner")):
            source = self.export_dir(stage)
            target = self.models / demo_paths.DIR_NAMES[kind]
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            (tmp / "README.md").write_text(model_card(kind, report, self.state, self.runs), encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            print(f"{target}: {sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB", flush=True)

    def __call__(self, only: Sequence[str]) -> None:
        self.state.setdefault(
            "machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        )
        for stage in STAGES:
            if only and stage not in only:
                continue
            done = self.state["stages"].get(stage)
            if done and done.get("done") and not only:
                print(f"[{stage}] done in an earlier run ({done.get('seconds', 0):.0f} s)", flush=True)
                continue
            kept = self.stages / stage
            later = (
                [s for s in list(TRAINING)[list(TRAINING).index(stage) + 1 :] if s != "aligner"]
                if stage in TRAINING
                else []
            )
            if (
                stage in TRAINING
                and not only
                and not self.smoke
                and any((self.stages / s / "model.safetensors").exists() for s in later)
                and stage != "aligner"
            ):
                # A later ASR stage's export is kept: this stage fed it and need not run again.
                self.state["stages"][stage] = {"done": True, "superseded_by": str(self.stages)}
                self.save()
                print(f"[{stage}] skipped: a later stage's export is kept in {self.stages}", flush=True)
                continue
            if stage in TRAINING and (kept / "model.safetensors").exists() and not only and not self.smoke:
                # A finished stage's committed export: take it instead of training the stage again.
                shutil.rmtree(self.export_dir(stage), ignore_errors=True)
                shutil.copytree(kept, self.export_dir(stage))
                record = (
                    json.loads((kept / "stage.json").read_text()) if (kept / "stage.json").exists() else {}
                )
                self.state["stages"][stage] = {**record, "done": True, "from": str(kept)}
                self.save()
                print(f"[{stage}] taken from {kept}", flush=True)
                continue
            print(f"[{stage}] starting (load average {os.getloadavg()[0]:.2f})", flush=True)
            started = time.monotonic()
            getattr(self, stage)()
            seconds = time.monotonic() - started
            self.state["stages"][stage] = {"done": True, "seconds": round(seconds, 1)}
            self.save()
            if stage in TRAINING and not self.smoke:
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(self.export_dir(stage), kept)
                (kept / "stage.json").write_text(json.dumps(self.state["stages"][stage]) + "\n")
            print(f"[{stage}] done in {seconds:.0f} s", flush=True)
        total = sum(s.get("seconds", 0.0) for s in self.state["stages"].values())
        print(f"recipe: {total / 60:.1f} min of wall time over all stages", flush=True)


def _table(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def heldout_table(report: dict[str, Any]) -> str:
    """The held-out results as a Markdown table, the goal and the floor (below which no model ships) beside them."""
    from train import demo_eval

    goal, floor = demo_eval.GOAL, demo_eval.FLOOR
    rows = [["metric", "measured", "goal", "floor"]]
    asr, cont, ali = report.get("asr"), report.get("asr_continuous"), report.get("aligner")
    for name, stats, key in (
        ("word-by-word test set", asr, "max_wer"),
        ("continuous speech", cont, "max_continuous_wer"),
    ):
        if not stats:
            continue
        bar = [f"≤ {getattr(goal, key):.0%}", f"≤ {getattr(floor, key):.0%}"]
        rows.append([f"ASR WER, {name}", f"{stats['wer']:.2%}", *bar])
        for language, per in sorted(stats["languages"].items()):
            rows.append([f"ASR WER, {name}, {language}", f"{per['wer']:.2%}", *bar])
        rows.append([f"language identification, {name}", f"{stats['language_accuracy']:.2%}",
                     f"≥ {goal.min_language_accuracy:.0%}", f"≥ {floor.min_language_accuracy:.0%}"])  # fmt: skip
    if ali:

        def shift_bar(bars: demo_eval.Bars) -> str:
            if bars.max_boundary_shift_ms is None:
                return "< the baseline's"
            return f"≤ {bars.max_boundary_shift_ms:g} ms"

        def within_bar(bars: demo_eval.Bars) -> str:
            return "" if bars.min_within_80ms is None else f"≥ {bars.min_within_80ms:.0%}"

        rows.append(["aligner mean word-boundary shift", f"{ali['mean_shift_ms']:.1f} ms", shift_bar(goal),
                     shift_bar(floor)])  # fmt: skip
        rows.append(["aligner boundaries within 80 ms", f"{ali['within_80ms']:.1%}", within_bar(goal),
                     within_bar(floor)])  # fmt: skip
        rows.append(["proportional baseline: mean shift", f"{ali['baseline_mean_shift_ms']:.1f} ms", "", ""])
        rows.append(["proportional baseline: within 80 ms", f"{ali['baseline_within_80ms']:.1%}", "", ""])
    return _table(rows)


def config_text(config: Any) -> str:
    a, t = config.audio, config.text
    text = (
        f"Encoder: d_model {a.d_model}, {a.encoder_layers} layers, {a.encoder_attention_heads} heads, ffn "
        f"{a.encoder_ffn_dim}, conv channels {a.downsample_hidden_size}, {a.num_mel_bins} mel bins, attention "
        f"windows of {a.window_chunks} s. Decoder: hidden {t.hidden_size}, {t.num_hidden_layers} layers, "
        f"{t.num_attention_heads} query / {t.num_key_value_heads} kv heads, head_dim {t.head_dim}, ffn "
        f"{t.intermediate_size}; an own byte-level BPE vocabulary of {t.vocab_size} ids (the special tokens keep "
        "their names; their ids are in config.json and the tokenizer files)."
    )
    if config.is_aligner:
        text += f" Head: {config.classify_num} classes of {config.timestamp_segment_time:g} ms."
    return text


# Per training stage: the evaluation metrics its model card shows (name in the metrics log, column title, format).
STAGE_METRICS = {
    "asr_ctc": (("ctc_wer", "greedy CTC WER", "{:.1%}"), ("ctc", "val CTC per label", "{:.3f}"),
                ("rolled_ctc", "same, audio rolled by a row", "{:.3f}"), ("ctc_gap_ratio", "audio-use gap", "{:.0%}")),
    "asr_decoder": (("wer", "greedy WER", "{:.1%}"), ("language_accuracy", "language ID", "{:.1%}"),
                    ("text_ce", "transcript CE", "{:.3f}"), ("text_ce_gap", "CE gap, audio rolled", "{:.3f}")),
    "asr": (("wer", "greedy WER", "{:.1%}"), ("language_accuracy", "language ID", "{:.1%}"),
            ("ctc_wer", "greedy CTC WER", "{:.1%}"), ("text_ce_gap", "CE gap, audio rolled", "{:.3f}")),
    "asr_voices": (("wer", "greedy WER", "{:.1%}"), ("language_accuracy", "language ID", "{:.1%}"),
                   ("ctc_wer", "greedy CTC WER", "{:.1%}"), ("text_ce_gap", "CE gap, audio rolled", "{:.3f}")),
    "aligner": (("boundary_shift_ms", "mean boundary shift (ms)", "{:.1f}"),),
}  # fmt: skip


def stage_tables(runs: Path) -> str:
    """Each training stage's evaluations on the validation set (val + val-continuous), as Markdown tables."""
    from qasr_jax.training.metrics import read_metrics

    parts = []
    for stage, columns in STAGE_METRICS.items():
        log = runs / TRAINING[stage][1] / "metrics.jsonl"
        if not log.exists():
            continue
        rows = [["step", *(title for _, title, _ in columns)]]
        for record in read_metrics(log, "eval"):
            rows.append(
                [
                    str(record["step"]),
                    *(fmt.format(record[key]) if key in record else "" for key, _, fmt in columns),
                ]
            )
        parts.append(f"{stage} ({TRAINING[stage][0]}):\n\n{_table(rows)}")
    return "\n\n".join(parts)


def model_card(kind: str, report: dict[str, Any], state: dict[str, Any], runs: Path | None = None) -> str:
    from train import demo_init

    config = demo_init.asr_config() if kind == "asr" else demo_init.aligner_config()
    stages = state["stages"]
    times = _table([["stage", "wall time (min)"]]
                   + [[name, f"{s.get('seconds', 0) / 60:.1f}"] for name, s in stages.items() if name != "export"])  # fmt: skip
    what = (
        "a Qwen3-ASR model (transcription with language identification)"
        if kind == "asr"
        else "a Qwen3-ForcedAligner model (word timestamps for a given transcript)"
    )
    counts = ", ".join(f"{k} {v}" for k, v in state.get("counts", SYNTH_COUNTS).items())
    from train import synth

    words = len(set().union(*(synth.vocabulary(language) for language in synth.LANGUAGES)))
    validation = stage_tables(runs) if runs is not None else ""
    return f"""# {demo_paths.DIR_NAMES[kind]}

A small demo of {what} with the released architecture and checkpoint layout (config.json, model.safetensors in
fp32, tokenizer and processor files): the official `qwen-asr` package loads it as it loads a released
checkpoint. It was trained from scratch on synthetic espeak-ng speech in **English and German only** and knows
only the {words} word forms of its grammar (`train/synth.py`): it lets the programs run and show real output on a
machine without a released checkpoint. For real speech use Qwen/Qwen3-ASR-0.6B or Qwen/Qwen3-ForcedAligner-0.6B.

## Data
`python -m train.synth` (seed {SEED}; {counts}): sentences of a small grammar, voiced by espeak-ng voice
variants at random speed, pitch and pitch range, with random pauses, silence, gain and noise (white, pink, brown,
mains hum; 15-40 dB SNR). Training sentences are voiced word by word (exact word times) or in one go
(continuous speech). Test sentences and test voice variants are never seen in training (sentences split by a
hash of their text, voice variants by name).

## Config
{config_text(config)}

## Recipe
`python -m train.demo_recipe` (all stages; rerunning resumes). Measured wall time on {state.get("machine")}:

{times}

Validation during training (`metrics.jsonl` of each run; the audio-use gap is how much worse the CTC loss gets
when each row hears the next row's audio):

{validation}

## Held-out results
`python -m train.evaluate_demo --manifest data/demo/test.jsonl --continuous-manifest data/demo/test_continuous.jsonl`
({report.get("utterances", "?")} word-by-word and {report.get("continuous_utterances", "?")} continuous test
utterances):

{heldout_table(report)}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo_recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--data", default="data/demo", help="synthetic data and recipe state (default data/demo)"
    )
    parser.add_argument("--runs", default="data/runs", help="training runs (default data/runs)")
    parser.add_argument("--models", default="models", help="where the finished models go (default models)")
    parser.add_argument("--stages", default=str(STAGE_EXPORTS),
                        help="where finished stages' exports are kept and taken from (default train/stages)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="synthesis processes")
    parser.add_argument(
        "--smoke", action="store_true", help="a few utterances and two steps per stage (checks the plumbing)"
    )
    parser.add_argument("--only", default="", help=f"comma-separated stages to (re)run: {', '.join(STAGES)}")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STAGES]
    if unknown:
        parser.error(f"--only: unknown stages {unknown}; choose from {', '.join(STAGES)}")
    Recipe(args)(only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
