"""Causal attention of new queries against the decoder's KV cache, with left padding and grouped KV heads.

The decoder keeps a preallocated cache of ``kv_len`` slots per row. Prompts are left-padded, so row ``b`` holds
tokens from slot ``kv_start[b]`` on. The queries of one call occupy slots ``q_offset .. q_offset + q_len - 1``
(the same for every row) and have already been written into the cache. Query ``i`` attends to slots ``j`` with
``kv_start[b] <= j <= q_offset + i``. Query heads share KV heads as in HF ``repeat_kv``: query head ``h`` reads
KV head ``h // (q_heads // kv_heads)``.

- ``causal_attention_xla``: the reference in plain XLA ops, any ``q_len`` (prefill and decode).
- ``decode_attention_pallas``: a fused kernel for one new token (``q_len == 1``), the memory-bound step that
  runs once per generated token.
- ``causal_attention``: the dispatch the model calls. Prefill always runs XLA (its queries fill matmuls well
  and it runs once per request); decode runs the kernel on TPU/GPU when the shapes fit it
  (``decode_kernel_fits``), else XLA.

The cache is laid out ``[batch, kv_heads, kv_len, head_dim]``: each (row, kv head) is one contiguous
``[kv_len, head_dim]`` matrix, so the XLA path is a plain batched matmul against it (no transpose of the cache
per step) and a kernel tile is a contiguous block of it.

Kernel design (split-K, "flash decoding"). The cache is read in place; one (kv head, kv block) tile is a
``[block_k, head_dim]`` block. A grid step (row, kv head, kv block) attends the
``q_heads // kv_heads`` queries of that kv head (padded to a matmul-friendly row count) to one kv block and writes
an unnormalised partial output with its row max and row sum; a few XLA ops merge the partials. Every step is
independent, so all grid axes are parallel even at batch 1. Blocks outside a row's visible range
``[kv_start, q_offset]`` do no work: on TPU their index map re-points at a visible block (consecutive equal block
indices skip the DMA), so the unused tail of the preallocated cache is never read; on GPU the loads sit behind
``pl.when``.
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

# Largest first. TPU: long blocks amortise the ~0.35 us per grid step (a 1024×128 bf16 K+V tile, double
# buffered, is 1 MiB of VMEM). GPU: one block per program; 256 keeps the merged partials (16 padded query rows
# × head_dim fp32) a small fraction of the cache bytes read, while leaving many programs for small batches.
_TPU_BLOCK_CANDIDATES = (1024, 512, 256, 128, 64, 32, 16)
_GPU_BLOCK_CANDIDATES = (256, 128, 64, 32, 16)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, kv_start: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            "q must be [batch, q_len, q_heads, head_dim] and k, v [batch, kv_heads, kv_len, head_dim]; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    batch, _, q_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or q_heads % k.shape[1] != 0:
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

    q: ``[batch, q_len, q_heads, head_dim]``; k, v: ``[batch, kv_heads, kv_len, head_dim]``; q_offset: int32
    scalar, the cache slot of query 0; kv_start: int32 ``[batch]``, the first valid slot of each row.
    Returns ``[batch, q_len, q_heads, head_dim]`` in ``q.dtype``; queries with no visible slot get zeros.
    """
    _check_shapes(q, k, v, kv_start)
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    # Query head h = kv * group + g belongs to KV head kv: a reshape groups them without copying K/V.
    q_grouped = q.reshape(batch, q_len, kv_heads, group, head_dim)
    if q.dtype != jnp.float32 and jax.default_backend() == "cpu":
        # XLA:CPU has no bf16 x bf16 -> f32 batched matmul; elsewhere the narrow inputs go to the MXU/tensor
        # cores as they are.
        q_grouped, k, v = (x.astype(jnp.float32) for x in (q_grouped, k, v))
    logits = jnp.einsum("bskgd,bktd->bkgst", q_grouped, k, preferred_element_type=jnp.float32) * scale
    query_slot = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)  # [q_len]
    key_slot = jnp.arange(kv_len, dtype=jnp.int32)  # [kv_len]
    visible = (key_slot[None, None, :] >= kv_start[:, None, None]) & (
        key_slot[None, None, :] <= query_slot[None, :, None]
    )  # [batch, q_len, kv_len]
    probs = masked_softmax(logits, visible[:, None, None, :, :])
    # Probabilities on the left, the cache on the right in its stored layout (a plain batched matmul; asking for
    # the output in query-major order instead makes XLA:CPU swap the operands onto a slow transposed path).
    out = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)


def decode_kernel_selected(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], impl: str = "auto") -> bool:
    """Whether ``causal_attention`` runs the Pallas decode kernel for these shapes under ``impl``."""
    return resolve_impl(impl) == "pallas" and decode_kernel_fits(q_shape, kv_shape, resolve_target(None))


def _kv_block_size(kv_len: int, target: Target) -> int | None:
    """The largest candidate block that divides ``kv_len`` (blocks never hang off the cache), or None."""
    candidates = _TPU_BLOCK_CANDIDATES if target == "tpu" else _GPU_BLOCK_CANDIDATES
    return next((block for block in candidates if kv_len % block == 0), None)


def decode_kernel_fits(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], target: Target) -> bool:
    """Whether ``decode_attention_pallas`` takes these shapes on ``target``.

    Needs one query per row, a cache length that is a multiple of 16 (allocate caches in multiples of 128 or
    256) and, on GPU, a power-of-two head_dim (a tile spans the whole head_dim, so TPU takes any).
    """
    _, q_len, _, head_dim = q_shape
    kv_len = kv_shape[2]
    if q_len != 1 or _kv_block_size(kv_len, target) is None:
        return False
    if target == "tpu":
        return True
    return head_dim >= 16 and head_dim == next_power_of_2(head_dim)


def _attend_kv_block(
    q_offset: jax.Array,
    kv_start: jax.Array,
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    max_ref,
    sum_ref,
    *,
    scale: float,
) -> None:
    """The kernel body shared by both targets: one kv head's queries of one row against one kv block.

    q_ref: ``[group_padded, head_dim]``; k_ref, v_ref: ``[block_k, head_dim]``; out_ref: fp32
    ``[group_padded, head_dim]``, the unnormalised partial output; max_ref, sum_ref: fp32 ``[group_padded, 1]``,
    the partial's row max and row sum. q_offset, kv_start: int32 scalars of this row.
    """
    group_padded, head_dim = q_ref.shape
    block_k = k_ref.shape[0]
    block_start = pl.program_id(2) * block_k
    # The visible slots [kv_start, q_offset] meet this block (an empty range, kv_start > q_offset, meets none).
    block_visible = jnp.maximum(kv_start, block_start) <= jnp.minimum(q_offset, block_start + block_k - 1)

    @pl.when(jnp.logical_not(block_visible))
    def _skip():
        out_ref[...] = jnp.zeros((group_padded, head_dim), jnp.float32)
        max_ref[...] = jnp.full((group_padded, 1), MASK_VALUE, jnp.float32)
        sum_ref[...] = jnp.zeros((group_padded, 1), jnp.float32)

    @pl.when(block_visible)
    def _attend():
        q = q_ref[...]
        v = v_ref[...]
        precision = kernel_precision(q.dtype)
        logits = kernel_dot(q, k_ref[...], 1, precision) * scale  # [group_padded, block_k]
        slot = block_start + jax.lax.broadcasted_iota(jnp.int32, (group_padded, block_k), 1)
        logits = jnp.where((slot >= kv_start) & (slot <= q_offset), logits, MASK_VALUE)
        # The block holds at least one visible slot, so the row max is a real logit.
        row_max = jnp.max(logits, axis=1, keepdims=True)
        probs = jnp.exp(logits - row_max)
        out_ref[...] = kernel_dot(probs.astype(v.dtype), v, 0, precision)
        max_ref[...] = row_max
        sum_ref[...] = jnp.sum(probs, axis=1, keepdims=True)


def _tpu_kernel(q_offset_ref, kv_start_ref, q_ref, k_ref, v_ref, out_ref, max_ref, sum_ref, *, scale):
    # Scalars are prefetched into SMEM: q_offset_ref [1], kv_start_ref [batch].
    q_offset = q_offset_ref[0]
    kv_start = kv_start_ref[pl.program_id(0)]
    _attend_kv_block(q_offset, kv_start, q_ref, k_ref, v_ref, out_ref, max_ref, sum_ref, scale=scale)


def _gpu_kernel(q_offset_ref, kv_start_ref, q_ref, k_ref, v_ref, out_ref, max_ref, sum_ref, *, scale):
    # Scalars arrive as squeezed one-element blocks (Triton has no scalar prefetch).
    _attend_kv_block(
        q_offset_ref[()], kv_start_ref[()], q_ref, k_ref, v_ref, out_ref, max_ref, sum_ref, scale=scale
    )


def decode_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array | int,
    kv_start: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
    target: Target | None = None,
) -> jax.Array:
    """The fused Pallas kernel for one new token; same contract as ``causal_attention_xla`` with ``q_len == 1``.

    q: ``[batch, 1, q_heads, head_dim]``; k, v: ``[batch, kv_heads, kv_len, head_dim]``. Raises ValueError for
    shapes outside ``decode_kernel_fits``. Forward only: decoding needs no gradient (training runs the XLA path).
    """
    _check_shapes(q, k, v, kv_start)
    target = resolve_target(target)
    if not decode_kernel_fits(q.shape, k.shape, target):
        raise ValueError(
            f"decode kernel ({target}) does not take q {q.shape} with cache {k.shape}; see decode_kernel_fits"
        )
    batch, _, q_heads, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    block_k = _kv_block_size(kv_len, target)
    num_blocks = kv_len // block_k
    # Query rows per kv head, padded: TPU sublanes come in 8s, Triton's tl.dot needs at least 16 rows.
    group_padded = round_up(group, 8) if target == "tpu" else max(16, next_power_of_2(group))

    q_grouped = q.reshape(batch, kv_heads, group, head_dim)
    q_grouped = jnp.pad(q_grouped, ((0, 0), (0, 0), (0, group_padded - group), (0, 0)))
    q_offset = jnp.reshape(jnp.asarray(q_offset, jnp.int32), (1,))
    kv_start = kv_start.astype(jnp.int32)

    grid = (batch, kv_heads, num_blocks)
    query_block = (None, None, group_padded, head_dim)
    kv_block = (None, None, block_k, head_dim)
    partial_block = (None, None, None, group_padded, head_dim)
    stat_block = (None, None, None, group_padded, 1)
    out_shape = [
        jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, group_padded, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, group_padded, 1), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, group_padded, 1), jnp.float32),
    ]

    if target == "tpu":

        def kv_index(b, h, j, q_offset_ref, kv_start_ref):
            # Steps outside the visible range re-point at the nearest visible block: the pipeline skips the
            # copy when a block index repeats, so the cache is read only where this row has tokens.
            first = jax.lax.div(jnp.maximum(kv_start_ref[b], 0), block_k)
            last = jax.lax.div(jnp.clip(q_offset_ref[0], 0, kv_len - 1), block_k)
            return b, h, jnp.clip(j, jnp.minimum(first, last), last), 0

        def partial_index(b, h, j, *_):
            return b, h, j, 0, 0

        call = pl.pallas_call(
            functools.partial(_tpu_kernel, scale=scale),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=grid,
                in_specs=[
                    pl.BlockSpec(query_block, lambda b, h, j, *_: (b, h, 0, 0)),
                    pl.BlockSpec(kv_block, kv_index),
                    pl.BlockSpec(kv_block, kv_index),
                ],
                out_specs=[
                    pl.BlockSpec(partial_block, partial_index),
                    pl.BlockSpec(stat_block, partial_index),
                    pl.BlockSpec(stat_block, partial_index),
                ],
            ),
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
            interpret=interpret,
            name="decode_attention",
        )
    else:
        call = pl.pallas_call(
            functools.partial(_gpu_kernel, scale=scale),
            grid=grid,
            in_specs=[
                pl.BlockSpec((None,), lambda b, h, j: (0,)),
                pl.BlockSpec((None,), lambda b, h, j: (b,)),
                pl.BlockSpec(query_block, lambda b, h, j: (b, h, 0, 0)),
                pl.BlockSpec(kv_block, lambda b, h, j: (b, h, j, 0)),
                pl.BlockSpec(kv_block, lambda b, h, j: (b, h, j, 0)),
            ],
            out_specs=[
                pl.BlockSpec(partial_block, lambda b, h, j: (b, h, j, 0, 0)),
                pl.BlockSpec(stat_block, lambda b, h, j: (b, h, j, 0, 0)),
                pl.BlockSpec(stat_block, lambda b, h, j: (b, h, j, 0, 0)),
            ],
            out_shape=out_shape,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
            interpret=interpret,
            name="decode_attention",
        )
    partial_out, partial_max, partial_sum = call(q_offset, kv_start, q_grouped, k, v)

    # Merge the per-block softmax partials. Skipped blocks carry max = mask value and sum = 0, so they weigh
    # nothing unless the whole row is invisible, which the final guard turns into zeros.
    overall_max = jnp.max(partial_max, axis=2, keepdims=True)
    weight = jnp.exp(partial_max - overall_max)  # [batch, kv_heads, num_blocks, group_padded, 1]
    numerator = jnp.sum(weight * partial_out, axis=2)  # [batch, kv_heads, group_padded, head_dim]
    denominator = jnp.sum(weight * partial_sum, axis=2)  # [batch, kv_heads, group_padded, 1]
    out = jnp.where(denominator > 0.0, numerator / jnp.where(denominator > 0.0, denominator, 1.0), 0.0)
    return out[:, :, :group].reshape(batch, 1, q_heads, head_dim).astype(q.dtype)


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

    With ``"pallas"``, decoding (``q_len == 1``) runs the kernel when ``decode_kernel_fits`` the shapes on this
    platform's target; prefill (``q_len > 1``) and other shapes run the XLA reference. Shapes as in
    ``causal_attention_xla``.
    """
    if decode_kernel_selected(q.shape, k.shape, impl):
        return decode_attention_pallas(
            q, k, v, q_offset, kv_start, scale=scale, interpret=resolve_interpret(interpret)
        )
    return causal_attention_xla(q, k, v, q_offset, kv_start, scale=scale)
