"""Config and weight loading: layouts, dtypes, shards, Orbax, and every error case with its typed error."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qasr_jax import load_config, load_pretrained
from qasr_jax.config import config_from_dict, config_to_dict
from qasr_jax.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from qasr_jax.weights import flatten_params, transposed
from tests.support import official

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return official.build_checkpoint(
        tmp_path_factory.mktemp("load") / "ck", official.small_asr_config(), seed=7
    )


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------------- config


def test_config_reads_released_fields_and_token_ids():
    raw = official.small_aligner_config()
    cfg = config_from_dict(raw)
    assert cfg.is_aligner and cfg.classify_num == 400 and cfg.head_size == 400
    assert cfg.timestamp_token_id == 151705 and cfg.timestamp_segment_time == 80.0
    assert cfg.audio_token_id == 151676 and cfg.audio_start_token_id == 151669
    assert not cfg.tied_head
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_real_configs_have_the_released_shapes():
    for name, (d, layers, hidden) in {"asr-0.6b": (896, 18, 1024), "asr-1.7b": (1024, 24, 2048)}.items():
        cfg = config_from_dict(official.real_config(name))
        assert (cfg.audio.d_model, cfg.audio.encoder_layers, cfg.text.hidden_size) == (d, layers, hidden)
        assert cfg.audio.window_chunks == 8 and cfg.text.mrope_section == (24, 20, 20)


def _broken(mutate) -> dict:
    raw = copy.deepcopy(official.small_asr_config())
    mutate(raw)
    return raw


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda r: r["thinker_config"].pop("audio_token_id"), "audio_token_id"),
        (lambda r: r["thinker_config"]["audio_config"].pop("d_model"), "d_model"),
        (lambda r: r["thinker_config"]["text_config"].pop("rope_theta"), "rope_theta"),
        (lambda r: r["thinker_config"]["audio_config"].update(output_dim=32), "output_dim"),
        (
            lambda r: r["thinker_config"]["audio_config"].update(encoder_attention_heads=5),
            "encoder_attention_heads",
        ),
        (lambda r: r["thinker_config"]["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
        (lambda r: r["thinker_config"]["text_config"].update(hidden_size="64"), "hidden_size"),
        (lambda r: r["thinker_config"]["audio_config"].update(n_window_infer=150), "n_window_infer"),
        (
            lambda r: r["thinker_config"]["text_config"]["rope_scaling"].update(mrope_section=[4, 4, 4]),
            "mrope",
        ),
        (lambda r: r.pop("thinker_config"), "thinker_config"),
    ],
)
def test_bad_config_raises_config_error_naming_the_field(mutate, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(_broken(mutate))


def test_aligner_config_requires_its_fields():
    raw = official.small_aligner_config()
    raw.pop("timestamp_segment_time")
    with pytest.raises(ConfigError, match="timestamp_segment_time"):
        config_from_dict(raw)
    raw = official.small_aligner_config()
    raw["thinker_config"].pop("classify_num")
    with pytest.raises(ConfigError, match="classify_num"):
        config_from_dict(raw)


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


# ---------------------------------------------------------------------------------------------------- weights


def test_sharded_and_single_file_checkpoints_load_identically(ckpt, tmp_path):
    sharded = official.build_checkpoint(
        tmp_path / "sh", official.small_asr_config(), seed=7, max_shard_bytes=2**20
    )
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    _, a = load_pretrained(ckpt)
    _, b = load_pretrained(sharded)
    from qasr_jax.weights import tree_equal

    assert tree_equal(a, b) == []


def test_bf16_checkpoint_stays_bf16_unless_a_dtype_is_asked(tmp_path):
    path = official.build_checkpoint(tmp_path / "bf", official.small_asr_config(), seed=7, dtype="bfloat16",
                                     tokenizer=False)  # fmt: skip
    _, params = load_pretrained(path)
    kernel = params["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype.name == "bfloat16"
    _, params32 = load_pretrained(path, dtype="float32")
    assert params32["decoder"]["layers"]["mlp"]["up_proj"]["kernel"].dtype.name == "float32"
    # Values: the bf16 bits where the torch layout says, and the fp32 load their exact widening, leaf by leaf.
    up = load_file(os.path.join(path, "model.safetensors"))["thinker.model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_array_equal(np.asarray(kernel[1]).view(np.uint16), up.T.view(np.uint16))
    for (where, low), (_, wide) in zip(flatten_params(params), flatten_params(params32), strict=True):
        np.testing.assert_array_equal(np.asarray(low).astype(np.float32), np.asarray(wide), err_msg=str(where))


@pytest.mark.parametrize("source", ["float32", "bfloat16"])
def test_transposed_copy_equals_the_transpose_in_place_and_converting(source):
    import ml_dtypes

    rng = np.random.default_rng(0)
    array = rng.standard_normal((700, 300)).astype(np.float32)
    if source == "bfloat16":
        array = array.astype(ml_dtypes.bfloat16)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        expected = array.astype(dtype).T
        np.testing.assert_array_equal(transposed(array, dtype), expected)
        stacked = np.zeros((3, 300, 700), dtype)
        layer = stacked[1]
        assert transposed(array, dtype, out=layer) is layer
        np.testing.assert_array_equal(stacked[1], expected)
        assert not stacked[0].any() and not stacked[2].any()
    with pytest.raises(ValueError, match="out is"):
        transposed(array, np.float32, out=np.zeros((700, 300), np.float32))


def test_weights_land_where_the_torch_layout_says(ckpt):
    """Spot-check the layout conversion by hand: Linear transposed and split into heads, conv OIHW → HWIO."""
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    config, params = load_pretrained(ckpt)
    q = tensors["thinker.model.layers.1.self_attn.k_proj.weight"]  # [kv·hd, D]
    ours = np.asarray(params["decoder"]["layers"]["self_attn"]["k_proj"]["kernel"][1])  # [D, kv, hd]
    np.testing.assert_array_equal(ours[:, 1, 3], q[1 * config.text.head_dim + 3])
    conv = tensors["thinker.audio_tower.conv2d2.weight"]  # [O, I, H, W]
    np.testing.assert_array_equal(
        np.asarray(params["audio_tower"]["frontend"]["conv2d2"]["kernel"])[2, 0, 5, 7], conv[7, 5, 2, 0]
    )


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(official.small_asr_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin"):
        load_pretrained(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        load_pretrained(tmp_path / "pytorch_model.bin")


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path / "bad")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["thinker.model.layers.1.mlp.up_proj.weight"]
    del tensors["thinker.audio_tower.ln_post.bias"]
    tensors["thinker.audio_tower.extra.weight"] = np.zeros(3, np.float32)
    tensors["thinker.model.norm.weight"] = np.zeros(5, np.float32)
    save_file(tensors, file)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert "decoder/layers/mlp/up_proj/kernel (layers [1])" in msg
    assert "audio_tower/ln_post/bias" in msg
    assert "thinker.audio_tower.extra.weight" in msg
    assert "thinker.model.norm.weight: (5,)" in msg


def test_shard_index_naming_a_missing_file_is_an_error(tmp_path):
    path = official.build_checkpoint(tmp_path / "sh", official.small_asr_config(), seed=7, max_shard_bytes=2**20,
                                     tokenizer=False)  # fmt: skip
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    os.remove(os.path.join(path, sorted(set(index["weight_map"].values()))[0]))
    with pytest.raises(CheckpointError, match="not present"):
        load_pretrained(path)


def test_no_weights_at_all_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(official.small_asr_config()))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_pretrained(tmp_path)


def test_orbax_checkpoint_for_another_config_is_refused(ckpt, tmp_path):
    from qasr_jax.conversion import convert_checkpoint

    dst = str(tmp_path / "orbax")
    convert_checkpoint(ckpt, dst)
    with open(os.path.join(dst, "config.json")) as f:
        raw = json.load(f)
    raw["thinker_config"]["text_config"]["intermediate_size"] = 96
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_pretrained(dst)


def test_convert_program_writes_a_loadable_dir_and_verifies(ckpt, tmp_path):
    dst = tmp_path / "conv16"
    run = subprocess.run(
        [sys.executable, "-m", "convert", ckpt, str(dst), "--dtype", "bfloat16", "--verify"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "identical" in run.stdout
    for name in (
        "config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ):
        assert (dst / name).exists()
    _, params = load_pretrained(dst)
    assert params["embed_tokens"]["embedding"].dtype.name == "bfloat16"
    again = subprocess.run([sys.executable, "-m", "convert", ckpt, str(dst)], cwd=REPO, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr


# ---------------------------------------------------------------------------------------------------- weights cache


def _cached_leaf_file(cache_dir, leaf: str) -> str:
    """The cache file of the (only) entry that holds the param named ``leaf`` ('/'-joined path)."""
    (entry,) = [os.path.join(cache_dir, e) for e in os.listdir(cache_dir) if not e.startswith(".")]
    with open(os.path.join(entry, "index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    (item,) = [i for i in index["params"] if "/".join(i["path"]) == leaf]
    return os.path.join(entry, item["file"])


UP = "decoder/layers/mlp/up_proj/kernel"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_cache_gives_bit_identical_params_and_a_second_load_maps_it(tmp_path, dtype):
    from qasr_jax.weights import tree_equal

    path = official.build_checkpoint(tmp_path / "ck", official.small_asr_config(), seed=7, dtype=dtype,
                                     tokenizer=False)  # fmt: skip
    cache = tmp_path / "cache"
    _, direct = load_pretrained(path, weights_cache=False)
    assert not cache.exists()
    _, first = load_pretrained(path, weights_cache=cache)  # converts and writes the entry
    _, second = load_pretrained(path, weights_cache=cache)  # maps the entry
    assert tree_equal(direct, first) == [] and tree_equal(direct, second) == []
    assert second["decoder"]["layers"]["mlp"]["up_proj"]["kernel"].dtype.name == dtype
    # The second load read the entry's files: a value written into one shows up in the params.
    file = _cached_leaf_file(cache, UP)
    with open(file, "r+b") as handle:
        handle.write(np.asarray([7.0], dtype=dtype).tobytes())
    _, third = load_pretrained(path, weights_cache=cache)
    assert float(third["decoder"]["layers"]["mlp"]["up_proj"]["kernel"].reshape(-1)[0]) == 7.0
    assert float(direct["decoder"]["layers"]["mlp"]["up_proj"]["kernel"].reshape(-1)[0]) != 7.0


def test_weights_cache_entry_is_rebuilt_when_short_and_a_changed_checkpoint_gets_a_new_one(ckpt, tmp_path):
    from qasr_jax.weights import tree_equal

    path = _copy(ckpt, tmp_path / "ck")
    cache = tmp_path / "cache"
    _, direct = load_pretrained(path, weights_cache=False)
    load_pretrained(path, weights_cache=cache)
    file = _cached_leaf_file(cache, UP)
    with open(file, "r+b") as handle:
        handle.truncate(os.path.getsize(file) // 2)
    _, rebuilt = load_pretrained(path, weights_cache=cache)
    assert tree_equal(direct, rebuilt) == []
    assert (
        os.path.getsize(_cached_leaf_file(cache, UP))
        == direct["decoder"]["layers"]["mlp"]["up_proj"]["kernel"].nbytes
    )

    # New weights in the same dir: a new entry, and the new weights (not the cached old ones).
    tensors = load_file(os.path.join(path, "model.safetensors"))
    name = "thinker.model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name] * 2
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    _, changed = load_pretrained(path, weights_cache=cache)
    _, changed_direct = load_pretrained(path, weights_cache=False)
    assert tree_equal(changed, changed_direct) == [] and tree_equal(changed, direct) != []
    assert len([e for e in os.listdir(cache) if not e.startswith(".")]) == 2


def test_weights_cache_setting_resolves_like_the_compilation_cache(monkeypatch, tmp_path):
    from qasr_jax.weights import weights_cache_dir

    monkeypatch.delenv("QASR_WEIGHTS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert weights_cache_dir() == os.path.join(str(tmp_path), "qasr-jax", "weights")
    monkeypatch.setenv("QASR_WEIGHTS_CACHE", str(tmp_path / "w"))
    assert weights_cache_dir() == str(tmp_path / "w")
    for off in ("off", "0", "false", ""):
        monkeypatch.setenv("QASR_WEIGHTS_CACHE", off)
        assert weights_cache_dir() is None
    assert weights_cache_dir(tmp_path / "x") == str(tmp_path / "x") and weights_cache_dir(False) is None


SHARDED_FROM_CACHE = """
import sys, numpy as np, jax
from qasr_jax import load_pretrained, sharding
from qasr_jax.weights import flatten_params
path, cache = sys.argv[1], sys.argv[2]
_, direct = load_pretrained(path, weights_cache=False)
mesh = sharding.resolve_mesh("fsdp=2,tensor=2")
load = lambda: sharding.load_placed(path, None, mesh, None, cache)[1]
load()  # writes the entry
placed = load()  # each device reads its slices of the mapped files
split = 0
for (p, a), (_, b) in zip(flatten_params(direct), flatten_params(placed)):
    assert np.array_equal(np.asarray(a), np.asarray(b)), p
    split += len({str(s.index) for s in b.addressable_shards}) > 1
assert split > 0
print("ok", split)
"""


def test_sharded_load_from_the_weights_cache_equals_the_unsharded_params(ckpt, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SHARDED_FROM_CACHE, ckpt, str(tmp_path / "cache")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
