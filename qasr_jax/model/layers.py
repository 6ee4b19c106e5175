"""Small building blocks shared by the encoder and the decoder: dense layers with logical axes, norms, GELU.

Every parameter is created with ``nn.with_logical_partitioning`` so a mesh rule table (qasr_jax.sharding)
can place it without touching the model. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

default_init = nn.initializers.normal(stddev=0.02)


def gelu(x: jax.Array) -> jax.Array:
    """The exact erf GELU (``jax.nn.gelu`` defaults to the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


class Dense(nn.Module):
    """``y = x · W (+ b)`` contracting the last ``len(in_shape)`` axes of x into ``out_shape``.

    kernel: ``[*in_shape, *out_shape]`` with logical axes ``kernel_axes``; bias: ``[*out_shape]``.
    """

    in_shape: Sequence[int]
    out_shape: Sequence[int]
    kernel_axes: Axes
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(default_init, self.kernel_axes),
            (*self.in_shape, *self.out_shape),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))
        if self.has_variable("params", "lora_a"):
            y = y + self.low_rank_update(x)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n_in:]),
                tuple(self.out_shape),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y

    def low_rank_update(self, x: jax.Array) -> jax.Array:
        """The adapter's ``(x · lora_a) · lora_b`` (``qasr_jax.adapters``; its scale is already in ``lora_b``).

        ``lora_a [*in_shape, rank]``, ``lora_b [rank, *out_shape]`` apply to every row; with a leading axis,
        ``lora_a [n, *in_shape, rank]``, ``lora_b [n, rank, *out_shape]`` give each of n rows its own adapter,
        and x's leading axis of ``k·n`` holds k consecutive entries per row (the encoder's windows of a clip).
        With ``lora_dropout`` and a "dropout" rng (training), x is dropped out on the adapter's path only.
        """
        n_in = len(self.in_shape)
        a = self.get_variable("params", "lora_a").astype(self.dtype)
        b = self.get_variable("params", "lora_b").astype(self.dtype)
        if self.lora_dropout > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
        if a.ndim == n_in + 1:
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            h = jax.lax.dot_general(x, a, (contract, ((), ())))
            return jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))
        rows = a.shape[0]
        lead = x.shape[: x.ndim - n_in]
        xr = x.reshape(rows, -1, *self.in_shape)  # [rows, entries, *in]
        contract = (tuple(range(2, 2 + n_in)), tuple(range(1, 1 + n_in)))
        h = jax.lax.dot_general(xr, a, (contract, ((0,), (0,))))  # [rows, entries, rank]
        out = jax.lax.dot_general(h, b, (((2,), (1,)), ((0,), (0,))))  # [rows, entries, *out]
        return out.reshape(*lead, *self.out_shape)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (the encoder's norms use PyTorch's eps, 1e-5)."""

    eps: float = 1e-5
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (d,),
                           self.param_dtype)  # fmt: skip
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)), (d,),
                          self.param_dtype)  # fmt: skip
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm in fp32; the result is cast back to the input dtype before the gain multiplies it."""

    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (d,),
                           self.param_dtype)  # fmt: skip
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(x.dtype).astype(self.dtype)
