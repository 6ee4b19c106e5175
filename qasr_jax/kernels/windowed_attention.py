"""Bidirectional attention inside fixed-size windows with a valid prefix: the encoder's attention.

The encoder lays its tokens into windows of ``window`` tokens (104 = 8 s at the released config; 13–104 in
practice). Only a prefix of each window holds tokens (``valid_len``); the rest is padding that must neither be
attended to nor produce NaNs. Windows never attend to each other, so the packed batch of windows is simply the
leading axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qasr_jax.kernels.backend import resolve_impl, resolve_interpret
from qasr_jax.kernels.softmax import masked_softmax


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, valid_len: jax.Array) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must all be [num_windows, window, heads, head_dim]; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if valid_len.shape != (q.shape[0],):
        raise ValueError(f"valid_len must be [num_windows] = [{q.shape[0]}], got {valid_len.shape}")


def windowed_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, valid_len: jax.Array, *, scale: float | None = None
) -> jax.Array:
    """Reference windowed attention in plain XLA ops.

    q, k, v: ``[num_windows, window, heads, head_dim]``; valid_len: int32 ``[num_windows]``, the number of
    tokens at the start of each window (the rest is padding). Returns ``[num_windows, window, heads,
    head_dim]`` in ``q.dtype``; rows at or past ``valid_len`` are zero.

    Numerics follow the official model: fp32 logits and softmax, probabilities cast to the value dtype for the
    value product, fp32 accumulation.
    """
    _check_shapes(q, k, v, valid_len)
    window, head_dim = q.shape[1], q.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    token_valid = jnp.arange(window)[None, :] < valid_len[:, None]  # [num_windows, window]
    probs = masked_softmax(logits, token_valid[:, None, None, :])
    out = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return jnp.where(token_valid[:, :, None, None], out, 0.0).astype(q.dtype)


def windowed_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid_len: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The fused Pallas kernel (same contract as ``windowed_attention_xla``)."""
    raise NotImplementedError("the Pallas windowed-attention kernel is not available yet; use impl='xla'")


def windowed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid_len: jax.Array,
    *,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Windowed attention on the implementation ``impl`` selects (see ``qasr_jax.kernels.backend``).

    q, k, v: ``[num_windows, window, heads, head_dim]``; valid_len: int32 ``[num_windows]``.
    Returns ``[num_windows, window, heads, head_dim]`` in ``q.dtype``, zeros at padded rows.
    """
    if resolve_impl(impl) == "xla":
        return windowed_attention_xla(q, k, v, valid_len, scale=scale)
    return windowed_attention_pallas(q, k, v, valid_len, scale=scale, interpret=resolve_interpret(interpret))
