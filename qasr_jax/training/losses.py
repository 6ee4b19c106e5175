"""The training forward pass and its losses.

Both objectives read logits only where they have targets (``label_positions``): the head, the largest matmul
of the model (hidden × 152k vocabulary), runs on the target tokens rather than on the whole sequence.

* ASR: the logits at position p predict token p + 1; the targets are ``language X<asr_text>text<|im_end|>``.
* Aligner: the logits at each ``<timestamp>`` token are its boundary class (time / 80 ms).

* CTC (ASR, optional): the row's ``ctc_text`` labels on the audio embeddings read through the model's head.

Each loss is divided by its total over the whole batch (CE by the target weight, CTC by the label count), so
micro-batches, devices and processes add up to the exact means of the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qasr_jax import audio as audio_io
from qasr_jax.config import AudioEncoderConfig
from qasr_jax.model import Qwen3ASR
from qasr_jax.training.augment import SpecAugment
from qasr_jax.training.data import Batch


def batch_frames(waveforms: jax.Array) -> int:
    """Mel frames of a batch whose waveforms are ``[batch, (frames + 1) · 160]`` (the data pipeline's width)."""
    return waveforms.shape[1] // audio_io.HOP_LENGTH - 1


def training_window(config: AudioEncoderConfig, frames: int) -> int:
    """Attention window (chunks) for a batch of ``frames`` mel frames: the config's window, or one window over the
    whole batch width when that is shorter. Every clip then lies in one window either way and the padding is
    masked, so the result is the same and a short batch does not pay for a whole window of padding."""
    return max(1, min(config.window_chunks, -(-frames // config.chunk_frames)))


def audio_token_lengths(config: AudioEncoderConfig, wave_lengths: jax.Array) -> jax.Array:
    """Encoder output tokens ``[batch]`` for audio of ``wave_lengths`` samples (``config.output_length`` in jnp)."""
    frames = wave_lengths.astype(jnp.int32) // audio_io.HOP_LENGTH
    full, rest = frames // config.chunk_frames, frames % config.chunk_frames
    for _ in range(3):
        rest = jnp.where(rest > 0, (rest - 1) // 2 + 1, 0)
    return full * config.tokens_per_chunk + rest


def encode(
    module: Qwen3ASR, batch: Batch, augment: SpecAugment | None = None, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(audio embeddings [batch, tokens, hidden], their lengths)``: log-mel on device, exactly as the inference
    program computes it, then the encoder. With ``augment`` and ``key`` the features are perturbed first."""
    frames = batch_frames(batch.waveforms)
    scales, transform = None, None
    if augment is not None and augment.active and key is not None:
        scales = augment.scales(key, batch.waveforms.shape[0])
        transform = functools.partial(augment, key=key)
    window = training_window(module.config.audio, frames)
    return module.encode_waveforms(
        batch.waveforms,
        batch.wave_lengths,
        frames,
        window,
        frequency_scale=scales,
        transform_features=transform,
    )


def decode_targets(module: Qwen3ASR, batch: Batch, audio_embeds: jax.Array) -> jax.Array:
    """Logits ``[batch, labels, head]`` (fp32) at ``label_positions``, the audio slots filled with ``audio_embeds``."""
    return module(
        batch.input_ids, batch.attention_mask, audio_embeds=audio_embeds, logits_at=batch.label_positions
    )


def target_logits(module: Qwen3ASR, batch: Batch) -> jax.Array:
    """Logits ``[batch, labels, head]`` (fp32) at ``label_positions`` (use with ``model.apply(..., method=)``)."""
    return forward(module, batch)[0]


def forward(module: Qwen3ASR, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(target logits [batch, labels, head], audio embeddings [batch, tokens, hidden], their lengths)``.

    batch: ``waveforms [B, W]``, ``wave_lengths [B]``, ``input_ids``/``attention_mask [B, S]`` (right-padded,
    one ``<|audio_pad|>`` per encoder output token), ``label_positions [B, L]``.
    """
    audio_embeds, audio_lengths = encode(module, batch)
    return decode_targets(module, batch, audio_embeds), audio_embeds, audio_lengths


def audio_logits(module: Qwen3ASR, audio_embeds: jax.Array) -> jax.Array:
    """CTC logits ``[batch, tokens, vocab]`` (fp32): the audio embeddings, RMS-normalised as the head's input is,
    read through the model's own head. No parameter is added; at init these logits have the spread of the LM
    head's rather than the raw projector output's (≈ 30× smaller)."""
    x = audio_embeds.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return module.head(x)


def ctc_feasible(labels: jax.Array, paddings: jax.Array, audio_lengths: jax.Array) -> jax.Array:
    """``[batch]`` bool: the labels fit the audio tokens, counting the blank each repeated label needs."""
    valid = paddings < 0.5
    count = jnp.sum(valid, axis=-1)
    repeats = jnp.sum(valid[:, 1:] & valid[:, :-1] & (labels[:, 1:] == labels[:, :-1]), axis=-1)
    return (count > 0) & (count + repeats <= audio_lengths)


def ctc_row_weights(batch: Batch, audio_lengths: jax.Array) -> jax.Array:
    """``[batch]``: each row's weight in the CTC loss (its loss weight; 0 where the labels cannot fit)."""
    feasible = ctc_feasible(batch.ctc_labels, batch.ctc_label_paddings, audio_lengths)
    return jnp.max(batch.label_weights, axis=-1) * feasible


def ctc_label_count(config: AudioEncoderConfig, batch: Batch) -> jax.Array:
    """Σ over rows of row weight × label count: the CTC loss's denominator (computable before the forward pass)."""
    weights = ctc_row_weights(batch, audio_token_lengths(config, batch.wave_lengths))
    return jnp.sum(weights * jnp.sum(1.0 - batch.ctc_label_paddings, axis=-1))


def ctc_sum(
    model: Qwen3ASR, params: Any, audio_embeds: jax.Array, audio_lengths: jax.Array, batch: Batch,
    blank_id: int,
) -> jax.Array:  # fmt: skip
    """Σ over rows (times each row's weight) of the CTC loss of ``ctc_labels`` on ``audio_logits``. Rows whose
    labels cannot fit their audio tokens count nothing."""
    logits = model.apply({"params": params}, audio_embeds, method=audio_logits)  # [B, N, V] fp32
    return ctc_sum_of_logits(logits, audio_lengths, batch, blank_id)


def ctc_sum_of_logits(logits: jax.Array, audio_lengths: jax.Array, batch: Batch, blank_id: int) -> jax.Array:
    """``ctc_sum`` from the CTC logits ``[B, N, V]``."""
    steps = logits.shape[1]
    logit_paddings = (jnp.arange(steps)[None, :] >= audio_lengths[:, None]).astype(jnp.float32)
    per_row = optax.ctc_loss(
        logits, logit_paddings, batch.ctc_labels, batch.ctc_label_paddings, blank_id=blank_id
    )
    row_weight = ctc_row_weights(batch, audio_lengths)
    return jnp.sum(jnp.where(row_weight > 0, per_row * row_weight, 0.0))


def frame_sums(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(Σ w·CE, Σ w) of the frame targets (``frame_labels``/``frame_weights``) on the CTC logits."""
    tokens = batch.frame_labels.shape[1]
    ce, weight, _ = cross_entropy_sums(logits[:, :tokens], batch.frame_labels, batch.frame_weights)
    return ce, weight


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


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a step minimises: ``ce_weight`` × CE per target token + ``ctc_weight`` × CTC per label +
    ``frame_weight`` × CE per frame of the frame targets (rows with word times; ``Batch.frame_labels``).

    ``ce_weight = 0`` skips the decoder's forward pass (the encoder learns from CTC alone); ``ctc_weight = 0``
    skips CTC. ``blank_id``: the CTC blank. ``augment``: feature perturbation of the training forward pass
    (``augment.SpecAugment``; it needs the step's key).
    """

    ce_weight: float = 1.0
    ctc_weight: float = 0.0
    blank_id: int = 0
    frame_weight: float = 0.0
    augment: SpecAugment | None = None


def loss_sums(
    model: Qwen3ASR,
    params: Any,
    batch: Batch,
    objective: Objective,
    ce_total: jax.Array,
    ctc_total: jax.Array,
    frame_total: jax.Array | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective on ``batch`` (a micro-batch) with each loss divided by its whole-batch total (``ce_total``
    target weight, ``ctc_total`` labels, ``frame_total`` frame weight), so micro-batches add up to the batch's
    means; and the sums (``ce``, ``weight``, ``correct``, ``ctc``, ``ctc_labels``, ``frame``, ``frames``).
    ``key`` draws the objective's feature augmentation (none without it) and the adapters' dropout (a model with
    ``lora_dropout``)."""
    # The adapters' dropout masks: their own stream, so the augmentation's draws stay what they are without it.
    rngs = {"dropout": jax.random.fold_in(key, 0x10A)} if key is not None and model.lora_dropout > 0 else None
    audio_embeds, audio_lengths = model.apply(
        {"params": params}, batch, objective.augment, key, method=encode, rngs=rngs
    )
    loss = jnp.zeros((), jnp.float32)
    counts: dict[str, jax.Array] = {"weight": jnp.sum(batch.label_weights.astype(jnp.float32))}
    if objective.ce_weight > 0:
        logits = model.apply({"params": params}, batch, audio_embeds, method=decode_targets, rngs=rngs)
        ce_sum, weight, correct = cross_entropy_sums(logits, batch.labels, batch.label_weights)
        counts.update(ce=ce_sum, weight=weight, correct=correct)
        loss = loss + objective.ce_weight * ce_sum / ce_total
    if objective.ctc_weight > 0 or objective.frame_weight > 0:
        logits = model.apply({"params": params}, audio_embeds, method=audio_logits)
    if objective.ctc_weight > 0:
        ctc = ctc_sum_of_logits(logits, audio_lengths, batch, objective.blank_id)
        row_weight = ctc_row_weights(batch, audio_lengths)
        counts.update(ctc=ctc, ctc_labels=jnp.sum(row_weight * jnp.sum(1.0 - batch.ctc_label_paddings, -1)))
        loss = loss + objective.ctc_weight * ctc / ctc_total
    if objective.frame_weight > 0:
        frame, frames = frame_sums(logits, batch)
        counts.update(frame=frame, frames=frames)
        total = frame_total if frame_total is not None else jnp.maximum(frames, 1e-9)
        loss = loss + objective.frame_weight * frame / total
    return loss, counts


def audio_use(model: Qwen3ASR, params: Any, batch: Batch, blank_id: int) -> dict[str, jax.Array]:
    """Sums that show whether the model uses its audio: the transcript-only CE (``text_weights``) and the CTC of
    the batch, each also with the audio rolled by one row (row r hears row r − 1's audio), plus the greedy CTC
    argmax ``ctc_argmax [B, tokens]`` and the audio lengths. A model that ignores its audio scores the same
    both ways; the gap between them is the audio's share."""
    audio, lengths = model.apply({"params": params}, batch, method=encode)
    rolled, rolled_lengths = jnp.roll(audio, 1, axis=0), jnp.roll(lengths, 1, axis=0)
    # Rows whose labels fit both their own audio and the rolled audio, so both sums cover the same labels.
    rows = ctc_row_weights(batch, lengths) * ctc_row_weights(batch, rolled_lengths)
    labels = jnp.sum(1.0 - batch.ctc_label_paddings, axis=-1)
    out: dict[str, jax.Array] = {"ctc_labels": jnp.sum(rows * labels)}
    for prefix, (embeds, lens) in (("", (audio, lengths)), ("rolled_", (rolled, rolled_lengths))):
        logits = model.apply({"params": params}, batch, embeds, method=decode_targets)
        ce, weight, _ = cross_entropy_sums(logits, batch.labels, batch.text_weights)
        out[prefix + "text_ce"], out["text_weight"] = ce, weight
        ctc_logits = model.apply({"params": params}, embeds, method=audio_logits)
        paddings = (jnp.arange(ctc_logits.shape[1])[None, :] >= lens[:, None]).astype(jnp.float32)
        per_row = optax.ctc_loss(
            ctc_logits, paddings, batch.ctc_labels, batch.ctc_label_paddings, blank_id=blank_id
        )
        out[prefix + "ctc"] = jnp.sum(jnp.where(rows > 0, per_row * rows, 0.0))
        if not prefix:
            out["ctc_argmax"] = jnp.argmax(ctc_logits, axis=-1).astype(jnp.int32)
            out["audio_lengths"] = lens
    return out


def greedy_ctc(argmax: Any, length: int, blank_id: int) -> list[int]:
    """The labels of a greedy CTC path: repeats merged, blanks dropped."""
    out, previous = [], None
    for token in list(argmax[:length]):
        token = int(token)
        if token != previous and token != blank_id:
            out.append(token)
        previous = token
    return out


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
    "Objective",
    "audio_logits",
    "audio_token_lengths",
    "audio_use",
    "batch_frames",
    "cross_entropy_sums",
    "ctc_feasible",
    "ctc_label_count",
    "ctc_sum",
    "ctc_sum_of_logits",
    "decode_targets",
    "encode",
    "forward",
    "frame_sums",
    "greedy_ctc",
    "loss_sums",
    "predictions",
    "target_logits",
    "training_window",
]
