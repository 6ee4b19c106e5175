"""Our thinker against the official PyTorch model (qwen-asr 0.0.6) on checkpoints whose weights matter.

Every comparison uses real speech (espeak-ng clips of ~0.7 s, ~5 s and ~20 s: a clip shorter than one chunk,
partial last chunks, several attention windows), features from the official processor, and the official
encoder with its attention windows wired in. Bar: max|Δ| ≤ 1e-3 · std(official) in fp32. The second half
shows that the bar can fail: deliberately broken variants of our model exceed it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax import load_pretrained
from qasr_jax.model import Qwen3ASR
from qasr_jax.model import decoder as decoder_module
from qasr_jax.model import encoder as encoder_module
from tests.support import official
from tests.support.speech import speech_clips

TOL = 1e-3

CONFIGS = {
    "gqa2-tied-window800": lambda: official.small_asr_config(),
    "gqa1-untied-window200": lambda: official.small_asr_config(
        text={"num_key_value_heads": 4}, audio={"n_window_infer": 200}, tie_word_embeddings=False
    ),
    "aligner-gqa2-window200": lambda: official.small_aligner_config(audio={"n_window_infer": 200}),
}


def rel_max_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max|Δ| / std(ref)."""
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.std(ref))


class Case:
    """One checkpoint: its dir, the official model, features, and the official reference outputs."""

    def __init__(self, root: str, name: str, config: dict):
        self.dir = official.build_checkpoint(os.path.join(root, name), config, seed=1)
        self.config_dict = config
        self.torch_model = official.load_official(self.dir)
        self.features = official.official_features(speech_clips(), self.dir)
        self.ref_encoded = official.official_encode(self.torch_model, self.features, windowed=True)
        lengths = [e.shape[0] for e in self.ref_encoded]
        self.input_ids, self.attention_mask = official.make_audio_prompt_ids(lengths, seed=3)
        self.ref_logits = official.official_logits(
            self.torch_model, self.input_ids, self.attention_mask, self.features, windowed=True
        )
        self.input_features, self.feature_mask = official.pad_features(self.features)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    return {}


def get_case(cases: dict, name: str, tmp_path_factory) -> Case:
    if name not in cases:
        cases[name] = Case(str(tmp_path_factory.mktemp("ckpt")), name, CONFIGS[name]())
    return cases[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, cases, tmp_path_factory) -> Case:
    return get_case(cases, request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def base_case(cases, tmp_path_factory) -> Case:
    return get_case(cases, "gqa2-tied-window800", tmp_path_factory)


def encode(params, config, features, mask, window_chunks=None, attention_impl="xla", backend=None):
    model = Qwen3ASR(config, attention_impl=attention_impl, backend=backend)
    fn = jax.jit(
        lambda p, f, m: model.apply({"params": p}, f, m, window_chunks, method=Qwen3ASR.encode_audio)
    )
    emb, lengths = fn(params, jnp.asarray(features), jnp.asarray(mask))
    return [np.asarray(emb[i, : int(n)]) for i, n in enumerate(np.asarray(lengths))]


def logits(params, config, c: Case) -> np.ndarray:
    model = Qwen3ASR(config, attention_impl="xla")
    fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    return np.asarray(fn(params, c.input_ids, c.attention_mask, c.input_features, c.feature_mask))


def logits_error(ours: np.ndarray, c: Case) -> float:
    valid = c.attention_mask.astype(bool)
    return max(rel_max_error(ours[i][valid[i]], c.ref_logits[i][valid[i]]) for i in range(len(ours)))


def test_encoder_matches_official_on_ragged_batch(case: Case):
    config, params = load_pretrained(case.dir)
    ours = encode(params, config, case.input_features, case.feature_mask)
    for mine, ref in zip(ours, case.ref_encoded):
        assert mine.shape == ref.shape
        assert rel_max_error(mine, ref) <= TOL


def test_encoder_with_pallas_attention_matches_official(base_case: Case):
    """The Pallas windowed-attention kernel (interpret mode on CPU) in the whole encoder."""
    config, params = load_pretrained(base_case.dir)
    ours = encode(params, config, base_case.input_features, base_case.feature_mask, attention_impl="pallas")
    for mine, ref in zip(ours, base_case.ref_encoded):
        assert rel_max_error(mine, ref) <= TOL


def test_conv_front_end_in_small_groups_matches_official(base_case: Case):
    """conv_chunksize bounds the conv front end's batch (memory); it must not change the numbers."""
    import dataclasses

    config, params = load_pretrained(base_case.dir)
    small = config.replace(audio=dataclasses.replace(config.audio, conv_chunksize=4))
    ours = encode(params, small, base_case.input_features, base_case.feature_mask)
    for mine, ref in zip(ours, base_case.ref_encoded):
        assert rel_max_error(mine, ref) <= TOL


def test_front_end_skipping_padding_chunks_matches_official_and_a_wrong_skip_fails(
    base_case: Case, monkeypatch
):
    """One chunk per front-end group: every chunk past a clip's audio (window padding, the ragged batch's shorter
    clips) is a group of its own and skipped. Skipping one group more (the last chunk holding audio) must fail."""
    import dataclasses

    config, params = load_pretrained(base_case.dir)
    single = config.replace(audio=dataclasses.replace(config.audio, conv_chunksize=1))
    frames = [int(n) for n in base_case.feature_mask.sum(-1)]
    window = config.audio.chunk_frames * config.audio.window_chunks
    assert any(n % window for n in frames)  # some windows are padded, so there are groups to skip
    ours = encode(params, single, base_case.input_features, base_case.feature_mask)
    for mine, ref in zip(ours, base_case.ref_encoded):
        assert rel_max_error(mine, ref) <= TOL

    run_all = encoder_module.groups_to_run
    monkeypatch.setattr(
        encoder_module, "groups_to_run", lambda n_groups, group, audio: run_all(n_groups, group, audio - 1)
    )
    broken = encode(params, single, base_case.input_features, base_case.feature_mask)
    assert max(rel_max_error(mine, ref) for mine, ref in zip(broken, base_case.ref_encoded)) > 100 * TOL


def test_cpu_and_accelerator_encoder_layouts_agree(base_case: Case):
    """The encoder's platform layout is a construction option: on the CPU the convolutions run as tap matmuls
    in groups of 8 chunks, elsewhere as ``lax.conv_general_dilated`` in groups of ``conv_chunksize``. Both,
    run here, give the same embeddings to fp32 rounding and match the official encoder."""
    config, params = load_pretrained(base_case.dir)
    features, mask = jnp.asarray(base_case.input_features), jnp.asarray(base_case.feature_mask)
    for backend, convolution_op in (("cpu", False), ("gpu", True)):
        model = Qwen3ASR(config, attention_impl="xla", backend=backend)
        program = jax.make_jaxpr(
            lambda p, model=model: model.apply({"params": p}, features, mask, method=Qwen3ASR.encode_audio)
        )
        assert ("conv_general_dilated" in str(program(params))) == convolution_op, backend
    cpu = encode(params, config, base_case.input_features, base_case.feature_mask, backend="cpu")
    accelerator = encode(params, config, base_case.input_features, base_case.feature_mask, backend="gpu")
    for mine, theirs, ref in zip(cpu, accelerator, base_case.ref_encoded):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-5 * np.std(theirs))
        assert rel_max_error(theirs, ref) <= TOL


def test_encoder_batch_result_equals_each_item_alone(case: Case):
    config, params = load_pretrained(case.dir)
    batched = encode(params, config, case.input_features, case.feature_mask)
    for i, (feats, frames) in enumerate(case.features):
        alone = encode(params, config, feats[None], np.ones((1, frames), np.int32))[0]
        np.testing.assert_allclose(batched[i], alone, rtol=0, atol=1e-5 * np.std(alone))


def test_logits_match_official(case: Case):
    config, params = load_pretrained(case.dir)
    ours = logits(params, config, case)
    assert ours.shape == case.ref_logits.shape
    assert config.head_size == ours.shape[-1]
    assert logits_error(ours, case) <= TOL


def test_hf_layout_gives_the_same_logits(base_case: Case, tmp_path):
    hf_dir = official.build_checkpoint(tmp_path / "hf", base_case.config_dict, seed=1, layout="hf")
    config, params = load_pretrained(hf_dir)
    assert logits_error(logits(params, config, base_case), base_case) <= TOL


def test_hf_layout_aligner_head_loads(tmp_path):
    cfg = official.small_aligner_config()
    original = official.build_checkpoint(tmp_path / "orig", cfg, seed=2)
    hf_dir = official.build_checkpoint(tmp_path / "hf", cfg, seed=2, layout="hf")
    _, a = load_pretrained(original)
    _, b = load_pretrained(hf_dir)
    np.testing.assert_array_equal(np.asarray(a["lm_head"]["kernel"]), np.asarray(b["lm_head"]["kernel"]))


def test_converted_orbax_checkpoint_gives_the_same_logits(base_case: Case, tmp_path):
    from qasr_jax.conversion import convert_checkpoint, verify_conversion

    dst = str(tmp_path / "orbax")
    convert_checkpoint(base_case.dir, dst)
    assert verify_conversion(base_case.dir, dst).ok
    config, params = load_pretrained(dst)
    assert logits_error(logits(params, config, base_case), base_case) <= TOL


def test_window_override_per_call_matches_official_window(base_case: Case):
    """window_chunks=2 on an 8-chunk-window checkpoint equals the official encoder run with 2-s windows."""
    config, params = load_pretrained(base_case.dir)
    tower = base_case.torch_model.thinker.audio_tower
    saved = tower.n_window_infer
    tower.n_window_infer = 200
    try:
        ref = official.official_encode(base_case.torch_model, base_case.features, windowed=True)
    finally:
        tower.n_window_infer = saved
    ours = encode(params, config, base_case.input_features, base_case.feature_mask, window_chunks=2)
    assert rel_max_error(ours[2], ref[2]) <= TOL
    assert rel_max_error(ours[2], base_case.ref_encoded[2]) > 10 * TOL  # and 2-s windows do differ from 8-s


# ----------------------------------------------------------------------------------------------------------
# The bar can fail: broken variants exceed it.
# ----------------------------------------------------------------------------------------------------------


def test_whole_clip_window_reproduces_unpatched_official_and_fails_windowed(base_case: Case):
    config, params = load_pretrained(base_case.dir)
    unpatched = official.official_encode(base_case.torch_model, base_case.features, windowed=False)
    ours = encode(params, config, base_case.input_features, base_case.feature_mask, window_chunks=0)
    for mine, ref in zip(ours, unpatched):
        assert rel_max_error(mine, ref) <= TOL
    # The ~20 s clip spans three 8-s windows: without windows it is far from the windowed reference.
    assert rel_max_error(ours[2], base_case.ref_encoded[2]) > 10 * TOL


def test_positions_not_restarting_per_chunk_fails(base_case: Case, monkeypatch):
    def continuous(n_chunks, steps, channels):
        return encoder_module.sinusoid_table(n_chunks * steps, channels).reshape(n_chunks, steps, channels)

    monkeypatch.setattr(encoder_module, "chunk_positions", continuous)
    config, params = load_pretrained(base_case.dir)
    ours = encode(params, config, base_case.input_features, base_case.feature_mask)
    assert rel_max_error(ours[0], base_case.ref_encoded[0]) <= TOL  # one chunk: nothing to restart
    assert rel_max_error(ours[1], base_case.ref_encoded[1]) > 10 * TOL
    assert rel_max_error(ours[2], base_case.ref_encoded[2]) > 10 * TOL


def test_rope_off_by_one_fails(base_case: Case, monkeypatch):
    """Rotary frequencies paired one dimension off. (A constant shift of every position is not a bug RoPE
    can show: attention depends on relative positions only; the cached-decoding tests cover position gaps.)"""
    right = decoder_module.rope_cos_sin

    def off_by_one(*args, **kwargs):
        cos, sin = right(*args, **kwargs)
        return jnp.roll(cos, 1, axis=-1), jnp.roll(sin, 1, axis=-1)

    monkeypatch.setattr(decoder_module, "rope_cos_sin", off_by_one)
    config, params = load_pretrained(base_case.dir)
    assert logits_error(logits(params, config, base_case), base_case) > 10 * TOL


def test_wrong_gqa_grouping_fails(base_case: Case):
    """Permuting query heads (consistently in q_proj, q's norm-free layout and o_proj) keeps every head's
    computation but pairs heads 1 and 2 with the wrong kv head: the grouping h // (H / KV) becomes h % KV."""
    config, params = load_pretrained(base_case.dir)
    assert config.text.kv_groups == 2 and config.text.num_attention_heads == 4
    perm = np.array([0, 2, 1, 3])
    attn = params["decoder"]["layers"]["self_attn"]
    broken = jax.tree_util.tree_map(lambda x: x, params)
    broken["decoder"]["layers"]["self_attn"] = {
        **attn,
        "q_proj": {"kernel": attn["q_proj"]["kernel"][:, :, perm]},
        "o_proj": {"kernel": attn["o_proj"]["kernel"][:, perm]},
    }
    # Sanity: with the identity permutation the logits still match.
    assert logits_error(logits(params, config, base_case), base_case) <= TOL
    assert logits_error(logits(broken, config, base_case), base_case) > 10 * TOL


@pytest.mark.parametrize("shape", [(3, 128, 100, 1), (2, 64, 50, 8), (2, 7, 5, 3)])
def test_patch_convolution_equals_the_convolution_op_with_its_gradients(shape):
    """The CPU front end's nine-tap matmul computes what ``lax.conv_general_dilated`` (the accelerator path)
    computes, values and gradients, on odd and even sizes; a kernel flattened in the wrong tap order fails."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 4)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, 4)))

    def loss(patches):
        return lambda x, k: jnp.sum(encoder_module.conv3x3_stride2(x, k, patches) * cotangent)

    ours = encoder_module.conv3x3_stride2(x, kernel, True)
    reference = encoder_module.conv3x3_stride2(x, kernel, False)
    assert ours.shape == reference.shape == cotangent.shape
    assert rel_max_error(ours, np.asarray(reference)) < 1e-5
    for g_ours, g_ref in zip(
        jax.grad(loss(True), (0, 1))(x, kernel), jax.grad(loss(False), (0, 1))(x, kernel)
    ):
        assert rel_max_error(g_ours, np.asarray(g_ref)) < 1e-5
    transposed = encoder_module.conv3x3_stride2(x, kernel.transpose(1, 0, 2, 3), True)
    assert rel_max_error(transposed, np.asarray(reference)) > 1e-2
