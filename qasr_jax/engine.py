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
(``DecodeRequest.adapter``, 0 = the base model), each decode slot keeps it (``DecodeState.adapters``), and the
programs give every row its own low-rank updates (the stacked weights gathered by row once per call), so rows
with different adapters share one prefill and one decode step.

A prefill can also continue cached sequences (``prefill(..., prefix=Prefix(...))``, a stream's kept prompt): each
row's run is written after the keys and values its own cache keeps, and the result is a decode state of those
rows (``prefill_after_program``).

Callers: ``run`` (the one-shot policy: prefill, insert all, generate to completion), the streaming and serving
loops (insert as requests arrive, generate a few steps, collect finished slots; streams continue their prefixes)
and the trainer's evaluator (params change between calls; the programs do not).
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
from qasr_jax.model import Qwen3ASR, extend_cache, unrolled
from qasr_jax.model.attention import KVCache
from qasr_jax.model.decoder import CACHE_AXES, CACHE_SEQ_AXIS, cache_length, init_cache, layer_cache_shape

# The released generation_config.json stops on <|im_end|> or <|endoftext|>.
DEFAULT_EOS_TOKEN_IDS = (151645, 151643)
DEFAULT_PAD_TOKEN_ID = 151643
# Cache slots of a continued sequence, on a two-steps-per-octave ladder from this size: few programs, at most a
# third unused.
MIN_CACHE_LEN = 256


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
class DecodeRequest:
    """One request: 16 kHz samples ``[n]``, its prompt ids (audio slot expanded to the encoder output length of
    ``n // 160`` frames), and how many tokens it may generate."""

    samples: np.ndarray
    prompt_ids: Sequence[int]
    max_new_tokens: int
    adapter: int = 0  # the request's slot in the AdapterStack it runs with (0: the base model)


@dataclasses.dataclass(frozen=True)
class DecodeResult:
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
class BatchShape:
    """The bucket of a one-shot batch (``Engine.run``): prefill rows, mel frames and prompt length, and the token
    slots per row."""

    rows: int
    frames: int
    prompt_len: int
    steps: int

    @property
    def prefill(self) -> PrefillShape:
        return PrefillShape(self.rows, self.frames, self.prompt_len)


@dataclasses.dataclass(frozen=True)
class StateShape:
    """The static shape of a decode state."""

    slots: int
    cache_len: int
    max_new_tokens: int  # token slots per request


@flax.struct.dataclass
class Prefilled:
    """Prefilled requests, one per row (rows past ``count`` are padding and are never inserted).

    caches: the prompts' keys/values as the scanned decoder made them, ``{"k", "v"}: [layers, rows, kv,
    prompt_len, hd]`` (``insert`` copies layer l's block into the state's cache of layer l); kv_start: ``[rows]``
    first valid slot (left padding); positions: ``[rows]`` the next token's position (the prompt length);
    first_token: ``[rows]``; first_logprob: ``[rows]`` its log-probability; budgets: ``[rows]`` tokens each
    request may generate.
    """

    caches: KVCache
    kv_start: jax.Array
    positions: jax.Array
    first_token: jax.Array
    first_logprob: jax.Array
    budgets: jax.Array
    count: int = flax.struct.field(pytree_node=False, default=0)
    adapters: jax.Array | None = None  # [rows] each row's adapter slot

    @property
    def prompt_len(self) -> int:
        """The prompt bucket: cache slots of each row's block."""
        return self.caches["k"].shape[1 + CACHE_SEQ_AXIS]


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A request that continues a cached sequence (``Prefix``): the ids to run after the kept tokens (its audio
    slots take the rows of ``audio [tokens, hidden]`` in order) and how many tokens it may generate."""

    ids: Sequence[int]
    audio: np.ndarray
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Prefix:
    """The cached sequences a prefill continues, one per request: each one's per-layer caches ``{"k", "v"}: [1,
    kv, cache_len, hd]`` (None: nothing cached yet), how many of its cached tokens are kept, and the cache slot of
    its first token. The caches are donated: the decode state holds them afterwards (``Engine.row_caches``)."""

    caches: Sequence[list[KVCache] | None]
    keeps: Sequence[int]
    offsets: Sequence[int]


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


def min_slots(backend: str) -> int:
    """The fewest slots a decode state gets on ``backend``. On XLA:CPU a one-row step fuses each layer's in-place
    cache write into two consumers and copies whole cache layers to feed both, so a state there has at least two
    slots (the spare one stays free)."""
    return 2 if backend == "cpu" else 1


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


def choose_first(options: DecodeOptions, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's first generated token ``[rows]`` from the prompt's last logits ``[rows, vocab]`` (nothing
    generated before it), and its log-probability."""
    rows = logits.shape[0]
    first = next_token(logits, jnp.zeros((rows, 1), jnp.int32), jnp.int32(0), None, options)
    return first, token_logprob(logits, first)


def start_rows(
    options: DecodeOptions,
    first: jax.Array,
    first_logprob: jax.Array,
    budgets: jax.Array,
    max_new: int,
    vocab_size: int | None,
) -> dict[str, jax.Array | None]:
    """The decode-state fields of rows that start generating with ``first`` (``choose_first``): their token and
    log-prob slots, count, budget, whether they go on, whether they stopped, the tokens seen (with a ``vocab_size``
    when a repetition penalty tracks them, else None). Every way into a decode state (``insert``, a prefill that
    continues a cached prefix) starts its rows here."""
    ended = is_eos(first, options)
    tokens = jnp.full((first.shape[0], max_new), options.pad_token_id, jnp.int32).at[:, 0].set(first)
    return dict(
        tokens=tokens,
        logprobs=jnp.zeros(tokens.shape, jnp.float32).at[:, 0].set(first_logprob),
        counts=jnp.ones_like(first),
        budgets=budgets,
        live=~ended & (budgets > 1),
        stopped=ended,
        seen=None if vocab_size is None else jax.nn.one_hot(first, vocab_size, dtype=bool),
    )


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
    first, first_logprob = choose_first(options, logits)
    return Prefilled(cache, kv_start, lengths, first, first_logprob, budgets, adapters=adapter_rows)


def init_state_program(
    config: ThinkerConfig, dtype: Any, options: DecodeOptions, shape: StateShape, start: jax.Array
) -> DecodeState:
    cfg = config.text
    caches = init_cache(cfg, shape.slots, shape.cache_len, dtype)
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
    prompt_len = prefilled.prompt_len
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
    rows = start_rows(
        options, first, prefilled.first_logprob, prefilled.budgets, state.tokens.shape[1],
        None if state.seen is None else state.seen.shape[1],
    )  # fmt: skip

    def put(array: jax.Array, values: jax.Array) -> jax.Array:
        return array.at[slots].set(values.astype(array.dtype), mode="drop")

    return DecodeState(
        caches=caches,
        index=state.index,
        kv_start=put(state.kv_start, start + prefilled.kv_start),
        positions=put(state.positions, prefilled.positions),
        last_token=put(state.last_token, first),
        **{name: put(getattr(state, name), value) for name, value in rows.items() if name != "seen"},
        seen=None if state.seen is None else put(state.seen, rows["seen"]),
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
    step_model, step_params = unrolled(model, params)  # one copy of the layers per call, not per step
    slots, max_new = state.tokens.shape
    cache_len = cache_length(state.caches[0])
    rows = jnp.arange(slots)

    def keep_going(carry: tuple[jax.Array, DecodeState]) -> jax.Array:
        step, s = carry
        return (step < steps) & jnp.any(s.live) & (s.index < cache_len)

    def one_step(carry: tuple[jax.Array, DecodeState]) -> tuple[jax.Array, DecodeState]:
        step, s = carry
        logits, caches = extend_cache(
            step_model, step_params, s.last_token[:, None], s.positions[:, None], s.kv_start, s.caches, s.index
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


def roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Each row's cache slots moved right by its own ``shift`` (cyclically): ``x [rows, kv, cache_len, hd]``,
    ``shift [rows]``. One contiguous slice per row of the cache laid out twice (a per-element gather is much
    slower on the CPU)."""
    length = x.shape[CACHE_SEQ_AXIS]
    doubled = jnp.concatenate([x, x], axis=CACHE_SEQ_AXIS)
    rows = [
        jax.lax.dynamic_slice_in_dim(
            doubled[b : b + 1], jnp.mod(-shift[b], length), length, axis=CACHE_SEQ_AXIS
        )
        for b in range(x.shape[0])
    ]
    return jnp.concatenate(rows, axis=0)


def pad_rows(x: jax.Array, rows: int, value: Any = 0) -> jax.Array:
    """``x`` with rows of ``value`` appended up to ``rows`` (axis 0)."""
    if x.shape[0] >= rows:
        return x
    return jnp.concatenate([x, jnp.full((rows - x.shape[0], *x.shape[1:]), value, x.dtype)], axis=0)


def stack_rows(rows: int, sequences: list[list[KVCache]]) -> list[KVCache]:
    """The caches of ``len(sequences)`` sequences (per layer ``[1, kv, cache_len, hd]``) as the first rows of one
    cache of ``rows`` rows (the rest zeros)."""
    return [
        {name: pad_rows(jnp.concatenate([seq[layer][name] for seq in sequences], axis=0), rows)
         for name in ("k", "v")}
        for layer in range(len(sequences[0]))
    ]  # fmt: skip


def split_rows(n: int, caches: list[KVCache]) -> list[list[KVCache]]:
    """The first ``n`` rows of a decode state's caches, each as a sequence's own cache (per layer
    ``[1, kv, cache_len, hd]``, its tokens where the state has them)."""
    return [[{name: layer[name][b : b + 1] for name in ("k", "v")} for layer in caches] for b in range(n)]


def prefill_after_program(
    model: Qwen3ASR,
    options: DecodeOptions,
    max_new: int,
    slots: int,
    params: Any,
    caches: list[KVCache],
    keeps: jax.Array,
    offsets: jax.Array,
    ids: jax.Array,
    lengths: jax.Array,
    audio: jax.Array,
    budgets: jax.Array,
) -> DecodeState:
    """Every row's run ``ids[b, :lengths[b]]`` (its audio slots taking ``audio[b]`` in order) prefilled after the
    ``keeps[b]`` tokens its cache holds from slot ``offsets[b]``, and a decode state of ``slots`` slots (the rows,
    then empty ones) that continues them all.

    caches: per layer ``[rows, kv, cache_len, hd]``. The rows of a decode state share one write index, while they
    keep different numbers of tokens and run different lengths. So row b's kept tokens are moved to end at slot
    K = max(keeps), the runs are written at K (right-padded), then row b is moved right by its padding: every
    row's sequence ends at the state's index K + run_len (keys carry their positions, so a move changes no key or
    value; what falls off a row's end is past its sequence). A lone row moves nothing: its run is written after
    its kept tokens where they are, and the index is its own end.
    """
    rows, run_len = ids.shape
    positions = keeps[:, None] + jnp.arange(run_len, dtype=jnp.int32)[None, :]
    if rows == 1:
        write, kv_start = offsets[0] + keeps[0], offsets
    else:
        top = jnp.max(keeps)
        caches = [
            {name: roll_rows(layer[name], top - keeps - offsets) for name in ("k", "v")} for layer in caches
        ]
        write, kv_start = top, top - keeps
    logits, caches = extend_cache(
        *unrolled(model, params), ids, positions, kv_start, caches, write, lengths - 1, audio
    )
    if rows == 1:
        index = write + lengths[0]
    else:
        caches = [{name: roll_rows(layer[name], run_len - lengths) for name in ("k", "v")} for layer in caches]
        index = write + run_len
        kv_start = index - lengths - keeps
    caches = [{name: pad_rows(layer[name], slots) for name in ("k", "v")} for layer in caches]
    first, first_logprob = choose_first(options, logits)
    started = start_rows(
        options, pad_rows(first, slots, options.pad_token_id), pad_rows(first_logprob, slots),
        pad_rows(budgets, slots),  # empty slots: no budget, never live
        max_new, model.config.text.vocab_size if options.tracks_seen else None,
    )  # fmt: skip
    return DecodeState(
        caches=caches,
        index=index,
        kv_start=jnp.where(jnp.arange(slots) < rows, pad_rows(kv_start, slots), index),  # empty slots: nothing
        positions=pad_rows(keeps + lengths, slots),
        last_token=started["tokens"][:, 0],
        **started,
    )


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
        self.batch_shapes: dict[BatchShape, None] = {}  # the one-shot buckets run so far, in order
        backend = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        self.min_slots = min_slots(backend)  # chosen once, for the devices the programs run on
        self.window_tokens = config.audio.output_length(config.audio.window_frames)

    # -- shapes --

    def prefill_shape(self, requests: Sequence[DecodeRequest], max_rows: int) -> PrefillShape:
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
        """A state's placement: KV caches (the ``"k"``/``"v"`` leaves) split like the keys the model writes into
        them (rows over the batch axes, kv heads over ``tensor``: ``CACHE_AXES``), other arrays by their rows,
        scalars replicated."""

        def place(path: Any, x: Any) -> Any:
            if x.ndim == 0:
                return sharding.replicated(self.mesh)
            if path and getattr(path[-1], "key", None) in ("k", "v"):
                logical = (None,) * (x.ndim - len(CACHE_AXES)) + CACHE_AXES  # a stacked cache: layers first
                spec = sharding.logical_to_spec(logical, x.shape, self.mesh, self.sharding_rules)
                return jax.sharding.NamedSharding(self.mesh, spec)
            return sharding.batch_sharding(self.mesh, x.shape, self.sharding_rules)

        return jax.tree_util.tree_map_with_path(place, abstract_state)

    def abstract(self, tree: Any, is_state: bool = False) -> Any:
        """ShapeDtypeStructs of ``tree``; on a mesh with the state's shardings (``is_state``: split by rows as
        ``compile_program`` places a state) or replicated."""
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        if self.mesh is None:
            return shapes
        if is_state:
            placement = self._state_shardings(shapes)
        else:
            placement = jax.tree_util.tree_map(lambda _: sharding.replicated(self.mesh), shapes)
        return jax.tree_util.tree_map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, placement
        )

    def place_state(self, tree: Any) -> Any:
        """Device arrays of ``tree`` (caches made outside a program) placed as a state is (``_state_shardings``)
        on a mesh, on the default device otherwise."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, self._state_shardings(tree))

    # -- the four verbs --

    def init_state(self, slots: int, cache_len: int, max_new_tokens: int, start: int = 0) -> DecodeState:
        """An empty state: ``slots`` free slots (at least ``min_slots``) over a cache of ``cache_len``; the
        first insert puts prompts so that they end at cache slot ``start`` (at least the longest prompt bucket to
        be inserted)."""
        shape = StateShape(max(slots, self.min_slots), cache_len, max_new_tokens)
        fn = functools.partial(init_state_program, self.config, self.dtype, self.options, shape)
        program = self.compile_program(
            ("init", shape, self.options), fn, jax.ShapeDtypeStruct((), jnp.int32), state_out=True
        )
        return program(jnp.int32(start))

    def prefill(
        self,
        params: Any,
        requests: Sequence[DecodeRequest] | Sequence[Continuation],
        shape: PrefillShape | None = None,
        adapters: lora.AdapterStack | None = None,
        prefix: Prefix | None = None,
    ) -> Prefilled | DecodeState:
        """Encoder and prompts of ``requests`` (one program per ``PrefillShape``; default: their own bucket), each
        with the adapter of its ``adapter`` slot in ``adapters``: KV blocks and first tokens to ``insert``.

        With a ``prefix``, the requests are ``Continuation``s of cached sequences (a stream's earlier prompt): each
        one's run is prefilled after its kept tokens, in its own cache, and the result is the decode state of those
        rows, ready to ``generate`` (``row_caches`` gives each row's cache back). One program per bucket of rows,
        run length, audio tokens, token slots and cache length."""
        if prefix is not None:
            return self._prefill_after(params, requests, prefix)
        shape = shape or self.prefill_shape(requests, max(len(requests), 1))
        arrays = list(pack_prefill(requests, shape, self.options.pad_token_id))
        mesh, rules = self.mesh, self.sharding_rules
        int_vec = sharding.batch_struct((shape.rows,), jnp.int32, mesh, rules)
        prompt = sharding.batch_struct((shape.rows, shape.prompt_len), jnp.int32, mesh, rules)
        waves = sharding.batch_struct((shape.rows, shape.samples), jnp.float32, mesh, rules)
        structs, key, weights = [waves, int_vec, prompt, prompt, int_vec], ("prefill", shape, self.options), []
        if adapters is not None:  # each row's adapter slot, and the stack
            slots = len(adapters.names) + 1
            for i, r in enumerate(requests):
                if not 0 <= r.adapter < slots:
                    raise ValueError(f"request {i}: adapter slot {r.adapter} is not in [0, {slots})")
            arrays.append(np.asarray([r.adapter for r in requests] + [0] * (shape.rows - len(requests)), np.int32))
            structs += [int_vec, sharding.abstract_arrays(adapters.weights)]
            key, weights = (*key, adapters.signature), [adapters.weights]
        elif any(r.adapter for r in requests):
            raise ValueError("a request names an adapter slot, but no adapters were passed")
        fn = functools.partial(prefill_program, self.model, self.options, shape.frames)
        program = self.compile_program(key, fn, sharding.abstract_arrays(params), *structs)
        placed = sharding.place_batch(arrays, mesh, rules)
        return program(params, *placed, *weights).replace(count=len(requests))

    def _prefill_after(self, params: Any, requests: Sequence[Continuation], prefix: Prefix) -> DecodeState:
        n = len(requests)
        if n == 0 or not len(prefix.caches) == len(prefix.keeps) == len(prefix.offsets) == n:
            raise ValueError(f"{n} continuations need a prefix of as many cached sequences")
        if any(r.max_new_tokens < 1 for r in requests) or any(not r.ids for r in requests):
            raise ValueError("every continuation needs ids to run and max_new_tokens >= 1")
        cfg, mesh, rules = self.config.text, self.mesh, self.sharding_rules
        rows = buckets.bucket_size(n, 1, 2)
        run_len = buckets.PROMPT_LADDER.size(max(len(r.ids) for r in requests))
        windows = max(1, max(-(-len(r.audio) // self.window_tokens) for r in requests))
        audio_len = buckets.WINDOW_LADDER.size(windows) * self.window_tokens
        max_new = buckets.STEP_LADDER.size(max(r.max_new_tokens for r in requests))
        top = max(prefix.keeps)
        if n == 1:  # a lone row continues where its tokens are (see prefill_after_program)
            slots = 1
            need = prefix.offsets[0] + top + max(run_len, len(requests[0].ids) + max_new)
        else:
            slots = max(rows, self.min_slots)
            need = top + run_len + max_new
        held = [cache_length(kv[0]) for kv in prefix.caches if kv is not None]
        cache_len = max([buckets.bucket_size(need, MIN_CACHE_LEN, 2), *held])

        ids = np.full((rows, run_len), self.options.pad_token_id, np.int32)
        lengths, budgets = np.ones((rows,), np.int32), np.ones((rows,), np.int32)
        keeps, offsets = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
        keeps[:n], offsets[:n] = prefix.keeps, prefix.offsets
        audio_rows = np.zeros((rows, audio_len, cfg.hidden_size), np.float32)
        for b, r in enumerate(requests):
            ids[b, : len(r.ids)] = r.ids
            lengths[b], budgets[b] = len(r.ids), r.max_new_tokens
            audio_rows[b, : len(r.audio)] = r.audio
        caches = [self.grow_cache(kv, cache_len) for kv in prefix.caches]
        if n == 1:
            (stacked,) = caches
        else:
            stacked = self.compile_program(("stack-rows", n, rows, cache_len), functools.partial(stack_rows, rows),
                                           self.abstract([self._layers(1, cache_len)] * n, True), state_out=True)(
                caches
            )  # fmt: skip
        del caches
        vector = sharding.batch_struct((rows,), jnp.int32, mesh, rules)
        program = self.compile_program(
            ("prefill-after", rows, slots, cache_len, run_len, audio_len, max_new, self.options),
            functools.partial(prefill_after_program, self.model, self.options, max_new, slots),
            sharding.abstract_arrays(params), self.abstract(self._layers(rows, cache_len), True), vector, vector,
            sharding.batch_struct((rows, run_len), jnp.int32, mesh, rules), vector,
            sharding.batch_struct((rows, audio_len, cfg.hidden_size), jnp.float32, mesh, rules), vector,
            donate=(1,), state_out=True,
        )  # fmt: skip
        placed = sharding.place_batch([keeps, offsets, ids, lengths, audio_rows, budgets], mesh, rules)
        return program(params, stacked, *placed)

    def row_caches(self, state: DecodeState, n: int) -> list[tuple[list[KVCache], int]]:
        """The first ``n`` rows of ``state`` as cached sequences to continue (a ``Prefix``): each row's per-layer
        caches ``[1, kv, cache_len, hd]`` and the slot of its first token. ``state``'s caches are then theirs."""
        starts = jax.device_get(state.kv_start)
        slots, cache_len = state.tokens.shape[0], cache_length(state.caches[0])
        if slots == 1:
            split = [state.caches]
        else:
            split = self.compile_program(("split-rows", n, slots, cache_len), functools.partial(split_rows, n),
                                         self.abstract(self._layers(slots, cache_len), True), state_out=True)(
                state.caches
            )  # fmt: skip
        return [(kv, int(starts[b])) for b, kv in enumerate(split)]

    def grow_cache(self, kv: list[KVCache] | None, cache_len: int) -> list[KVCache]:
        """One sequence's per-layer caches with ``cache_len`` slots (zeros for None; the same arrays when already
        that long), its tokens where they were."""
        if kv is None:
            return self.place_state(init_cache(self.config.text, 1, cache_len, self.dtype))
        if cache_length(kv[0]) == cache_len:
            return kv
        pad = [(0, 0)] * kv[0]["k"].ndim
        pad[CACHE_SEQ_AXIS] = (0, cache_len - cache_length(kv[0]))
        return self.place_state([{name: jnp.pad(layer[name], pad) for name in ("k", "v")} for layer in kv])

    def encode_windows(
        self, params: Any, features: np.ndarray, lengths: np.ndarray, clip_frames: np.ndarray
    ) -> np.ndarray:
        """Audio embeddings ``[rows, window_tokens, hidden]`` of encoder windows: ``features [rows, n_mels,
        window_frames]`` (row i valid for ``lengths[i]`` frames), each row one window of a clip of
        ``clip_frames[i]`` frames."""
        rows, n_mels, wf = features.shape
        model, mesh, rules = self.model, self.mesh, self.sharding_rules

        def encode(params: Any, features: jax.Array, lengths: jax.Array, clip_frames: jax.Array) -> jax.Array:
            mask = (jnp.arange(wf)[None, :] < lengths[:, None]).astype(jnp.int32)
            embeds, _ = model.apply(
                {"params": params}, features, mask, None, clip_frames, method=Qwen3ASR.encode_audio
            )
            return embeds

        vector = sharding.batch_struct((rows,), jnp.int32, mesh, rules)
        program = self.compile_program(
            ("encode-windows", rows, n_mels, wf), encode, sharding.abstract_arrays(params),
            sharding.batch_struct((rows, n_mels, wf), jnp.float32, mesh, rules), vector, vector,
        )  # fmt: skip
        placed = sharding.place_batch([features, lengths, clip_frames], mesh, rules)
        return np.asarray(program(params, *placed))

    def _layers(self, rows: int, cache_len: int) -> list[KVCache]:
        layer = jax.ShapeDtypeStruct(layer_cache_shape(self.config.text, rows, cache_len), self.dtype)
        return [{"k": layer, "v": layer} for _ in range(self.config.text.num_hidden_layers)]

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
        key = ("insert", state.shape, rows, prefilled.prompt_len, self.options,
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

    def collect(self, state: DecodeState, slots: Sequence[int]) -> list[DecodeResult]:
        """The tokens of ``slots`` (finished or not) as ``DecodeResult``s, with their log-probabilities (one
        transfer for all of it)."""
        tokens, logprobs, counts, stopped = jax.device_get(
            (state.tokens, state.logprobs, state.counts, state.stopped)
        )
        return [result_of(tokens, logprobs, counts, stopped, s) for s in slots]

    # -- one policy --

    def batch_shape(self, requests: Sequence[DecodeRequest], max_rows: int) -> BatchShape:
        """The bucket that runs ``requests`` together in one batch of at most ``max_rows`` rows: the prefill's
        rows, frames and prompt length, and the token slots (the step bucket of the largest budget)."""
        prefill = self.prefill_shape(requests, max_rows)
        steps = buckets.STEP_LADDER.size(max(r.max_new_tokens for r in requests))
        return BatchShape(prefill.rows, prefill.frames, prefill.prompt_len, steps)

    def run(
        self,
        params: Any,
        requests: Sequence[DecodeRequest],
        shape: BatchShape | None = None,
        adapters: lora.AdapterStack | None = None,
    ) -> list[DecodeResult]:
        """Every request to completion in one batch (the one-shot policy): prefill, insert all, then one loop on
        the device until every row has emitted an end token or used its budget. ``shape``: the batch's bucket
        (default: ``batch_shape`` of the requests alone); ``adapters``: the stack the requests' adapter slots
        refer to. Rows are independent: a row's tokens do not depend on what else is in the batch."""
        if not requests:
            return []
        for i, r in enumerate(requests):
            if r.max_new_tokens < 1:
                raise ValueError(f"request {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
        shape = shape or self.batch_shape(requests, len(requests))
        if max(r.max_new_tokens for r in requests) > shape.steps:
            raise ValueError(f"a request's max_new_tokens exceeds the {shape.steps} token slots")
        self.batch_shapes.setdefault(shape, None)
        state = self.init_state(shape.rows, shape.prompt_len + shape.steps, shape.steps, start=shape.prompt_len)
        prefilled = self.prefill(params, requests, shape.prefill, adapters)
        state = self.insert(state, prefilled, list(range(len(requests))))
        state = self.generate(params, state, shape.steps, adapters)
        return self.collect(state, range(len(requests)))


def result_of(
    tokens: np.ndarray, logprobs: np.ndarray, counts: np.ndarray, stopped: np.ndarray, slot: int
) -> DecodeResult:
    """Slot ``slot``'s ``DecodeResult`` from host copies of a state's ``tokens``, ``logprobs``, ``counts`` and
    ``stopped``."""
    n = int(counts[slot])
    return DecodeResult(tokens[slot, :n].tolist(), bool(stopped[slot]), logprobs[slot, :n].tolist())


def pack_prefill(
    requests: Sequence[DecodeRequest], shape: PrefillShape, pad_token_id: int
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
    "BatchShape",
    "Continuation",
    "DecodeOptions",
    "DecodeRequest",
    "DecodeResult",
    "DecodeState",
    "Engine",
    "PrefillShape",
    "Prefilled",
    "Prefix",
    "StateShape",
    "is_eos",
    "next_token",
    "pack_prefill",
    "result_of",
    "token_logprob",
]
