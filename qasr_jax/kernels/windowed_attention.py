"""Bidirectional attention inside fixed-size windows with a valid prefix: the encoder's attention.

The encoder lays its tokens into windows of ``window`` tokens (104 = 8 s at the released config; 13–104 in
practice). Only a prefix of each window holds tokens (``valid_len``); the rest is padding that must neither be
attended to nor produce NaNs. Windows never attend to each other, so the packed batch of windows is simply the
leading axis.

Three functions share one contract:

- ``windowed_attention_xla``: the reference in plain XLA ops.
- ``windowed_attention_pallas``: a fused flash-attention kernel (online softmax, fp32 statistics and
  accumulation). Forward only in Pallas; its gradient recomputes through the XLA reference (see
  ``_windowed_attention_bwd`` for why).
- ``windowed_attention``: the dispatch the model calls (``impl="auto"``: Pallas on TPU/GPU, XLA on CPU).

Kernel layout. The kernel works on ``[num_windows, heads, window_padded, head_dim]``: one grid step attends
one block of queries of one (window, head) to the whole window's keys, looping over key blocks with an online
softmax. The window axis is padded to the block size of the target (TPU: a multiple of 128, the MXU and lane
width; GPU/Triton: a power of two ≥ 16, or a multiple of 64 past 128), which is also why the kernel cannot read
the model's ``[num_windows, window, heads, head_dim]`` arrays in place: TPU blocks cannot squeeze the
second-to-last (heads) axis. The pad-and-transpose is one fused copy of q, k, v in and one of the output out.
Key blocks past ``valid_len`` are never visited and query blocks past it only write zeros, so ragged windows
cost what their tokens cost.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from qasr_jax.kernels.backend import (
    MASK_VALUE,
    Target,
    kernel_dot,
    kernel_precision,
    next_power_of_2,
    resolve_impl,
    resolve_interpret,
    resolve_target,
    round_up,
)
from qasr_jax.kernels.softmax import masked_softmax

# Masked logits get MASK_VALUE; every key block the kernel visits holds at least one valid key, so the running
# max is a real logit by the time a masked entry is exponentiated.

# Past this many tokens a window is split into several query and key blocks (GPU: 64×64 tiles keep the
# fp32 accumulator of a 128-wide head in registers with 8 warps).
_TPU_BLOCK = 128
_GPU_MAX_SINGLE_BLOCK = 128
_GPU_BLOCK = 64


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


def window_block_sizes(window: int, target: Target) -> tuple[int, int]:
    """``(window_padded, block)``: the padded window length and the query/key block size of a target.

    TPU: blocks of 128 (lane width and MXU tile; 104-token windows become one 128 block). GPU: the whole
    window as one power-of-two block up to 128 (16 is the smallest ``tl.dot`` tile), else 64-token blocks.
    """
    if target == "tpu":
        return round_up(window, _TPU_BLOCK), _TPU_BLOCK
    if window <= _GPU_MAX_SINGLE_BLOCK:
        block = max(16, next_power_of_2(window))
        return block, block
    return round_up(window, _GPU_BLOCK), _GPU_BLOCK


def _attend_query_block(
    valid_len: jax.Array,
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    *,
    scale: float,
    block_k: int,
) -> None:
    """The kernel body shared by both targets: one query block of one (window, head) against its keys.

    q_ref, out_ref: ``[block_q, head_dim]``; k_ref, v_ref: ``[window_padded, head_dim]``; valid_len: int32
    scalar, the window's token count.
    """
    block_q, head_dim = q_ref.shape
    q_start = pl.program_id(2) * block_q

    @pl.when(q_start >= valid_len)
    def _padding_rows():
        out_ref[...] = jnp.zeros((block_q, head_dim), out_ref.dtype)

    @pl.when(q_start < valid_len)
    def _token_rows():
        q = q_ref[...]
        precision = kernel_precision(q.dtype)  # both matmuls accumulate in fp32

        def attend_key_block(key_block, carry):
            acc, row_max, row_sum = carry
            key_slice = pl.ds(pl.multiple_of(key_block * block_k, block_k), block_k)
            v = v_ref[key_slice, :]
            logits = kernel_dot(q, k_ref[key_slice, :], 1, precision) * scale  # [block_q, block_k]
            key_pos = key_block * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
            logits = jnp.where(key_pos < valid_len, logits, MASK_VALUE)
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
            rescale = jnp.exp(row_max - new_max)
            probs = jnp.exp(logits - new_max)
            row_sum = rescale * row_sum + jnp.sum(probs, axis=1, keepdims=True)
            acc = rescale * acc + kernel_dot(probs.astype(v.dtype), v, 0, precision)
            return acc, new_max, row_sum

        carry = (
            jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q, 1), jnp.float32),
        )
        # Only key blocks holding tokens are visited; valid_len > 0 here, so at least one is. (lax.div:
        # truncating division of non-negative ints, without the sign fix-up of Python's floor division.)
        num_key_blocks = jax.lax.div(valid_len + (block_k - 1), block_k)
        acc, _, row_sum = jax.lax.fori_loop(0, num_key_blocks, attend_key_block, carry)
        query_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, head_dim), 0)
        out = jnp.where(query_pos < valid_len, acc / row_sum, 0.0)
        out_ref[...] = out.astype(out_ref.dtype)


def _tpu_kernel(valid_len_ref, q_ref, k_ref, v_ref, out_ref, *, scale: float, block_k: int) -> None:
    # valid_len_ref: the whole [num_windows] array, scalar-prefetched into SMEM.
    valid_len = valid_len_ref[pl.program_id(0)]
    _attend_query_block(valid_len, q_ref, k_ref, v_ref, out_ref, scale=scale, block_k=block_k)


def _gpu_kernel(valid_len_ref, q_ref, k_ref, v_ref, out_ref, *, scale: float, block_k: int) -> None:
    # valid_len_ref: this window's entry, a squeezed one-element block (Triton has no scalar prefetch).
    valid_len = valid_len_ref[()]
    _attend_query_block(valid_len, q_ref, k_ref, v_ref, out_ref, scale=scale, block_k=block_k)


def _windowed_attention_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid_len: jax.Array,
    scale: float,
    target: Target,
    interpret: bool,
) -> jax.Array:
    """The Pallas forward pass; shapes as in ``windowed_attention_xla``."""
    num_windows, window, heads, head_dim = q.shape
    window_padded, block = window_block_sizes(window, target)
    # Lengths outside [0, window] would count padding slots as tokens; the reference treats them as clipped.
    valid_len = jnp.clip(valid_len.astype(jnp.int32), 0, window)

    def to_kernel_layout(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, window_padded - window), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)  # [num_windows, heads, window_padded, head_dim]

    grid = (num_windows, heads, window_padded // block)
    query_block = (None, None, block, head_dim)
    window_block = (None, None, window_padded, head_dim)
    out_shape = jax.ShapeDtypeStruct((num_windows, heads, window_padded, head_dim), q.dtype)

    if target == "tpu":
        kernel = functools.partial(_tpu_kernel, scale=scale, block_k=block)
        call = pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1,
                grid=grid,
                in_specs=[
                    pl.BlockSpec(query_block, lambda n, h, i, lengths: (n, h, i, 0)),
                    pl.BlockSpec(window_block, lambda n, h, i, lengths: (n, h, 0, 0)),
                    pl.BlockSpec(window_block, lambda n, h, i, lengths: (n, h, 0, 0)),
                ],
                out_specs=pl.BlockSpec(query_block, lambda n, h, i, lengths: (n, h, i, 0)),
            ),
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
            interpret=interpret,
            name="windowed_attention",
        )
    else:
        kernel = functools.partial(_gpu_kernel, scale=scale, block_k=block)
        call = pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=[
                pl.BlockSpec((None,), lambda n, h, i: (n,)),
                pl.BlockSpec(query_block, lambda n, h, i: (n, h, i, 0)),
                pl.BlockSpec(window_block, lambda n, h, i: (n, h, 0, 0)),
                pl.BlockSpec(window_block, lambda n, h, i: (n, h, 0, 0)),
            ],
            out_specs=pl.BlockSpec(query_block, lambda n, h, i: (n, h, i, 0)),
            out_shape=out_shape,
            compiler_params=pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
            interpret=interpret,
            name="windowed_attention",
        )
    out = call(valid_len, to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v))
    return out.transpose(0, 2, 1, 3)[:, :window]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _windowed_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid_len: jax.Array,
    scale: float,
    target: Target,
    interpret: bool,
) -> jax.Array:
    return _windowed_attention_forward(q, k, v, valid_len, scale, target, interpret)


def _windowed_attention_fwd(q, k, v, valid_len, scale, target, interpret):
    out = _windowed_attention_forward(q, k, v, valid_len, scale, target, interpret)
    return out, (q, k, v, valid_len)


def _windowed_attention_bwd(scale, target, interpret, residuals, d_out):
    """Gradients by recomputing the attention through the XLA reference.

    A Pallas backward kernel (FlashAttention-2 style dq and dk/dv passes) pays off when the score matrix is
    large next to q, k, v. Here windows hold at most ~104 tokens: the per-head score tile [window, window] is
    only window/head_dim (≈1.6× at 104/64) the size of q itself, and attention is a few percent of the
    encoder layer's FLOPs beside its projections and MLP. XLA's fused batched matmuls over that small tile cost
    about as much as a hand-written kernel would, the recomputation is one extra attention forward, and the
    gradient stays exactly the reference's (the same function the CPU path differentiates). A dedicated
    backward kernel would earn its complexity only for much longer windows.
    """
    del target, interpret
    q, k, v, valid_len = residuals
    _, pullback = jax.vjp(lambda q, k, v: windowed_attention_xla(q, k, v, valid_len, scale=scale), q, k, v)
    d_q, d_k, d_v = pullback(d_out)
    return d_q, d_k, d_v, None


_windowed_attention_pallas.defvjp(_windowed_attention_fwd, _windowed_attention_bwd)


def windowed_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid_len: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
    target: Target | None = None,
) -> jax.Array:
    """The fused Pallas kernel; same contract as ``windowed_attention_xla``, differentiable.

    target: ``"tpu"`` or ``"gpu"`` launch variant (see ``qasr_jax.kernels.backend``); default: the platform's.
    """
    _check_shapes(q, k, v, valid_len)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    return _windowed_attention_pallas(q, k, v, valid_len, scale, resolve_target(target), interpret)


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
