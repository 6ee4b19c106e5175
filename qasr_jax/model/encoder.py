"""The AuT audio encoder: conv front end on 1-second mel chunks, windowed transformer, projector.

Data flow for a batch of B audios, mel ``[B, n_mels, T]`` with per-audio frame counts:

1. time is cut into chunks of ``C = 2·n_window`` frames (100 = 1 s); every chunk that holds audio goes
   through three stride-2 3×3 convolutions (+GELU) → ``[chunks, 13, d_model]`` after ``conv_out``, plus
   sinusoidal positions 0..12 that restart in every chunk. Chunks run in groups (scanned); the chunks
   holding audio are ordered first, and groups of padding only (whole-window padding, empty batch rows)
   are skipped: their tokens are past every window's valid prefix, so they are masked whatever they hold;
2. ``window_chunks`` consecutive chunks of one audio form an attention window (8 chunks = 104 tokens = 8 s
   in the released models). Only an audio's last chunk can be partial, so the valid tokens of a window
   are a prefix and the valid tokens of an audio are a prefix of its flattened windows;
3. pre-LN transformer layers (``nn.scan``), bidirectional inside a window only; ``ln_post``; the projector
   (proj1 → GELU → proj2) to the text hidden size.

Exactness per audio: the reference encodes each audio alone, zero-padding its last chunk to C frames
when the audio has at least one full chunk, and not padding at all when the whole audio is shorter than
one chunk. In the second case the convolutions see the clip's own end, so between the layers we zero
the time steps past each layer's valid length; the result is then independent of batch composition.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.config import AudioEncoderConfig, conv_out_len
from qasr_jax.model.attention import WindowedSelfAttention
from qasr_jax.model.layers import Dense, Dtype, LayerNorm, default_init, gelu


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """``[length, channels]`` float32: ``[sin | cos]`` with timescale step log(max)/(channels/2 − 1)."""
    half = channels // 2
    log_step = np.log(max_timescale) / (half - 1)
    inv = np.exp(-log_step * np.arange(half, dtype=np.float32)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def chunk_positions(n_chunks: int, steps: int, channels: int) -> np.ndarray:
    """Position embeddings of ``n_chunks`` chunks of ``steps`` tokens: rows 0..steps−1 in every chunk."""
    return np.broadcast_to(sinusoid_table(steps, channels)[None], (n_chunks, steps, channels))


def _conv_valid_len(n: jax.Array) -> jax.Array:
    return jnp.where(n > 0, (n - 1) // 2 + 1, 0)


def groups_to_run(n_groups: int, group: int, audio_chunks: jax.Array) -> jax.Array:
    """``[n_groups]`` bool: the front-end groups that hold at least one of the ``audio_chunks`` chunks placed
    first."""
    return jnp.arange(n_groups) * group < audio_chunks


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x += attn(LN(x)); x += fc2(GELU(fc1(LN(x))))."""

    config: AudioEncoderConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dropout: float = 0.0  # dropout on the adapters' input (training with a "dropout" rng)

    @nn.compact
    def __call__(self, x: jax.Array, valid_len: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="self_attn_layer_norm", **kw)(x)
        lora = dict(lora_dropout=self.lora_dropout)
        x = x + WindowedSelfAttention(cfg.encoder_attention_heads, cfg.head_dim, self.attention_impl,
                                      name="self_attn", **kw, **lora)(h, valid_len)  # fmt: skip
        h = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        h = Dense((cfg.d_model,), (cfg.encoder_ffn_dim,), ("embed", "mlp"), name="fc1", **kw, **lora)(h)
        h = Dense((cfg.encoder_ffn_dim,), (cfg.d_model,), ("mlp", "embed"), name="fc2", **kw, **lora)(gelu(h))
        x = x + h
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None


def conv3x3_stride2(x: jax.Array, kernel: jax.Array, patches: bool) -> jax.Array:
    """3×3 convolution, stride 2, zero padding 1: ``[N, H, W, Cin]`` × ``[3, 3, Cin, Cout]`` → ``[N, ⌈H/2⌉, ⌈W/2⌉,
    Cout]``.

    ``patches=True`` gathers the nine strided taps into ``[N, H', W', 9·Cin]`` and does one matmul. XLA:CPU has
    no fast path for a strided convolution's kernel gradient (a convolution with a dilated right-hand side),
    which makes this three-layer front end's backward pass many times slower than its forward; as slices and a
    matmul, the backward pass is a scatter-free pad and two matmuls. ``patches=False`` is
    ``lax.conv_general_dilated`` (cuDNN / the TPU convolution units). Both compute the same sums.
    """
    if not patches:
        return jax.lax.conv_general_dilated(
            x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip
    _, h, w, c_in = x.shape
    h_out, w_out = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [
        padded[:, i : i + 2 * h_out - 1 : 2, j : j + 2 * w_out - 1 : 2, :] for i in range(3) for j in range(3)
    ]
    columns = jnp.concatenate(taps, axis=-1)  # [N, H', W', 9·Cin], tap-major like the kernel's flattening
    return jax.lax.dot_general(
        columns, kernel.reshape(9 * c_in, -1), (((3,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST
    )


class StridedConv(nn.Module):
    """The parameters of a ``conv3x3_stride2`` layer: a ``[3, 3, in, out]`` kernel (the layout of ``nn.Conv`` and of
    the released checkpoints once transposed) and a bias. Returns them; ``front_end`` computes with them."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("conv_height", "conv_width", "conv_in", "conv_out")
            ),
            (3, 3, in_features, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            (self.features,),
            self.param_dtype,
        )
        return kernel, bias


class ConvOut(nn.Module):
    """The ``[channels·freq, d_model]`` kernel of the front end's output projection (no bias)."""

    in_features: int
    out_features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param(
            "kernel",
            nn.with_logical_partitioning(default_init, ("conv_flat", "embed")),
            (self.in_features, self.out_features),
            self.param_dtype,
        )


def front_end(
    x: jax.Array,
    seen: jax.Array,
    convs: list[tuple[jax.Array, jax.Array]],
    out_kernel: jax.Array,
    dtype: Dtype,
    patches: bool,
) -> jax.Array:
    """Three stride-2 3×3 convolutions (+GELU) and the output projection: ``[G, n_mels, C, 1]`` chunks with ``seen
    [G]`` → ``[G, tokens_per_chunk, d_model]``. ``patches``: the convolutions' form (``conv3x3_stride2``)."""
    x = x.astype(dtype)
    for i, (kernel, bias) in enumerate(convs):
        x = gelu(conv3x3_stride2(x, kernel.astype(dtype), patches) + bias.astype(dtype))
        seen = _conv_valid_len(seen)
        if i < len(convs) - 1:
            x = jnp.where(jnp.arange(x.shape[2])[None, None, :, None] < seen[:, None, None, None], x, 0)
    # [G, freq, tpc, ch] → [G, tpc, ch·freq] (channel-major flatten, as conv_out's weight expects).
    g, freq, steps, ch = x.shape
    x = x.transpose(0, 2, 3, 1).reshape(g, steps, ch * freq)
    return jax.lax.dot_general(x, out_kernel.astype(dtype), (((2,), (0,)), ((), ())))


class ConvFrontEnd(nn.Module):
    """The conv front end on one group of 1-second chunks; scanned over groups.

    ``(carry, (x [G, n_mels, C, 1], seen [G], active [])) → (carry, [G, tokens_per_chunk, d_model])``, ``seen``
    being the time steps each chunk's first convolution may see (see the module docstring). A group that is not
    ``active`` holds only padding chunks: it is skipped (its output is zeros, which the windows mask out).
    """

    config: AudioEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    patches: bool = False  # the convolutions as tap gathers and a matmul (``conv3x3_stride2``)

    @nn.compact
    def __call__(self, carry: None, inputs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        x, seen, active = inputs
        cfg = self.config
        hidden = cfg.downsample_hidden_size
        convs = [
            StridedConv(hidden, self.param_dtype, name=name)(in_features)
            for name, in_features in (("conv2d1", x.shape[-1]), ("conv2d2", hidden), ("conv2d3", hidden))
        ]
        freq = conv_out_len(conv_out_len(conv_out_len(x.shape[1])))  # mel bins after the three convolutions
        out_kernel = ConvOut(hidden * freq, cfg.d_model, self.param_dtype, name="conv_out")()
        steps = cfg.tokens_per_chunk
        shape = (x.shape[0], steps, cfg.d_model)
        y = jax.lax.cond(
            active,
            lambda x, seen: front_end(x, seen, convs, out_kernel, self.dtype, self.patches),
            lambda x, seen: jnp.zeros(shape, self.dtype),
            x,
            seen,
        )
        return carry, y


class AudioEncoder(nn.Module):
    """Mel features → audio embeddings in the text hidden size."""

    config: AudioEncoderConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dropout: float = 0.0  # dropout on the adapters' input (training with a "dropout" rng)
    remat: bool = False
    # Chunks per conv front-end group (None: 8 on the CPU, the config's ``conv_chunksize`` elsewhere). On the CPU
    # small groups keep the im2col activations in cache-sized blocks, which runs faster, and skip padding
    # chunks at a fine grain; an accelerator wants few, large groups.
    front_group: int | None = None
    # The platform the computation is laid out for ("cpu", "gpu", "tpu"; None: ``jax.default_backend()`` when
    # the module is built). It picks the convolutions' form and the default ``front_group``, not the function:
    # either layout runs on any platform and agrees with the other to rounding.
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.backend is None:
            object.__setattr__(self, "backend", jax.default_backend())
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        features: jax.Array,
        frames: jax.Array,
        window_chunks: int | None = None,
        clip_frames: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Encode a padded batch.

        Args:
          features: ``[batch, n_mels, time]`` log-mel; frames past an audio's length are ignored.
          frames: ``[batch]`` int, valid mel frames per audio.
          window_chunks: attention window in chunks (1 chunk = 1 s): None → the config's
            ``n_window_infer``; 0 → one window spanning each whole clip.
          clip_frames: ``[batch]`` frames of the whole clip each row is a piece of (default: ``frames``). A row
            that is one attention window of a longer clip (streaming encodes windows one at a time) is computed
            as inside that clip: the clip's length, not the row's, decides the short-clip rule above.

        Returns:
          embeddings ``[batch, tokens, output_dim]`` (valid tokens of audio b are its first ``lengths[b]``)
          and ``lengths [batch]`` (= 13·(T // 100) + f(f(f(T % 100))) for T frames).
        """
        cfg = self.config
        batch, n_mels, time = features.shape
        if n_mels != cfg.num_mel_bins:
            raise ValueError(f"input_features has {n_mels} mel bins; the encoder expects {cfg.num_mel_bins}")
        C, tpc = cfg.chunk_frames, cfg.tokens_per_chunk
        n_chunks = max(1, -(-time // C))
        wc = cfg.window_chunks if window_chunks is None else int(window_chunks)
        wc = n_chunks if wc <= 0 else wc
        n_chunks = -(-n_chunks // wc) * wc
        frames = jnp.asarray(frames, jnp.int32)

        # 1. chunks: zero everything past each audio's end, then [batch·chunks, n_mels, C, 1] (NHWC).
        t_idx = jnp.arange(n_chunks * C)
        x = jnp.pad(features.astype(self.dtype), ((0, 0), (0, 0), (0, n_chunks * C - time)))
        x = jnp.where(t_idx[None, None, :] < frames[:, None, None], x, 0)
        x = (
            x.reshape(batch, n_mels, n_chunks, C)
            .transpose(0, 2, 1, 3)
            .reshape(batch * n_chunks, n_mels, C, 1)
        )
        chunk_len = jnp.clip(frames[:, None] - jnp.arange(n_chunks)[None, :] * C, 0, C)  # [B, n]
        # Time steps each conv layer may see (see module docstring): the clip's own length when the whole
        # audio is shorter than one chunk, else the full chunk.
        clip = frames if clip_frames is None else jnp.asarray(clip_frames, jnp.int32)
        seen = jnp.where(clip[:, None] < C, chunk_len, C).reshape(-1)

        # The conv front end runs over groups of chunks (scanned, params shared), so its largest activation stays
        # bounded whatever the batch's total audio length. Chunks holding audio go first (stable order), so the
        # padding chunks (whole-window padding of each clip, empty rows of the batch) fill the last groups,
        # which are skipped.
        n = batch * n_chunks
        holds_audio = chunk_len.reshape(-1) > 0
        order = jnp.argsort(jnp.logical_not(holds_audio).astype(jnp.int32), stable=True)
        on_cpu = self.backend == "cpu"
        front_group = self.front_group or (8 if on_cpu else cfg.conv_chunksize)
        n_groups = -(-n // min(n, cfg.conv_chunksize, front_group))
        group = -(-n // n_groups)
        pad = n_groups * group - n
        x = jnp.pad(x[order], ((0, pad), (0, 0), (0, 0), (0, 0)))
        seen = jnp.pad(seen[order], (0, pad))
        active = groups_to_run(n_groups, group, holds_audio.sum())
        front = ConvFrontEnd
        if self.remat:
            front = nn.remat(front, prevent_cse=False)
        front = nn.scan(
            front,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=0,
            out_axes=0,
            length=n_groups,
        )
        _, x = front(cfg, self.dtype, self.param_dtype, on_cpu, name="frontend")(
            None, (x.reshape(n_groups, group, *x.shape[1:]), seen.reshape(n_groups, group), active)
        )
        x = x.reshape(n_groups * group, *x.shape[2:])[:n]
        x = x[jnp.argsort(order)]  # back to [batch·chunks, tpc, d] in batch order
        steps = x.shape[1]
        pos = chunk_positions(n_chunks, steps, cfg.d_model)  # [n, steps, d]
        x = (x.reshape(batch, n_chunks, steps, -1) + jnp.asarray(pos, self.dtype)).reshape(n, steps, -1)

        # 2. windows: [batch·windows, wc·tpc, d] with the count of valid (prefix) tokens per window.
        tok_valid = _conv_valid_len(_conv_valid_len(_conv_valid_len(chunk_len)))  # [B, n]
        n_windows = n_chunks // wc
        window_valid = tok_valid.reshape(batch, n_windows, wc).sum(-1).reshape(-1)
        x = x.reshape(batch * n_windows, wc * tpc, cfg.d_model)

        # 3. transformer layers, stacked with nn.scan.
        layer = EncoderLayer
        if self.remat:
            layer = nn.remat(layer, prevent_cse=False)
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=cfg.encoder_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(cfg, self.attention_impl, self.dtype, self.param_dtype, self.lora_dropout, name="layers")(
            x, window_valid
        )

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lora = dict(lora_dropout=self.lora_dropout)
        x = LayerNorm(cfg.layer_norm_eps, name="ln_post", **kw)(x)
        x = gelu(Dense((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"), name="proj1", **kw, **lora)(x))
        x = Dense((cfg.d_model,), (cfg.output_dim,), ("mlp", "embed_out"), name="proj2", **kw, **lora)(x)
        x = x.reshape(batch, n_chunks * tpc, cfg.output_dim)
        lengths = tok_valid.sum(-1)
        return x, lengths
