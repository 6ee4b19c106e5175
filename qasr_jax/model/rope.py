"""Multimodal rotary position embedding (MRoPE) over 3-D positions.

Each rotary frequency takes its angle from one of the three position components (temporal, height,
width). ``mrope_section`` says how many frequencies each component owns; "interleaved" assigns them in a
T,H,W,T,H,W,... pattern over the first ``3·min`` frequencies (the rest stay temporal), the older
"chunked" layout assigns contiguous blocks. With all three components equal (speech only), both reduce
to ordinary RoPE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mrope_component_index(mrope_section: tuple[int, int, int], interleaved: bool) -> np.ndarray:
    """For each of the ``sum(mrope_section)`` frequencies, which position component (0, 1, 2) drives it."""
    n = sum(mrope_section)
    owner = np.zeros(n, np.int32)
    if interleaved:
        for comp in (1, 2):
            owner[comp : 3 * mrope_section[comp] : 3] = comp
    else:
        owner[mrope_section[0] : mrope_section[0] + mrope_section[1]] = 1
        owner[mrope_section[0] + mrope_section[1] :] = 2
    return owner


def rope_cos_sin(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    mrope_section: tuple[int, int, int],
    interleaved: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[batch, seq, head_dim]`` (fp32) for positions ``[3, batch, seq]`` (or ``[batch, seq]``)."""
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
    # fp32 throughout, as the reference computes its inverse frequencies and angles.
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = jnp.asarray(np.float32(1.0) / np.power(np.float32(theta), exponent), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, S, hd/2]
    owner = mrope_component_index(mrope_section, interleaved)
    index = jnp.broadcast_to(jnp.asarray(owner), (1, *angles.shape[1:]))
    angles = jnp.take_along_axis(angles, index, axis=0)[0]  # [B, S, hd/2]
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` by cos/sin ``[batch, seq, head_dim]`` (half-split layout)."""
    dtype = x.dtype
    cos = cos[:, :, None, :].astype(dtype)
    sin = sin[:, :, None, :].astype(dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
