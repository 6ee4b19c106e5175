"""Real speech for tests, synthesised with espeak-ng and cached on disk by content."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np
import soundfile as sf

CACHE_DIR = os.environ.get("QASR_TEST_AUDIO_CACHE", os.path.join(tempfile.gettempdir(), "qasr_test_audio"))

# Sentences whose espeak-ng renderings at the default speed last about 0.7 s, 5 s and 19 s.
SHORT_EN = "Hi."
MEDIUM_EN = "The quick brown fox jumps over the lazy dog near the quiet river bank today."
LONG_EN = (
    "Speech recognition turns spoken language into written text. Modern systems listen to an audio "
    "signal, split it into short frames, and predict the words one token at a time. They are trained "
    "on many thousands of hours of recordings in dozens of languages, and they can follow accents, "
    "noise and fast talkers surprisingly well."
)
MEDIUM_ZH = "今天天气很好，我们一起去公园散步吧。"


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def synth_wav(text: str, voice: str = "en", speed: int = 160, pitch: int = 50) -> str:
    """Path of a wav file (espeak-ng's native 22.05 kHz, mono int16) speaking ``text``."""
    key = hashlib.sha1(f"{voice}|{speed}|{pitch}|{text}".encode()).hexdigest()[:16]
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, f"{key}.wav")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.tmp.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp, text],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, path)
    return path


def synth(text: str, voice: str = "en", speed: int = 160, pitch: int = 50, sr: int = 16000) -> np.ndarray:
    """float32 mono samples at ``sr`` speaking ``text`` (resampled with soxr when sr differs)."""
    import soxr

    data, native = sf.read(synth_wav(text, voice, speed, pitch), dtype="float32", always_2d=False)
    if native != sr:
        data = soxr.resample(data, native, sr).astype(np.float32)
    return data


def speech_clips(sr: int = 16000) -> list[np.ndarray]:
    """The standard ragged batch: about 0.7 s, 5 s and 19 s of English speech."""
    return [synth(SHORT_EN, sr=sr), synth(MEDIUM_EN, sr=sr), synth(LONG_EN, sr=sr)]
