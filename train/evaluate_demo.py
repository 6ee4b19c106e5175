"""The demo models' held-out report: WER and language identification, aligner boundary shifts vs a baseline.

    python -m train.evaluate_demo --manifest data/demo/test.jsonl \
        [--continuous-manifest data/demo/test_continuous.jsonl] \
        [--asr models/qwen3-asr-demo] [--aligner models/qwen3-forced-aligner-demo] [--json report.json]

The manifests are ``train.synth`` test splits (sentences and voices never used in training): ``--manifest``
voiced word by word with exact word times (ASR and aligner), ``--continuous-manifest`` spoken in one go (ASR).
Without --asr or --aligner the shipped demo models are evaluated. Prints the report and the bars
(``train.demo_eval``); exits 1 when a bar is missed (unless --no-fail).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from qasr_jax import demo
from train import demo_eval


def print_asr(name: str, report: dict[str, Any]) -> None:
    for language, stats in sorted(report["languages"].items()):
        print(f"{name} {language}: WER {stats['wer']:.2%} ({stats['errors']}/{stats['words']} words, "
              f"{stats['utterances']} utterances), language identification {stats['language_accuracy']:.2%}")  # fmt: skip
    print(
        f"{name} overall: WER {report['wer']:.2%}, language identification {report['language_accuracy']:.2%}"
    )
    for failure in report["failures"][:8]:
        print(
            f"  {failure['id']}: {failure['reference']!r} -> {failure['detected']}: {failure['hypothesis']!r}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--manifest", required=True, help="held-out JSONL written by python -m train.synth")
    parser.add_argument("--continuous-manifest", help="held-out JSONL of continuous speech (ASR only)")
    parser.add_argument("--asr", help="ASR checkpoint dir (default: the shipped demo model)")
    parser.add_argument("--aligner", help="ForcedAligner checkpoint dir (default: the shipped demo aligner)")
    parser.add_argument("--skip-asr", action="store_true", help="evaluate the aligner only")
    parser.add_argument("--skip-aligner", action="store_true", help="evaluate the ASR model only")
    parser.add_argument("--limit", type=int, help="use only the first N rows of each manifest")
    parser.add_argument("--batch-size", type=int, default=32, help="utterances per batch (default 32)")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when a bar is missed")
    args = parser.parse_args(argv)

    from qasr_jax.aligner import Qwen3ForcedAligner
    from qasr_jax.asr import Qwen3ASRModel

    rows = demo_eval.read_rows(args.manifest, args.limit)
    continuous_rows = (
        demo_eval.read_rows(args.continuous_manifest, args.limit) if args.continuous_manifest else []
    )
    report: dict = {"manifest": args.manifest, "utterances": len(rows),
                    "continuous_manifest": args.continuous_manifest, "continuous_utterances": len(continuous_rows)}  # fmt: skip
    asr = aligner = continuous = None
    if not args.skip_asr:
        path = args.asr or demo.default_model_path()
        started = time.monotonic()
        model = Qwen3ASRModel.from_pretrained(path, max_inference_batch_size=args.batch_size)
        asr = demo_eval.asr_report(model, rows)
        asr["model"], asr["seconds"] = str(path), round(time.monotonic() - started, 1)
        print_asr("ASR", asr)
        report["asr"] = asr
        if continuous_rows:
            continuous = demo_eval.asr_report(model, continuous_rows)
            print_asr("ASR continuous", continuous)
            report["asr_continuous"] = continuous
    if not args.skip_aligner:
        path = args.aligner or demo.default_aligner_path()
        started = time.monotonic()
        aligner = demo_eval.aligner_report(
            Qwen3ForcedAligner.from_pretrained(path, max_batch_size=args.batch_size), rows
        )
        aligner["model"], aligner["seconds"] = str(path), round(time.monotonic() - started, 1)
        print(f"aligner: mean |boundary shift| {aligner['mean_shift_ms']:.1f} ms over {aligner['boundaries']} "
              f"boundaries ({aligner['within_80ms']:.1%} within 80 ms); proportional baseline "
              f"{aligner['baseline_mean_shift_ms']:.1f} ms ({aligner['baseline_within_80ms']:.1%} within 80 ms)")  # fmt: skip
        report["aligner"] = aligner
    missed = demo_eval.missed_bars(asr, aligner, continuous)
    report["missed_bars"] = missed
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
    print("bars: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
