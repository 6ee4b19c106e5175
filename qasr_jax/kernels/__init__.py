"""Attention kernels: fused Pallas kernels beside their XLA reference implementations.

The model calls the dispatch functions:

- ``windowed_attention(q, k, v, valid_len, *, scale, impl, interpret)``: the encoder's bidirectional attention
  inside windows with a valid prefix.
- ``causal_attention(q, k, v, q_offset, kv_start, *, scale, impl, interpret)``: the decoder's causal attention
  against its KV cache, left padding and grouped KV heads.

How to choose ``impl``: leave it at ``"auto"`` (Pallas on TPU/GPU, XLA on CPU). Force ``"xla"`` to rule a kernel
out when debugging numerics or on a backend where the kernel does not lower; force ``"pallas"`` on CPU only to
test a kernel (it runs in the Pallas interpreter, far slower than XLA). Both implementations compute the softmax
in fp32 and return ``q.dtype``. ``qasr_jax.kernels.backend`` explains the TPU (Mosaic) and GPU (Triton) kernel
variants; ``python -m benchmarks.kernels`` times kernel against XLA.
"""

from qasr_jax.kernels.backend import Impl, Target, resolve_impl, resolve_interpret, resolve_target
from qasr_jax.kernels.decode_attention import (
    causal_attention,
    causal_attention_xla,
    decode_attention_pallas,
    decode_kernel_fits,
    decode_kernel_selected,
)
from qasr_jax.kernels.softmax import masked_softmax
from qasr_jax.kernels.windowed_attention import (
    windowed_attention,
    windowed_attention_pallas,
    windowed_attention_xla,
)

__all__ = [
    "Impl",
    "Target",
    "causal_attention",
    "causal_attention_xla",
    "decode_attention_pallas",
    "decode_kernel_fits",
    "decode_kernel_selected",
    "masked_softmax",
    "resolve_impl",
    "resolve_interpret",
    "resolve_target",
    "windowed_attention",
    "windowed_attention_pallas",
    "windowed_attention_xla",
]
