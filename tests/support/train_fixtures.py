"""Small models, checkpoint dirs and manifests for the training tests.

The tiny models use the demo tokenizer committed in ``train/configs/demo_asr_init`` (2048 ids, special tokens
read from its files), so heads and embeddings stay small; their encoders use 2-second attention windows so that
short clips are padded to 200 frames rather than 800.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import speech

REPO = Path(__file__).resolve().parents[2]
DEMO_ASR_DIR = REPO / "train" / "configs" / "demo_asr_init"
DEMO_ALIGNER_DIR = REPO / "train" / "configs" / "demo_aligner_init"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "generation_config.json",
)

SENTENCES = (  # sentences of the demo grammar (train.synth), so the demo tokenizer spells each word in one piece
    "The dog sees 3 red cats.",
    "A small bird sings today.",
    "We find the old house.",
    "9 green apples run.",
)


def tiny_config_dict(aligner: bool = False, classify_num: int = 64) -> dict[str, Any]:
    """The demo checkpoint's config.json shrunk to a model that trains in seconds on a CPU.

    Encoder: d_model 32, 1 layer, 4 heads, ffn 64, conv channels 16, 2 s windows. Decoder: hidden 32, 2 layers,
    4 query / 2 kv heads of 8, MLP 64, vocab 2048, tied head (aligner: ``classify_num`` classes).
    """
    source = DEMO_ALIGNER_DIR if aligner else DEMO_ASR_DIR
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    thinker = config["thinker_config"]
    thinker["audio_config"].update(
        d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, output_dim=32,
        downsample_hidden_size=16, n_window_infer=200,
    )  # fmt: skip
    thinker["text_config"].update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "interleaved": True,
                                  "mrope_interleaved": True},
    )  # fmt: skip
    if aligner:
        thinker["classify_num"] = classify_num
    return config


def write_model_dir(dst: str | os.PathLike, config: dict[str, Any], aligner: bool = False) -> str:
    """A checkpoint dir without weights (``model.init = "random"``): config.json plus the demo tokenizer files."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    source = DEMO_ALIGNER_DIR if aligner else DEMO_ASR_DIR
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dst / name)
    (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return str(dst)


def speech_rows(
    sentences: Sequence[str] = SENTENCES, voice: str = "en", speed: int = 190
) -> list[dict[str, Any]]:
    """Manifest rows of espeak-ng clips (absolute paths); aligner ``words`` spread evenly over each clip."""
    import soundfile

    rows = []
    for text in sentences:
        path = speech.synth_wav(text, voice=voice, speed=speed)
        seconds = soundfile.info(path).duration
        words = [w.strip(".,") for w in text.split()]
        edges = np.linspace(0.05, seconds - 0.05, 2 * len(words))
        rows.append({
            "audio": path, "text": text, "language": "English",
            "words": [{"text": w, "start": round(float(edges[2 * i]), 3), "end": round(float(edges[2 * i + 1]), 3)}
                      for i, w in enumerate(words)],
        })  # fmt: skip
    return rows


def write_manifest(path: str | os.PathLike, rows: Sequence[dict[str, Any] | str]) -> str:
    """Write rows (dicts, or raw lines written as they are) as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return os.fspath(path)


def train_toml(
    model_dir: str, manifest: str, output_dir: str, overrides: dict[str, dict[str, Any]] | None = None
) -> str:
    """A TOML config for the tiny model (random init, fp32), with ``overrides`` merged per section."""
    sections: dict[str, dict[str, Any]] = {
        "model": {"checkpoint": model_dir, "init": "random"},
        "data": {"train_manifest": manifest, "batch_size": 4, "num_threads": 2, "token_multiple": 16},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 5, "decay": "constant", "clip_norm": 1.0},
        "mesh": {"spec": "data=-1"},
        "run": {"output_dir": output_dir, "steps": 10, "log_every": 1, "save_every": 5, "progress": False},
    }
    for name, values in (overrides or {}).items():
        sections.setdefault(name, {}).update(copy.deepcopy(values))
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
