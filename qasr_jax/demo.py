"""The demo models shipped in the repository, and the held-out checks they are held to.

``models/qwen3-asr-demo`` and ``models/qwen3-forced-aligner-demo`` are a small Qwen3-ASR and ForcedAligner of the
released architecture, trained from scratch on synthetic espeak-ng speech in English and German
(``train/synth.py``, ``train/configs/demo_*.toml``). They let the programs run and show real output where no
released checkpoint is at hand; they know only the synthetic corpus' few hundred words.

The checks (``train/evaluate_demo.py`` prints them; ``tests/test_demo.py`` holds the models to them on a freshly
synthesised test set, unseen sentences spoken by unseen voices):

- ASR: word error rate per language (case and punctuation ignored) ≤ 5%, language detection ≥ 98%;
- aligner: mean absolute word-boundary shift ≤ 40 ms, and at least 3× lower than the shift of a simple baseline
  that spreads the words over the speech (first word start to last word end) in proportion to their lengths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

ASR_DIR_NAME = "qwen3-asr-demo"
ALIGNER_DIR_NAME = "qwen3-forced-aligner-demo"
# Overrides for installs where the repository's models/ folder is elsewhere.
ASR_ENV = "QASR_DEMO_MODEL"
ALIGNER_ENV = "QASR_DEMO_ALIGNER"

MAX_WER = 0.05
MIN_LANGUAGE_ACCURACY = 0.98
MAX_BOUNDARY_SHIFT_MS = 40.0
MIN_BASELINE_RATIO = 3.0


def _models_dirs() -> list[Path]:
    """Where models/ may be: next to the package (a source checkout or editable install), then the cwd."""
    return [Path(__file__).resolve().parent.parent / "models", Path.cwd() / "models"]


def _demo_path(env: str, name: str) -> Path:
    override = os.environ.get(env)
    if override:
        return Path(override)
    for models in _models_dirs():
        if (models / name / "config.json").is_file():
            return models / name
    searched = ", ".join(str(m / name) for m in _models_dirs())
    raise FileNotFoundError(f"the demo model {name} is not here (looked in {searched}; set {env} to its dir)")


def default_model_path() -> Path:
    """The demo ASR checkpoint dir (``$QASR_DEMO_MODEL`` when set)."""
    return _demo_path(ASR_ENV, ASR_DIR_NAME)


def default_aligner_path() -> Path:
    """The demo ForcedAligner checkpoint dir (``$QASR_DEMO_ALIGNER`` when set)."""
    return _demo_path(ALIGNER_ENV, ALIGNER_DIR_NAME)


RELEASED = {False: "Qwen/Qwen3-ASR-0.6B", True: "Qwen/Qwen3-ForcedAligner-0.6B"}


def model_or_demo(
    path: str | os.PathLike | None, *, aligner: bool = False, stream: TextIO | None = None
) -> str:
    """``path`` when given; otherwise the demo model's dir, saying so (and how to use a real checkpoint) on
    ``stream`` (default stderr). For the programs' ``--model`` options."""
    if path is not None:
        return os.fspath(path)
    demo_dir = default_aligner_path() if aligner else default_model_path()
    what = "forced aligner" if aligner else "model"
    released = RELEASED[aligner]
    local = released.split("/")[1]
    print(
        f"note: no --model given, using the demo {what} {demo_dir}: a small model trained on synthetic English "
        f"and German espeak-ng speech that knows only its few hundred words. For real speech download a released "
        f"checkpoint (huggingface-cli download {released} --local-dir {local}) and pass --model {local}.",
        file=stream if stream is not None else sys.stderr,
    )
    return os.fspath(demo_dir)


# --------------------------------------------------------------------------------------------------------------
# Held-out rows and metrics


@dataclasses.dataclass(frozen=True)
class HeldOutRow:
    """One manifest row of ``train.synth``: audio path (absolute), transcript, language, exact word times."""

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
            words = tuple((w["text"], float(w["start"]), float(w["end"])) for w in raw["words"])
            rows.append(HeldOutRow(raw["id"], str(base / raw["audio"]), raw["text"], raw["language"], words))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def normalize_words(text: str) -> list[str]:
    """Lower-cased words with everything but letters, digits and apostrophes removed."""
    cleaned = "".join(c if c.isalnum() or c == "'" else " " for c in text.lower())
    return cleaned.split()


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Substitutions + deletions + insertions turning ``reference`` into ``hypothesis`` (Levenshtein)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        current = [i]
        for j, hyp in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


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


def asr_report(model: Any, rows: Sequence[HeldOutRow]) -> dict[str, Any]:
    """WER per language and language-detection accuracy of ``model`` (a ``Qwen3ASRModel``) on ``rows``."""
    results = model.transcribe([row.audio for row in rows])
    per_language: dict[str, dict[str, Any]] = {}
    failures = []
    for row, result in zip(rows, results):
        stats = per_language.setdefault(
            row.language, {"utterances": 0, "words": 0, "errors": 0, "language_ok": 0}
        )
        reference, hypothesis = normalize_words(row.text), normalize_words(result.text)
        errors = word_errors(reference, hypothesis)
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
        "languages": per_language,
        "language_accuracy": sum(s["language_ok"] for s in per_language.values()) / max(total, 1),
        "failures": failures,
    }


def aligner_report(aligner: Any, rows: Sequence[HeldOutRow]) -> dict[str, Any]:
    """Mean absolute word-boundary shift (ms) of ``aligner`` (a ``Qwen3ForcedAligner``) on ``rows`` given their
    reference texts, next to the proportional baseline's."""
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
    mean_ms = 1000.0 * sum(shifts) / max(len(shifts), 1)
    baseline_ms = 1000.0 * sum(baseline) / max(len(baseline), 1)
    return {
        "utterances": len(rows),
        "boundaries": len(shifts),
        "mean_shift_ms": mean_ms,
        "baseline_mean_shift_ms": baseline_ms,
        "baseline_ratio": baseline_ms / max(mean_ms, 1e-9),
        "within_80ms": sum(s <= 0.08 for s in shifts) / max(len(shifts), 1),
        "languages": {k: 1000.0 * sum(v) / len(v) for k, v in per_language.items()},
    }


def missed_bars(asr: dict[str, Any] | None, aligner: dict[str, Any] | None) -> list[str]:
    """The bars a report misses, as sentences (empty when every bar is met)."""
    missed = []
    if asr is not None:
        for language, stats in sorted(asr["languages"].items()):
            if stats["wer"] > MAX_WER:
                missed.append(f"{language} WER {stats['wer']:.2%} > {MAX_WER:.0%}")
        if asr["language_accuracy"] < MIN_LANGUAGE_ACCURACY:
            missed.append(f"language detection {asr['language_accuracy']:.2%} < {MIN_LANGUAGE_ACCURACY:.0%}")
    if aligner is not None:
        if aligner["mean_shift_ms"] > MAX_BOUNDARY_SHIFT_MS:
            missed.append(
                f"aligner mean shift {aligner['mean_shift_ms']:.1f} ms > {MAX_BOUNDARY_SHIFT_MS:g} ms"
            )
        if aligner["baseline_ratio"] < MIN_BASELINE_RATIO:
            missed.append(f"aligner only {aligner['baseline_ratio']:.2f}x better than the baseline")
    return missed


__all__ = [
    "HeldOutRow",
    "aligner_report",
    "asr_report",
    "default_aligner_path",
    "default_model_path",
    "missed_bars",
    "model_or_demo",
    "normalize_words",
    "proportional_times",
    "read_rows",
    "word_errors",
]
