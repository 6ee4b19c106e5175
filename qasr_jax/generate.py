"""Jit-compiled greedy decoding: waveforms and prompts in, generated token ids out, in one device program.

One compiled program per bucket runs the whole request batch: log-mel features → audio encoder → audio
embeddings merged into the prompts → decoder prefill into a preallocated KV cache → a ``lax.while_loop`` of
single-token steps with per-row positions, budgets and stop flags, which ends as soon as every row has emitted
an end token or used its budget. Nothing returns to the host between steps.

Shapes are bucketed so that a job over clips of mixed lengths compiles a handful of programs: the batch to a
power of two, the audio to whole encoder windows on a half-octave ladder (1, 1.5, 2, 3, 4, 6, ... windows), the
prompt length on a quarter-octave ladder (32, 40, 48, 56, 64, 80, ...: prefill cost grows with it), the step
count on a half-octave ladder from 16 (it only sizes the cache; the loop stops when every row is done). A ``Generator`` keeps its compiled programs for its lifetime and
counts them.

Rows are independent: each row's features, audio embeddings, prompt (left-padded, masked) and stop flag are
its own, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qasr_jax import audio, sharding
from qasr_jax.config import ThinkerConfig
from qasr_jax.model import Qwen3ASR, first_valid, init_cache, positions_from_mask
from qasr_jax.model.attention import KVCache
from qasr_jax.model.decoder import DecoderLayer
from qasr_jax.model.layers import RMSNorm
from qasr_jax.model.rope import rope_cos_sin

# The released generation_config.json stops on <|im_end|> or <|endoftext|>.
DEFAULT_EOS_TOKEN_IDS = (151645, 151643)
DEFAULT_PAD_TOKEN_ID = 151643

MIN_PROMPT_BUCKET = 32
MIN_STEP_BUCKET = 16


def bucket_size(n: int, minimum: int = 1, steps_per_octave: int = 2) -> int:
    """The smallest size ≥ ``n`` on a geometric ladder from ``minimum`` with ``steps_per_octave`` sizes per
    doubling: ``minimum · (1, 1.5, 2, 3, 4, 6, ...)`` for 2, ``minimum · (1, 1.25, 1.5, 1.75, 2, 2.5, ...)`` for 4.

    Padding wastes at most 1/(steps_per_octave + 1) of a bucket, and inputs spanning ``k`` doublings need
    ``k · steps_per_octave`` programs.
    """
    size = minimum
    while True:
        for step in range(steps_per_octave):
            candidate = size + size * step // steps_per_octave
            if candidate >= n:
                return candidate
        size *= 2


def batch_bucket(n: int, max_batch: int) -> int:
    """Rows of the program that runs ``n`` requests: the next power of two, at most ``max_batch``."""
    if n > max_batch:
        raise ValueError(f"{n} requests do not fit a batch of at most {max_batch}")
    return min(1 << max(n - 1, 0).bit_length(), max_batch)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How the next token is chosen (static: part of the compiled program).

    eos_token_ids: a row stops after emitting one of these.
    pad_token_id: written into a row's token slots after it stopped.
    suppress_token_ids: never emitted (their logits are set to −inf), as HF ``suppress_tokens``.
    repetition_penalty: > 1 lowers the logits of tokens this row has already generated (HF's rule: positive
        logits divided, negative ones multiplied). 1.0 is off. Only generated tokens count, not the prompt:
        words of the context or a forced language should stay free to appear.
    no_repeat_ngram_size: n > 0 forbids any n-gram from occurring twice among a row's generated tokens.
    """

    eos_token_ids: tuple[int, ...] = DEFAULT_EOS_TOKEN_IDS
    pad_token_id: int = DEFAULT_PAD_TOKEN_ID
    suppress_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The static shape of one compiled program."""

    batch: int
    frames: int  # mel frames per row (whole encoder windows)
    prompt_len: int  # left-padded prompt tokens per row
    steps: int  # generated-token slots per row

    @property
    def samples(self) -> int:
        # One hop more than the frames covers any waveform with at most ``frames`` whole hops.
        return (self.frames + 1) * audio.HOP_LENGTH


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One row: 16 kHz samples ``[n]``, its prompt ids (audio slot expanded to the encoder output length of
    ``n // 160`` frames), and how many tokens it may generate."""

    samples: np.ndarray
    prompt_ids: Sequence[int]
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Generation:
    """One row's result: generated ids (up to and including the end token), whether it stopped on an end
    token, and whether it used its whole budget without one."""

    token_ids: list[int]
    stopped: bool

    @property
    def truncated(self) -> bool:
        return not self.stopped


def _next_token(
    logits: jax.Array, generated: jax.Array, count: jax.Array, seen: jax.Array | None, options: DecodeOptions
) -> jax.Array:
    """Greedy choice ``[batch]`` int32 from last-position logits ``[batch, vocab]`` (fp32).

    generated: ``[batch, steps]`` ids generated so far (the first ``count`` slots are real for active rows);
    seen: ``[batch, vocab]`` bool, tokens a row has generated (only with a repetition penalty).
    """
    batch = logits.shape[0]
    rows = jnp.arange(batch)[:, None]
    if options.suppress_token_ids:
        logits = logits.at[:, jnp.asarray(options.suppress_token_ids, jnp.int32)].set(-jnp.inf)
    if options.repetition_penalty != 1.0 and seen is not None:
        penalty = jnp.float32(options.repetition_penalty)
        penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
        logits = jnp.where(seen, penalised, logits)
    n = options.no_repeat_ngram_size
    if n > 0:
        steps = generated.shape[1]
        start = jnp.arange(steps, dtype=jnp.int32)  # candidate n-gram starts
        # The n-gram starting at i is banned-by-prefix when its first n-1 tokens equal the row's last n-1.
        match = jnp.ones((batch, steps), bool)
        for k in range(n - 1):
            earlier = jnp.take(generated, jnp.clip(start + k, 0, steps - 1), axis=1)
            latest = jax.lax.dynamic_index_in_dim(
                generated, jnp.clip(count - (n - 1) + k, 0, steps - 1), axis=1, keepdims=True
            )
            match &= earlier == latest
        complete = start + (n - 1) < count  # the n-gram's last token was generated already
        follower = jnp.take(generated, jnp.clip(start + (n - 1), 0, steps - 1), axis=1)
        # Scatter-min: a banned follower gets −inf, any other index is left as it is (duplicates are harmless).
        bans = jnp.where(match & complete, -jnp.inf, jnp.inf).astype(logits.dtype)
        logits = logits.at[jnp.broadcast_to(rows, follower.shape), follower].min(bans)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _is_eos(tokens: jax.Array, options: DecodeOptions) -> jax.Array:
    if not options.eos_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(options.eos_token_ids, jnp.int32))


def unstack_layers(stacked: Any, num_layers: int) -> list[Any]:
    """Per-layer trees from a tree whose leaves carry a leading layer axis (the scanned decoder's params or
    cache)."""
    return [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], stacked) for i in range(num_layers)]


def decode_token(
    model: Qwen3ASR,
    params: Any,
    layer_params: list[Any],
    x: jax.Array,
    positions: jax.Array,
    kv_start: jax.Array,
    layer_caches: list[KVCache],
    slot: jax.Array,
) -> tuple[jax.Array, list[KVCache]]:
    """One decoder step with the layers unrolled over separate per-layer weights and caches.

    The same layers as ``Qwen3ASR.decode``, run one by one instead of scanned: a scan reads each layer's weights
    and cache as slices of stacked arrays, which XLA copies out before every matrix-vector product; with one
    token per row those copies cost more than the products (2-3x the step time on CPU).

    x: ``[batch, 1, hidden]``; positions: ``[3, batch, 1]``; slot: the cache slot of this token.
    Returns last-position logits ``[batch, vocab]`` (fp32) and the updated caches.
    """
    cfg = model.config.text
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved)
    layer = DecoderLayer(
        cfg, attention_impl=model.attention_impl, dtype=model.dtype, param_dtype=model.param_dtype
    )
    updated = []
    for weights, cache in zip(layer_params, layer_caches):
        x, cache = layer.apply({"params": weights}, x, cache, cos, sin, kv_start, slot)
        updated.append(cache)
    norm = RMSNorm(cfg.rms_norm_eps, dtype=model.dtype, param_dtype=model.param_dtype)
    x = norm.apply({"params": params["decoder"]["norm"]}, x)
    return model.apply({"params": params}, x, method=Qwen3ASR.head)[:, 0], updated


def generate_batch(
    model: Qwen3ASR,
    options: DecodeOptions,
    steps: int,
    frames: int,
    params: Any,
    waveforms: jax.Array,
    wave_lengths: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    budgets: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The whole request batch as one traceable function (``model``, ``options``, ``steps``, ``frames`` static).

    Args:
      waveforms: ``[batch, samples]`` float32 16 kHz, zero past each row's length.
      wave_lengths: ``[batch]`` int32 samples per row.
      input_ids: ``[batch, prompt_len]`` int32, left-padded prompts.
      attention_mask: ``[batch, prompt_len]`` int32, 0 on the left padding.
      budgets: ``[batch]`` int32, tokens each row may generate (1 ≤ budget ≤ steps).

    Returns:
      tokens ``[batch, steps]`` int32 (``pad_token_id`` after a row's end), counts ``[batch]`` int32 (tokens
      generated, the end token included), stopped ``[batch]`` bool (ended on an end token).
    """
    variables = {"params": params}
    cfg: ThinkerConfig = model.config
    batch, prompt_len = input_ids.shape

    features, feature_frames = audio.log_mel(waveforms, wave_lengths, frames=frames)
    feature_mask = (jnp.arange(frames)[None, :] < feature_frames[:, None]).astype(jnp.int32)
    audio_embeds, _ = model.apply(variables, features, feature_mask, method=Qwen3ASR.encode_audio)
    x = model.apply(variables, input_ids, audio_embeds, method=Qwen3ASR.embed_inputs)

    cache = init_cache(cfg.text, batch, prompt_len + steps, model.dtype)
    kv_start = first_valid(attention_mask)
    logits, cache = model.apply(
        variables, x, positions_from_mask(attention_mask), kv_start, cache, 0, "last", method=Qwen3ASR.decode
    )
    prompt_tokens = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)

    # Separate buffers for the step loop, made once per batch (see decode_token).
    num_layers = cfg.text.num_hidden_layers
    layer_params = unstack_layers(params["decoder"]["layers"], num_layers)
    layer_caches = unstack_layers(cache, num_layers)
    del cache

    generated = jnp.full((batch, steps), options.pad_token_id, jnp.int32)
    track_seen = options.repetition_penalty != 1.0
    seen = jnp.zeros((batch, cfg.text.vocab_size), bool) if track_seen else None
    token = _next_token(logits[:, 0], generated, jnp.int32(0), seen, options)
    generated = generated.at[:, 0].set(token)
    if track_seen:
        seen = seen.at[jnp.arange(batch), token].set(True)
    stopped = _is_eos(token, options)
    done = stopped | (budgets <= 1)
    counts = jnp.ones((batch,), jnp.int32)

    def keep_going(state: tuple) -> jax.Array:
        step, _, _, _, _, done, _, _ = state
        return (step < steps) & ~jnp.all(done)

    def one_step(state: tuple) -> tuple:
        step, caches, generated, token, seen, done, stopped, counts = state
        # Token step-1 is fed at cache slot prompt_len+step-1, position (row's prompt length)+step-1.
        x = model.apply(variables, token[:, None], method=Qwen3ASR.embed_inputs)
        positions = jnp.broadcast_to((prompt_tokens + step - 1)[None, :, None], (3, batch, 1))
        logits, caches = decode_token(
            model, params, layer_params, x, positions, kv_start, caches, prompt_len + step - 1
        )
        new = _next_token(logits, generated, step, seen, options)
        new = jnp.where(done, options.pad_token_id, new)
        generated = jax.lax.dynamic_update_index_in_dim(generated, new, step, axis=1)
        if seen is not None:
            seen = seen.at[jnp.arange(batch), new].set(True)
        counts = counts + (~done).astype(jnp.int32)
        ended = ~done & _is_eos(new, options)
        stopped = stopped | ended
        done = done | ended | (step + 1 >= budgets)
        return step + 1, caches, generated, new, seen, done, stopped, counts

    state = (jnp.int32(1), layer_caches, generated, token, seen, done, stopped, counts)
    _, _, generated, _, _, _, stopped, counts = jax.lax.while_loop(keep_going, one_step, state)
    return generated, counts, stopped


class Generator:
    """Compiled greedy generation for one model and its params, with a program cache keyed by shape.

    ``generate(requests)`` runs one batch (at most ``max_batch`` requests) and returns one ``Generation`` per
    request, in order. ``compile_count`` is the number of programs compiled so far; ``compile_seconds`` their
    total compile time.
    """

    def __init__(
        self,
        config: ThinkerConfig,
        params: Any,
        *,
        dtype: Any = jnp.float32,
        attention_impl: str = "auto",
        max_batch: int = 32,
        options: DecodeOptions | None = None,
        mesh: Mesh | None = None,
        sharding_rules: sharding.Rules = sharding.DEFAULT_RULES,
    ) -> None:
        """``mesh``: run on a device mesh; ``params`` are then already placed (``sharding.load_sharded``) and
        each batch is split over it as ``sharding_rules`` say."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.config = config
        self.params = params
        self.model = Qwen3ASR(config, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)
        self.max_batch = max_batch
        self.options = options or DecodeOptions()
        self.mesh = mesh
        self.sharding_rules = sharding_rules
        self._programs: dict[tuple[BatchShape, DecodeOptions], Any] = {}
        self.compile_seconds = 0.0

    @property
    def compile_count(self) -> int:
        return len(self._programs)

    @property
    def compiled_shapes(self) -> list[BatchShape]:
        return [shape for shape, _ in self._programs]

    def shape_for(self, requests: Sequence[GenerationRequest]) -> BatchShape:
        """The bucket that runs ``requests`` together."""
        window_frames = self.config.audio.chunk_frames * self.config.audio.window_chunks
        frames = max(audio.num_frames(len(r.samples)) for r in requests)
        return BatchShape(
            batch=batch_bucket(len(requests), self.max_batch),
            frames=bucket_size(max(1, -(-frames // window_frames))) * window_frames,
            prompt_len=bucket_size(max(len(r.prompt_ids) for r in requests), MIN_PROMPT_BUCKET, 4),
            steps=bucket_size(max(r.max_new_tokens for r in requests), MIN_STEP_BUCKET),
        )

    def _program(self, shape: BatchShape, options: DecodeOptions) -> Any:
        key = (shape, options)
        program = self._programs.get(key)
        if program is None:
            started = time.perf_counter()
            # On a mesh the results are replicated, so every process can read them.
            placement = {} if self.mesh is None else {"out_shardings": sharding.replicated(self.mesh)}
            fn = jax.jit(
                functools.partial(generate_batch, self.model, options, shape.steps, shape.frames), **placement
            )
            b, mesh, rules = shape.batch, self.mesh, self.sharding_rules
            int_vec = sharding.batch_struct((b,), jnp.int32, mesh, rules)
            prompt = sharding.batch_struct((b, shape.prompt_len), jnp.int32, mesh, rules)
            with sharding.use_mesh(mesh, rules):
                program = fn.lower(
                    sharding.abstract_arrays(self.params),
                    sharding.batch_struct((b, shape.samples), jnp.float32, mesh, rules),
                    int_vec,
                    prompt,
                    prompt,
                    int_vec,
                ).compile()
            self.compile_seconds += time.perf_counter() - started
            self._programs[key] = program
        return program

    def generate(
        self, requests: Sequence[GenerationRequest], options: DecodeOptions | None = None
    ) -> list[Generation]:
        """Greedy generation for one batch of requests (independent rows)."""
        if not requests:
            return []
        options = options or self.options
        shape = self.shape_for(requests)
        inputs = pack_batch(requests, shape, options.pad_token_id)
        inputs = sharding.place_batch(list(inputs), self.mesh, self.sharding_rules)
        tokens, counts, stopped = self._program(shape, options)(self.params, *inputs)
        tokens, counts, stopped = np.asarray(tokens), np.asarray(counts), np.asarray(stopped)
        return [
            Generation(token_ids=tokens[i, : counts[i]].tolist(), stopped=bool(stopped[i]))
            for i in range(len(requests))
        ]


def pack_batch(
    requests: Sequence[GenerationRequest], shape: BatchShape, pad_token_id: int
) -> tuple[np.ndarray, ...]:
    """Host arrays for ``generate_batch`` in ``shape``: waveforms, lengths, left-padded ids, mask, budgets.

    Rows past the requests repeat the first request with a budget of one token, so they end at once.
    """
    for i, r in enumerate(requests):
        if len(r.prompt_ids) > shape.prompt_len or audio.num_frames(len(r.samples)) > shape.frames:
            raise ValueError(f"request {i} does not fit the batch shape {shape}")
        if not 1 <= r.max_new_tokens <= shape.steps:
            raise ValueError(
                f"request {i}: max_new_tokens must be in [1, {shape.steps}], got {r.max_new_tokens}"
            )
    rows = list(requests) + [requests[0]] * (shape.batch - len(requests))
    waveforms = np.zeros((shape.batch, shape.samples), np.float32)
    lengths = np.zeros((shape.batch,), np.int32)
    input_ids = np.full((shape.batch, shape.prompt_len), pad_token_id, np.int32)
    mask = np.zeros((shape.batch, shape.prompt_len), np.int32)
    budgets = np.ones((shape.batch,), np.int32)
    for i, r in enumerate(rows):
        n = len(r.samples)
        waveforms[i, :n] = r.samples
        lengths[i] = n
        input_ids[i, shape.prompt_len - len(r.prompt_ids) :] = np.asarray(r.prompt_ids, np.int32)
        mask[i, shape.prompt_len - len(r.prompt_ids) :] = 1
        if i < len(requests):
            budgets[i] = r.max_new_tokens
    return waveforms, lengths, input_ids, mask, budgets


__all__ = [
    "DEFAULT_EOS_TOKEN_IDS",
    "BatchShape",
    "DecodeOptions",
    "Generation",
    "GenerationRequest",
    "Generator",
    "batch_bucket",
    "bucket_size",
    "decode_token",
    "generate_batch",
    "pack_batch",
]
