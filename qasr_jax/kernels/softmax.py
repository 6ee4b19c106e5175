"""The masked fp32 softmax shared by the XLA reference implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis in fp32, over the entries where ``mask`` is true.

    logits: any shape ``[..., keys]``; mask: boolean, broadcastable to ``logits``. Rows with no true entry
    come out as all zeros rather than NaN (an all-padding window, a left-padded row before its first token).
    """
    logits = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    # A fully masked row has max -inf; shifting by 0 instead keeps exp(-inf) = 0 and avoids -inf - -inf = NaN.
    # The shift cancels in the softmax, so it carries no gradient.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    unnormalised = jnp.exp(logits - row_max)
    row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
    return unnormalised / jnp.where(row_sum > 0.0, row_sum, 1.0)
