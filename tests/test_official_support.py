"""The official-code reference helpers (tests/support/official.py) do what parity tests rely on.

Checkpoint dirs load with the official ``from_pretrained`` and hold exactly the official model's tensors in every
layout, dtype and sharding; the weights are scaled so that every part matters; the windows patch really restricts
the official encoder's attention to its windows; the runners agree with the official pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import official
from tests.support.speech import speech_clips


@pytest.fixture(scope="module")
def features() -> list[tuple[np.ndarray, int]]:
    return official.official_features(speech_clips())


@pytest.fixture(scope="module")
def asr_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return official.build_checkpoint(tmp_path_factory.mktemp("asr"), official.small_asr_config())


@pytest.fixture(scope="module")
def asr_model(asr_dir: str):
    return official.load_official(asr_dir)


@pytest.fixture(scope="module")
def aligner_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return official.build_checkpoint(tmp_path_factory.mktemp("aligner"), official.small_aligner_config())


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


def test_small_configs_have_released_layout_and_ids() -> None:
    asr = official.small_asr_config()
    thinker = asr["thinker_config"]
    assert asr["model_type"] == "qwen3_asr"
    assert (thinker["audio_token_id"], thinker["audio_start_token_id"], thinker["audio_end_token_id"]) == (
        151676,
        151669,
        151670,
    )
    assert thinker["audio_config"]["output_dim"] == thinker["text_config"]["hidden_size"] == 64
    assert thinker["text_config"]["rope_scaling"]["mrope_section"] == [4, 2, 2]
    assert (
        sum(thinker["text_config"]["rope_scaling"]["mrope_section"])
        == thinker["text_config"]["head_dim"] // 2
    )
    assert not official.is_aligner_config(asr)

    aligner = official.small_aligner_config(classify_num=123)
    assert official.is_aligner_config(aligner)
    assert "forced_aligner" in aligner["thinker_config"]["model_type"]
    assert aligner["thinker_config"]["classify_num"] == 123
    assert (aligner["timestamp_token_id"], aligner["timestamp_segment_time"]) == (151705, 80)
    assert aligner["thinker_config"]["text_config"]["vocab_size"] == 152064
    assert aligner["thinker_config"]["text_config"]["tie_word_embeddings"] is False


def test_config_overrides_merge_into_nested_fields() -> None:
    cfg = official.small_asr_config(
        text={"num_key_value_heads": 4, "hidden_size": 96, "rope_scaling": {"mrope_section": [4, 2, 2]}},
        audio={"n_window_infer": 200},
        tie_word_embeddings=False,
    )
    text, audio = cfg["thinker_config"]["text_config"], cfg["thinker_config"]["audio_config"]
    assert text["num_key_value_heads"] == 4 and text["num_attention_heads"] == 4
    assert text["rope_scaling"]["interleaved"] is True  # untouched siblings survive a nested override
    assert audio["n_window_infer"] == 200 and audio["d_model"] == 64
    assert audio["output_dim"] == 96  # follows the text hidden size
    assert text["tie_word_embeddings"] is False and cfg["tie_word_embeddings"] is False
    # The defaults are not mutated by overrides.
    assert official.small_asr_config()["thinker_config"]["text_config"]["num_key_value_heads"] == 2


@pytest.mark.parametrize(
    ("name", "audio", "text", "aligner"),
    [
        ("asr-0.6b", (896, 18, 14, 3584, 1024), (1024, 28, 16, 8, 128, 3072, 151936, True), False),
        ("asr-1.7b", (1024, 24, 16, 4096, 2048), (2048, 28, 16, 8, 128, 6144, 151936, True), False),
        ("aligner-0.6b", (1024, 24, 16, 4096, 1024), (1024, 28, 16, 8, 128, 3072, 152064, False), True),
    ],
)
def test_real_configs_match_the_released_table(name: str, audio: tuple, text: tuple, aligner: bool) -> None:
    cfg = official.real_config(name)
    a, t = cfg["thinker_config"]["audio_config"], cfg["thinker_config"]["text_config"]
    assert (a["d_model"], a["encoder_layers"], a["encoder_attention_heads"], a["encoder_ffn_dim"]) == audio[
        :4
    ]
    assert a["output_dim"] == audio[4]
    assert (a["num_mel_bins"], a["downsample_hidden_size"], a["n_window"], a["n_window_infer"]) == (
        128,
        480,
        50,
        800,
    )
    assert (a["conv_chunksize"], a["max_source_positions"]) == (500, 1500)
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    assert tuple(t[f] for f in fields) == text[:5]
    assert (t["intermediate_size"], t["vocab_size"], t["tie_word_embeddings"]) == text[5:]
    assert (t["rope_theta"], t["rms_norm_eps"], t["rope_scaling"]["mrope_section"]) == (
        1e6,
        1e-6,
        [24, 20, 20],
    )
    assert official.is_aligner_config(cfg) is aligner
    if aligner:
        assert cfg["thinker_config"]["classify_num"] == 5000
    with pytest.raises(ValueError, match="unknown released model"):
        official.real_config("asr-9b")


def test_encoder_output_length_matches_official_formula() -> None:
    from qwen_asr.core.transformers_backend.modeling_qwen3_asr import _get_feat_extract_output_lengths

    frames = torch.arange(0, 2500)
    expected = _get_feat_extract_output_lengths(frames).tolist()
    assert [official.encoder_output_length(int(n)) for n in frames] == expected


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_dir_has_released_files(asr_dir: str) -> None:
    root = Path(asr_dir)
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "chat_template.json",
    ):
        assert (root / name).is_file(), name
    config = json.loads((root / "config.json").read_text())
    assert config["model_type"] == "qwen3_asr"
    assert config["thinker_config"]["audio_token_id"] == 151676
    assert config["thinker_config"]["text_config"]["num_key_value_heads"] == 2
    assert json.loads((root / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]


def test_official_pipeline_loads_the_dir_and_sees_the_stored_tensors(asr_dir: str) -> None:
    from qwen_asr.inference.qwen3_asr import Qwen3ASRModel

    wrapper = Qwen3ASRModel.from_pretrained(asr_dir, dtype=torch.float32, max_new_tokens=3)
    prompt = wrapper._build_text_prompt(context="", force_language=None)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|audio_pad|>" in prompt
    assert wrapper.processor.tokenizer.convert_tokens_to_ids("<|audio_pad|>") == 151676

    stored = official.checkpoint_tensors(asr_dir)
    loaded = wrapper.model.state_dict()
    assert set(stored) == set(loaded)  # the released layout stores the tied head too
    for name, tensor in stored.items():
        assert torch.equal(tensor, loaded[name]), name
    expected = official.build_official_model(official.small_asr_config()).state_dict()
    for name, tensor in expected.items():
        assert torch.equal(tensor, loaded[name]), name


def test_tied_head_loads_whether_stored_or_omitted(asr_dir: str, tmp_path: Path) -> None:
    omitted = official.build_checkpoint(
        tmp_path / "omitted", official.small_asr_config(), save_tied_head=False, tokenizer=False
    )
    assert "thinker.lm_head.weight" in official.checkpoint_tensors(asr_dir)
    assert "thinker.lm_head.weight" not in official.checkpoint_tensors(omitted)
    for path in (asr_dir, omitted):
        state = official.official_state_dict(path)
        np.testing.assert_array_equal(
            state["thinker.lm_head.weight"], state["thinker.model.embed_tokens.weight"]
        )


def test_untied_checkpoint_has_its_own_head(tmp_path: Path) -> None:
    path = official.build_checkpoint(
        tmp_path, official.small_asr_config(tie_word_embeddings=False, text={"num_key_value_heads": 4})
    )
    model = official.load_official(path)
    thinker = model.thinker
    assert thinker.lm_head.weight is not thinker.model.embed_tokens.weight
    assert not torch.equal(thinker.lm_head.weight, thinker.model.embed_tokens.weight)
    assert thinker.model.layers[0].self_attn.num_key_value_groups == 1


def test_aligner_dir_loads_with_the_official_aligner(aligner_dir: str) -> None:
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForcedAligner

    config = json.loads((Path(aligner_dir) / "config.json").read_text())
    assert config["thinker_config"]["model_type"] == "qwen3_forced_aligner"
    assert config["thinker_config"]["classify_num"] == 400
    assert (config["timestamp_token_id"], config["timestamp_segment_time"]) == (151705, 80)
    aligner = Qwen3ForcedAligner.from_pretrained(aligner_dir, dtype=torch.float32)
    assert aligner.model.thinker.lm_head.weight.shape == (400, 64)
    assert aligner.timestamp_token_id == 151705
    stored = official.checkpoint_tensors(aligner_dir)
    assert stored["thinker.lm_head.weight"].shape == (400, 64)
    assert stored["thinker.model.embed_tokens.weight"].shape == (152064, 64)


def test_sharded_and_single_file_checkpoints_hold_identical_tensors(asr_dir: str, tmp_path: Path) -> None:
    sharded = official.build_checkpoint(
        tmp_path, official.small_asr_config(), max_shard_bytes=20_000_000, tokenizer=False
    )
    index = json.loads((Path(sharded) / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (Path(sharded) / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    single, split = official.checkpoint_tensors(asr_dir), official.checkpoint_tensors(sharded)
    assert set(single) == set(split) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in split.values())
    for name in single:
        assert torch.equal(single[name], split[name]), name
    loaded = official.official_state_dict(sharded)
    np.testing.assert_array_equal(
        loaded["thinker.audio_tower.conv2d1.weight"], single["thinker.audio_tower.conv2d1.weight"]
    )


def test_bfloat16_checkpoint_writes_bfloat16_tensors(asr_dir: str, tmp_path: Path) -> None:
    path = official.build_checkpoint(tmp_path, official.small_asr_config(), dtype="bfloat16", tokenizer=False)
    stored = official.checkpoint_tensors(path)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((Path(path) / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = official.checkpoint_tensors(asr_dir)
    for name, tensor in stored.items():
        assert torch.equal(tensor, fp32[name].to(torch.bfloat16)), name
    model = official.load_official(path)
    assert model.dtype == torch.float32


@pytest.mark.parametrize("aligner", [False, True])
def test_hf_layout_renames_every_tensor(aligner: bool, tmp_path: Path) -> None:
    config = (
        official.small_aligner_config() if aligner else official.small_asr_config(tie_word_embeddings=False)
    )
    original = official.checkpoint_tensors(official.build_checkpoint(tmp_path / "o", config, tokenizer=False))
    hf = official.checkpoint_tensors(
        official.build_checkpoint(tmp_path / "h", config, layout="hf", tokenizer=False)
    )
    assert set(hf) == {official.hf_key(k, aligner=aligner) for k in original}
    for name, tensor in original.items():
        assert torch.equal(hf[official.hf_key(name, aligner=aligner)], tensor), name
    head = "score.weight" if aligner else "lm_head.weight"
    for name in (
        head,
        "model.audio_tower.conv2d1.weight",
        "model.audio_tower.conv_out.weight",
        "model.audio_tower.layers.1.self_attn.out_proj.bias",
        "model.audio_tower.ln_post.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_2.bias",
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.0.self_attn.q_norm.weight",
        "model.language_model.norm.weight",
    ):
        assert name in hf, name
    assert not any(k.startswith("thinker.") or ".proj1." in k or ".proj2." in k for k in hf)


def test_hf_layout_drops_a_tied_head_by_default(tmp_path: Path) -> None:
    hf = official.checkpoint_tensors(
        official.build_checkpoint(tmp_path, official.small_asr_config(), layout="hf", tokenizer=False)
    )
    assert "lm_head.weight" not in hf and "model.language_model.embed_tokens.weight" in hf


def test_build_checkpoint_rejects_unknown_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        official.build_checkpoint(tmp_path, official.small_asr_config(), layout="gguf")
    with pytest.raises(ValueError, match="dtype"):
        official.build_checkpoint(tmp_path, official.small_asr_config(), dtype="float16")


# ---------------------------------------------------------------------------------------------------------------
# Scaled weights and the windows patch
# ---------------------------------------------------------------------------------------------------------------


def test_scaled_weights_make_every_part_matter(asr_model, features) -> None:
    scaled = official.measure_weight_effects(asr_model, features)
    # The conv front end is not dwarfed by the sinusoidal positions.
    assert scaled["conv_rms"] >= 0.5 * scaled["position_rms"]
    # Attention is sharp in both towers, and the windows change the encoder output a lot.
    assert scaled["encoder_max_attention"] > 10 * scaled["uniform_attention"]
    assert scaled["encoder_logit_std"] > 2.0 and scaled["decoder_logit_std"] > 2.0
    assert scaled["window_effect"] >= 0.05
    assert scaled["head_copies_input"] < 0.05

    # The trap being avoided: at the official init none of this holds.
    plain = official.measure_weight_effects(
        official.build_official_model(official.small_asr_config(), scale=False), features
    )
    assert plain["conv_rms"] < 0.01 * plain["position_rms"]
    assert plain["window_effect"] < 0.01
    assert plain["head_copies_input"] > 0.5


def test_window_mask_matches_the_encoders_own(asr_model) -> None:
    tower = asr_model.thinker.audio_tower
    hidden = torch.zeros(30, 64)
    cu_seqlens = torch.tensor([0, 13, 26, 30], dtype=torch.int32)
    ours = official.window_attention_mask(hidden, cu_seqlens)
    assert torch.equal(ours, tower._prepare_attention_mask(hidden, cu_seqlens))
    assert ours.shape == (1, 1, 30, 30) and ours[0, 0, 0, 12] == 0 and ours[0, 0, 0, 13] < -1e30


def test_windowed_official_encoder_attends_inside_windows_only(asr_model, features) -> None:
    long_feats, frames = features[2]
    window_frames = asr_model.thinker.audio_tower.config.n_window_infer  # 800 frames = 104 tokens
    assert frames > 2 * window_frames
    full = official.official_encode(asr_model, [long_feats])[0]
    first = official.official_encode(asr_model, [long_feats[:, :window_frames]])[0]
    assert first.shape[0] == 104 and full.shape[0] == official.encoder_output_length(frames)
    # Windowed, the first window's tokens cannot see the rest of the clip.
    np.testing.assert_allclose(full[:104], first, rtol=0, atol=1e-5 * np.abs(full).max())
    whole = official.official_encode(asr_model, [long_feats], windowed=False)[0]
    assert official.relative_difference(whole[:104], first) > 0.05
    # windowed=None follows the model's own setting (load_official(windowed=True)).
    np.testing.assert_array_equal(official.official_encode(asr_model, [long_feats], windowed=None)[0], full)


def test_windows_context_manager_patches_and_restores(asr_dir: str, features) -> None:
    from qwen_asr.core.transformers_backend.modeling_qwen3_asr import Qwen3ASRAudioEncoderLayer

    original = Qwen3ASRAudioEncoderLayer.forward
    plain = official.load_official(asr_dir, windowed=False)
    long_feats = features[2][0]
    unpatched = official.official_encode(plain, [long_feats], windowed=None)[0]
    with official.official_encoder_windows():
        assert Qwen3ASRAudioEncoderLayer.forward is not original
        with official.official_encoder_windows():
            patched = official.official_encode(plain, [long_feats], windowed=None)[0]
        assert Qwen3ASRAudioEncoderLayer.forward is not original  # nesting keeps the outer patch
    assert Qwen3ASRAudioEncoderLayer.forward is original
    reference = official.official_encode(plain, [long_feats], windowed=True)[0]
    np.testing.assert_array_equal(patched, reference)
    assert official.relative_difference(unpatched, reference) > 0.05
    # The runner's override is temporary.
    np.testing.assert_array_equal(official.official_encode(plain, [long_feats], windowed=None)[0], unpatched)


# ---------------------------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------------------------


def test_official_features_are_per_item_batches_of_one(asr_dir: str, features) -> None:
    from transformers import WhisperFeatureExtractor

    clips = speech_clips()
    assert [frames for _, frames in features] == [len(w) // 160 for w in clips]
    assert all(f.shape == (128, n) and f.dtype == np.float32 for f, n in features)
    extractor = WhisperFeatureExtractor.from_pretrained(asr_dir)
    alone = extractor(
        clips[1],
        sampling_rate=16000,
        padding=True,
        truncation=False,
        return_attention_mask=True,
        return_tensors="np",
    )
    np.testing.assert_array_equal(features[1][0], alone["input_features"][0])
    from_dir = official.official_features(clips[:1], preprocessor_dir=asr_dir)
    np.testing.assert_array_equal(from_dir[0][0], features[0][0])


def test_make_audio_prompt_ids_left_pads_audio_runs() -> None:
    ids, mask = official.make_audio_prompt_ids([9, 64, 264], seed=3)
    assert ids.shape == mask.shape and ids.dtype == np.int64 and mask.dtype == np.int64
    for row, row_mask, n_audio in zip(ids, mask, [9, 64, 264]):
        start = int(np.argmax(row_mask))
        assert row_mask[start:].all() and not row_mask[:start].any()
        assert (row[:start] == official.PAD_TOKEN_ID).all()
        valid = row[start:]
        assert (valid == official.AUDIO_PAD_ID).sum() == n_audio
        begin = int(np.argmax(valid == official.AUDIO_PAD_ID))
        assert valid[begin - 1] == official.AUDIO_START_ID and valid[begin + n_audio] == official.AUDIO_END_ID
        assert begin - 1 >= 2 and len(valid) - (begin + n_audio) - 1 >= 2  # text on both sides
    assert mask[-1].all()  # the longest item is not padded


def test_official_logits_match_the_official_forward_per_item(asr_model, features) -> None:
    encoded = official.official_encode(asr_model, features)
    assert [e.shape for e in encoded] == [(official.encoder_output_length(n), 64) for _, n in features]
    n_audio = [e.shape[0] for e in encoded]
    ids, mask = official.make_audio_prompt_ids(n_audio)
    logits = official.official_logits(asr_model, ids, mask, features)
    assert logits.shape == (*ids.shape, 151936) and logits.dtype == np.float32
    # Each short item alone (no padding, no other audio in the batch) gives the same logits at its valid positions.
    alone = {}
    for i in (0, 1):
        start = int(np.argmax(mask[i]))
        alone[i] = official.official_logits(
            asr_model, ids[i : i + 1, start:], mask[i : i + 1, start:], features[i : i + 1]
        )
        np.testing.assert_allclose(logits[i, start:], alone[i][0], rtol=0, atol=1e-4 * np.abs(alone[i]).max())
    # Windows reach the logits of the long item only (the short ones fit in one window).
    long_whole = official.official_logits(asr_model, ids[2:], mask[2:], features[2:], windowed=False)
    assert official.relative_difference(long_whole[0], logits[2]) > 0.05
    start = int(np.argmax(mask[0]))
    short_whole = official.official_logits(
        asr_model, ids[:1, start:], mask[:1, start:], features[:1], windowed=False
    )
    np.testing.assert_allclose(short_whole, alone[0], rtol=0, atol=1e-6 * np.abs(alone[0]).max())


def test_aligner_logits_have_the_class_head(aligner_dir: str, features) -> None:
    model = official.load_official(aligner_dir)
    short = features[:2]
    ids, mask = official.make_audio_prompt_ids([official.encoder_output_length(n) for _, n in short])
    logits = official.official_logits(model, ids, mask, short)
    assert logits.shape == (*ids.shape, 400)
    assert np.isfinite(logits).all()
