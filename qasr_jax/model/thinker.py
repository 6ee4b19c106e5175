"""The thinker: audio encoder + audio-embedding merge + Qwen3 decoder + head (vocabulary or aligner classes).

Entry points (all pure: ``Qwen3ASR(config).apply({"params": p}, ..., method=...)``):

* ``__call__(input_ids, attention_mask, input_features, feature_attention_mask, logits_at=...)`` → logits:
  the one forward pass (encoder → audio merge → decoder → head) that training and the aligner call, with the
  arguments of the reference thinker forward: left-padded ids holding one ``<|audio_pad|>`` run per row (its
  length = that row's encoder output length), padded log-mel ``[B, n_mels, T]``, frame mask ``[B, T]``; or
  with ``audio_embeds`` already encoded. ``logits_at`` runs the head on those positions only.
* ``encode_audio(input_features, feature_attention_mask)`` → (embeddings ``[B, N, D]``, lengths ``[B]``).
* ``encode_waveforms(waveforms, wave_lengths, frames)`` → the same from 16 kHz audio (log-mel on device).
* ``embed_inputs(input_ids, audio_embeds)`` → input embeddings with audio merged.
* ``decode(inputs_embeds, positions, kv_start, cache, cache_index)`` → (logits, cache): the decoder against
  an explicit KV cache (``init_cache``), scanned over its layers.
* ``prefill(waveforms, wave_lengths, input_ids, attention_mask, frames)`` → (last-position logits, cache,
  kv_start, prompt lengths): log-mel, encoder, audio merge and the prompt through the decoder into a new cache.
* ``extend_cache(model, params, ids, positions, kv_start, caches, cache_index)`` (a function) → (logits, caches):
  one token (a decoding step), or a run of tokens, per row after cached ones; with ``unrolled(model, params)`` the
  decoder's layers run one by one over their own weights (``scan_layers=False``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qasr_jax import audio as audio_io
from qasr_jax.config import ThinkerConfig
from qasr_jax.kernels.backend import resolve_impl
from qasr_jax.model.attention import KVCache
from qasr_jax.model.decoder import Decoder, init_cache, unscan_layers
from qasr_jax.model.encoder import AudioEncoder
from qasr_jax.model.layers import Dense, Dtype, default_init


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids ``[3, batch, seq]`` from a ``[batch, seq]`` mask: cumsum − 1 on valid slots, 1 on padding."""
    mask = attention_mask.astype(jnp.int32)
    pos = jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 1)
    return jnp.broadcast_to(pos[None], (3, *pos.shape))


def first_valid(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's first valid slot (its left padding), ``[batch]`` int32."""
    return jnp.argmax(attention_mask.astype(jnp.int32) > 0, axis=-1).astype(jnp.int32)


class Qwen3ASR(nn.Module):
    config: ThinkerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False
    # Dropout on the input of every adapter (``qasr_jax.adapters``) when applied with a "dropout" rng.
    lora_dropout: float = 0.0
    # The platform the encoder's layout is chosen for (``AudioEncoder.backend``); None:
    # ``jax.default_backend()`` when the model is built.
    backend: str | None = None
    # The decoder's layers scanned over stacked params (the stored layout) or unrolled, one module each (decoding;
    # ``unrolled``).
    scan_layers: bool = True

    def __post_init__(self) -> None:
        if self.backend is None:
            object.__setattr__(self, "backend", jax.default_backend())
        # "auto" becomes the attention for that platform once, here: Pallas kernels on TPU/GPU, XLA on the CPU.
        object.__setattr__(self, "attention_impl", resolve_impl(self.attention_impl, self.backend))
        super().__post_init__()

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora_dropout=self.lora_dropout)
        self.audio_tower = AudioEncoder(
            cfg.audio, self.attention_impl, remat=self.remat, backend=self.backend, **kw
        )
        self.embed_tokens = nn.Embed(
            cfg.text.vocab_size,
            cfg.text.hidden_size,
            embedding_init=nn.with_logical_partitioning(default_init, ("vocab", "embed")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.decoder = Decoder(cfg.text, self.attention_impl, remat=self.remat, scan_layers=self.scan_layers, **kw)
        if not cfg.tied_head:
            self.lm_head = Dense((cfg.text.hidden_size,), (cfg.head_size,), ("embed", "vocab"), use_bias=False,
                                 **kw)  # fmt: skip

    def encode_audio(
        self,
        input_features: jax.Array,
        feature_attention_mask: jax.Array,
        window_chunks: int | None = None,
        clip_frames: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Audio embeddings for a batch: ``[batch, tokens, hidden]`` and valid lengths ``[batch]``.

        clip_frames: ``[batch]``, when each row is one window of a longer clip of that many frames (streaming).
        """
        frames = jnp.sum(feature_attention_mask.astype(jnp.int32), axis=-1)
        return self.audio_tower(input_features, frames, window_chunks, clip_frames)

    def encode_waveforms(
        self,
        waveforms: jax.Array,
        wave_lengths: jax.Array,
        frames: int,
        window_chunks: int | None = None,
        frequency_scale: jax.Array | None = None,
        transform_features: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Audio embeddings ``[batch, tokens, hidden]`` and valid lengths ``[batch]`` of 16 kHz waveforms.

        waveforms: ``[batch, samples]``, zero past ``wave_lengths``; ``frames`` (static): mel frames to
        compute. Training augmentation: ``frequency_scale`` ``[batch]`` stretches each row's spectrum
        (``audio.log_mel``); ``transform_features(log_mel [batch, n_mels, frames], valid frames [batch])``
        perturbs the features before the encoder. Without them the features are exactly those of inference.
        """
        features, feature_frames = audio_io.log_mel(
            waveforms, wave_lengths, frames=frames, frequency_scale=frequency_scale
        )
        if transform_features is not None:
            features = transform_features(features, feature_frames)
        feature_mask = (jnp.arange(frames)[None, :] < feature_frames[:, None]).astype(jnp.int32)
        return self.encode_audio(features, feature_mask, window_chunks)

    def embed_inputs(self, input_ids: jax.Array, audio_embeds: jax.Array | None = None) -> jax.Array:
        """Token embeddings ``[batch, seq, hidden]``; the k-th ``<|audio_pad|>`` of row b gets audio token k of b."""
        x = self.embed_tokens(input_ids).astype(self.dtype)
        if audio_embeds is None:
            return x
        is_audio = input_ids == self.config.audio_token_id
        k = jnp.clip(jnp.cumsum(is_audio, axis=-1) - 1, 0, audio_embeds.shape[1] - 1)
        gathered = jnp.take_along_axis(audio_embeds.astype(self.dtype), k[..., None], axis=1)
        return jnp.where(is_audio[..., None], gathered, x)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Logits (fp32) from final hidden states."""
        if self.config.tied_head:
            return self.embed_tokens.attend(hidden.astype(self.dtype)).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def decode(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        kv_start: jax.Array,
        cache: list[KVCache] | None = None,
        cache_index: jax.Array | int = 0,
        logits_at: jax.Array | None = None,
        keep_kv: bool = False,
    ) -> tuple[jax.Array, list[KVCache] | None]:
        """Decoder + head: logits ``[batch, seq, V]`` (fp32) and the updated cache (``keep_kv`` without a cache:
        a new cache of the inputs' length, see ``Decoder``).

        logits_at: ``[batch, k]`` int positions: the head (the largest matmul: hidden × vocabulary) runs on
        these positions only and the logits are ``[batch, k, V]``.
        """
        hidden, cache = self.decoder(inputs_embeds, positions, kv_start, cache, cache_index, keep_kv)
        if logits_at is not None:
            hidden = jnp.take_along_axis(hidden, logits_at[..., None].astype(jnp.int32), axis=1)
        return self.head(hidden), cache

    def prefill(
        self,
        waveforms: jax.Array,
        wave_lengths: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        frames: int,
    ) -> tuple[jax.Array, KVCache, jax.Array, jax.Array]:
        """Audio and prompts of a batch into a new KV cache of the prompts' length.

        waveforms: ``[batch, samples]`` 16 kHz, zero past ``wave_lengths``; ``frames`` (static): mel frames to
        compute (whole encoder windows). input_ids/attention_mask: ``[batch, prompt_len]``, left-padded, the
        audio slot of each row expanded to its encoder output length.

        Returns last-position logits ``[batch, V]`` (fp32), the prompts' keys/values ``{"k", "v"}: [layers, batch,
        kv, prompt_len, hd]``,
        each row's first valid slot ``[batch]`` and its prompt length ``[batch]`` (the next token's position).
        """
        audio_embeds, _ = self.encode_waveforms(waveforms, wave_lengths, frames)
        x = self.embed_inputs(input_ids, audio_embeds)
        batch, prompt_len = input_ids.shape
        kv_start = first_valid(attention_mask)
        last = jnp.full((batch, 1), prompt_len - 1, jnp.int32)
        positions = positions_from_mask(attention_mask)
        logits, cache = self.decode(x, positions, kv_start, logits_at=last, keep_kv=True)
        lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
        return logits[:, 0], cache, kv_start, lengths

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        input_features: jax.Array | None = None,
        feature_attention_mask: jax.Array | None = None,
        window_chunks: int | None = None,
        *,
        audio_embeds: jax.Array | None = None,
        logits_at: jax.Array | None = None,
    ) -> jax.Array:
        """The forward pass: logits ``[batch, seq, vocab]`` (``[batch, seq, classify_num]`` for the aligner),
        fp32.

        The audio comes as log-mel (``input_features``, encoded here) or as ``audio_embeds`` ``[batch, tokens,
        hidden]`` already encoded (``encode_audio``/``encode_waveforms``), or not at all (text only).
        logits_at: ``[batch, k]`` int positions: only their logits, ``[batch, k, ...]`` (see ``decode``).
        """
        if input_features is not None:
            if audio_embeds is not None:
                raise ValueError("pass input_features or audio_embeds, not both")
            if feature_attention_mask is None:
                feature_attention_mask = jnp.ones(input_features.shape[::2], jnp.int32)
            audio_embeds, _ = self.encode_audio(input_features, feature_attention_mask, window_chunks)
        x = self.embed_inputs(input_ids, audio_embeds)
        logits, _ = self.decode(
            x, positions_from_mask(attention_mask), first_valid(attention_mask), logits_at=logits_at
        )
        return logits


def unrolled(model: Qwen3ASR, params: Any) -> tuple[Qwen3ASR, Any]:
    """The model with its decoder layers unrolled (``scan_layers=False``) and its params in that layout (the
    decoder's layers are copied out of the stacked weights: make it once per batch of steps, not per step)."""
    layers = unscan_layers(params["decoder"], model.config.text.num_hidden_layers)
    return model.clone(scan_layers=False), {**params, "decoder": layers}


def extend_cache(
    model: Qwen3ASR,
    params: Any,
    ids: jax.Array,
    positions: jax.Array,
    kv_start: jax.Array,
    layer_caches: list[KVCache],
    cache_index: jax.Array,
    last: jax.Array | None = None,
    audio: jax.Array | None = None,
) -> tuple[jax.Array, list[KVCache]]:
    """A run of tokens per row appended to per-layer caches: a decoding step (a run of one) or a prefill that
    continues a sequence whose earlier keys/values are cached (decoding runs it on ``unrolled(model, params)``).

    ids: ``[batch, seq]`` (the audio slots take the rows of ``audio [batch, tokens, hidden]`` in order); positions:
    ``[batch, seq]``; layer_caches: one ``{"k", "v"}: [batch, kv, cache_len, hd]`` per layer. The run is written at
    cache slots ``[cache_index, cache_index + seq)`` (shared by the rows) and attends to every valid slot up to its
    own. last: ``[batch]`` index in the run whose logits are returned (the run may be padded past it; None: a run
    of one). Returns logits ``[batch, V]`` (fp32) and the updated caches.
    """
    batch, seq = ids.shape
    x = model.apply({"params": params}, ids, audio, method=Qwen3ASR.embed_inputs)
    logits, layer_caches = model.apply(
        {"params": params}, x, jnp.broadcast_to(positions[None], (3, batch, seq)), kv_start, layer_caches,
        cache_index, logits_at=None if last is None else last[:, None], method=Qwen3ASR.decode,
    )  # fmt: skip
    return logits[:, 0], layer_caches


__all__ = [
    "Qwen3ASR",
    "extend_cache",
    "first_valid",
    "init_cache",
    "positions_from_mask",
    "unrolled",
]
