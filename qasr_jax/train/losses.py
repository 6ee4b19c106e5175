"""The training forward pass and its losses.

Both objectives read logits only where they have targets (``label_positions``): the head, the largest matmul
of the model (hidden × 152k vocabulary), runs on the target tokens rather than on the whole sequence.

* ASR: the logits at position p predict token p + 1; the targets are ``language X<asr_text>text<|im_end|>``.
* Aligner: the logits at each ``<timestamp>`` token are its boundary class (time / 80 ms).

Losses are returned as sums with the total weight, so micro-batches, devices and processes add up to the
exact token mean of the whole batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qasr_jax import audio as audio_io
from qasr_jax.model import Qwen3ASR, first_valid, positions_from_mask


def batch_frames(waveforms: jax.Array) -> int:
    """Mel frames of a batch whose waveforms are ``[batch, (frames + 1) · 160]`` (the data pipeline's width)."""
    return waveforms.shape[1] // audio_io.HOP_LENGTH - 1


def target_logits(module: Qwen3ASR, batch: dict[str, jax.Array]) -> jax.Array:
    """Logits ``[batch, labels, head]`` (fp32) at ``label_positions`` (use with ``model.apply(..., method=)``).

    batch: ``waveforms [B, W]``, ``wave_lengths [B]``, ``input_ids``/``attention_mask [B, S]`` (right-padded,
    one ``<|audio_pad|>`` per encoder output token), ``label_positions [B, L]``. Log-mel features are computed
    here, on device, exactly as the inference program computes them.
    """
    frames = batch_frames(batch["waveforms"])
    features, feature_frames = audio_io.log_mel(batch["waveforms"], batch["wave_lengths"], frames=frames)
    feature_mask = (jnp.arange(frames)[None, :] < feature_frames[:, None]).astype(jnp.int32)
    audio_embeds, _ = module.encode_audio(features, feature_mask)
    x = module.embed_inputs(batch["input_ids"], audio_embeds)
    mask = batch["attention_mask"]
    hidden, _ = module.decoder(x, positions_from_mask(mask), first_valid(mask))
    picked = jnp.take_along_axis(hidden, batch["label_positions"][..., None], axis=1)
    return module.head(picked)


def cross_entropy_sums(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Σ w·CE, Σ w, Σ w·[argmax = label]) over ``[B, L]`` targets; logits ``[B, L, V]`` in fp32."""
    logits = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    nll = log_norm - picked
    weights = weights.astype(jnp.float32)
    active = weights > 0
    # Padding targets may sit on any position; where() keeps their values out of the sums entirely.
    ce_sum = jnp.sum(jnp.where(active, nll * weights, 0.0))
    correct = jnp.sum(jnp.where(active & (jnp.argmax(logits, axis=-1) == labels), weights, 0.0))
    return ce_sum, jnp.sum(weights), correct


def loss_sums(
    model: Qwen3ASR, params: Any, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Σ w·CE of a batch and its counts (``weight``, ``correct``)."""
    logits = model.apply({"params": params}, batch, method=target_logits)
    ce_sum, weight, correct = cross_entropy_sums(logits, batch["labels"], batch["label_weights"])
    return ce_sum, {"weight": weight, "correct": correct}


def predictions(
    model: Qwen3ASR, params: Any, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss sums plus the argmax class ``[B, L]`` at every target (the aligner's boundary predictions)."""
    logits = model.apply({"params": params}, batch, method=target_logits)
    ce_sum, weight, correct = cross_entropy_sums(logits, batch["labels"], batch["label_weights"])
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), {
        "ce_sum": ce_sum,
        "weight": weight,
        "correct": correct,
    }


__all__ = ["batch_frames", "cross_entropy_sums", "loss_sums", "predictions", "target_logits"]
