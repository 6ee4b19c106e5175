"""The held-out checks the demo models are held to, and the reports that measure them.

The goal (``GOAL``):

- ASR on unseen sentences spoken by unseen voice variants, voiced word by word: word error rate overall and per
  language ≤ 5%; language identification ≥ 98%;
- ASR on unseen sentences spoken in one go (continuous speech): word error rate ≤ 10%;
- aligner: mean absolute word-boundary shift ≤ 40 ms and ≥ 90% of boundaries within 80 ms of the exact times,
  next to a baseline that spreads the words over the speech in proportion to their lengths.

The floor below which no demo model ships (``FLOOR``): word error rate ≤ 10% word by word (overall and per
language) and ≤ 20% continuous, language identification ≥ 95%; the aligner's word boundaries closer to the exact
times, on average, than the proportional baseline's.

Word error rates use the one normalisation and edit distance of ``qasr_jax.training.evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qasr_jax.training.evaluate import edit_distance, normalize_text

MAX_WER = 0.05
MAX_CONTINUOUS_WER = 0.10
MIN_LANGUAGE_ACCURACY = 0.98
MAX_BOUNDARY_SHIFT_MS = 40.0
MIN_WITHIN_80MS = 0.90


@dataclasses.dataclass(frozen=True)
class Bars:
    """One set of held-out bars."""

    max_wer: float
    max_continuous_wer: float
    min_language_accuracy: float
    max_boundary_shift_ms: float | None = MAX_BOUNDARY_SHIFT_MS  # None: below the baseline's mean shift
    min_within_80ms: float | None = MIN_WITHIN_80MS  # None: no bar


GOAL = Bars(MAX_WER, MAX_CONTINUOUS_WER, MIN_LANGUAGE_ACCURACY)
FLOOR = Bars(0.10, 0.20, 0.95, max_boundary_shift_ms=None, min_within_80ms=None)


@dataclasses.dataclass(frozen=True)
class HeldOutRow:
    """One manifest row of ``train.synth``: audio path (absolute), transcript, language, exact word times (none
    for continuous speech)."""

    id: str
    audio: str
    text: str
    language: str
    words: tuple[tuple[str, float, float], ...]


def read_rows(manifest: str | os.PathLike, limit: int | None = None) -> list[HeldOutRow]:
    """The rows of a ``train.synth`` manifest (audio paths resolved against the manifest's directory)."""
    base = Path(manifest).resolve().parent
    rows = []
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            raw = json.loads(line)
            words = tuple((w["text"], float(w["start"]), float(w["end"])) for w in raw.get("words", ()))
            rows.append(HeldOutRow(raw["id"], str(base / raw["audio"]), raw["text"], raw["language"], words))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def proportional_times(
    words: Sequence[str], speech_start: float, speech_end: float
) -> list[tuple[float, float]]:
    """The baseline alignment: ``words`` laid end to end over [speech_start, speech_end], each taking a share
    proportional to its number of characters."""
    lengths = [max(len(w), 1) for w in words]
    total = sum(lengths)
    times, cursor = [], speech_start
    for n in lengths:
        end = cursor + (speech_end - speech_start) * n / total
        times.append((cursor, end))
        cursor = end
    return times


def _boundary_shifts(
    predicted: Iterable[tuple[float, float]], reference: Iterable[tuple[float, float]]
) -> list[float]:
    return [abs(p - r) for (ps, pe), (rs, re) in zip(predicted, reference) for p, r in ((ps, rs), (pe, re))]


def asr_report(model: Any, rows: Sequence[HeldOutRow], adapter: str | None = None) -> dict[str, Any]:
    """WER (overall and per language) and language identification of ``model`` (a ``Qwen3ASRModel``), with one
    of its loaded adapters (``adapter``; None: the base model)."""
    results = model.transcribe([row.audio for row in rows], adapter=adapter)
    per_language: dict[str, dict[str, Any]] = {}
    failures = []
    for row, result in zip(rows, results):
        stats = per_language.setdefault(
            row.language, {"utterances": 0, "words": 0, "errors": 0, "language_ok": 0}
        )
        reference, hypothesis = normalize_text(row.text).split(), normalize_text(result.text).split()
        errors = edit_distance(reference, hypothesis)
        stats["utterances"] += 1
        stats["words"] += len(reference)
        stats["errors"] += errors
        stats["language_ok"] += int(result.language == row.language)
        if errors or result.language != row.language:
            failures.append({"id": row.id, "reference": row.text, "language": row.language,
                             "hypothesis": result.text, "detected": result.language})  # fmt: skip
    for stats in per_language.values():
        stats["wer"] = stats["errors"] / max(stats["words"], 1)
        stats["language_accuracy"] = stats["language_ok"] / max(stats["utterances"], 1)
    total = len(rows)
    return {
        "utterances": total,
        "wer": sum(s["errors"] for s in per_language.values())
        / max(sum(s["words"] for s in per_language.values()), 1),
        "languages": per_language,
        "language_accuracy": sum(s["language_ok"] for s in per_language.values()) / max(total, 1),
        "failures": failures,
    }


def aligner_report(aligner: Any, rows: Sequence[HeldOutRow]) -> dict[str, Any]:
    """Word-boundary shifts (ms) of ``aligner`` (a ``Qwen3ForcedAligner``) on ``rows`` given their reference texts,
    next to the proportional baseline's."""
    rows = [row for row in rows if row.words]
    results = aligner.align(
        [row.audio for row in rows], [row.text for row in rows], [row.language for row in rows]
    )
    shifts: list[float] = []
    baseline: list[float] = []
    per_language: dict[str, list[float]] = {}
    for row, result in zip(rows, results):
        if not result.ok or [item.text for item in result] != [w for w, _, _ in row.words]:
            raise ValueError(
                f"{row.id}: the aligner returned {list(result)} for {row.text!r} ({result.error})"
            )
        reference = [(s, e) for _, s, e in row.words]
        row_shifts = _boundary_shifts([(i.start_time, i.end_time) for i in result], reference)
        shifts += row_shifts
        per_language.setdefault(row.language, []).extend(row_shifts)
        spread = proportional_times([w for w, _, _ in row.words], reference[0][0], reference[-1][1])
        baseline += _boundary_shifts(spread, reference)
    n, nb = max(len(shifts), 1), max(len(baseline), 1)
    return {
        "utterances": len(rows),
        "boundaries": len(shifts),
        "mean_shift_ms": 1000.0 * sum(shifts) / n,
        "within_80ms": sum(s <= 0.08 for s in shifts) / n,
        "baseline_mean_shift_ms": 1000.0 * sum(baseline) / nb,
        "baseline_within_80ms": sum(s <= 0.08 for s in baseline) / nb,
        "languages": {k: 1000.0 * sum(v) / len(v) for k, v in per_language.items()},
    }


def missed_bars(
    asr: dict[str, Any] | None,
    aligner: dict[str, Any] | None,
    continuous: dict[str, Any] | None = None,
    bars: Bars = GOAL,
) -> list[str]:
    """The bars (``GOAL`` or ``FLOOR``) the reports miss, as sentences (empty when every bar is met)."""
    missed = []
    min_language = bars.min_language_accuracy
    for name, report, bar in (
        ("ASR", asr, bars.max_wer),
        ("continuous ASR", continuous, bars.max_continuous_wer),
    ):
        if report is None:
            continue
        if report["wer"] > bar:
            missed.append(f"{name} WER {report['wer']:.2%} > {bar:.0%}")
        for language, stats in sorted(report["languages"].items()):
            if stats["wer"] > bar:
                missed.append(f"{name} {language} WER {stats['wer']:.2%} > {bar:.0%}")
        if report["language_accuracy"] < min_language:
            missed.append(
                f"{name} language identification {report['language_accuracy']:.2%} < {min_language:.0%}"
            )
    if aligner is not None:
        if bars.max_boundary_shift_ms is None:
            if aligner["mean_shift_ms"] >= aligner["baseline_mean_shift_ms"]:
                missed.append(
                    f"aligner mean shift {aligner['mean_shift_ms']:.1f} ms >= the proportional baseline's "
                    f"{aligner['baseline_mean_shift_ms']:.1f} ms"
                )
        elif aligner["mean_shift_ms"] > bars.max_boundary_shift_ms:
            missed.append(
                f"aligner mean shift {aligner['mean_shift_ms']:.1f} ms > {bars.max_boundary_shift_ms:g} ms"
            )
        if bars.min_within_80ms is not None and aligner["within_80ms"] < bars.min_within_80ms:
            missed.append(
                f"aligner {aligner['within_80ms']:.1%} of boundaries within 80 ms < {bars.min_within_80ms:.0%}"
            )
    return missed


__all__ = [
    "FLOOR",
    "GOAL",
    "Bars",
    "HeldOutRow",
    "aligner_report",
    "asr_report",
    "missed_bars",
    "proportional_times",
    "read_rows",
]
