"""Time one training step (forward, backward, AdamW update) of the demo models and of the released sizes.

    python -m benchmarks.train_step [--models demo-ctc,demo-decoder,demo,demo-voices,demo-aligner,asr-0.6b] [--repeats 5]

Each model gets a synthetic batch of the shape and the objective of its training stage (``demo-ctc``: stage A,
batch 16 × 2 s, CTC and frame targets, the decoder skipped; ``demo-decoder``: stage B, batch 16 × 3 s, CE with
the encoder frozen; ``demo``: stage C, everything; ``demo-voices``: stage D, C with the feature augmentation of
``demo_asr_voices.toml``; ``demo-aligner``: batch 16 × 3 s; ``asr-0.6b``: batch 1 × 10 s,
the released Qwen3-ASR-0.6B config with random weights, fp32). Audio is noise, the tokens are random ids: the
step's cost does not depend on either. Prints one table with the load average before and after the run.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from benchmarks import common

SIZES: dict[str, dict[str, Any]] = {
    "demo-ctc": {"batch": 16, "seconds": 2.0, "targets": 10, "aligner": False, "ce": 0.0, "ctc": 1.0,
                 "frame": 1.0, "freeze": ("decoder_layers",)},
    "demo-decoder": {"batch": 16, "seconds": 3.0, "targets": 12, "aligner": False, "freeze": ("encoder",)},
    "demo": {"batch": 16, "seconds": 3.0, "targets": 12, "aligner": False, "ctc": 0.3, "frame": 0.3},
    "demo-voices": {"batch": 16, "seconds": 3.0, "targets": 12, "aligner": False, "ctc": 0.3, "frame": 0.3,
                    "augment": "demo_asr_voices.toml"},  # the [augment] table of that stage's config
    "demo-aligner": {"batch": 16, "seconds": 3.0, "targets": 16, "aligner": True},
    "asr-0.6b": {"batch": 1, "seconds": 10.0, "targets": 40, "aligner": False},
}  # fmt: skip


def thinker_config(name: str) -> Any:
    from train import demo_init

    if name.startswith("demo"):
        return demo_init.aligner_config() if SIZES[name]["aligner"] else demo_init.asr_config()
    return common.thinker_config(name)


def synthetic_batch(config: Any, batch: int, seconds: float, targets: int, seed: int = 0) -> Any:
    """A training batch in the data pipeline's layout (``qasr_jax.training.data.BatchLoader``)."""
    from qasr_jax import audio as audio_io
    from qasr_jax.training.data import Batch

    rng = np.random.default_rng(seed)
    samples = int(seconds * audio_io.SAMPLE_RATE)
    frames = audio_io.num_frames(samples)
    chunk = config.audio.chunk_frames
    padded_frames = -(-frames // chunk) * chunk
    audio_tokens = config.audio.output_length(frames)
    prompt = 12
    seq_len = -(-(prompt + audio_tokens + targets) // 16) * 16
    ids = rng.integers(0, 1000, (batch, seq_len)).astype(np.int32)
    ids[:, 4 : 4 + audio_tokens] = config.audio_token_id
    mask = np.zeros((batch, seq_len), np.int32)
    mask[:, : prompt + audio_tokens + targets] = 1
    first = prompt + audio_tokens
    classes = config.classify_num if config.is_aligner else config.text.vocab_size
    tokens = padded_frames // chunk * config.audio.tokens_per_chunk
    return Batch(
        waveforms=(0.1 * rng.standard_normal((batch, (padded_frames + 1) * audio_io.HOP_LENGTH))).astype(
            np.float32
        ),
        wave_lengths=np.full((batch,), samples, np.int32),
        input_ids=ids,
        attention_mask=mask,
        label_positions=np.tile(np.arange(first - 1, first - 1 + targets, dtype=np.int32), (batch, 1)),
        labels=rng.integers(0, classes, (batch, targets)).astype(np.int32),
        label_weights=np.ones((batch, targets), np.float32),
        ctc_labels=rng.integers(0, 1000, (batch, targets)).astype(np.int32),
        ctc_label_paddings=np.zeros((batch, targets), np.float32),
        text_weights=np.ones((batch, targets), np.float32),
        frame_labels=rng.integers(0, 1000, (batch, tokens)).astype(np.int32),
        frame_weights=np.ones((batch, tokens), np.float32),
    )


def time_steps(name: str, repeats: int) -> float:
    """Median seconds per train step of the stage's objective (compiled ahead of the timing)."""
    import jax

    from qasr_jax import sharding
    from qasr_jax.training.augment import SpecAugment
    from qasr_jax.training.config import ModelConfig, OptimConfig
    from qasr_jax.training.losses import Objective
    from qasr_jax.training.step import Trainer

    size = SIZES[name]
    config = thinker_config(name)
    mesh = sharding.make_mesh("data=1")
    augment = None
    if "augment" in size:
        import tomllib

        with open(os.path.join(common.REPO, "train", "configs", size["augment"]), "rb") as f:
            augment = SpecAugment(**tomllib.load(f)["augment"])
    objective = Objective(size.get("ce", 1.0), size.get("ctc", 0.0), 0, size.get("frame", 0.0), augment)
    model_cfg = ModelConfig(checkpoint="-", freeze=size.get("freeze", ()))
    trainer = Trainer(config, model_cfg, OptimConfig(), 1000, mesh, objective=objective)
    state = trainer.init_state(trainer.init_random_params(0))
    batch = trainer.shard_batch(synthetic_batch(config, size["batch"], size["seconds"], size["targets"]))
    state, metrics = trainer.train_step(state, batch)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.train_step", __doc__)
    parser.add_argument("--models", default="demo-ctc,demo-decoder,demo,demo-voices,demo-aligner,asr-0.6b")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(SIZES)}")
    load = os.getloadavg()[0]
    print(f"load average before the run: {load:.2f} ({os.cpu_count()} CPUs)")
    print("| model | batch | clip (s) | frozen | step (s) |")
    print("|---|---:|---:|---|---:|")
    for name in names:
        size = SIZES[name]
        step = time_steps(name, args.repeats)
        frozen = ", ".join(size.get("freeze", ())) or "-"
        print(f"| {name} | {size['batch']} | {size['seconds']:g} | {frozen} | {step:.3f} |", flush=True)
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
