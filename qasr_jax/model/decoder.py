"""The Qwen3 decoder: pre-norm layers (RMSNorm → GQA attention → RMSNorm → SwiGLU), with a KV cache.

A KV cache is a list with one ``{"k", "v"}`` per layer, each ``[batch, kv_heads, cache_len, head_dim]`` (logical
axes ``CACHE_AXES``; ``init_cache``): the engine's decode states, a stream's cache, any cache a call continues. A
call writes its new keys/values at slots ``[cache_index, cache_index + seq)``. Rows are left-padded: row b's valid
slots start at ``kv_start[b]``. A prompt's prefill starts from no cache and hands back its keys/values as the scan
made them, stacked by layer (``keep_kv``), so that no empty cache is filled and no block is copied per layer
before ``insert`` copies it into a decode state.

The layers run scanned or unrolled, a construction option (``scan_layers``, as MaxText's): scanned, their
params are stacked on a leading layer axis under ``layers`` (the stored layout: loading, training, adapters,
sharding) and one traced layer serves any depth (prompts, training, the aligner); unrolled, each layer has its own
params, ``layers_0`` … (``unscan_layers`` makes them from the stacked ones), and decoding and continuing a cached
sequence run that way, where a scan's per-layer slices of stacked weights and caches cost more than the few-row
products themselves.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qasr_jax.config import TextConfig
from qasr_jax.model.attention import CausalSelfAttention, KVCache
from qasr_jax.model.layers import Dense, Dtype, RMSNorm
from qasr_jax.model.rope import rope_cos_sin


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dropout: float = 0.0  # dropout on the adapters' input (training with a "dropout" rng)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.hidden_size, self.config.intermediate_size
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, lora_dropout=self.lora_dropout)
        gate = Dense((d,), (f,), ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense((d,), (f,), ("embed", "mlp"), name="up_proj", **kw)(x)
        return Dense((f,), (d,), ("mlp", "embed"), name="down_proj", **kw)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: TextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dropout: float = 0.0  # dropout on the adapters' input (training with a "dropout" rng)
    keep_kv: bool = False  # without a cache: return the new keys/values as one (``CausalSelfAttention``)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_cache: KVCache | None,
        cos: jax.Array,
        sin: jax.Array,
        kv_start: jax.Array,
        cache_index: jax.Array,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        lora = dict(lora_dropout=self.lora_dropout)
        attention = CausalSelfAttention(cfg, self.attention_impl, name="self_attn", keep_kv=self.keep_kv, **kw, **lora)
        h, layer_cache = attention(h, cos, sin, kv_start, layer_cache, cache_index)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + MLP(cfg, name="mlp", **kw, **lora)(h)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, layer_cache


class Decoder(nn.Module):
    """Decoder layers + final norm over input embeddings. Returns hidden states and the updated cache."""

    config: TextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dropout: float = 0.0  # dropout on the adapters' input (training with a "dropout" rng)
    remat: bool = False
    scan_layers: bool = True  # False: one module per layer, ``layers_0`` … (``unscan_layers``)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        kv_start: jax.Array,
        cache: list[KVCache] | None = None,
        cache_index: jax.Array | int = 0,
        keep_kv: bool = False,
    ) -> tuple[jax.Array, list[KVCache] | None]:
        """x: [batch, seq, hidden]; positions: [3, batch, seq] (or [batch, seq]); kv_start: [batch]; cache: one
        ``{"k", "v"}`` per layer (stacked for a scan and handed back per layer). ``keep_kv`` without a cache:
        the tokens' own keys/values come back as they are, scanned ``{"k", "v"}: [layers, batch, kv_heads, seq,
        head_dim]``, unrolled one ``{"k", "v"}`` per layer (a prompt's prefill: no empty cache to fill, and no
        copy of the block per layer; ``insert`` copies each layer's part into a decode state)."""
        cfg = self.config
        cos, sin = rope_cos_sin(
            positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved
        )
        layer = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        args = (cfg, self.attention_impl, self.dtype, self.param_dtype, self.lora_dropout, keep_kv)
        x = x.astype(self.dtype)
        kv_start, cache_index = jnp.asarray(kv_start, jnp.int32), jnp.asarray(cache_index, jnp.int32)
        if not self.scan_layers:
            caches = [None] * cfg.num_hidden_layers if cache is None else cache
            out = []
            for i, layer_cache in enumerate(caches):
                x, layer_cache = layer(*args, name=f"layers_{i}")(x, layer_cache, cos, sin, kv_start, cache_index)
                out.append(layer_cache)
            cache = None if out[0] is None else out
        else:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                out_axes=0,
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            stacked = None if cache is None else jax.tree_util.tree_map(lambda *layers: jnp.stack(layers), *cache)
            x, stacked = stack(*args, name="layers")(x, stacked, cos, sin, kv_start, cache_index)
            # No cache, or a prompt's own keys/values: stacked as the scan made them.
            cache = stacked if stacked is None or cache is None else unstack_layers(stacked, cfg.num_hidden_layers)
        return RMSNorm(cfg.rms_norm_eps, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x), cache


def unstack_layers(stacked: Any, num_layers: int) -> list[Any]:
    """Per-layer trees from a tree whose leaves carry a leading layer axis (the scanned layers' params or
    cache)."""
    return [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], stacked) for i in range(num_layers)]


def unscan_layers(decoder_params: Any, num_layers: int) -> dict[str, Any]:
    """A scanned ``Decoder``'s params in the unrolled layout: ``layers`` split into ``layers_0`` … (a copy: make it
    once per batch of steps, not per step)."""
    params = {name: value for name, value in decoder_params.items() if name != "layers"}
    return params | {f"layers_{i}": p for i, p in enumerate(unstack_layers(decoder_params["layers"], num_layers))}


# The sequence axis of one layer's cache array.
CACHE_SEQ_AXIS = 2
# The logical axes of one layer's cache array, ``[batch, kv_heads, cache_len, head_dim]``: split as the keys and
# values written into it are (``k_proj``/``v_proj`` put kv heads on ``tensor``), so a step reads its own shard.
CACHE_AXES = ("activation_batch", "kv_heads", "activation_length", "head_dim")


def layer_cache_shape(config: TextConfig, batch: int, cache_len: int) -> tuple[int, ...]:
    """The shape of one layer's ``k`` (or ``v``) cache array."""
    return (batch, config.num_key_value_heads, cache_len, config.head_dim)


def cache_length(layer_cache: KVCache) -> int:
    """The number of cache slots of one layer's cache."""
    return layer_cache["k"].shape[CACHE_SEQ_AXIS]


def init_cache(config: TextConfig, batch: int, cache_len: int, dtype=jnp.float32) -> list[KVCache]:
    """An empty KV cache: one ``{"k", "v"}`` of ``layer_cache_shape`` per layer."""
    shape = layer_cache_shape(config, batch, cache_len)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers)]
