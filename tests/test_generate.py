"""The compiled decode loop against plain greedy decoding that recomputes the whole sequence at every step.

The reference feeds prompt + tokens so far through the thinker's full forward (no cache), takes the argmax of
the last position's logits, and applies HF's logits processors for the optional repetition controls. The loop
must give the same tokens, stop each row on its own end token or budget, and pad after a row has stopped.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax import audio as audio_io
from qasr_jax.buckets import batch_bucket, bucket_size
from qasr_jax.engine import DecodeOptions, DecodeRequest, Engine, PrefillShape, pack_prefill
from qasr_jax.model import Qwen3ASR
from qasr_jax.text import Tokenizer, build_prompt_ids
from qasr_jax.weights import load_pretrained
from tests.support import speech
from tests.test_asr import cached_small_checkpoint

STEPS = 14


@pytest.fixture(scope="module")
def loaded():
    path = cached_small_checkpoint()
    config, params = load_pretrained(path)
    return config, params, Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def requests(loaded) -> list[DecodeRequest]:
    """Two rows of different audio and prompt lengths (so one is left-padded) and budgets. Decoded plainly, the
    second repeats a token four times, which the repetition controls must change."""
    config, _, tokenizer = loaded
    short = speech.synth(speech.SHORT_EN)
    long = speech.synth(speech.LONG_EN)[: 3 * audio_io.SAMPLE_RATE]
    rows = []
    for wav, context, language, budget in ((short, "", "English", STEPS), (long, "Topic: foxes.", None, 9)):
        tokens = config.audio.output_length(audio_io.num_frames(len(wav)))
        rows.append(DecodeRequest(wav, build_prompt_ids(tokenizer, tokens, context, language), budget))
    return rows


@pytest.fixture(scope="module")
def full_forward(loaded, requests):
    """logits(sequences) → last-valid-position logits per row, from the uncached full forward."""
    config, params, _ = loaded
    model = Qwen3ASR(config)
    features, feature_mask = audio_io.features([r.samples for r in requests])
    length = max(len(r.prompt_ids) for r in requests) + STEPS
    forward = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, features, feature_mask))

    def last_logits(sequences: list[list[int]]) -> np.ndarray:
        # Right padding: causal attention keeps every valid position blind to the padding after it.
        ids = np.zeros((len(sequences), length), np.int32)
        mask = np.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        logits = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask)))
        return np.stack([logits[row, len(seq) - 1] for row, seq in enumerate(sequences)])

    return last_logits


def reference_greedy(full_forward, requests, options: DecodeOptions) -> list[list[int]]:
    """Greedy tokens per row, recomputing everything each step; HF processors over the generated tokens."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors = []
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size))
    generated: list[list[int]] = [[] for _ in requests]
    done = [False] * len(requests)
    for _ in range(STEPS):
        logits = full_forward([list(r.prompt_ids) + g for r, g in zip(requests, generated)])
        for row, request in enumerate(requests):
            if done[row]:
                continue
            scores = torch.from_numpy(logits[row : row + 1].copy())
            scores[:, list(options.suppress_token_ids)] = -float("inf")
            if generated[row]:
                history = torch.tensor([generated[row]])
                for processor in processors:
                    scores = processor(history, scores)
            token = int(scores.argmax(-1))
            generated[row].append(token)
            done[row] = token in options.eos_token_ids or len(generated[row]) >= request.max_new_tokens
    return generated


def test_bucket_ladders():
    assert [bucket_size(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert [bucket_size(n, 32) for n in (1, 32, 33, 49, 65, 97, 129, 200, 385)] == [
        32, 32, 48, 64, 96, 128, 192, 256, 512,
    ]  # fmt: skip
    assert [bucket_size(n, 32, 4) for n in (33, 41, 57, 65, 81, 200, 407)] == [40, 48, 64, 80, 96, 224, 448]
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert batch_bucket(5, 6) == 6
    with pytest.raises(ValueError):
        batch_bucket(7, 6)


@pytest.fixture(scope="module")
def plain(full_forward, requests) -> list[list[int]]:
    return reference_greedy(full_forward, requests, DecodeOptions(eos_token_ids=()))


def test_cached_loop_matches_full_recomputation_and_stops_each_row(loaded, requests, full_forward, plain):
    config, params, _ = loaded
    assert [len(g) for g in plain] == [STEPS, 9]
    # Make row 0's fifth token an end token: row 0 must stop there, row 1 goes on (or stops at its own).
    eos = plain[0][4]
    options = DecodeOptions(eos_token_ids=(eos,), pad_token_id=7)
    expected = reference_greedy(full_forward, requests, options)
    assert len(expected[0]) == 5 and expected[0][-1] == eos

    engine = Engine(config, options=options)
    out = engine.run(params, requests, engine.batch_shape(requests, 4))
    assert [g.token_ids for g in out] == expected
    assert out[0].stopped and not out[0].truncated
    assert out[1].truncated == (eos not in expected[1])
    (shape,) = engine.batch_shapes
    assert shape.rows == 2 and shape.steps == 16


def test_repetition_controls_match_hf_processors(loaded, requests, full_forward, plain):
    config, params, _ = loaded
    options = DecodeOptions(
        eos_token_ids=(), suppress_token_ids=(151645, 151643), repetition_penalty=1.8, no_repeat_ngram_size=2
    )
    expected = reference_greedy(full_forward, requests, options)
    assert len(set(plain[1])) < len(plain[1])
    assert expected != plain  # the controls change the greedy path of these rows
    out = Engine(config, options=options).run(params, requests)
    assert [g.token_ids for g in out] == expected
    for tokens in expected:
        bigrams = list(itertools.pairwise(tokens))
        assert len(bigrams) == len(set(bigrams))


def test_pack_prefill_left_pads_and_fills_spare_rows(requests):
    shape = PrefillShape(rows=4, frames=800, prompt_len=96)
    waveforms, lengths, ids, mask, budgets = pack_prefill(requests, shape, pad_token_id=5)
    assert waveforms.shape == (4, shape.samples) and ids.shape == mask.shape == (4, 96)
    for row, request in enumerate(requests):
        n = len(request.prompt_ids)
        assert ids[row, 96 - n :].tolist() == list(request.prompt_ids)
        assert (ids[row, : 96 - n] == 5).all() and mask[row].sum() == n and mask[row, 96 - n :].all()
        assert lengths[row] == len(request.samples)
    assert budgets.tolist() == [STEPS, 9, 1, 1]  # spare rows are never inserted
    with pytest.raises(ValueError, match="does not fit"):
        pack_prefill(requests, PrefillShape(rows=2, frames=800, prompt_len=16), pad_token_id=5)
