"""Continuous batching on the engine: requests inserted at different times, into slots just freed, with
different prompt lengths and budgets, across cache compactions, each give exactly the tokens of the same request
decoded alone (greedy decoding that recomputes the whole sequence at every step, ``tests/test_generate.py``)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from qasr_jax import buckets
from qasr_jax.engine import DecodeOptions, Engine
from tests.test_generate import full_forward, loaded, reference_greedy, requests  # noqa: F401 (the fixtures of test_generate)


def test_requests_joining_mid_decode_and_freed_slots_give_their_alone_tokens(loaded, requests, full_forward):  # noqa: F811
    config, params, _ = loaded
    options = DecodeOptions(eos_token_ids=())  # budgets decide where each request ends
    first, second = requests  # prompts of different lengths (one is left-padded in a shared prefill)
    again = dataclasses.replace(second, max_new_tokens=12)
    expected = {
        "first": reference_greedy(full_forward, [first, second], options)[0],
        "second": reference_greedy(full_forward, [first, second], options)[1],
        "again": reference_greedy(full_forward, [first, again], options)[1],
    }
    assert [len(expected[k]) for k in ("first", "second", "again")] == [14, 9, 12]

    engine = Engine(config, options=options)
    prompt = buckets.PROMPT_LADDER.size(max(len(r.prompt_ids) for r in requests))
    cache_len = prompt + 16  # room for one request alone: the others need the cache compacted
    state = engine.init_state(slots=2, cache_len=cache_len, max_new_tokens=16, start=prompt)
    shape = engine.prefill_shape(requests, 2)  # one prefill bucket for every insert
    shifts = []

    def advance(state, steps):
        state = engine.generate(params, state, steps)
        if int(state.index) == cache_len and bool(np.any(jax.device_get(state.live))):
            state, shift = engine.reclaim(state, keep=prompt)
            assert shift > 0
            shifts.append(shift)
        return state

    state = engine.insert(state, engine.prefill(params, [first], shape), [0])
    state = advance(state, 5)
    assert int(state.index) == prompt + 5 and engine.collect(state, [0])[0].token_ids == expected["first"][:6]
    # The second request joins slot 1 while the first is mid-decode.
    state = engine.insert(state, engine.prefill(params, [second], shape), [1])
    while bool(jax.device_get(state.live)[1]):
        state = advance(state, 1)
    results = {"second": engine.collect(state, [1])[0]}
    # Slot 1 is free again: a request with another budget takes it while the first goes on.
    state = engine.insert(state, engine.prefill(params, [again], shape), [1])
    while bool(np.any(jax.device_get(state.live))):
        state = advance(state, 4)
    results["first"], results["again"] = engine.collect(state, [0, 1])

    assert shifts, "the cache was never compacted"
    for name, generation in results.items():
        assert generation.token_ids == expected[name], name
        assert generation.truncated  # no end tokens: every request used its budget
    # The same requests run alone through the one-shot policy give the same tokens.
    assert Engine(config, options=options).run(params, [again])[0].token_ids == expected["again"]


def test_insert_refuses_bad_slots(loaded, requests):  # noqa: F811
    config, params, _ = loaded
    engine = Engine(config, options=DecodeOptions(eos_token_ids=()))
    state = engine.init_state(slots=2, cache_len=128, max_new_tokens=16, start=96)
    prefilled = engine.prefill(params, requests)
    with pytest.raises(ValueError, match="distinct"):
        engine.insert(state, prefilled, [0, 0])
    with pytest.raises(ValueError, match="distinct"):
        engine.insert(state, prefilled, [0, 2])
    with pytest.raises(ValueError, match="2 prefilled requests, 1 slots"):
        engine.insert(state, prefilled, [0])
