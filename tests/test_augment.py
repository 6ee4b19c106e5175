"""Training-time feature augmentation (qasr_jax.training.augment): what each perturbation does, checked on inputs
whose perturbed values can be computed by hand, and its wiring into the config and the train step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax.training.augment import SpecAugment
from qasr_jax.training.config import ConfigError, config_from_dict

MELS, WIDTH = 128, 60
FRAMES = np.array([60, 37, 9])


def _batch(values: np.ndarray) -> jnp.ndarray:
    valid = np.arange(WIDTH)[None, None, :] < FRAMES[:, None, None]
    return jnp.asarray(np.where(valid, values, 0.0), jnp.float32)


def _tone(hz: float, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_frequency_scale_moves_a_tone_as_a_tone_of_that_frequency() -> None:
    """A 1 kHz tone stretched by 1.5 (or 0.6) has the mel peak of a 1.5 kHz (0.6 kHz) tone; scale 1 changes
    nothing."""
    from qasr_jax import audio as audio_io

    wave = jnp.asarray(np.stack([_tone(1000.0)] * 3))
    lengths = jnp.full((3,), wave.shape[1])
    plain, _ = audio_io.log_mel(wave, lengths)
    scaled, _ = audio_io.log_mel(wave, lengths, frequency_scale=jnp.asarray([1.0, 1.5, 0.6]))
    np.testing.assert_allclose(np.asarray(scaled[0]), np.asarray(plain[0]), atol=1e-6)
    for row, hz in ((1, 1500.0), (2, 600.0)):
        reference, _ = audio_io.log_mel(jnp.asarray(_tone(hz))[None], lengths[:1])
        peak = np.argmax(np.asarray(scaled[row]).mean(axis=-1))
        assert abs(peak - np.argmax(np.asarray(reference[0]).mean(axis=-1))) <= 1
        assert abs(peak - np.argmax(np.asarray(plain[0]).mean(axis=-1))) >= 5


def test_scales_are_drawn_per_row_within_the_bounds() -> None:
    scales = np.asarray(SpecAugment(frequency_scale=0.3).scales(jax.random.key(0), 4000))
    assert scales.min() >= 1 / 1.3 - 1e-6 and scales.max() <= 1.3 + 1e-6
    logs = np.log(scales)
    assert abs(logs.mean()) < 0.02 and logs.std() > 0.12  # log-uniform: centred on 1, spread over the range
    assert SpecAugment(time_masks=1, time_width=3).scales(jax.random.key(0), 4) is None


def test_time_masks_set_spans_to_the_row_mean_and_leave_the_rest() -> None:
    values = np.random.default_rng(0).normal(size=(3, MELS, WIDTH)).astype(np.float32)
    x = _batch(values)
    out = np.asarray(SpecAugment(time_masks=2, time_width=6)(x, jnp.asarray(FRAMES), jax.random.key(1)))
    x = np.asarray(x)
    for row, frames in enumerate(FRAMES):
        mean = x[row, :, :frames].mean()
        changed = np.any(out[row] != x[row], axis=0)  # per frame
        assert not changed[frames:].any()
        assert changed.sum() <= 12
        for t in np.flatnonzero(changed):
            np.testing.assert_allclose(out[row, :, t], mean, rtol=1e-5)
        kept = ~changed
        np.testing.assert_array_equal(out[row][:, kept], x[row][:, kept])


def test_frequency_masks_cover_whole_bands_of_valid_frames() -> None:
    values = np.random.default_rng(1).normal(size=(3, MELS, WIDTH)).astype(np.float32)
    x = _batch(values)
    out = np.asarray(SpecAugment(freq_masks=1, freq_width=20)(x, jnp.asarray(FRAMES), jax.random.key(5)))
    x = np.asarray(x)
    for row, frames in enumerate(FRAMES):
        changed_bins = np.flatnonzero(np.any(out[row, :, :frames] != x[row, :, :frames], axis=1))
        if changed_bins.size:
            assert changed_bins.size <= 20
            assert np.all(np.diff(changed_bins) == 1), "one band is contiguous"
            np.testing.assert_allclose(out[row, changed_bins, :frames], x[row, :, :frames].mean(), rtol=1e-5)
        assert np.all(out[row, :, frames:] == 0)


def test_draws_depend_on_the_key_only() -> None:
    x = _batch(np.random.default_rng(2).normal(size=(3, MELS, WIDTH)).astype(np.float32))
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=5)
    a = aug(x, jnp.asarray(FRAMES), jax.random.key(7))
    b = aug(x, jnp.asarray(FRAMES), jax.random.key(7))
    c = aug(x, jnp.asarray(FRAMES), jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.any(np.asarray(a) != np.asarray(c))
    assert not SpecAugment().active


def test_config_section_is_validated() -> None:
    base = {"model": {"checkpoint": "m"}, "data": {"train_manifest": "t.jsonl"}}
    cfg = config_from_dict({**base, "augment": {"frequency_scale": 0.1, "time_masks": 2, "time_width": 20}})
    assert cfg.augment.frequency_scale == 0.1 and cfg.augment.time_width == 20
    with pytest.raises(ConfigError, match=r"augment\.frequency_scale"):
        config_from_dict({**base, "augment": {"frequency_scale": 1.5}})
    with pytest.raises(ConfigError, match=r"unknown fields in \[augment\]"):
        config_from_dict({**base, "augment": {"warp": 0.1}})


def test_train_step_augments_with_the_step_key(tmp_path) -> None:
    """The train step's loss is the objective on features perturbed with key fold_in(key(seed), step), and the
    same step with another seed, or without augmentation, gives another loss."""
    from qasr_jax import sharding
    from qasr_jax import text as text_io
    from qasr_jax.config import load_config
    from qasr_jax.training import data as data_lib
    from qasr_jax.training import losses
    from qasr_jax.training.config import ModelConfig, OptimConfig
    from qasr_jax.training.step import Trainer
    from tests.support import train_fixtures as tf
    from tests.test_train import _random_params, _tiny_model_dir

    model_dir = _tiny_model_dir(tmp_path / "model")
    config = load_config(model_dir)
    tokens = data_lib.Tokenization(text_io.Tokenizer.from_pretrained(model_dir), config)
    report = data_lib.read_manifest(tf.write_manifest(tmp_path / "t.jsonl", tf.speech_rows(tf.SENTENCES[:2])),
                                    tokens, "asr")  # fmt: skip
    shapes = data_lib.Shapes(config, 16, 16)
    (spec,) = data_lib.eval_specs(report.examples, shapes, 2)
    batch = data_lib.BatchLoader(report.examples, tokens)(spec).batch
    params = _random_params(config, seed=1)
    mesh = sharding.make_mesh("data=1", jax.devices()[:1])
    augment = SpecAugment(frequency_scale=0.3, freq_masks=2, freq_width=20, time_masks=2, time_width=30)

    trainer = Trainer(config, ModelConfig(checkpoint=model_dir), OptimConfig(), 1, mesh,
                      objective=losses.Objective(augment=augment), seed=4)  # fmt: skip
    _, metrics = trainer.train_step(trainer.init_state(params), trainer.shard_batch(batch))
    with_aug = float(metrics["loss"])

    total = jnp.sum(jnp.asarray(batch.label_weights, jnp.float32))

    @functools.partial(jax.jit, static_argnums=1)
    def by_hand(key: jax.Array, objective_augment: bool) -> jax.Array:
        objective = losses.Objective(augment=augment if objective_augment else None)
        return losses.loss_sums(trainer.model, params, batch, objective, total, jnp.float32(1), None, key)[0]

    step0 = jax.random.fold_in(jax.random.key(4), 0)
    assert with_aug == pytest.approx(float(by_hand(step0, True)), rel=1e-5)
    assert abs(with_aug - float(by_hand(jax.random.fold_in(jax.random.key(5), 0), True))) > 1e-5
    assert abs(with_aug - float(by_hand(step0, False))) > 1e-4
