"""Causal attention of new queries against the decoder's KV cache, with left padding and grouped KV heads.

The decoder keeps a preallocated cache of ``kv_len`` slots per row. Prompts are left-padded, so row ``b`` holds
tokens from slot ``kv_start[b]`` on. The queries of one call occupy slots ``q_offset .. q_offset + q_len - 1``
(the same for every row) and have already been written into the cache. Query ``i`` attends to slots ``j`` with
``kv_start[b] <= j <= q_offset + i``. Query heads share KV heads as in HF ``repeat_kv``: query head ``h`` reads
KV head ``h // (q_heads // kv_heads)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qasr_jax.kernels.backend import resolve_impl, resolve_interpret
from qasr_jax.kernels.softmax import masked_softmax


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, kv_start: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            "q must be [batch, q_len, q_heads, head_dim] and k, v [batch, kv_len, kv_heads, head_dim]; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    batch, _, q_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or q_heads % k.shape[2] != 0:
        raise ValueError(
            f"k/v {k.shape} do not fit q {q.shape}: batch and head_dim must match and kv_heads divide q_heads"
        )
    if kv_start.shape != (batch,):
        raise ValueError(f"kv_start must be [batch] = [{batch}], got {kv_start.shape}")


def causal_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array | int,
    kv_start: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Reference cached causal attention in plain XLA ops, for any ``q_len``.

    q: ``[batch, q_len, q_heads, head_dim]``; k, v: ``[batch, kv_len, kv_heads, head_dim]``; q_offset: int32
    scalar, the cache slot of query 0; kv_start: int32 ``[batch]``, the first valid slot of each row.
    Returns ``[batch, q_len, q_heads, head_dim]`` in ``q.dtype``; queries with no visible slot get zeros.
    """
    _check_shapes(q, k, v, kv_start)
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    # Query head h = kv * group + g belongs to KV head kv: a reshape groups them without copying K/V.
    q_grouped = q.reshape(batch, q_len, kv_heads, group, head_dim)
    logits = jnp.einsum("bskgd,btkd->bkgst", q_grouped, k, preferred_element_type=jnp.float32) * scale
    query_slot = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)  # [q_len]
    key_slot = jnp.arange(kv_len, dtype=jnp.int32)  # [kv_len]
    visible = (key_slot[None, None, :] >= kv_start[:, None, None]) & (
        key_slot[None, None, :] <= query_slot[None, :, None]
    )  # [batch, q_len, kv_len]
    probs = masked_softmax(logits, visible[:, None, None, :, :])
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)


def decode_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array | int,
    kv_start: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The fused Pallas kernel for one new token (``q_len == 1``); same contract as ``causal_attention_xla``."""
    raise NotImplementedError("the Pallas decode-attention kernel is not available yet; use impl='xla'")


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array | int,
    kv_start: jax.Array,
    *,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Cached causal attention on the implementation ``impl`` selects (see ``qasr_jax.kernels.backend``).

    The Pallas kernel covers decoding (``q_len == 1``); prefill (``q_len > 1``) always runs the XLA reference.
    Shapes as in ``causal_attention_xla``.
    """
    if resolve_impl(impl) == "pallas" and q.shape[1] == 1:
        return decode_attention_pallas(
            q, k, v, q_offset, kv_start, scale=scale, interpret=resolve_interpret(interpret)
        )
    return causal_attention_xla(q, k, v, q_offset, kv_start, scale=scale)
