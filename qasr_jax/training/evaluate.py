"""Held-out evaluation: loss, WER/CER of greedy transcripts, and the aligner's word-boundary shift.

Transcripts are decoded with the inference engine (``qasr_jax.engine``, params passed per call) on the training
mesh, from the same prompt inference builds, and parsed with the official output rules. Before scoring, text is
normalised the way ASR benchmarks score (Whisper's basic normaliser: case-folded, bracketed asides dropped,
punctuation and symbols to spaces, whitespace collapsed). Languages written without spaces between words
(Chinese, Cantonese, Japanese, Korean, Thai) are scored by character error rate, the others by word error
rate; both are corpus-level (total edits / total reference units).

The aligner's boundary shift is the mean absolute difference, in milliseconds, between the predicted word
boundaries (argmax class × segment time, repaired to be monotonic as the aligner does) and the manifest's.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from qasr_jax import audio as audio_io
from qasr_jax import buckets, sharding
from qasr_jax import text as text_io
from qasr_jax.engine import DecodeOptions, DecodeRequest, Engine
from qasr_jax.training import losses
from qasr_jax.training.data import Batch, BatchLoader, Example, Shapes, eval_specs, load_samples
from qasr_jax.training.step import Trainer

CHARACTER_LANGUAGES = frozenset({"Chinese", "Cantonese", "Japanese", "Korean", "Thai"})

_BRACKETED = re.compile(r"[<\[][^>\]]*[>\]]|\([^)]*\)")


def normalize_text(text: str) -> str:
    """Benchmark normalisation: NFKC, case-folded, ``[..]``/``<..>``/``(..)`` removed, marks, punctuation and
    symbols replaced by spaces (apostrophes inside words kept), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _BRACKETED.sub(" ", text)
    kept = []
    for i, char in enumerate(text):
        category = unicodedata.category(char)
        inner_apostrophe = (
            char == "'" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
        )
        if category[0] in "MSP" and not inner_apostrophe:
            kept.append(" ")
        else:
            kept.append(char)
    return " ".join("".join(kept).split())


def scoring_units(text: str, language: str | None) -> list[str]:
    """The units errors are counted in: characters (no spaces) for CHARACTER_LANGUAGES, else words."""
    normalized = normalize_text(text)
    if language in CHARACTER_LANGUAGES:
        return [c for c in normalized if not c.isspace()]
    return normalized.split()


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (substitutions, insertions, deletions cost 1)."""
    if not reference:
        return len(hypothesis)
    if not hypothesis:
        return len(reference)
    ref = list(reference)
    previous = np.arange(len(ref) + 1)
    for i, token in enumerate(hypothesis, start=1):
        substitution = previous[:-1] + np.asarray([r != token for r in ref], dtype=np.int64)
        current = np.empty_like(previous)
        current[0] = i
        best = np.minimum(substitution, previous[1:] + 1)
        # Deletions run left to right: current[j] = min(best[j-1], current[j-1] + 1).
        for j in range(1, len(ref) + 1):
            current[j] = min(best[j - 1], current[j - 1] + 1)
        previous = current
    return int(previous[-1])


@dataclasses.dataclass
class ErrorCounts:
    """Corpus-level edit counts per scoring unit."""

    word_edits: int = 0
    words: int = 0
    char_edits: int = 0
    chars: int = 0

    def add(self, reference: str, hypothesis: str, language: str | None) -> None:
        ref, hyp = scoring_units(reference, language), scoring_units(hypothesis, language)
        if language in CHARACTER_LANGUAGES:
            self.char_edits += edit_distance(ref, hyp)
            self.chars += len(ref)
        else:
            self.word_edits += edit_distance(ref, hyp)
            self.words += len(ref)

    def rates(self) -> dict[str, float]:
        out = {}
        if self.words:
            out["wer"] = self.word_edits / self.words
        if self.chars:
            out["cer"] = self.char_edits / self.chars
        return out


def boundary_shift_ms(
    predicted_classes: Sequence[int], words: Sequence[Any], segment_ms: float
) -> np.ndarray:
    """|predicted − reference| per boundary (start, end of each word) in ms; predictions repaired as inference."""
    predicted = np.asarray(text_io.repair_timestamps(np.asarray(predicted_classes, np.float64) * segment_ms))
    reference = np.asarray([t * 1000.0 for w in words for t in (w.start, w.end)])
    return np.abs(predicted - reference)


def label_words(tokenizer: text_io.Tokenizer, ids: Sequence[int]) -> list[str]:
    """CTC labels (``Tokenization.ctc_labels``) back to words: a word starts at a piece spelt with a leading
    space ("Ġ") or at a digit after a non-digit (numbers lose their lone space piece in the labels)."""
    groups: list[list[int]] = []
    previous_digit = False
    for token in ids:
        piece = tokenizer.id_to_token(int(token)) or ""
        digit = piece[:1].isdigit()
        if not groups or piece.startswith("Ġ") or (digit and not previous_digit):
            groups.append([])
        groups[-1].append(int(token))
        previous_digit = digit
    words = (tokenizer.decode(g, skip_special_tokens=True).strip() for g in groups)
    return [w for w in words if w]


class Evaluator:
    """Evaluates params on a held-out set of examples (every process loads whole batches; they are small)."""

    def __init__(
        self,
        trainer: Trainer,
        examples: Sequence[Example],
        loader: BatchLoader,
        shapes: Shapes,
        batch_size: int,
        objective: str,
        tokenizer: text_io.Tokenizer,
        max_new_tokens: int = 64,
        transcribe: bool = True,
    ) -> None:
        """``transcribe``: decode greedy transcripts for WER (off while the decoder is not trained). ASR sets
        also get the audio-use gauge and the greedy CTC WER (``audio_use``)."""
        self.trainer = trainer
        self.examples = list(examples)
        self.loader = loader
        self.specs = eval_specs(self.examples, shapes, batch_size)
        self.batch_size = batch_size
        self.objective = objective
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.decode_transcripts = transcribe
        self.options = DecodeOptions(eos_token_ids=(tokenizer.im_end_id, tokenizer.endoftext_id),
                                     pad_token_id=tokenizer.endoftext_id)  # fmt: skip
        self.engine = Engine(trainer.config, options=self.options, mesh=trainer.mesh, sharding_rules=trainer.rules,
                             model=trainer.model)  # fmt: skip

    def _place(self, batch: Batch) -> Batch:
        return sharding.place_batch(batch, self.trainer.mesh, self.trainer.rules)

    def loss_and_predictions(self, params: Any) -> tuple[dict[str, float], list[tuple[Example, np.ndarray]]]:
        """Token-mean loss and accuracy over the set, and each example's argmax at its targets."""
        ce = weight = correct = 0.0
        predicted = []
        gauge: dict[str, float] = {}
        ctc_counts = ErrorCounts()
        for spec in self.specs:
            loaded = self.loader(spec)
            placed = self._place(loaded.batch)
            classes, sums = self.trainer.eval_step(params, placed)
            classes, sums = jax.device_get((classes, sums))
            if self.objective == "asr":
                use = jax.device_get(self.trainer.audio_use(params, placed))
                for key in ("text_ce", "rolled_text_ce", "text_weight", "ctc", "rolled_ctc", "ctc_labels"):
                    gauge[key] = gauge.get(key, 0.0) + float(use[key])
                for r, (index, w) in enumerate(zip(spec.rows, spec.weights)):
                    if w > 0 and not loaded.failed[r]:
                        example = self.examples[index]
                        path = losses.greedy_ctc(
                            use["ctc_argmax"][r],
                            int(use["audio_lengths"][r]),
                            self.trainer.objective.blank_id,
                        )
                        reference = " ".join(label_words(self.tokenizer, example.transcript))
                        hypothesis = " ".join(label_words(self.tokenizer, path))
                        ctc_counts.add(reference, hypothesis, example.language)
            ce, weight, correct = (
                ce + float(sums["ce_sum"]),
                weight + float(sums["weight"]),
                correct + float(sums["correct"]),
            )
            for r, (index, w) in enumerate(zip(spec.rows, spec.weights)):
                if w > 0 and not loaded.failed[r]:
                    example = self.examples[index]
                    predicted.append((example, classes[r, : len(example.targets)]))
        metrics = {"loss": ce / max(weight, 1e-9), "accuracy": correct / max(weight, 1e-9), "targets": weight}
        if gauge:
            text_weight, labels = max(gauge["text_weight"], 1e-9), max(gauge["ctc_labels"], 1e-9)
            metrics.update(
                text_ce=gauge["text_ce"] / text_weight,
                rolled_text_ce=gauge["rolled_text_ce"] / text_weight,
                ctc=gauge["ctc"] / labels,
                rolled_ctc=gauge["rolled_ctc"] / labels,
            )
            # The audio-use gap: how much worse each loss gets when a row hears another row's audio.
            metrics["text_ce_gap"] = metrics["rolled_text_ce"] - metrics["text_ce"]
            metrics["ctc_gap"] = metrics["rolled_ctc"] - metrics["ctc"]
            metrics["ctc_gap_ratio"] = metrics["ctc_gap"] / max(metrics["rolled_ctc"], 1e-9)
            rates = ctc_counts.rates()
            if "wer" in rates:
                metrics["ctc_wer"] = rates["wer"]
            if "cer" in rates:
                metrics["ctc_cer"] = rates["cer"]
        return metrics, predicted

    def transcribe(self, params: Any, examples: Sequence[Example]) -> list[tuple[str, str]]:
        """Greedy ``(language, text)`` for each example, as inference produces it."""
        cfg = self.trainer.config
        steps = buckets.STEP_LADDER.size(self.max_new_tokens)
        results: list[tuple[str, str]] = []
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            requests = []
            for example in chunk:
                samples = load_samples(example)
                audio_tokens = cfg.audio.output_length(audio_io.num_frames(len(samples)))
                prompt = text_io.build_prompt_ids(self.tokenizer, audio_tokens, "", None)
                requests.append(DecodeRequest(samples, prompt, self.max_new_tokens))
            # A fixed row count (the eval batch size): one program per audio/prompt bucket whatever the params.
            shape = dataclasses.replace(
                self.engine.batch_shape(requests, self.batch_size), rows=self.batch_size, steps=steps
            )
            for generation in self.engine.run(params, requests, shape):
                raw = self.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
                results.append(text_io.parse_asr_output(raw))
        return results

    def evaluate(self, params: Any) -> dict[str, float]:
        """Every metric of the objective: loss/accuracy, and WER/CER + language accuracy (ASR) or the mean
        boundary shift in ms (aligner)."""
        metrics, predicted = self.loss_and_predictions(params)
        if self.objective == "aligner":
            segment = self.trainer.config.timestamp_segment_time
            shifts = [boundary_shift_ms(classes, e.words, segment) for e, classes in predicted]
            if shifts:
                metrics["boundary_shift_ms"] = float(np.mean(np.concatenate(shifts)))
            return metrics
        if not self.decode_transcripts:
            return metrics
        examples = [e for e, _ in predicted]
        counts = ErrorCounts()
        language_hits = language_total = 0
        for example, (language, hypothesis) in zip(examples, self.transcribe(params, examples)):
            counts.add(example.text, hypothesis, example.language)
            if example.language is not None:
                language_total += 1
                language_hits += int(language == example.language)
        metrics.update(counts.rates())
        if language_total:
            metrics["language_accuracy"] = language_hits / language_total
        return metrics


__all__ = [
    "CHARACTER_LANGUAGES",
    "ErrorCounts",
    "Evaluator",
    "boundary_shift_ms",
    "edit_distance",
    "label_words",
    "normalize_text",
    "scoring_units",
]
