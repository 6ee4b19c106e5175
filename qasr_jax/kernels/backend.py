"""Choosing between a Pallas kernel and its XLA reference implementation, and between kernel variants.

Every kernel in this package comes in two implementations with the same signature and semantics:

- ``"xla"``: plain ``jnp`` code (einsums, masks, an fp32 softmax). It runs everywhere, is differentiable by
  ordinary autodiff, and is the numerical reference the kernels are tested against.
- ``"pallas"``: a fused ``pl.pallas_call`` kernel that never materialises the score matrix in HBM.

``impl="auto"`` picks ``"pallas"`` on TPU and GPU and ``"xla"`` on CPU, where Pallas has no compiled backend
and would run through its (slow) interpreter. ``"xla"`` or ``"pallas"`` force one; forcing ``"pallas"`` on CPU
runs the kernel in interpret mode, which is how the tests check kernels without an accelerator.

TPU and GPU Pallas are different compilers with different rules, so each kernel has two launch variants
(``target``) around one shared kernel body:

- ``"tpu"`` (Mosaic): block shapes whose last two dimensions are multiples of 8×128 (or the whole array
  dimension); per-window/per-row scalars arrive through scalar prefetch into SMEM, where index maps can read
  them too; ``pltpu.CompilerParams`` marks grid axes parallel.
- ``"gpu"`` (Triton, selected by passing ``pltriton.CompilerParams``; JAX's default GPU lowering is Mosaic GPU,
  which these kernels do not target): every array a kernel touches has power-of-two size, ``tl.dot`` needs at
  least 16 rows, there is no scalar prefetch, so scalars arrive as squeezed one-element blocks.

The target defaults to the platform (``"tpu"`` on TPU, ``"gpu"`` on GPU; ``"tpu"`` on CPU, where interpret mode
runs either variant).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Impl = Literal["auto", "xla", "pallas"]
Target = Literal["tpu", "gpu"]

_ACCELERATOR_PLATFORMS = ("tpu", "gpu")

# Masked logits in the kernels get a large finite value rather than -inf so that exp(mask - max) is exactly 0
# without ever forming inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def platform() -> str:
    """The platform that jitted code runs on by default: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


def resolve_impl(impl: str, on: str | None = None) -> Literal["xla", "pallas"]:
    """Turn a user's ``impl`` option into the implementation to run on the platform ``on`` (default: the default
    backend's)."""
    if impl == "auto":
        return "pallas" if (on or platform()) in _ACCELERATOR_PLATFORMS else "xla"
    if impl in ("xla", "pallas"):
        return impl
    raise ValueError(f"impl must be 'auto', 'xla' or 'pallas', got {impl!r}")


def resolve_interpret(interpret: bool | None) -> bool:
    """Whether a Pallas kernel runs in interpret mode: forced by the caller, else only where there is no
    compiled Pallas backend (CPU)."""
    if interpret is not None:
        return interpret
    return platform() not in _ACCELERATOR_PLATFORMS


def resolve_target(target: str | None) -> Target:
    """The kernel variant to build: the caller's choice, else the one for the default platform."""
    if target is None:
        return "gpu" if platform() == "gpu" else "tpu"
    if target in ("tpu", "gpu"):
        return target
    raise ValueError(f"target must be 'tpu' or 'gpu', got {target!r}")


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``value``."""
    return -(-value // multiple) * multiple


def next_power_of_2(value: int) -> int:
    """The smallest power of two that is at least ``value`` (and at least 1)."""
    return 1 << max(value - 1, 0).bit_length()


def kernel_precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """The matmul precision of a kernel's inputs: fp32 inputs must not be rounded to bf16 by the MXU (TPU default
    precision); bf16 inputs multiply exactly either way."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def kernel_dot(a: jax.Array, b: jax.Array, b_axis: int, precision: jax.lax.Precision) -> jax.Array:
    """``a [m, k]`` times ``b`` contracted over its axis ``b_axis`` (1: ``a @ b.T``, 0: ``a @ b``), accumulated in
    fp32: the two matmuls of a kernel body."""
    return jax.lax.dot_general(
        a, b, (((1,), (b_axis,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
