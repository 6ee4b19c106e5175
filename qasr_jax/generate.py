"""One-shot batches over the engine: every request of a batch prefilled, inserted and decoded to completion.

``Generator.generate(requests)`` is the policy the transcription API uses when nothing waits to join a batch:
prefill the batch (encoder, audio merge, prompts into KV blocks), insert every request into the slots of a
fresh decode state, then one ``lax.while_loop`` until every slot has emitted an end token or used its budget.
Nothing returns to the host between steps. The programs are the engine's (``qasr_jax.engine``); this module only
picks the bucket of a batch.

Buckets (``qasr_jax.buckets``): the batch to a power of two, the audio to whole encoder windows on a half-octave
ladder, the prompt length on a quarter-octave ladder, the step count on a half-octave ladder from 16 (it sizes the
cache; the loop stops when every row is done). One bucket compiles one set of programs, kept for the
generator's lifetime; ``compile_count`` counts buckets and ``engine.programs`` the programs.

Rows are independent: each row's features, audio embeddings, prompt (left-padded, masked) and stop flag are
its own, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from qasr_jax import buckets, sharding
from qasr_jax.adapters import AdapterStack
from qasr_jax.config import ThinkerConfig
from qasr_jax.engine import (
    DEFAULT_EOS_TOKEN_IDS,
    DecodeOptions,
    Engine,
    Generation,
    GenerationRequest,
    PrefillShape,
)


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The bucket of a one-shot batch: prefill rows, mel frames and prompt length, and the step slots."""

    batch: int
    frames: int
    prompt_len: int
    steps: int

    @property
    def prefill(self) -> PrefillShape:
        return PrefillShape(self.batch, self.frames, self.prompt_len)


class Generator:
    """Compiled greedy generation for one model and its params (the one-shot policy over an ``Engine``).

    ``generate(requests)`` runs one batch (at most ``max_batch`` requests) and returns one ``Generation`` per
    request, in order. ``compile_count`` is the number of buckets compiled so far; ``compile_seconds`` the
    total compile time of their programs.
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
        self.max_batch = max_batch
        self.options = options or DecodeOptions()
        self.mesh = mesh
        self.sharding_rules = sharding_rules
        self.engines: dict[DecodeOptions, Engine] = {}
        self._engine_args = dict(
            dtype=dtype, attention_impl=attention_impl, mesh=mesh, sharding_rules=sharding_rules
        )
        self._buckets: dict[tuple[BatchShape, DecodeOptions], BatchShape] = {}

    def engine(self, options: DecodeOptions | None = None) -> Engine:
        """The engine (and its compiled programs) for ``options`` (default: the generator's)."""
        options = options or self.options
        if options not in self.engines:
            self.engines[options] = Engine(self.config, options=options, **self._engine_args)
        return self.engines[options]

    @property
    def compile_count(self) -> int:
        return len(self._buckets)

    @property
    def compiled_shapes(self) -> list[BatchShape]:
        return list(self._buckets.values())

    @property
    def compile_seconds(self) -> float:
        return sum(engine.programs.seconds for engine in self.engines.values())

    def shape_for(self, requests: Sequence[GenerationRequest]) -> BatchShape:
        """The bucket that runs ``requests`` together."""
        prefill = self.engine().prefill_shape(requests, self.max_batch)
        steps = buckets.STEP_LADDER.size(max(r.max_new_tokens for r in requests))
        return BatchShape(prefill.rows, prefill.frames, prefill.prompt_len, steps)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        options: DecodeOptions | None = None,
        adapters: AdapterStack | None = None,
    ) -> list[Generation]:
        """Greedy generation for one batch of requests (independent rows); ``adapters``: the stack the requests'
        adapter slots refer to (passed on only when a request uses one)."""
        if not requests:
            return []
        for i, r in enumerate(requests):
            if r.max_new_tokens < 1:
                raise ValueError(f"request {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
        options = options or self.options
        shape = self.shape_for(requests)
        engine = self.engine(options)
        self._buckets.setdefault((shape, options), shape)
        if not any(r.adapter for r in requests):
            adapters = None
        return engine.run(self.params, requests, shape.prefill, shape.steps, adapters)


__all__ = [
    "DEFAULT_EOS_TOKEN_IDS",
    "BatchShape",
    "DecodeOptions",
    "Generation",
    "GenerationRequest",
    "Generator",
]
