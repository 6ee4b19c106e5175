"""Decoder pieces: MRoPE against the official rotary embedding and plain RoPE; cached decoding = full forward."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax.config import config_from_dict
from qasr_jax.errors import ConfigError
from qasr_jax.model import Qwen3ASR, first_valid, init_cache, positions_from_mask, unrolled
from qasr_jax.model.decoder import Decoder
from qasr_jax.model.rope import apply_rope, rope_cos_sin
from tests.support import official


def plain_rope_numpy(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Textbook RoPE (half-split pairs), float64: x [B, S, H, D], positions [B, S]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = positions[..., None].astype(np.float64) * inv  # [B, S, D/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("section,head_dim", [((24, 20, 20), 128), ((4, 2, 2), 16)])
def test_mrope_with_equal_positions_is_plain_rope(section, head_dim, interleaved):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, head_dim)).astype(np.float32)
    pos = rng.integers(0, 3000, (2, 7))
    cos, sin = rope_cos_sin(jnp.asarray(np.broadcast_to(pos, (3, 2, 7))), head_dim, 1e6, section, interleaved)
    ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_allclose(ours, plain_rope_numpy(x, pos, 1e6), atol=2e-3, rtol=0)


def test_mrope_with_distinct_positions_matches_official_rotary_embedding():
    import torch
    from qwen_asr.core.transformers_backend.configuration_qwen3_asr import Qwen3ASRTextConfig
    from qwen_asr.core.transformers_backend.modeling_qwen3_asr import Qwen3ASRThinkerTextRotaryEmbedding

    cfg = Qwen3ASRTextConfig(
        head_dim=128,
        hidden_size=256,
        num_attention_heads=2,
        rope_theta=1e6,
        rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "interleaved": True},
    )
    rotary = Qwen3ASRThinkerTextRotaryEmbedding(cfg)
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 500, (3, 2, 9))
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos))
    cos, sin = rope_cos_sin(jnp.asarray(pos), 128, 1e6, (24, 20, 20), True)
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=1e-4)
    # The components really are used: distinct positions differ from the temporal-only rotation.
    cos_t, _ = rope_cos_sin(jnp.asarray(np.broadcast_to(pos[0], pos.shape)), 128, 1e6, (24, 20, 20), True)
    assert np.abs(np.asarray(cos_t) - ref_cos.numpy()).max() > 0.1


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from qasr_jax import load_pretrained

    path = official.build_checkpoint(tmp_path_factory.mktemp("dec"), official.small_asr_config(), seed=5,
                                     tokenizer=False)  # fmt: skip
    return load_pretrained(path)


def _prompt_batch(seed=0):
    ids, mask = official.make_audio_prompt_ids([0, 0, 0], seed=seed, text_before=(2, 9), text_after=(1, 6))
    return ids, mask


def _cached_logits(model, params, ids, mask, extra, step_position_shift=0):
    """Prefill the prompts, then feed ``extra`` [B, n] one token at a time; logits of every fed position."""
    batch, prompt = ids.shape
    cache = init_cache(model.config.text, batch, prompt + extra.shape[1])
    kv_start = first_valid(jnp.asarray(mask))
    x = model.apply({"params": params}, jnp.asarray(ids), method=Qwen3ASR.embed_inputs)
    out, cache = model.apply({"params": params}, x, positions_from_mask(jnp.asarray(mask)), kv_start, cache, 0,
                             method=Qwen3ASR.decode)  # fmt: skip
    steps = [np.asarray(out)]
    lengths = mask.sum(-1)
    for t in range(extra.shape[1]):
        x = model.apply({"params": params}, jnp.asarray(extra[:, t : t + 1]), method=Qwen3ASR.embed_inputs)
        pos = jnp.asarray(lengths + t + step_position_shift)[:, None]
        out, cache = model.apply(
            {"params": params}, x, pos, kv_start, cache, prompt + t, method=Qwen3ASR.decode
        )
        steps.append(np.asarray(out))
    return np.concatenate(steps, axis=1)


def test_cached_decoding_equals_full_forward(small_model):
    config, params = small_model
    model = Qwen3ASR(config, attention_impl="xla")
    ids, mask = _prompt_batch()
    extra = np.random.default_rng(0).integers(0, 3000, (ids.shape[0], 4))
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    full = np.asarray(model.apply({"params": params}, full_ids, full_mask))
    cached = _cached_logits(model, params, ids, mask, extra)
    valid = full_mask.astype(bool)
    scale = full[valid].std()
    assert np.abs(cached[valid] - full[valid]).max() <= 1e-4 * scale
    # A decoding step whose position is one ahead of its cache slot is caught by the same comparison.
    broken = _cached_logits(model, params, ids, mask, extra, step_position_shift=1)
    assert np.abs(broken[:, ids.shape[1] :] - full[:, ids.shape[1] :]).max() > 1e-2 * scale


def test_unrolled_layers_compute_what_the_scan_computes(small_model):
    config, params = small_model
    model = Qwen3ASR(config, attention_impl="xla")
    step_model, step_params = unrolled(model, params)
    # The unrolled layout is the one an unrolled decoder builds: a module per layer, each with one layer's shapes.
    x, positions, start = jnp.zeros((1, 3, config.text.hidden_size)), jnp.zeros((1, 3), jnp.int32), jnp.zeros(1, int)
    built = jax.eval_shape(Decoder(config.text, scan_layers=False).init, jax.random.key(0), x, positions, start)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert shapes(nn.unbox(built["params"])) == shapes(step_params["decoder"])
    assert len([k for k in step_params["decoder"] if k.startswith("layers_")]) == config.text.num_hidden_layers

    # Prefill and decoding steps on the unrolled decoder give the scanned model's full forward.
    ids, mask = _prompt_batch(seed=2)
    extra = np.random.default_rng(2).integers(0, 3000, (ids.shape[0], 3))
    full_ids, full_mask = np.concatenate([ids, extra], axis=1), np.concatenate([mask, np.ones_like(extra)], axis=1)
    full = np.asarray(model.apply({"params": params}, full_ids, full_mask))
    valid = full_mask.astype(bool)
    scale = full[valid].std()
    cached = _cached_logits(step_model, step_params, ids, mask, extra)
    assert np.abs(cached[valid] - full[valid]).max() <= 1e-4 * scale
    # The layers run in their order: the first two swapped give other logits.
    swapped = dict(step_params["decoder"], layers_0=step_params["decoder"]["layers_1"],
                   layers_1=step_params["decoder"]["layers_0"])  # fmt: skip
    broken = _cached_logits(step_model, {**step_params, "decoder": swapped}, ids, mask, extra)
    assert np.abs(broken[valid] - full[valid]).max() > 1e-2 * scale


def test_left_padding_does_not_change_a_rows_logits(small_model):
    config, params = small_model
    model = Qwen3ASR(config, attention_impl="xla")
    ids, mask = _prompt_batch(seed=4)
    batched = np.asarray(model.apply({"params": params}, ids, mask))
    for i in range(ids.shape[0]):
        row = mask[i].astype(bool)
        alone = np.asarray(model.apply({"params": params}, ids[i : i + 1, row], mask[i : i + 1, row]))[0]
        np.testing.assert_allclose(batched[i][row], alone, atol=1e-4 * alone.std(), rtol=0)


def test_bf16_compute_stays_close_to_fp32(small_model):
    config, params = small_model
    ids, mask = _prompt_batch()
    ref = np.asarray(Qwen3ASR(config, attention_impl="xla").apply({"params": params}, ids, mask))
    params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    out = Qwen3ASR(config, dtype=jnp.bfloat16, attention_impl="xla").apply({"params": params16}, ids, mask)
    assert out.dtype == jnp.float32  # logits are always fp32
    valid = mask.astype(bool)
    rel = np.linalg.norm(np.asarray(out)[valid] - ref[valid]) / np.linalg.norm(ref[valid])
    assert rel < 0.1


# Field by field, what the decoder and encoder cannot compute (test_loading.py covers missing and mistyped fields).
@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"text": {"head_dim": 15, "rope_scaling": {"mrope_section": [4, 2, 1]}}},
         r"head_dim must be even for rotary embeddings, got 15"),
        ({"text": {"num_key_value_heads": 3}},
         r"num_key_value_heads \(3\) does not divide num_attention_heads \(4\)"),
        ({"text": {"rope_scaling": {"mrope_section": [4, 4]}}},
         r"mrope_section \[4, 4\] must have 3 parts summing to head_dim/2 = 8"),
        ({"text": {"rope_scaling": {"rope_type": "yarn"}}}, r"rope_scaling type 'yarn' is not supported"),
        ({"text": {"hidden_act": "gelu"}}, r"hidden_act 'gelu' is not supported \(only 'silu'\)"),
        ({"text": {"attention_bias": True}}, r"attention_bias=true is not supported"),
        ({"audio": {"activation_function": "relu"}}, r"activation_function 'relu' is not supported"),
        ({"audio": {"scale_embedding": True}}, r"scale_embedding=true is not supported"),
    ],
    ids=["odd-head-dim", "kv-heads", "mrope-parts", "rope-type", "hidden-act", "attention-bias",
         "audio-activation", "audio-scale-embedding"],
)  # fmt: skip
def test_config_rejects_what_the_model_cannot_compute(overrides, message):
    cfg = config_from_dict(official.small_asr_config())  # the unchanged config is computable
    assert cfg.text.kv_groups == 2 and cfg.audio.window_chunks == 8 and cfg.audio.tokens_per_chunk == 13
    with pytest.raises(ConfigError, match=message):
        config_from_dict(official.small_asr_config(**overrides))
