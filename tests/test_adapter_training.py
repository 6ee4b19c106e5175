"""LoRA fine-tuning through ``python -m train``'s loop: only the adapters train (and hold optimizer state), a run
stopped after a checkpoint resumes to the same losses and adapters, the export is a PEFT adapter dir plus a merged
checkpoint, and a sharded step on 8 simulated devices equals one device."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qasr_jax import adapters as lora
from qasr_jax.config import load_config
from qasr_jax.errors import ConfigError
from qasr_jax.training import train
from qasr_jax.training.config import load_train_config
from qasr_jax.training.metrics import read_metrics
from qasr_jax.weights import load_pretrained
from tests.support import train_fixtures as tf
from tests.test_train import load_checkpoint_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2")


class StopAfter(Exception):
    """Raised by a step callback: the run ends there as an interrupted process would (after its last save)."""


def _config(tmp_path, name: str, model_dir: str, manifest: str):
    toml = tf.train_toml(model_dir, manifest, str(tmp_path / name), {
        "model": {"remat": "layers"},
        "adapters": {"targets": ["model.layers.*.self_attn.[qkvo]_proj", "model.layers.*.mlp.*_proj",
                                 "audio_tower.layers.*.self_attn.*_proj"], "rank": 4, "alpha": 8.0, "dropout": 0.1,
                     "export_merged": str(tmp_path / name / "merged")},
        "optim": {"grad_accum": 2, "weight_decay": 0.01},
        "data": {"eval_manifest": manifest, "eval_batch_size": 4},
        "run": {"steps": 6, "save_every": 3, "eval_every": 0, "eval_max_new_tokens": 6,
                "export_dir": str(tmp_path / name / "adapter"), "export_dtype": "float32"},
    })  # fmt: skip
    (tmp_path / f"{name}.toml").write_text(toml, encoding="utf-8")
    return load_train_config(tmp_path / f"{name}.toml")


@pytest.mark.slow
def test_lora_run_trains_adapters_only_resumes_exactly_and_exports_peft_files(tmp_path):
    model_dir = tf.write_model_dir(tmp_path / "model", tf.tiny_config_dict())
    manifest = tf.write_manifest(tmp_path / "train.jsonl", tf.speech_rows())
    reference = train(_config(tmp_path, "reference", model_dir, manifest))

    def stop(step: int, _: dict) -> None:
        if step == 4:  # the checkpoint of step 3 is complete; step 4 is lost with the "process"
            raise StopAfter

    resumed_cfg = _config(tmp_path, "resumed", model_dir, manifest)
    with pytest.raises(StopAfter):
        train(resumed_cfg, callbacks=[stop])
    resumed = train(resumed_cfg)

    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "reference" / "metrics.jsonl", "train")}
    again = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl", "train")}
    print({s: (losses[s], again[s]) for s in losses})
    assert sorted(losses) == sorted(again) == list(range(1, 7))
    assert all(math.isclose(again[s], losses[s], rel_tol=1e-6) for s in losses), (losses, again)
    assert losses[6] < losses[1]
    assert resumed["eval"] and "wer" in resumed["eval"] and reference["step"] == 6

    # The checkpoint holds the adapters and their optimizer moments, nothing of the base.
    state = load_checkpoint_params(tmp_path / "reference" / "checkpoints" / "6" / "state")
    assert state and all(p.rsplit("/", 1)[1] in (lora.LORA_A, lora.LORA_B) for p in state), sorted(state)[:5]
    resumed_state = load_checkpoint_params(tmp_path / "resumed" / "checkpoints" / "6" / "state")
    for path, value in state.items():
        np.testing.assert_allclose(resumed_state[path], value, rtol=1e-6, atol=1e-7, err_msg=path)
    b = state["params/decoder/layers/self_attn/q_proj/lora_b"]
    assert np.abs(b).max() > 0  # B left zero

    # The export: peft's files, which load back to the checkpoint's adapters (scale alpha / rank folded in).
    config = load_config(model_dir)
    exported = json.loads((tmp_path / "reference" / "adapter" / lora.CONFIG_FILE).read_text())
    assert exported["r"] == 4 and exported["lora_alpha"] == 8.0 and exported["lora_dropout"] == 0.1
    adapter = lora.load_peft(tmp_path / "reference" / "adapter", config)
    loaded = dict(lora.weights.flatten_params(adapter.weights))
    for path, value in state.items():
        key = tuple(path.split("/")[1:])
        scale = 2.0 if key[-1] == lora.LORA_B else 1.0
        np.testing.assert_allclose(loaded[key], value * scale, rtol=1e-6, atol=1e-7, err_msg=path)

    # The merged export loads as a plain checkpoint whose adapted kernels moved by scale · A · B.
    _, merged = load_pretrained(tmp_path / "reference" / "merged")
    a = state["params/decoder/layers/mlp/down_proj/lora_a"]
    b = state["params/decoder/layers/mlp/down_proj/lora_b"]
    moved = np.einsum("lir,lro->lio", a, b) * 2.0
    np.testing.assert_allclose(
        np.asarray(merged["decoder"]["layers"]["mlp"]["down_proj"]["kernel"]) - moved,
        _base_kernel(tmp_path, model_dir, manifest), rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def _base_kernel(tmp_path, model_dir: str, manifest: str) -> np.ndarray:
    """The frozen base's down_proj kernel (the run's random init, drawn again)."""
    from qasr_jax import sharding
    from qasr_jax.training.step import Trainer

    cfg = _config(tmp_path, "base", model_dir, manifest)
    trainer = Trainer(load_config(model_dir), cfg.model, cfg.optim, 6, sharding.make_mesh("data=-1"))
    params = trainer.init_random_params(cfg.run.seed)
    return np.asarray(jax.device_get(params["decoder"]["layers"]["mlp"]["down_proj"]["kernel"]))


def test_adapter_config_section_is_validated(tmp_path):
    model_dir = tf.write_model_dir(tmp_path / "model", tf.tiny_config_dict())
    path = tmp_path / "c.toml"
    path.write_text(tf.train_toml(model_dir, "m.jsonl", str(tmp_path / "run")), encoding="utf-8")
    assert not load_train_config(path).adapters.enabled
    assert load_train_config(path, ["adapters.rank=8"]).adapters.enabled
    for overrides, message in (
        (["adapters.alpha=32"], "adapters.rank must be a positive number"),
        (["adapters.rank=8", "adapters.dropout=1.0"], r"adapters.dropout must be in \[0, 1\)"),
        (["adapters.rank=8", 'model.freeze=["encoder"]'], "model.freeze does not apply with adapters"),
        (["adapters.rnak=8"], r"unknown fields in \[adapters\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_train_config(path, overrides)


def test_lora_step_on_meshes_matches_single_device(tmp_path):
    """Two LoRA steps (remat, dropout, weight decay, clipping) on 8 devices equal one device; the mixed mesh
    accumulates over 2 micro-batches. The optimizer state holds moments for the adapters only."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, "-m", "tests.support.lora_mesh_check", str(tmp_path), *MESHES],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    assert result["devices"] == 8 and len(result["meshes"]) == len(MESHES)
    reference = result["reference"]
    # Adam's two moments per adapter leaf, no base leaf.
    assert reference["opt_values"] == 2 * reference["adapter_values"]
    assert reference["adapter_values"] < reference["base_values"] / 5
    for spec, r in result["meshes"].items():
        assert r["loss_rel"] <= 1e-5, (spec, r)
        assert r["adapter_rel_max"] <= 1e-5, (spec, r)
        assert r["a_moved_min"] > 1e-3, (spec, r)  # the second step moves A too
    assert any("tensor" in s for r in result["meshes"].values() for s in r["b_shardings"])
