"""The transcription engine: prefill → insert into a slot → generate, with the params passed to every call.

    engine = Engine(config, options=DecodeOptions(...))
    state = engine.init_state(slots=8, cache_len=512, start=64)   # an empty DecodeState
    prefilled = engine.prefill(params, requests)                  # audio + prompts → KV blocks, first tokens
    state = engine.insert(state, prefilled, slots=[0, 3])         # into free slots, others may be mid-decode
    state = engine.generate(params, state, steps=16)              # up to 16 steps for every live slot
    results = engine.collect(state, [0, 3])                       # tokens (and log-probs) of (finished) slots

The decode state holds a fixed number of slots over one KV cache per decoder layer, ``[slots, kv, cache_len,
hd]``. All slots write their next token at one shared cache index (``DecodeState.index``), so a step updates the
cache with one ``dynamic_update_slice`` per layer, in place; each slot's own sequence is the cache range
``[kv_start, index)``. Inserting a prefilled request of prompt bucket P puts its KV block at ``[index − P, index)``
of a free slot (left padding included, masked by ``kv_start``). When ``index`` reaches the end of the cache,
``compact`` moves every slot's range left by the oldest live slot's start. A request's tokens depend on nothing
but itself: attention sees only its own range, positions are its own, and a slot that is inserted later sees
the same keys at the same positions as it would alone.

Every step also records the log-probability of the token it chose (log-softmax of the model's fp32 logits, before
suppression or penalties: what the model itself gave that token), in ``DecodeState.logprobs`` beside the tokens.
It stays on the device and comes back with the tokens (``collect``), so it costs no transfer or sync of its own.

Programs are compiled once per static shape (``qasr_jax.buckets``): prefill per (rows, frames, prompt
bucket), insert per (rows, prompt bucket) and state shape, generate and compact per state shape. Steps are a
run-time argument of generate. The state is donated to insert, generate and compact.

Adapters (``qasr_jax.adapters``): prefill, generate and run take an ``AdapterStack``; each request names its slot
(``GenerationRequest.adapter``, 0 = the base model), each decode slot keeps it (``DecodeState.adapters``), and the
programs give every row its own low-rank updates (the stacked weights gathered by row once per call), so rows
with different adapters share one prefill and one decode step.

Callers: ``Generator`` (one-shot batches: prefill, insert all, generate to completion), the streaming and
serving loops (insert as requests arrive, generate a few steps, collect finished slots) and the trainer's
evaluator (params change between calls; the programs do not).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qasr_jax import adapters as lora
from qasr_jax import audio, buckets, sharding
from qasr_jax.config import ThinkerConfig
from qasr_jax.model import Qwen3ASR, decode_layer_params, decode_step
from qasr_jax.model.attention import KVCache
from qasr_jax.model.decoder import CACHE_SEQ_AXIS, cache_length, layer_cache_shape

# The released generation_config.json stops on <|im_end|> or <|endoftext|>.
DEFAULT_EOS_TOKEN_IDS = (151645, 151643)
DEFAULT_PAD_TOKEN_ID = 151643


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How the next token is chosen (static: part of the compiled programs).

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

    @property
    def tracks_seen(self) -> bool:
        return self.repetition_penalty != 1.0


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One request: 16 kHz samples ``[n]``, its prompt ids (audio slot expanded to the encoder output length of
    ``n // 160`` frames), and how many tokens it may generate."""

    samples: np.ndarray
    prompt_ids: Sequence[int]
    max_new_tokens: int
    adapter: int = 0  # the request's slot in the AdapterStack it runs with (0: the base model)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One request's result: generated ids (up to and including the end token), whether it stopped on an
    end token (else it used its whole budget), and the log-probability of each id (natural log, fp32 model
    logits; empty when not recorded)."""

    token_ids: list[int]
    stopped: bool
    logprobs: list[float] = dataclasses.field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return not self.stopped


@dataclasses.dataclass(frozen=True)
class PrefillShape:
    """The static shape of a prefill program."""

    rows: int
    frames: int  # mel frames per row (whole encoder windows)
    prompt_len: int  # left-padded prompt tokens per row

    @property
    def samples(self) -> int:
        # One hop more than the frames covers any waveform with at most ``frames`` whole hops.
        return (self.frames + 1) * audio.HOP_LENGTH


@dataclasses.dataclass(frozen=True)
class StateShape:
    """The static shape of a decode state."""

    slots: int
    cache_len: int
    max_new_tokens: int  # token slots per request


@flax.struct.dataclass
class Prefilled:
    """Prefilled requests, one per row (rows past ``count`` are padding and are never inserted).

    caches: ``{"k", "v"}: [layers, rows, kv, prompt_len, hd]``; kv_start: ``[rows]`` first valid slot (left
    padding); positions: ``[rows]`` the next token's position (the prompt length); first_token: ``[rows]``;
    first_logprob: ``[rows]`` its log-probability; budgets: ``[rows]`` tokens each request may generate.
    """

    caches: KVCache
    kv_start: jax.Array
    positions: jax.Array
    first_token: jax.Array
    first_logprob: jax.Array
    budgets: jax.Array
    count: int = flax.struct.field(pytree_node=False, default=0)
    adapters: jax.Array | None = None  # [rows] each row's adapter slot


@flax.struct.dataclass
class DecodeState:
    """The slots of the engine (all arrays have ``slots`` rows, except ``index``).

    caches: one ``{"k", "v"}: [slots, kv, cache_len, hd]`` per decoder layer; index: the cache slot the next step
    writes (shared); kv_start: each slot's first valid cache slot; positions: the position of the token fed
    next; last_token: the token fed next; tokens: ``[slots, max_new_tokens]`` generated ids (pad after the
    end); logprobs: ``[slots, max_new_tokens]`` fp32 log-probability of each generated id (0 after the end);
    counts: tokens generated; budgets: tokens allowed; live: still generating; stopped: ended on an end
    token; seen: ``[slots, vocab]`` tokens generated so far (only with a repetition penalty, else None).
    """

    caches: list[KVCache]
    index: jax.Array
    kv_start: jax.Array
    positions: jax.Array
    last_token: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    counts: jax.Array
    budgets: jax.Array
    live: jax.Array
    stopped: jax.Array
    seen: jax.Array | None
    adapters: jax.Array | None = None  # [slots] each slot's adapter slot (0: the base model)

    @property
    def shape(self) -> StateShape:
        slots, max_new = self.tokens.shape
        return StateShape(slots, cache_length(self.caches[0]), max_new)


def min_slots() -> int:
    """The fewest slots a decode state gets. On XLA:CPU a one-row step fuses each layer's in-place cache write
    into two consumers and copies whole cache layers to feed both (≈ 2× the step time of two rows at the
    0.6B config), so a state there has at least two slots; the spare one stays free."""
    return 2 if jax.default_backend() == "cpu" else 1


def next_token(
    logits: jax.Array, generated: jax.Array, count: jax.Array, seen: jax.Array | None, options: DecodeOptions
) -> jax.Array:
    """Greedy choice ``[batch]`` int32 from last-position logits ``[batch, vocab]`` (fp32).

    generated: ``[batch, steps]`` ids generated so far (the first ``count[b]`` slots of row b are real);
    count: ``[batch]``; seen: ``[batch, vocab]`` bool, tokens a row has generated (with a repetition penalty).
    """
    batch = logits.shape[0]
    rows = jnp.arange(batch)[:, None]
    count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), (batch,))
    if options.suppress_token_ids:
        logits = logits.at[:, jnp.asarray(options.suppress_token_ids, jnp.int32)].set(-jnp.inf)
    if options.tracks_seen and seen is not None:
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
            latest_index = jnp.clip(count - (n - 1) + k, 0, steps - 1)
            latest = jnp.take_along_axis(generated, latest_index[:, None], axis=1)
            match &= earlier == latest
        complete = start[None, :] + (n - 1) < count[:, None]  # the n-gram's last token was generated already
        follower = jnp.take(generated, jnp.clip(start + (n - 1), 0, steps - 1), axis=1)
        # Scatter-min: a banned follower gets −inf, any other index is left as it is (duplicates are harmless).
        bans = jnp.where(match & complete, -jnp.inf, jnp.inf).astype(logits.dtype)
        logits = logits.at[jnp.broadcast_to(rows, follower.shape), follower].min(bans)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log-softmax of ``logits [batch, vocab]`` at ``tokens [batch]``, in fp32: ``[batch]``.

    The raw logits decide (not those after suppression or a repetition penalty), so the value is the model's
    probability of the token, comparable across decoding options.
    """
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def is_eos(tokens: jax.Array, options: DecodeOptions) -> jax.Array:
    if not options.eos_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(options.eos_token_ids, jnp.int32))


# ----------------------------------------------------------------------------------------------------------------
# The programs (pure functions; ``Engine`` compiles them per shape)


def prefill_program(
    model: Qwen3ASR,
    options: DecodeOptions,
    frames: int,
    params: Any,
    waveforms: jax.Array,
    wave_lengths: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    budgets: jax.Array,
    adapter_rows: jax.Array | None = None,
    stack: Any = None,
) -> Prefilled:
    """Encoder and prompt of every row into its KV block, and each row's first token (with ``stack``, row i
    runs with the adapter in slot ``adapter_rows[i]``)."""
    if stack is not None:
        params = lora.combine(params, lora.select_rows(stack, adapter_rows))
    logits, cache, kv_start, lengths = model.apply(
        {"params": params},
        waveforms,
        wave_lengths,
        input_ids,
        attention_mask,
        frames,
        method=Qwen3ASR.prefill,
    )
    rows = input_ids.shape[0]
    first = next_token(logits, jnp.zeros((rows, 1), jnp.int32), jnp.int32(0), None, options)
    return Prefilled(
        cache, kv_start, lengths, first, token_logprob(logits, first), budgets, adapters=adapter_rows
    )


def init_state_program(
    config: ThinkerConfig, dtype: Any, options: DecodeOptions, shape: StateShape, start: jax.Array
) -> DecodeState:
    cfg = config.text
    cache_shape = layer_cache_shape(cfg, shape.slots, shape.cache_len)
    caches = [
        {"k": jnp.zeros(cache_shape, dtype), "v": jnp.zeros(cache_shape, dtype)}
        for _ in range(cfg.num_hidden_layers)
    ]
    slots = shape.slots
    zeros = jnp.zeros((slots,), jnp.int32)
    return DecodeState(
        caches=caches,
        index=jnp.asarray(start, jnp.int32),
        kv_start=jnp.full((slots,), start, jnp.int32),
        positions=zeros,
        last_token=jnp.full((slots,), options.pad_token_id, jnp.int32),
        tokens=jnp.full((slots, shape.max_new_tokens), options.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((slots, shape.max_new_tokens), jnp.float32),
        counts=zeros,
        budgets=zeros,
        live=jnp.zeros((slots,), bool),
        stopped=jnp.zeros((slots,), bool),
        seen=jnp.zeros((slots, cfg.vocab_size), bool) if options.tracks_seen else None,
        adapters=zeros,
    )


def insert_program(
    options: DecodeOptions, state: DecodeState, prefilled: Prefilled, slots: jax.Array
) -> DecodeState:
    """Prefilled row i into slot ``slots[i]`` (rows whose slot is out of range are dropped), its KV block at
    cache slots ``[index − prompt_len, index)``."""
    prompt_len = prefilled.caches["k"].shape[1 + CACHE_SEQ_AXIS]
    start = state.index - prompt_len
    zero = jnp.int32(0)
    caches = []
    for layer, cache in enumerate(state.caches):
        updated = {}
        for name in ("k", "v"):
            block = prefilled.caches[name][layer].astype(cache[name].dtype)  # [rows, kv, prompt_len, hd]
            region = jax.lax.dynamic_slice_in_dim(cache[name], start, prompt_len, axis=CACHE_SEQ_AXIS)
            region = region.at[slots].set(block, mode="drop")
            updated[name] = jax.lax.dynamic_update_slice(cache[name], region, (zero, zero, start, zero))
        caches.append(updated)
    first = prefilled.first_token
    ended = is_eos(first, options)
    row_tokens = jnp.full((first.shape[0], state.tokens.shape[1]), options.pad_token_id, jnp.int32)
    row_tokens = row_tokens.at[:, 0].set(first)
    row_logprobs = jnp.zeros(row_tokens.shape, jnp.float32).at[:, 0].set(prefilled.first_logprob)
    seen = state.seen
    if seen is not None:
        rows_seen = jax.nn.one_hot(first, seen.shape[1], dtype=bool)
        seen = seen.at[slots].set(rows_seen, mode="drop")

    def put(array: jax.Array, values: jax.Array) -> jax.Array:
        return array.at[slots].set(values.astype(array.dtype), mode="drop")

    return DecodeState(
        caches=caches,
        index=state.index,
        kv_start=put(state.kv_start, start + prefilled.kv_start),
        positions=put(state.positions, prefilled.positions),
        last_token=put(state.last_token, first),
        tokens=put(state.tokens, row_tokens),
        logprobs=put(state.logprobs, row_logprobs),
        counts=put(state.counts, jnp.ones_like(first)),
        budgets=put(state.budgets, prefilled.budgets),
        live=put(state.live, ~ended & (prefilled.budgets > 1)),
        stopped=put(state.stopped, ended),
        seen=seen,
        adapters=None if state.adapters is None else put(
            state.adapters, jnp.zeros_like(first) if prefilled.adapters is None else prefilled.adapters
        ),
    )


def generate_program(
    model: Qwen3ASR, options: DecodeOptions, params: Any, state: DecodeState, steps: jax.Array, stack: Any = None
) -> DecodeState:
    """Up to ``steps`` decode steps for every live slot; stops early when no slot is live or the cache is full.
    With ``stack``, each slot runs with the adapter of its slot in ``state.adapters``."""
    if stack is not None:
        # The slots' adapters do not change within a call: gather each row's weights once, before the loop.
        params = lora.combine(params, lora.select_rows(stack, state.adapters))
    layer_params = decode_layer_params(model, params)  # one copy per call, not per step
    slots, max_new = state.tokens.shape
    cache_len = cache_length(state.caches[0])
    rows = jnp.arange(slots)

    def keep_going(carry: tuple[jax.Array, DecodeState]) -> jax.Array:
        step, s = carry
        return (step < steps) & jnp.any(s.live) & (s.index < cache_len)

    def one_step(carry: tuple[jax.Array, DecodeState]) -> tuple[jax.Array, DecodeState]:
        step, s = carry
        logits, caches = decode_step(
            model, params, layer_params, s.last_token, s.positions, s.kv_start, s.caches, s.index
        )
        new = next_token(logits, s.tokens, s.counts, s.seen, options)
        new = jnp.where(s.live, new, options.pad_token_id)
        write = jnp.minimum(s.counts, max_new - 1)
        tokens = s.tokens.at[rows, write].set(jnp.where(s.live, new, s.tokens[rows, write]))
        logprob = token_logprob(logits, new)
        logprobs = s.logprobs.at[rows, write].set(jnp.where(s.live, logprob, s.logprobs[rows, write]))
        seen = s.seen
        if seen is not None:
            seen = seen.at[rows, new].set(seen[rows, new] | s.live)
        counts = s.counts + s.live.astype(jnp.int32)
        ended = s.live & is_eos(new, options)
        return step + 1, DecodeState(
            caches=caches,
            index=s.index + 1,
            kv_start=s.kv_start,
            positions=s.positions + 1,
            last_token=new,
            tokens=tokens,
            logprobs=logprobs,
            counts=counts,
            budgets=s.budgets,
            live=s.live & ~ended & (counts < s.budgets),
            stopped=s.stopped | ended,
            seen=seen,
            adapters=s.adapters,
        )

    _, state = jax.lax.while_loop(keep_going, one_step, (jnp.int32(0), state))
    return state


def compact_program(state: DecodeState, shift: jax.Array) -> DecodeState:
    """Every slot's cache range moved ``shift`` slots to the left (what falls off the front is no slot's)."""
    caches = [
        {name: jnp.roll(cache[name], -shift, axis=CACHE_SEQ_AXIS) for name in ("k", "v")} for cache in state.caches
    ]
    return state.replace(caches=caches, index=state.index - shift, kv_start=state.kv_start - shift)


# ----------------------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Compiled prefill / insert / generate / compact programs for one model config (not its params).

    ``mesh``: run on a device mesh (params placed by ``sharding.load_sharded``; batches and states split over
    its batch axes as ``sharding_rules`` say). ``programs`` counts every compiled program.
    """

    def __init__(
        self,
        config: ThinkerConfig,
        *,
        dtype: Any = jnp.float32,
        attention_impl: str = "auto",
        options: DecodeOptions | None = None,
        mesh: Mesh | None = None,
        sharding_rules: sharding.Rules = sharding.DEFAULT_RULES,
        model: Qwen3ASR | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.model = model or Qwen3ASR(config, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)
        self.options = options or DecodeOptions()
        self.mesh = mesh
        self.sharding_rules = sharding_rules
        self.programs = buckets.ProgramCache()

    # -- shapes --

    def prefill_shape(self, requests: Sequence[GenerationRequest], max_rows: int) -> PrefillShape:
        """The bucket that prefills ``requests`` together."""
        window_frames = self.config.audio.window_frames
        frames = max(audio.num_frames(len(r.samples)) for r in requests)
        return PrefillShape(
            rows=buckets.batch_bucket(len(requests), max_rows),
            frames=buckets.WINDOW_LADDER.size(max(1, -(-frames // window_frames))) * window_frames,
            prompt_len=buckets.PROMPT_LADDER.size(max(len(r.prompt_ids) for r in requests)),
        )

    def compile_program(
        self, key: Any, fn: Any, *args: Any, donate: tuple[int, ...] = (), state_out: bool = False
    ) -> Any:
        """The program of ``fn`` for abstract ``args`` (with their shardings on a mesh: ``abstract``,
        ``sharding.abstract_arrays``, ``sharding.batch_struct``), compiled on first use; every program of the
        engine and of the streaming drivers is built here. On a mesh, a state (``state_out``: every result, a
        decode state or caches) is split over the batch axes by its rows, and other results are replicated (every
        process reads them). Params of another structure or shape (an adapter merged in) get a program of their
        own."""
        leaves, structure = jax.tree_util.tree_flatten(args[0])
        key = (key, structure, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))

        def build() -> Any:
            placement = {}
            if self.mesh is not None:
                if state_out:
                    placement["out_shardings"] = self._state_shardings(jax.eval_shape(fn, *args))
                else:
                    placement["out_shardings"] = sharding.replicated(self.mesh)
            with sharding.use_mesh(self.mesh, self.sharding_rules):
                return jax.jit(fn, donate_argnums=donate, **placement).lower(*args).compile()

        return self.programs.get(key, build)

    def _state_shardings(self, abstract_state: Any) -> Any:
        def place(x: Any) -> Any:
            if x.ndim == 0:
                return sharding.replicated(self.mesh)
            return sharding.batch_sharding(self.mesh, x.shape, self.sharding_rules)

        return jax.tree_util.tree_map(place, abstract_state)

    def abstract(self, tree: Any, is_state: bool = False) -> Any:
        """ShapeDtypeStructs of ``tree``; on a mesh with the state's shardings (``is_state``: split by rows as
        ``compile_program`` places a state) or replicated."""
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        if self.mesh is None:
            return abstract
        shardings = self._state_shardings(abstract) if is_state else None
        if shardings is None:
            return jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(self.mesh)),
                abstract,
            )
        return jax.tree_util.tree_map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings
        )

    def place_state(self, tree: Any) -> Any:
        """Device arrays of ``tree`` (caches made outside a program) placed as a state is: split by rows on a
        mesh, on the default device otherwise."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, self._state_shardings(tree))

    # -- the four verbs --

    def init_state(self, slots: int, cache_len: int, max_new_tokens: int, start: int = 0) -> DecodeState:
        """An empty state: ``slots`` free slots (at least ``min_slots()``) over a cache of ``cache_len``; the
        first insert puts prompts so that they end at cache slot ``start`` (at least the longest prompt bucket to
        be inserted)."""
        shape = StateShape(max(slots, min_slots()), cache_len, max_new_tokens)
        fn = functools.partial(init_state_program, self.config, self.dtype, self.options, shape)
        program = self.compile_program(
            ("init", shape, self.options), fn, jax.ShapeDtypeStruct((), jnp.int32), state_out=True
        )
        return program(jnp.int32(start))

    def prefill(
        self,
        params: Any,
        requests: Sequence[GenerationRequest],
        shape: PrefillShape | None = None,
        adapters: lora.AdapterStack | None = None,
    ) -> Prefilled:
        """Encoder and prompts of ``requests`` (one program per ``PrefillShape``; default: their own bucket), each
        with the adapter of its ``adapter`` slot in ``adapters``."""
        shape = shape or self.prefill_shape(requests, max(len(requests), 1))
        arrays = pack_prefill(requests, shape, self.options.pad_token_id)
        if adapters is not None:
            return self._prefill_adapters(params, requests, shape, arrays, adapters)
        if any(r.adapter for r in requests):
            raise ValueError("a request names an adapter slot, but no adapters were passed")
        mesh, rules = self.mesh, self.sharding_rules
        fn = functools.partial(prefill_program, self.model, self.options, shape.frames)
        int_vec = sharding.batch_struct((shape.rows,), jnp.int32, mesh, rules)
        prompt = sharding.batch_struct((shape.rows, shape.prompt_len), jnp.int32, mesh, rules)
        waves = sharding.batch_struct((shape.rows, shape.samples), jnp.float32, mesh, rules)
        program = self.compile_program(
            ("prefill", shape, self.options), fn, sharding.abstract_arrays(params), waves, int_vec, prompt, prompt,
            int_vec,
        )  # fmt: skip
        placed = sharding.place_batch(list(arrays), mesh, rules)
        return program(params, *placed).replace(count=len(requests))

    def _prefill_adapters(
        self, params: Any, requests: Sequence[GenerationRequest], shape: PrefillShape, arrays: tuple,
        adapters: lora.AdapterStack,
    ) -> Prefilled:  # fmt: skip
        slots = len(adapters.names) + 1
        rows = np.zeros((shape.rows,), np.int32)
        for i, r in enumerate(requests):
            if not 0 <= r.adapter < slots:
                raise ValueError(f"request {i}: adapter slot {r.adapter} is not in [0, {slots})")
            rows[i] = r.adapter
        mesh, rules = self.mesh, self.sharding_rules
        fn = functools.partial(prefill_program, self.model, self.options, shape.frames)
        int_vec = sharding.batch_struct((shape.rows,), jnp.int32, mesh, rules)
        prompt = sharding.batch_struct((shape.rows, shape.prompt_len), jnp.int32, mesh, rules)
        waves = sharding.batch_struct((shape.rows, shape.samples), jnp.float32, mesh, rules)
        program = self.compile_program(
            ("prefill", shape, self.options, adapters.signature), fn, sharding.abstract_arrays(params), waves,
            int_vec, prompt, prompt, int_vec, int_vec, sharding.abstract_arrays(adapters.weights),
        )  # fmt: skip
        placed = sharding.place_batch([*arrays, rows], mesh, rules)
        return program(params, *placed, adapters.weights).replace(count=len(requests))

    def insert(self, state: DecodeState, prefilled: Prefilled, slots: Sequence[int]) -> DecodeState:
        """Prefilled request i into slot ``slots[i]`` (``state`` is donated). The state's ``index`` must be at
        least the prefill's prompt bucket (``init_state(start=...)``, or after some generated steps)."""
        if len(slots) != prefilled.count:
            raise ValueError(f"{prefilled.count} prefilled requests, {len(slots)} slots")
        rows = prefilled.first_token.shape[0]
        n_slots = state.tokens.shape[0]
        if any(not 0 <= s < n_slots for s in slots) or len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, in [0, {n_slots}): {list(slots)}")
        targets = np.full((rows,), n_slots, np.int32)  # out of range: padding rows are dropped
        targets[: len(slots)] = slots
        fn = functools.partial(insert_program, self.options)
        key = ("insert", state.shape, rows, prefilled.caches["k"].shape[1 + CACHE_SEQ_AXIS], self.options,
               prefilled.adapters is not None)  # fmt: skip
        prefilled = prefilled.replace(count=0)  # the count is host bookkeeping, not part of the program
        program = self.compile_program(
            key, fn, self.abstract(state, True), self.abstract(prefilled), jax.ShapeDtypeStruct((rows,), jnp.int32),
            donate=(0,), state_out=True,
        )  # fmt: skip
        return program(state, prefilled, jnp.asarray(targets))

    def generate(
        self, params: Any, state: DecodeState, steps: int, adapters: lora.AdapterStack | None = None
    ) -> DecodeState:
        """Up to ``steps`` steps for every live slot (``state`` is donated); returns early when no slot is live or
        the cache is full (then ``compact``). ``adapters``: the stack the slots' adapter slots refer to."""
        fn = functools.partial(generate_program, self.model, self.options)
        extra, key = (), ("generate", state.shape, self.options)
        if adapters is not None:
            extra, key = (adapters.weights,), (*key, adapters.signature)
        program = self.compile_program(
            key, fn, sharding.abstract_arrays(params), self.abstract(state, True),
            jax.ShapeDtypeStruct((), jnp.int32), *map(sharding.abstract_arrays, extra), donate=(1,), state_out=True,
        )  # fmt: skip
        return program(params, state, jnp.int32(steps), *extra)

    def compact(self, state: DecodeState, shift: int) -> DecodeState:
        """Move every slot's range ``shift`` cache slots to the left (``state`` is donated)."""
        program = self.compile_program(
            ("compact", state.shape), compact_program, self.abstract(state, True),
            jax.ShapeDtypeStruct((), jnp.int32), donate=(0,), state_out=True,
        )  # fmt: skip
        return program(state, jnp.int32(shift))

    def reclaim(self, state: DecodeState, keep: int) -> tuple[DecodeState, int]:
        """Free the cache slots before the oldest live sequence: a ``compact`` by that much, but leaving the index
        at ``keep`` or more (the longest prompt bucket that may be inserted next). Returns the state and the shift
        (0: nothing to free; the cache is then too short for the sequences it holds)."""
        index, kv_start, live = jax.device_get((state.index, state.kv_start, state.live))
        oldest = int(kv_start[live].min()) if live.any() else int(index)
        shift = min(oldest, int(index) - keep)
        if shift <= 0:
            return state, 0
        return self.compact(state, shift), shift

    def collect(self, state: DecodeState, slots: Sequence[int]) -> list[Generation]:
        """The tokens of ``slots`` (finished or not) as ``Generation``s, with their log-probabilities (one
        transfer for all of it)."""
        tokens, logprobs, counts, stopped = jax.device_get(
            (state.tokens, state.logprobs, state.counts, state.stopped)
        )
        return [generation_of(tokens, logprobs, counts, stopped, s) for s in slots]

    # -- one policy --

    def run(
        self,
        params: Any,
        requests: Sequence[GenerationRequest],
        shape: PrefillShape | None = None,
        max_new: int | None = None,
        adapters: lora.AdapterStack | None = None,
    ) -> list[Generation]:
        """Every request to completion in one batch: prefill, insert all, one loop until all are done (the
        one-shot policy). ``max_new``: token slots per request (default: the step bucket of the largest budget).
        ``adapters``: the stack the requests' adapter slots refer to."""
        if not requests:
            return []
        shape = shape or self.prefill_shape(requests, len(requests))
        max_new = max_new or buckets.STEP_LADDER.size(max(r.max_new_tokens for r in requests))
        if max(r.max_new_tokens for r in requests) > max_new:
            raise ValueError(f"a request's max_new_tokens exceeds the {max_new} token slots")
        state = self.init_state(shape.rows, shape.prompt_len + max_new, max_new, start=shape.prompt_len)
        prefilled = self.prefill(params, requests, shape, adapters)
        state = self.insert(state, prefilled, list(range(len(requests))))
        state = self.generate(params, state, max_new, adapters)
        return self.collect(state, range(len(requests)))


def generation_of(
    tokens: np.ndarray, logprobs: np.ndarray, counts: np.ndarray, stopped: np.ndarray, slot: int
) -> Generation:
    """Slot ``slot``'s ``Generation`` from host copies of a state's ``tokens``, ``logprobs``, ``counts`` and
    ``stopped``."""
    n = int(counts[slot])
    return Generation(tokens[slot, :n].tolist(), bool(stopped[slot]), logprobs[slot, :n].tolist())


def pack_prefill(
    requests: Sequence[GenerationRequest], shape: PrefillShape, pad_token_id: int
) -> tuple[np.ndarray, ...]:
    """Host arrays for a prefill in ``shape``: waveforms, lengths, left-padded ids, mask, budgets.

    Rows past the requests repeat the first request (they are computed and never inserted).
    """
    for i, r in enumerate(requests):
        if len(r.prompt_ids) > shape.prompt_len or audio.num_frames(len(r.samples)) > shape.frames:
            raise ValueError(f"request {i} does not fit the prefill shape {shape}")
        if r.max_new_tokens < 1:
            raise ValueError(f"request {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
    if len(requests) > shape.rows:
        raise ValueError(f"{len(requests)} requests do not fit the prefill shape {shape}")
    rows = list(requests) + [requests[0]] * (shape.rows - len(requests))
    waveforms = np.zeros((shape.rows, shape.samples), np.float32)
    lengths = np.zeros((shape.rows,), np.int32)
    input_ids = np.full((shape.rows, shape.prompt_len), pad_token_id, np.int32)
    mask = np.zeros((shape.rows, shape.prompt_len), np.int32)
    budgets = np.ones((shape.rows,), np.int32)
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
    "DEFAULT_PAD_TOKEN_ID",
    "DecodeOptions",
    "DecodeState",
    "Engine",
    "Generation",
    "GenerationRequest",
    "PrefillShape",
    "Prefilled",
    "StateShape",
    "generation_of",
    "is_eos",
    "next_token",
    "pack_prefill",
    "token_logprob",
]
