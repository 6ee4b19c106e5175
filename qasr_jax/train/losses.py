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
import optax

from qasr_jax import audio as audio_io
from qasr_jax.model import Qwen3ASR, first_valid, positions_from_mask
from qasr_jax.train.data import Batch


def batch_frames(waveforms: jax.Array) -> int:
    """Mel frames of a batch whose waveforms are ``[batch, (frames + 1) · 160]`` (the data pipeline's width)."""
    return waveforms.shape[1] // audio_io.HOP_LENGTH - 1


def target_logits(module: Qwen3ASR, batch: Batch) -> jax.Array:
    """Logits ``[batch, labels, head]`` (fp32) at ``label_positions`` (use with ``model.apply(..., method=)``)."""
    return forward(module, batch)[0]


def forward(module: Qwen3ASR, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(target logits [batch, labels, head], audio embeddings [batch, tokens, hidden], their lengths)``.

    batch: ``waveforms [B, W]``, ``wave_lengths [B]``, ``input_ids``/``attention_mask [B, S]`` (right-padded,
    one ``<|audio_pad|>`` per encoder output token), ``label_positions [B, L]``. Log-mel features are computed
    here, on device, exactly as the inference program computes them.
    """
    frames = batch_frames(batch.waveforms)
    features, feature_frames = audio_io.log_mel(batch.waveforms, batch.wave_lengths, frames=frames)
    feature_mask = (jnp.arange(frames)[None, :] < feature_frames[:, None]).astype(jnp.int32)
    audio_embeds, audio_lengths = module.encode_audio(features, feature_mask)
    x = module.embed_inputs(batch.input_ids, audio_embeds)
    mask = batch.attention_mask
    hidden, _ = module.decoder(x, positions_from_mask(mask), first_valid(mask))
    picked = jnp.take_along_axis(hidden, batch.label_positions[..., None], axis=1)
    return module.head(picked), audio_embeds, audio_lengths


def ctc_sum(
    model: Qwen3ASR, params: Any, audio_embeds: jax.Array, audio_lengths: jax.Array, batch: Batch,
    blank_id: int,
) -> jax.Array:  # fmt: skip
    """Σ over rows (times each row's weight) of the CTC loss of ``ctc_labels`` on the audio embeddings read
    through the model's head. Rows whose labels cannot fit their audio tokens count nothing."""
    logits = model.apply({"params": params}, audio_embeds, method=Qwen3ASR.head)  # [B, N, V] fp32
    steps = logits.shape[1]
    logit_paddings = (jnp.arange(steps)[None, :] >= audio_lengths[:, None]).astype(jnp.float32)
    per_row = optax.ctc_loss(
        logits, logit_paddings, batch.ctc_labels, batch.ctc_label_paddings, blank_id=blank_id
    )
    labels = jnp.sum(1.0 - batch.ctc_label_paddings, axis=-1)
    row_weight = jnp.max(batch.label_weights, axis=-1) * (labels > 0) * (labels <= audio_lengths)
    return jnp.sum(jnp.where(row_weight > 0, per_row * row_weight, 0.0))


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
    model: Qwen3ASR, params: Any, batch: Batch, ctc_weight: float = 0.0, ctc_blank_id: int = 0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective's sum (Σ w·CE, plus ``ctc_weight`` × Σ CTC when it is positive) and the counts (``ce``,
    ``ctc``, ``weight``, ``correct``)."""
    logits, audio_embeds, audio_lengths = model.apply({"params": params}, batch, method=forward)
    ce_sum, weight, correct = cross_entropy_sums(logits, batch.labels, batch.label_weights)
    counts = {"ce": ce_sum, "weight": weight, "correct": correct}
    if ctc_weight <= 0:
        return ce_sum, counts
    counts["ctc"] = ctc_sum(model, params, audio_embeds, audio_lengths, batch, ctc_blank_id)
    return ce_sum + ctc_weight * counts["ctc"], counts


def predictions(model: Qwen3ASR, params: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss sums plus the argmax class ``[B, L]`` at every target (the aligner's boundary predictions)."""
    logits = model.apply({"params": params}, batch, method=target_logits)
    ce_sum, weight, correct = cross_entropy_sums(logits, batch.labels, batch.label_weights)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), {
        "ce_sum": ce_sum,
        "weight": weight,
        "correct": correct,
    }


__all__ = [
    "batch_frames",
    "cross_entropy_sums",
    "ctc_sum",
    "forward",
    "loss_sums",
    "predictions",
    "target_logits",
]
