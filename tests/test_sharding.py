"""Meshes, logical-axis rules and sharded inference (8 simulated CPU devices, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from qasr_jax import sharding
from qasr_jax.config import config_from_dict
from tests.support.train_fixtures import tiny_config_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2")


def run_mesh_check(mode: str, work_dir: str, meshes: tuple[str, ...] = MESHES) -> dict:
    """``tests/support/train_mesh_check.py`` in a fresh process with 8 CPU devices; its JSON result."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.train_mesh_check", mode, str(work_dir), *meshes],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mesh_spec_fills_missing_axes_and_the_rest():
    assert sharding.parse_mesh_spec("data=2,tensor=-1", 8) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert sharding.parse_mesh_spec("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.parse_mesh_spec("tensor=1", 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert sharding.parse_mesh_spec({"fsdp": -1}, 4) == {"data": 1, "fsdp": 4, "tensor": 1}
    for bad, why in (("data=3", "needs 3 devices"), ("data=-1,fsdp=-1", "only one axis"), ("pipe=2", "unknown"),
                     ("data", "is not 'axis=size'"), ("data=0", "positive")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            sharding.parse_mesh_spec(bad, 8)


def test_mesh_spec_rejects_a_product_that_misses_the_device_count():
    with pytest.raises(ValueError, match="needs 4 devices; 8 are available"):
        sharding.parse_mesh_spec("data=2,tensor=2", 8)


def test_rules_shard_what_divides_and_replicate_the_rest():
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    rules = sharding.DEFAULT_RULES
    # q_proj kernel [embed, heads, head_dim]: FSDP over embed, tensor parallel over heads.
    assert sharding.logical_to_spec(
        ("embed", "heads", "head_dim"), (64, 4, 16), mesh, rules
    ) == PartitionSpec("fsdp", "tensor", None)
    # 3 heads do not split over tensor=2: replicated rather than an error.
    assert sharding.logical_to_spec(
        ("embed", "heads", "head_dim"), (64, 3, 16), mesh, rules
    ) == PartitionSpec("fsdp", None, None)
    # The batch takes data×fsdp when both divide it, only data when just that divides it.
    assert sharding.logical_to_spec(("activation_batch", None), (8, 5), mesh, rules) == PartitionSpec(
        ("data", "fsdp"), None
    )
    assert sharding.logical_to_spec(("activation_batch",), (2,), mesh, rules) == PartitionSpec("data")
    assert sharding.logical_to_spec(("activation_batch",), (1,), mesh, rules) == PartitionSpec(None)
    # A mesh axis is used once per array: proj2 [mlp, embed_out] → tensor, fsdp.
    assert sharding.logical_to_spec(("mlp", "embed_out"), (64, 64), mesh, rules) == PartitionSpec(
        "tensor", "fsdp"
    )
    # Axes of size 1 are never named.
    flat = AbstractMesh((8, 1, 1), sharding.MESH_AXES)
    assert sharding.logical_to_spec(("vocab", "embed"), (2048, 32), flat, rules) == PartitionSpec(None, None)


def test_rule_overrides_replace_and_extend_the_table():
    rules = sharding.merge_rules({"embed": "", "vocab": ["fsdp", "tensor"], "my_axis": "data"})
    table = dict(rules)
    assert table["embed"] is None
    assert table["vocab"] == ("fsdp", "tensor")
    assert table["my_axis"] == "data"
    assert len(rules) == len(sharding.DEFAULT_RULES) + 1
    mesh = AbstractMesh((1, 2, 2), sharding.MESH_AXES)
    assert sharding.logical_to_spec(("vocab", "embed"), (2048, 32), mesh, rules) == PartitionSpec(
        ("fsdp", "tensor"), None
    )
    with pytest.raises(ValueError, match="not a mesh axis"):
        sharding.merge_rules({"embed": "model"})


def test_every_param_of_the_model_has_logical_axes_the_rules_know():
    names = sharding.logical_axes(config_from_dict(tiny_config_dict()))
    known = {name for name, _ in sharding.DEFAULT_RULES}
    used = {
        axis
        for axes in jax.tree_util.tree_leaves(names, is_leaf=lambda x: isinstance(x, tuple))
        for axis in axes
    }
    assert used <= known, used - known
    assert {"embed", "heads", "kv_heads", "mlp", "vocab", "layers"} <= used


def test_sharded_inference_matches_single_device(tmp_path):
    """Params loaded into each mesh (released safetensors and Orbax) give the single-device logits and tokens."""
    result = run_mesh_check("infer", str(tmp_path))
    assert result["devices"] == 8
    print(json.dumps(result, indent=1))
    for spec, r in result["meshes"].items():
        assert r["released_params_equal"] and r["orbax_params_equal"], spec
        assert r["logits_rel"] <= 1e-5, (spec, r)
        assert r["tokens_equal"], spec
    # The layouts really differ: data-only replicates everything, the others split params.
    assert result["meshes"]["data=8"]["sharded_leaves"] == 0
    for spec in MESHES[1:]:
        assert result["meshes"][spec]["sharded_leaves"] > 20, spec


def test_transcription_api_on_a_mesh_matches_single_device(tmp_path):
    """``Qwen3ASRModel.from_pretrained(..., mesh=...)``: params loaded into the mesh, batches split over it."""
    result = run_mesh_check("api", str(tmp_path), ("fsdp=8", "data=2,fsdp=2,tensor=2"))
    assert result["devices"] == 8
    assert all(text for _, text in result["reference"])  # something was generated to compare
    for spec, r in result["meshes"].items():
        assert r["equal"], (spec, result)


def test_aligner_on_a_mesh_matches_single_device(tmp_path):
    """``Qwen3ForcedAligner.from_pretrained(..., mesh=...)``: the same words and times as on one device."""
    result = run_mesh_check("align", str(tmp_path), ("fsdp=8", "data=2,fsdp=2,tensor=2"))
    assert result["devices"] == 8
    assert [len(words) for words in result["reference"]] == [1, 15]  # words with times to compare
    for spec, r in result["meshes"].items():
        assert r["equal"], (spec, result)


def test_streams_on_a_mesh_match_single_device(tmp_path):
    """A model loaded with ``mesh=`` streams: a lone stream and three streams batched by ``StreamScheduler``
    give every update of the single-device model (text, prefix, tokens; log-probabilities to 1e-4)."""
    result = run_mesh_check("stream", str(tmp_path), ("data=2,fsdp=2,tensor=2",))
    assert result["devices"] == 8
    reference = result["reference"]
    assert len(reference["lone"]) >= 3 and all(reference["many"]) and sum(map(len, reference["many"])) >= 8
    assert any(u[2] for u in reference["lone"])  # something was generated to compare
    for spec, r in result["meshes"].items():
        assert r["lone_equal"] and all(r["many_equal"]), (spec, r)
        assert r["cache_devices"] == 8  # the streams' caches live on the mesh


def test_batch_placement_helpers_work_with_and_without_a_mesh():
    import numpy as np

    host = [np.arange(8, dtype=np.int32).reshape(4, 2), np.ones((4,), np.float32)]
    plain = sharding.place_batch(host, None)
    assert all(isinstance(a, jax.Array) for a in plain)
    mesh = sharding.resolve_mesh("data=-1")
    assert sharding.resolve_mesh(mesh) is mesh and sharding.resolve_mesh(None) is None
    placed = sharding.place_batch(host, mesh)
    assert [a.sharding for a in placed] == [sharding.batch_sharding(mesh, a.shape) for a in host]
    assert np.array_equal(np.asarray(placed[0]), host[0])
    structs = sharding.abstract_arrays({"placed": placed[0], "host": jax.numpy.asarray(host[1])})
    assert structs["placed"].sharding == placed[0].sharding and structs["host"].sharding is None
    assert sharding.batch_struct((4, 2), np.int32, None).sharding is None
    assert sharding.batch_struct((4, 2), np.int32, mesh).sharding == sharding.batch_sharding(mesh, (4, 2))
