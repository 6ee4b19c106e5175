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
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n_in:]),
                tuple(self.out_shape),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


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
