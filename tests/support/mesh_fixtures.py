"""Parts shared by the mesh checks and the tests: the tiny model with 8 heads, params whose every part matters,
a synthetic ASR batch. Importing it changes nothing in the process (the checks set up their devices themselves).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qasr_jax.config import config_from_dict
from qasr_jax.training.data import Batch
from qasr_jax.weights import flatten_params

# The encoder key bias only shifts every attention logit of a query by the same amount, which softmax ignores:
# its gradient is exactly zero, so the optimizer sees rounding noise there (Adam turns noise into ±lr steps).
ZERO_GRADIENT_LEAVES = ("audio_tower/layers/self_attn/k_proj/bias",)


def mesh_test_config() -> Any:
    """The tiny model with 8 attention heads everywhere (so ``tensor=8`` splits heads) and 4 kv heads."""
    from tests.support.train_fixtures import tiny_config_dict

    raw = tiny_config_dict()
    raw["thinker_config"]["audio_config"]["encoder_attention_heads"] = 8
    raw["thinker_config"]["text_config"].update(num_attention_heads=8, num_key_value_heads=4, head_dim=4)
    raw["thinker_config"]["text_config"]["rope_scaling"]["mrope_section"] = [1, 1, 0]
    return config_from_dict(raw)


def random_params(config: Any, seed: int = 0, scale: float = 0.15) -> dict:
    """Host params whose every part matters: kernels N(0, scale²/fan-in·…), norms near 1, small biases."""
    from qasr_jax.weights import abstract_params, unflatten_params

    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in flatten_params(abstract_params(config)):
        shape = leaf.shape
        if path[-1] == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif path[-1] == "bias":
            value = 0.05 * rng.standard_normal(shape)
        else:
            value = scale * rng.standard_normal(shape)
        flat[path] = value.astype(np.float32)
    return unflatten_params(flat)


def synthetic_batch(config: Any, rows: int = 8, seed: int = 0) -> Batch:
    """A right-padded ASR-shaped batch: ragged audio, audio pads, targets at the end, one zero-weight row."""
    rng = np.random.default_rng(seed)
    frames = 200
    width = (frames + 1) * 160
    seq, labels = 48, 16
    batch = Batch(
        waveforms=(0.1 * rng.standard_normal((rows, width))).astype(np.float32),
        wave_lengths=rng.integers(8000, 32000, rows).astype(np.int32),
        input_ids=rng.integers(0, 1900, (rows, seq)).astype(np.int32),
        attention_mask=np.zeros((rows, seq), np.int32),
        label_positions=np.zeros((rows, labels), np.int32),
        labels=rng.integers(0, config.head_size, (rows, labels)).astype(np.int32),
        label_weights=np.zeros((rows, labels), np.float32),
        ctc_labels=np.zeros((rows, labels), np.int32),
        ctc_label_paddings=np.ones((rows, labels), np.float32),
    )
    for r in range(rows):
        n_audio = config.audio.output_length(int(batch.wave_lengths[r]) // 160)
        batch.input_ids[r, 2 : 2 + n_audio] = config.audio_token_id
        length = 2 + n_audio + int(rng.integers(4, 12))
        batch.attention_mask[r, :length] = 1
        n_labels = int(rng.integers(3, labels))
        batch.label_positions[r, :n_labels] = np.arange(length - n_labels, length)
        batch.label_weights[r, :n_labels] = 1.0
    batch.label_weights[-1] = 0.0
    return batch


def relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
