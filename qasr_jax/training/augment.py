"""Augmentation of the log-mel features during training, on device, inside the train step.

Three standard perturbations, each drawn per row from the step's key:

* **frequency scaling** (vocal-tract-length perturbation): the power spectrum is stretched along the frequency
  axis by a factor drawn log-uniformly in ``[1 / (1 + frequency_scale), 1 + frequency_scale]`` before the mel
  filters (``audio.log_mel``'s ``frequency_scale``). A shorter or longer vocal tract moves the formants by a
  roughly constant factor, so one voice becomes a family of voices.
* **frequency masks**: ``freq_masks`` bands of 0 … ``freq_width`` mel bins set to the row's mean.
* **time masks**: ``time_masks`` spans of 0 … ``time_width`` frames (within the row's valid frames) set to the
  row's mean (SpecAugment).

Frames past a row's length stay zero, so the encoder sees padding exactly as without augmentation. Nothing here
runs at evaluation or inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qasr_jax.training.config import AugmentConfig


class SpecAugment(AugmentConfig):
    """How much to perturb (all 0: nothing; see the module docstring): the fields of ``AugmentConfig``."""

    @property
    def active(self) -> bool:
        return self.frequency_scale > 0 or (self.freq_masks > 0 and self.freq_width > 0) or (
            self.time_masks > 0 and self.time_width > 0
        )

    def scales(self, key: jax.Array, batch: int) -> jax.Array | None:
        """``[batch]`` frequency factors for ``audio.log_mel`` (None when frequency scaling is off)."""
        if self.frequency_scale <= 0:
            return None
        bound = jnp.log1p(self.frequency_scale)
        return jnp.exp(jax.random.uniform(jax.random.fold_in(key, 1), (batch,), minval=-bound, maxval=bound))

    def __call__(self, features: jax.Array, frames: jax.Array, key: jax.Array) -> jax.Array:
        """``features [B, M, T]`` (zero past each row's ``frames [B]``) with the masks drawn from ``key``."""
        batch, mels, width = features.shape
        freq_key, time_key = jax.random.split(jax.random.fold_in(key, 2))
        valid = jnp.arange(width)[None, :] < frames[:, None]  # [B, T]
        x = features.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(valid, axis=-1), 1)
        mean = jnp.sum(jnp.where(valid[:, None, :], x, 0.0), axis=(1, 2)) / (count * mels)  # [B]
        masked = jnp.zeros((batch, mels, width), bool)
        if self.freq_masks > 0 and self.freq_width > 0:
            masked = masked | _bands(freq_key, batch, self.freq_masks, self.freq_width, jnp.full((batch,), mels),
                                     mels)[:, :, None]  # fmt: skip
        if self.time_masks > 0 and self.time_width > 0:
            masked = masked | _bands(time_key, batch, self.time_masks, self.time_width, frames, width)[:, None, :]
        x = jnp.where(masked, mean[:, None, None], x)
        return jnp.where(valid[:, None, :], x, 0.0).astype(features.dtype)


def _bands(key: jax.Array, batch: int, count: int, max_width: int, extent: jax.Array, size: int) -> jax.Array:
    """``[batch, size]`` bool: the union of ``count`` bands per row, each of width 0 … ``max_width`` (at most the
    row's ``extent``) starting uniformly where it fits within ``extent``."""
    width_key, start_key = jax.random.split(key)
    widths = jax.random.randint(width_key, (batch, count), 0, max_width + 1)
    widths = jnp.minimum(widths, extent[:, None])
    room = jnp.maximum(extent[:, None] - widths, 0) + 1
    starts = jnp.floor(jax.random.uniform(start_key, (batch, count)) * room).astype(jnp.int32)
    positions = jnp.arange(size)[None, None, :]
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return jnp.any(inside, axis=1)


__all__ = ["SpecAugment"]
