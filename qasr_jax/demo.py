"""Where the demo models shipped in the repository are.

``models/qwen3-asr-demo`` and ``models/qwen3-forced-aligner-demo`` are a small Qwen3-ASR and ForcedAligner of the
released architecture, trained from scratch on synthetic espeak-ng speech in English and German
(``train/synth.py``, ``train/configs/demo_*.toml``). They let the programs run and show real output where no
released checkpoint is at hand; they know only the synthetic corpus' few hundred words.

The library never picks them by itself: ``Qwen3ASRModel.from_pretrained(demo.default_model_path())`` names
the choice. The programs (``python -m infer transcribe`` / ``align``) fall back to them when no --model is given,
and say so. Their recipe and held-out checks are in ``train/`` (``train.demo_recipe``, ``train.demo_eval``).
"""

from __future__ import annotations

import os
from pathlib import Path

ASR_DIR_NAME = "qwen3-asr-demo"
ALIGNER_DIR_NAME = "qwen3-forced-aligner-demo"
DIR_NAMES = {"asr": ASR_DIR_NAME, "aligner": ALIGNER_DIR_NAME}
# Overrides for installs where the repository's models/ folder is elsewhere.
ASR_ENV = "QASR_DEMO_MODEL"
ALIGNER_ENV = "QASR_DEMO_ALIGNER"


def _models_dirs() -> list[Path]:
    """Where models/ may be: next to the package (a source checkout or editable install), then the cwd."""
    candidates = [Path(__file__).resolve().parent.parent / "models", Path.cwd().resolve() / "models"]
    return list(dict.fromkeys(candidates))


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


__all__ = ["ALIGNER_DIR_NAME", "ASR_DIR_NAME", "DIR_NAMES", "default_aligner_path", "default_model_path"]
