"""Training data: JSONL manifests → token sequences with loss targets → fixed-shape batches through grain.

A manifest row is a JSON object: ``audio`` (a file path; relative to the manifest's directory), ``text``,
optional ``language`` (one of the supported languages; missing or null = "None", as the official fine-tuning
recipe writes rows without language information) and ``context`` (the system prompt). Aligner rows carry
``words``: ``[{"text": "hello", "start": 0.12, "end": 0.48}, ...]`` in seconds.

What the model sees is what inference sees:

* ASR: the chat prompt with the audio slot expanded (``text.build_prompt_ids``, no forced language) followed by
  the target ``language X<asr_text>{text}<|im_end|>``; the loss is on the target tokens only.
* Aligner: ``<|audio_start|>{audio}<|audio_end|>w1<timestamp><timestamp>w2…`` (``text.build_aligner_ids``); the
  loss is the class (boundary time / ``timestamp_segment_time``) at every ``<timestamp>`` slot.

Audio shorter than 0.5 s is zero-padded to 0.5 s, as the inference pipeline pads short pieces.

Bad rows never stop a run. Rows that are not valid JSON, lack fields, name an unsupported language, point at a
missing or unreadable file, or are too long are dropped when the manifest is read; a file that fails to decode
later leaves its batch row empty (zero loss weight). Each is logged with its line and reason and counted.

Batches are planned per step (``BatchPlan``): an epoch is a seeded shuffle whose rows are sorted by length
inside windows of ``sort_window`` batches, cut into batches and shuffled again. Shapes (rows, audio frames in
whole encoder windows, tokens, labels) are decided from the manifest alone, so every process agrees on them
and loads only its own rows; the plan is a pure function of the step, so the pipeline resumes exactly from
a step number (grain's iterator state).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import flax
import numpy as np

from qasr_jax import audio as audio_io
from qasr_jax import buckets
from qasr_jax import text as text_io
from qasr_jax.config import ThinkerConfig
from qasr_jax.errors import QasrError

log = logging.getLogger(__name__)

# Short audio is zero-padded to this, as the inference pipeline pads short pieces.
MIN_SECONDS = audio_io.MIN_PIECE_SECONDS


@flax.struct.dataclass
class Batch:
    """The arrays of one training or evaluation step, every one ``[rows, ...]`` (a pytree: host numpy arrays from
    ``BatchLoader``, device arrays once placed).

    ``waveforms [rows, (frames + 1) · 160]`` float32 and ``wave_lengths`` (samples); ``input_ids [rows,
    seq_len]`` (right-padded) and ``attention_mask``; ``label_positions [rows, label_len]`` (where each target is
    predicted), ``labels`` and ``label_weights`` (float32; 0 on padding, on zero-weight rows and on rows that
    failed to load); ``ctc_labels``/``ctc_label_paddings [rows, label_len]`` (the row's CTC labels, 1 on
    padding); ``text_weights [rows, label_len]``: ``label_weights`` on the targets that are transcript tokens, 0 on
    the template around them (``language X<asr_text>``, ``<|im_end|>``), which needs no audio;
    ``frame_labels``/``frame_weights [rows, audio tokens]``: on rows with word times, each encoder output token's
    CTC label (the word under its centre, a word's labels spread evenly over its tokens; the blank between
    words), weight 1 on the row's valid tokens; 0 elsewhere.
    """

    waveforms: Any
    wave_lengths: Any
    input_ids: Any
    attention_mask: Any
    label_positions: Any
    labels: Any
    label_weights: Any
    ctc_labels: Any
    ctc_label_paddings: Any
    text_weights: Any = None
    frame_labels: Any = None
    frame_weights: Any = None


@dataclasses.dataclass(frozen=True)
class LoadedBatch:
    """What ``BatchLoader`` gives for one step: the step's ``Batch`` and, on the host only, ``failed [rows]``
    (True where the row's audio failed to load and the row was left empty)."""

    batch: Batch
    failed: np.ndarray


@dataclasses.dataclass(frozen=True)
class WordTime:
    """One aligned word of an aligner row: its text and its boundaries in seconds."""

    text: str
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Example:
    """One usable manifest row, tokenised.

    ``template``: the full token sequence with a single ``<|audio_pad|>`` (expanded to ``audio_tokens`` when
    loaded); ``targets``: the loss targets (next tokens for ASR, classes for the aligner); ``target_slots``:
    where each target's logits are read, as indices into the template (shifted by the audio expansion).
    """

    line: int
    audio: str
    text: str
    language: str | None
    num_samples: int
    template: tuple[int, ...]
    targets: tuple[int, ...]
    target_slots: tuple[int, ...]
    words: tuple[WordTime, ...] = ()
    transcript: tuple[int, ...] = ()  # the CTC labels (ASR): ``Tokenization.ctc_labels`` of the row's words
    header_targets: int = 0  # leading targets that are the template (``language X<asr_text>``), not the text
    # ASR rows with word times: (start s, end s, the word's CTC labels) per word (the frame targets).
    word_labels: tuple[tuple[float, float, tuple[int, ...]], ...] = ()

    @property
    def seconds(self) -> float:
        return self.num_samples / audio_io.SAMPLE_RATE


@dataclasses.dataclass
class ManifestReport:
    """What reading a manifest kept and skipped (with the reason per line)."""

    path: str
    examples: list[Example]
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @property
    def reasons(self) -> collections.Counter:
        """Skipped rows per kind of reason (the text before the first ':')."""
        return collections.Counter(reason.split(":", 1)[0] for _, reason in self.skipped)


class BadRow(ValueError):
    """A manifest row that cannot be used; the message is the reason."""


def padded_samples(num_samples: int) -> int:
    """Samples the model sees for ``num_samples`` samples of audio (short audio is padded to 0.5 s)."""
    return max(int(num_samples), int(MIN_SECONDS * audio_io.SAMPLE_RATE))


def header_samples(path: str) -> int:
    """Samples of ``path`` once decoded to 16 kHz, from its header (``audio.load_audio``'s ceil rule)."""
    import soundfile

    try:
        info = soundfile.info(path)
    # libsndfile raises RuntimeError, LibsndfileError or TypeError depending on how a file is unreadable.
    except Exception as error:
        raise BadRow(f"unreadable audio: {path} ({error})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise BadRow(f"empty audio: {path}")
    if info.samplerate == audio_io.SAMPLE_RATE:
        return int(info.frames)
    return math.ceil(info.frames * audio_io.SAMPLE_RATE / info.samplerate)


class Tokenization:
    """Builds the token sequences of both objectives for one tokenizer and model config."""

    def __init__(self, tokenizer: text_io.Tokenizer, config: ThinkerConfig, ctc_merges: int = 0) -> None:
        """``ctc_merges`` > 0: CTC labels are spelt with the tokenizer's first that many BPE merges only
        (``Tokenizer.with_merges``): pieces shared between words instead of one id per word."""
        self.tokenizer = tokenizer
        self.ctc_tokenizer = tokenizer.with_merges(ctc_merges) if ctc_merges > 0 else tokenizer
        self.config = config
        self.pad_id = tokenizer.endoftext_id
        self.audio_pad_id = tokenizer.audio_pad_id
        # Pieces that spell only whitespace (a lone "Ġ" before a digit): no sound of their own.
        self.space_ids = frozenset(t for t in tokenizer.encode(" ", allow_special=False))

    def asr(
        self, text: str, language: str | None, context: str
    ) -> tuple[list[int], list[int], list[int], int]:
        """(template, targets, slots, header): the prompt with one audio pad, then
        ``language X<asr_text>text<|im_end|>``; ``header``: how many leading targets are ``language X<asr_text>``.

        The logits at slot i predict targets[i] (the token after it).
        """
        prompt = text_io.build_prompt_ids(self.tokenizer, 1, context, None)
        header = self.tokenizer.encode(f"language {language or 'None'}{text_io.ASR_TEXT}")
        # The transcript is plain text: special-token spellings inside it stay text.
        target = [*header, *self.tokenizer.encode(text, allow_special=False), self.tokenizer.im_end_id]
        slots = [len(prompt) - 1 + k for k in range(len(target))]
        return [*prompt, *target], target, slots, len(header)

    def ctc_labels(self, ctc_text: str) -> list[int]:
        """The CTC labels of a transcript: each word's tokens as it is spelt mid-sentence (``" " + word``), with
        pieces that are only a word separator dropped, so a word has the same labels wherever it stands."""
        labels = []
        for word in ctc_text.split():
            pieces = self.ctc_tokenizer.encode(" " + word, allow_special=False)
            if len(pieces) > 1 and pieces[0] in self.space_ids:
                # A lone separator before the word's first piece: its spelling with the separator when the
                # vocabulary has one (so labels still show where words start), else dropped (numbers).
                joined = self.tokenizer.token_to_id(
                    (self.tokenizer.id_to_token(pieces[0]) or "")
                    + (self.tokenizer.id_to_token(pieces[1]) or "")
                )
                pieces = [joined, *pieces[2:]] if joined is not None else pieces[1:]
            labels += [t for t in pieces if t not in self.space_ids]
        return labels

    def aligner(self, words: Sequence[WordTime]) -> tuple[list[int], list[int], list[int]]:
        """(template, classes, slots): the aligner input; the class at each ``<timestamp>`` is its boundary time."""
        cfg = self.config
        template = text_io.build_aligner_ids(self.tokenizer, [w.text for w in words], 1)
        slots = [i for i, token in enumerate(template) if token == self.tokenizer.timestamp_id]
        if len(slots) != 2 * len(words):
            raise BadRow(
                f"words: {len(words)} words tokenise to {len(slots)} timestamp slots, not two per word"
            )
        times = [t for w in words for t in (w.start, w.end)]
        classes = [round(t * 1000.0 / cfg.timestamp_segment_time) for t in times]
        return template, classes, slots


def _parse_words(raw: Any, seconds: float, config: ThinkerConfig) -> tuple[WordTime, ...]:
    if not isinstance(raw, list) or not raw:
        raise BadRow("words: expected a non-empty list of {text, start, end}")
    words = []
    limit = (config.classify_num - 1) * config.timestamp_segment_time / 1000.0
    previous_end = 0.0
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise BadRow(f"words: item {i} needs a non-empty 'text'")
        try:
            start, end = float(item["start"]), float(item["end"])
        except (KeyError, TypeError, ValueError):
            raise BadRow(f"words: item {i} needs numeric 'start' and 'end' (seconds)") from None
        if not (0.0 <= start <= end) or not math.isfinite(end):
            raise BadRow(f"words: item {i} has start {start} / end {end}; need 0 <= start <= end")
        if start + 1e-6 < previous_end:
            raise BadRow(
                f"words: item {i} starts at {start} s, before the previous word ends ({previous_end} s)"
            )
        if end > min(seconds, limit) + 1e-3:
            raise BadRow(
                f"words: item {i} ends at {end} s, past the audio ({seconds:.3f} s) or the class range"
            )
        previous_end = end
        words.append(WordTime(item["text"].strip(), start, end))
    return tuple(words)


def parse_row(
    raw_line: str, line: int, base_dir: str, tokens: Tokenization, objective: str, max_seconds: float
) -> Example:
    """One manifest line as an Example, or BadRow saying what is wrong with it."""
    try:
        row = json.loads(raw_line)
    except json.JSONDecodeError as error:
        raise BadRow(f"invalid JSON: {error.msg}") from None
    if not isinstance(row, dict):
        raise BadRow("invalid row: expected a JSON object")
    audio_path = row.get("audio")
    if not isinstance(audio_path, str) or not audio_path:
        raise BadRow("missing field: 'audio' (a file path)")
    text = row.get("text", "" if objective == "aligner" else None)
    if not isinstance(text, str):
        raise BadRow("missing field: 'text' (a string)")
    context = row.get("context") or ""
    if not isinstance(context, str):
        raise BadRow("invalid field: 'context' must be a string")
    language = row.get("language")
    if language is not None and not isinstance(language, str):
        raise BadRow("invalid field: 'language' must be a string or null")
    if language is not None and language.strip() and language.strip().lower() != "none":
        try:
            language = text_io.normalize_language(language)
        except QasrError as error:
            raise BadRow(f"unsupported language: {error}") from None
    else:
        language = None
    path = audio_path if os.path.isabs(audio_path) else os.path.join(base_dir, audio_path)
    if not os.path.isfile(path):
        raise BadRow(f"missing audio: {path}")
    num_samples = header_samples(path)
    seconds = num_samples / audio_io.SAMPLE_RATE
    if seconds > max_seconds:
        raise BadRow(f"too long: {seconds:.2f} s > data.max_audio_seconds = {max_seconds:g}")
    words: tuple[WordTime, ...] = ()
    try:
        if objective == "aligner":
            words = _parse_words(row.get("words"), seconds, tokens.config)
            template, targets, slots = tokens.aligner(words)
        else:
            template, targets, slots, header = tokens.asr(text.strip(), language, context)
            ctc_text = row.get("ctc_text")
            if ctc_text is not None and not isinstance(ctc_text, str):
                raise BadRow("invalid field: 'ctc_text' must be a string")
            spoken = ctc_text if ctc_text is not None else spoken_words(text)
            transcript = tuple(tokens.ctc_labels(spoken))
            word_labels = _word_labels(row.get("words"), spoken, seconds, tokens)
    except QasrError as error:
        raise BadRow(f"invalid text: {error}") from None
    if objective == "aligner":
        return Example(line, path, text.strip(), language, num_samples, tuple(template), tuple(targets),
                       tuple(slots), words)  # fmt: skip
    return Example(line, path, text.strip(), language, num_samples, tuple(template), tuple(targets),
                   tuple(slots), words, transcript, header, word_labels)  # fmt: skip


def _word_labels(
    raw: Any, spoken: str, seconds: float, tokens: Tokenization
) -> tuple[tuple[float, float, tuple[int, ...]], ...]:
    """The frame targets of an ASR row: its ``words`` times paired with its spoken words' CTC labels, or ()
    when the row has no usable times (continuous speech) or they do not pair up one to one."""
    spoken_list = spoken.split()
    if not isinstance(raw, list) or not raw or len(raw) != len(spoken_list):
        return ()
    out = []
    for item, word in zip(raw, spoken_list):
        try:
            start, end = float(item["start"]), float(item["end"])
        except (KeyError, TypeError, ValueError):
            return ()
        if not 0.0 <= start < end <= seconds + 1e-3:
            return ()
        out.append((start, end, tuple(tokens.ctc_labels(word))))
    return tuple(out)


def spoken_words(text: str) -> str:
    """CTC text of a row without ``ctc_text``: the words without punctuation, the first letter lower-cased when
    the second is (sentence case), so "The dog." and "the dog" give the same labels ("I", "USA" stay)."""
    words = ["".join(c for c in w if c.isalnum() or c == "'") for w in text.split()]
    words = [w for w in words if w]
    if words and len(words[0]) > 1 and words[0][0].isupper() and words[0][1].islower():
        words[0] = words[0][0].lower() + words[0][1:]
    return " ".join(words)


def read_manifest(
    path: str | os.PathLike, tokens: Tokenization, objective: str = "asr", max_seconds: float = 30.0
) -> ManifestReport:
    """Every usable row of a JSONL manifest; the others are logged (file:line: reason) and counted."""
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    report = ManifestReport(path, [])
    with open(path, encoding="utf-8") as f:
        for line, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue
            try:
                report.examples.append(parse_row(raw_line, line, base_dir, tokens, objective, max_seconds))
            except BadRow as error:
                report.skipped.append((line, str(error)))
                log.warning("%s:%d: skipped: %s", path, line, error)
    if report.skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(report.reasons.items()))
        log.warning(
            "%s: %d rows skipped (%s); %d kept", path, len(report.skipped), counts, len(report.examples)
        )
    return report


# --------------------------------------------------------------------------------------------------------------
# Batch plans and shapes


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """One global batch: which examples fill its rows (with a loss weight each) and its padded shape."""

    step: int
    rows: tuple[int, ...]
    weights: tuple[float, ...]
    frames: int
    seq_len: int
    label_len: int


class Shapes:
    """Padded shapes of batches, from example metadata only (so every process computes the same ones)."""

    def __init__(self, config: ThinkerConfig, token_multiple: int, label_multiple: int) -> None:
        self.config = config
        self.token_multiple = token_multiple
        self.label_multiple = label_multiple
        # Frames come in whole encoder chunks (1 s); the training forward pass narrows the attention window to a
        # batch shorter than one window (``losses.training_window``), so short clips pay for no window padding.
        self.chunk_frames = config.audio.chunk_frames

    def frames(self, example: Example) -> int:
        return audio_io.num_frames(padded_samples(example.num_samples))

    def audio_tokens(self, example: Example) -> int:
        return self.config.audio.output_length(self.frames(example))

    def seq_len(self, example: Example) -> int:
        return len(example.template) - 1 + self.audio_tokens(example)

    def length_key(self, example: Example) -> int:
        return self.seq_len(example)

    def spec(
        self, step: int, examples: Sequence[Example], rows: Sequence[int], weights: Sequence[float]
    ) -> BatchSpec:
        chosen = [examples[i] for i in rows]
        return BatchSpec(
            step=step,
            rows=tuple(rows),
            weights=tuple(float(w) for w in weights),
            frames=buckets.round_up(max(self.frames(e) for e in chosen), self.chunk_frames),
            seq_len=buckets.round_up(max(self.seq_len(e) for e in chosen), self.token_multiple),
            label_len=buckets.round_up(
                max(max(len(e.targets), len(e.transcript)) for e in chosen), self.label_multiple
            ),
        )


class BatchPlan:
    """The training batches as a sequence indexed by step (grain's random-access source).

    Epoch e: a permutation seeded by (seed, e), extended by its own start to whole batches, sorted by length
    inside windows of ``sort_window`` batches, cut into batches, and the batches shuffled.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        shapes: Shapes,
        batch_size: int,
        steps: int,
        seed: int = 0,
        sort_window: int = 16,
    ) -> None:
        if not examples:
            raise ValueError("no usable training rows")
        self.examples = list(examples)
        self.shapes = shapes
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.sort_window = sort_window
        self.batches_per_epoch = -(-len(self.examples) // batch_size)
        self._lengths = np.asarray([shapes.length_key(e) for e in self.examples])
        self._epochs: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches (example indices) of one epoch."""
        cached = self._epochs.get(epoch)
        if cached is None:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.examples))
            total = self.batches_per_epoch * self.batch_size
            order = np.resize(order, total)  # wraps around: the last batch is completed from the start
            window = self.batch_size * self.sort_window
            for start in range(0, total, window):
                part = order[start : start + window]
                order[start : start + window] = part[np.argsort(-self._lengths[part], kind="stable")]
            batches = order.reshape(self.batches_per_epoch, self.batch_size)
            cached = [batches[i].tolist() for i in rng.permutation(len(batches))]
            self._epochs = {epoch: cached}  # one epoch is enough: steps are read in order
        return cached

    def __getitem__(self, step: int) -> BatchSpec:
        if not 0 <= step < self.steps:
            raise IndexError(step)
        epoch, index = divmod(int(step), self.batches_per_epoch)
        rows = self.epoch(epoch)[index]
        return self.shapes.spec(step, self.examples, rows, [1.0] * len(rows))


def eval_specs(examples: Sequence[Example], shapes: Shapes, batch_size: int) -> list[BatchSpec]:
    """Held-out batches of rows sorted by length (little padding); the last batch is filled up with zero-weight
    copies of its last row."""
    order = sorted(range(len(examples)), key=lambda i: shapes.length_key(examples[i]))
    specs = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        weights = [1.0] * len(rows) + [0.0] * (batch_size - len(rows))
        rows = rows + [rows[-1]] * (batch_size - len(rows))
        specs.append(shapes.spec(start // batch_size, examples, rows, weights))
    return specs


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_samples(example: Example) -> np.ndarray:
    """The example's 16 kHz samples, zero-padded to 0.5 s when shorter (QasrError/BadRow when unusable)."""
    samples = audio_io.load_audio(example.audio)
    if len(samples) != example.num_samples:
        # The shapes were planned from the header; a file that decodes to more than that does not fit.
        if len(samples) > example.num_samples:
            raise BadRow(
                f"decoded length {len(samples)} differs from the header's {example.num_samples} samples"
            )
        log.info("%s: decoded %d samples, header said %d", example.audio, len(samples), example.num_samples)
    target = padded_samples(len(samples))
    if len(samples) < target:
        samples = np.pad(samples, (0, target - len(samples)))
    return samples.astype(np.float32)


class BatchLoader:
    """Host arrays of this process's rows of a BatchSpec (a grain map transform): a ``LoadedBatch``."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokens: Tokenization,
        process_rows: slice | None = None,
        blank_id: int | None = None,
    ) -> None:
        """``blank_id``: the CTC blank, which frame targets put between words (None: no frame targets)."""
        self.examples = examples
        self.tokens = tokens
        self.process_rows = process_rows
        self.blank_id = blank_id

    def audio_tokens(self, frames: int) -> int:
        """Encoder output tokens of a batch ``frames`` wide (whole chunks: the encoder's padded output)."""
        config = self.tokens.config.audio
        return -(-frames // config.chunk_frames) * config.tokens_per_chunk

    def __call__(self, spec: BatchSpec) -> LoadedBatch:
        rows = spec.rows if self.process_rows is None else spec.rows[self.process_rows]
        weights = spec.weights if self.process_rows is None else spec.weights[self.process_rows]
        n = len(rows)
        width = (spec.frames + 1) * audio_io.HOP_LENGTH
        batch = Batch(
            waveforms=np.zeros((n, width), np.float32),
            wave_lengths=np.zeros((n,), np.int32),
            input_ids=np.full((n, spec.seq_len), self.tokens.pad_id, np.int32),
            attention_mask=np.zeros((n, spec.seq_len), np.int32),
            label_positions=np.zeros((n, spec.label_len), np.int32),
            labels=np.zeros((n, spec.label_len), np.int32),
            label_weights=np.zeros((n, spec.label_len), np.float32),
            ctc_labels=np.zeros((n, spec.label_len), np.int32),
            ctc_label_paddings=np.ones((n, spec.label_len), np.float32),
            text_weights=np.zeros((n, spec.label_len), np.float32),
            frame_labels=np.zeros((n, self.audio_tokens(spec.frames)), np.int32),
            frame_weights=np.zeros((n, self.audio_tokens(spec.frames)), np.float32),
        )
        failed = np.zeros((n,), bool)
        for r, (index, weight) in enumerate(zip(rows, weights)):
            example = self.examples[index]
            try:
                self._fill(batch, r, example, weight, spec)
            except (QasrError, BadRow, OSError) as error:
                log.warning("%s: row dropped from step %d: %s", example.audio, spec.step, error)
                self._blank(batch, r)
                failed[r] = True
        return LoadedBatch(batch, failed)

    def _blank(self, batch: Batch, r: int) -> None:
        """A row without loss that still computes finite numbers: 0.5 s of silence, one valid token."""
        for array in (
            batch.waveforms,
            batch.attention_mask,
            batch.label_positions,
            batch.labels,
            batch.label_weights,
            batch.ctc_labels,
            batch.text_weights,
            batch.frame_labels,
            batch.frame_weights,
        ):
            array[r] = 0
        batch.ctc_label_paddings[r] = 1
        batch.wave_lengths[r] = padded_samples(0)
        batch.input_ids[r] = self.tokens.pad_id
        batch.attention_mask[r, 0] = 1

    def _fill(self, batch: Batch, r: int, example: Example, weight: float, spec: BatchSpec) -> None:
        samples = load_samples(example)
        frames = audio_io.num_frames(len(samples))
        audio_tokens = self.tokens.config.audio.output_length(frames)
        ids = _expand(example.template, self.tokens.audio_pad_id, audio_tokens)
        if len(ids) > spec.seq_len or frames > spec.frames:
            raise BadRow(
                f"{len(ids)} tokens / {frames} frames do not fit the batch ({spec.seq_len} / {spec.frames})"
            )
        batch.waveforms[r, : len(samples)] = samples
        batch.wave_lengths[r] = len(samples)
        batch.input_ids[r, : len(ids)] = ids
        batch.attention_mask[r, : len(ids)] = 1
        shift = audio_tokens - 1  # slots after the audio pad move by the expansion
        pad_slot = example.template.index(self.tokens.audio_pad_id)
        slots = [s + shift if s > pad_slot else s for s in example.target_slots]
        k = len(slots)
        batch.label_positions[r, :k] = slots
        batch.labels[r, :k] = example.targets
        batch.label_weights[r, :k] = weight
        if example.transcript:  # ASR: the transcript's targets sit between the header and <|im_end|>
            batch.text_weights[r, example.header_targets : k - 1] = weight
        if example.word_labels and self.blank_id is not None:
            batch.frame_labels[r, :audio_tokens] = frame_targets(
                example.word_labels, audio_tokens, self.tokens.config.audio, self.blank_id
            )
            batch.frame_weights[r, :audio_tokens] = weight
        n = len(example.transcript)
        batch.ctc_labels[r, :n] = example.transcript
        batch.ctc_label_paddings[r, :n] = 0.0


def frame_targets(
    word_labels: Sequence[tuple[float, float, Sequence[int]]], tokens: int, config: Any, blank_id: int
) -> np.ndarray:
    """``[tokens]`` int32: the CTC label under each encoder output token's centre (token j of chunk c covers mel
    frames c·C + 8j … 8j + 7, its centre at (c·C + 8j + 4) / 100 s); a word's labels split its tokens evenly in
    order; tokens outside every word get the blank."""
    chunk, per_chunk = config.chunk_frames, config.tokens_per_chunk
    index = np.arange(tokens)
    centre = ((index // per_chunk) * chunk + 8 * (index % per_chunk) + 4) / 100.0
    out = np.full(tokens, blank_id, np.int32)
    for start, end, labels in word_labels:
        inside = np.flatnonzero((centre >= start) & (centre < end))
        if not len(labels) or not len(inside):
            continue
        for part, label in zip(np.array_split(inside, len(labels)), labels):
            out[part] = label
    return out


def _expand(template: Sequence[int], audio_pad_id: int, audio_tokens: int) -> list[int]:
    slot = list(template).index(audio_pad_id)
    return [*template[:slot], *([audio_pad_id] * audio_tokens), *template[slot + 1 :]]


def train_iterator(plan: BatchPlan, loader: BatchLoader, num_threads: int = 4, prefetch: int = 4) -> Any:
    """A grain iterator over ``plan`` (``get_state()``/``set_state()`` resume at a step), loading in threads."""
    import grain

    dataset = grain.MapDataset.source(plan).map(loader)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1))
    return iter(dataset.to_iter_dataset(options))


__all__ = [
    "BadRow",
    "Batch",
    "BatchLoader",
    "BatchPlan",
    "BatchSpec",
    "Example",
    "LoadedBatch",
    "ManifestReport",
    "Shapes",
    "Tokenization",
    "WordTime",
    "eval_specs",
    "frame_targets",
    "header_samples",
    "load_samples",
    "read_manifest",
    "train_iterator",
]
