"""Attention modules: the encoder's windowed bidirectional attention and the decoder's cached causal GQA.

The math itself lives in ``qasr_jax.kernels`` (an XLA reference and a Pallas kernel per op, picked by
``attention_impl``: "auto" = Pallas on TPU/GPU, XLA on CPU; "xla"/"pallas" force either).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qasr_jax import kernels
from qasr_jax.config import TextConfig
from qasr_jax.model.layers import Dense, Dtype, RMSNorm
from qasr_jax.model.rope import apply_rope


class WindowedSelfAttention(nn.Module):
    """Multi-head attention with biases inside fixed windows of tokens (the AuT encoder).

    x: ``[windows, window_len, d_model]``; valid_len: ``[windows]`` (valid tokens are a prefix of a window).
    """

    num_heads: int
    head_dim: int
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dropout: float = 0.0  # dropout on the adapters' input (training with a "dropout" rng)

    @nn.compact
    def __call__(self, x: jax.Array, valid_len: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora_dropout=self.lora_dropout)
        heads = (self.num_heads, self.head_dim)
        axes = ("embed", "heads", "head_dim")
        q = Dense((d,), heads, axes, name="q_proj", **kw)(x)
        k = Dense((d,), heads, axes, name="k_proj", **kw)(x)
        v = Dense((d,), heads, axes, name="v_proj", **kw)(x)
        out = kernels.windowed_attention(q, k, v, valid_len, impl=self.attention_impl)
        return Dense(heads, (d,), ("heads", "head_dim", "embed"), name="out_proj", **kw)(out)


KVCache = dict[str, jax.Array]  # {"k", "v"}: [batch, kv_heads, cache_len, head_dim]


class CausalSelfAttention(nn.Module):
    """Qwen3 attention: q/k/v/o without bias, RMSNorm per head on q and k, MRoPE, GQA, causal.

    With a cache, the new keys/values are written at slots ``[cache_index, cache_index + seq)`` and the
    queries attend to every valid slot up to their own; without one, to the new tokens only (``keep_kv``: their
    keys/values are returned as a cache of exactly their length, as a prompt's prefill wants it).
    """

    config: TextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dropout: float = 0.0  # dropout on the adapters' input (training with a "dropout" rng)
    keep_kv: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        kv_start: jax.Array,
        cache: KVCache | None,
        cache_index: jax.Array | int,
    ) -> tuple[jax.Array, KVCache | None]:
        """x: [batch, seq, hidden]; cos/sin: [batch, seq, head_dim]; kv_start: [batch] first valid slot."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora_dropout=self.lora_dropout)
        d, hd = cfg.hidden_size, cfg.head_dim
        q = Dense(
            (d,), (cfg.num_attention_heads, hd), ("embed", "heads", "head_dim"), False, name="q_proj", **kw
        )(x)
        k = Dense((d,), (cfg.num_key_value_heads, hd), ("embed", "kv_heads", "head_dim"), False, name="k_proj",
                  **kw)(x)  # fmt: skip
        v = Dense((d,), (cfg.num_key_value_heads, hd), ("embed", "kv_heads", "head_dim"), False, name="v_proj",
                  **kw)(x)  # fmt: skip
        norm_kw = dict(eps=cfg.rms_norm_eps, axis_name="head_dim", dtype=self.dtype, param_dtype=self.param_dtype)
        q = RMSNorm(name="q_norm", **norm_kw)(q)
        k = RMSNorm(name="k_norm", **norm_kw)(k)
        q = apply_rope(q, cos, sin)
        # Keys and values head-major, the cache's layout: [batch, kv_heads, seq, head_dim].
        k = apply_rope(k, cos, sin).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if cache is None:
            keys, values, q_offset = k, v, jnp.int32(0)
            new_cache = {"k": k.astype(self.dtype), "v": v.astype(self.dtype)} if self.keep_kv else None
        else:
            idx = jnp.asarray(cache_index, jnp.int32)
            zero = jnp.int32(0)
            keys = jax.lax.dynamic_update_slice(
                cache["k"], k.astype(cache["k"].dtype), (zero, zero, idx, zero)
            )
            values = jax.lax.dynamic_update_slice(
                cache["v"], v.astype(cache["v"].dtype), (zero, zero, idx, zero)
            )
            new_cache = {"k": keys, "v": values}
            q_offset = idx
        out = kernels.causal_attention(q, keys.astype(q.dtype), values.astype(q.dtype), q_offset, kv_start,
                                       impl=self.attention_impl)  # fmt: skip
        out = Dense((cfg.num_attention_heads, hd), (d,), ("heads", "head_dim", "embed"), False, name="o_proj",
                    **kw)(out)  # fmt: skip
        return out, new_cache
