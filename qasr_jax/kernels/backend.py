"""Choosing between a Pallas kernel and its XLA reference implementation.

Every kernel in this package comes in two implementations with the same signature and semantics:

- ``"xla"``: plain ``jnp`` code (einsums, masks, an fp32 softmax). It runs everywhere, is differentiable by
  ordinary autodiff, and is the numerical reference the kernels are tested against.
- ``"pallas"``: a fused ``pl.pallas_call`` kernel that never materialises the score matrix in HBM.

``impl="auto"`` picks ``"pallas"`` on TPU and GPU and ``"xla"`` on CPU, where Pallas has no compiled backend
and would run through its (slow) interpreter. ``"xla"`` or ``"pallas"`` force one; forcing ``"pallas"`` on CPU
runs the kernel in interpret mode, which is how the tests check kernels without an accelerator.
"""

from __future__ import annotations

from typing import Literal

import jax

Impl = Literal["auto", "xla", "pallas"]

_ACCELERATOR_PLATFORMS = ("tpu", "gpu")


def platform() -> str:
    """The platform that jitted code runs on by default: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


def resolve_impl(impl: str) -> Literal["xla", "pallas"]:
    """Turn a user's ``impl`` option into the implementation to run on the default backend."""
    if impl == "auto":
        return "pallas" if platform() in _ACCELERATOR_PLATFORMS else "xla"
    if impl in ("xla", "pallas"):
        return impl
    raise ValueError(f"impl must be 'auto', 'xla' or 'pallas', got {impl!r}")


def resolve_interpret(interpret: bool | None) -> bool:
    """Whether a Pallas kernel runs in interpret mode: forced by the caller, else only where there is no
    compiled Pallas backend (CPU)."""
    if interpret is not None:
        return interpret
    return platform() not in _ACCELERATOR_PLATFORMS
