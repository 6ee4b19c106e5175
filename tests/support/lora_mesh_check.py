"""Runs in a subprocess with 8 simulated CPU devices: LoRA train steps on meshes next to one device.

    python -m tests.support.lora_mesh_check WORK_DIR MESH_SPEC [MESH_SPEC ...]

Two optimizer steps of adapters (decoder q/k/v/o + MLP and the encoder's attention, rank 4, dropout 0.1) on the
tiny model's frozen random base, on one device and on each mesh (the last mesh with gradient accumulation over 2
micro-batches, against one device accumulating alike: dropout draws per micro-batch). The first step moves only B
(A's gradient is zero while B is), the second both. Prints one JSON object: per mesh the loss and adapter
differences, how far A moved, B's shardings, and what the optimizer state holds.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import dataclasses
import json
import sys
from typing import Any

import jax
import numpy as np

from qasr_jax import adapters, sharding
from qasr_jax.weights import flatten_params
from tests.support.mesh_fixtures import mesh_test_config, random_params, relative, synthetic_batch

SPEC = adapters.LoraSpec(
    targets=adapters.DECODER_TARGETS + adapters.ENCODER_ATTENTION_TARGETS, rank=4, alpha=8.0, dropout=0.1
)


def run(work_dir: str, specs: list[str]) -> dict[str, Any]:
    from qasr_jax.training.config import ModelConfig, OptimConfig
    from qasr_jax.training.step import Trainer

    config = mesh_test_config()
    base = random_params(config)
    batch = synthetic_batch(config)
    model_cfg = ModelConfig(checkpoint=work_dir, remat="layers")
    optim_cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=1.0)

    def two_steps(spec: str, devices: Any = None, **changes: Any) -> tuple[dict, list[float], dict]:
        trainer = Trainer(config, model_cfg, dataclasses.replace(optim_cfg, **changes), 10,
                          sharding.make_mesh(spec, devices), adapters=SPEC)  # fmt: skip
        state = trainer.init_state(base)
        losses = []
        for _ in range(2):
            state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
            losses.append(float(metrics["loss"]))
        new = {"/".join(p): np.asarray(v) for p, v in flatten_params(jax.device_get(state.params))}
        moments = [
            leaf for leaf in jax.tree_util.tree_leaves(state.opt_state) if getattr(leaf, "ndim", 0) > 0
        ]
        info = {
            "opt_arrays": len(moments),
            "opt_values": int(sum(leaf.size for leaf in moments)),
            "adapter_values": int(sum(v.size for v in new.values())),
            "base_values": int(sum(np.size(v) for v in jax.tree_util.tree_leaves(base))),
            "b_shardings": sorted({str(leaf.sharding.spec) for p, leaf in flatten_params(state.params)
                                   if p[-1] == "lora_b"}),
        }  # fmt: skip
        return new, losses, info

    initial = {"/".join(p): np.asarray(v)
               for p, v in flatten_params(adapters.init_adapters(config, SPEC, jax.random.key(0)))}  # fmt: skip
    references = {}
    out: dict[str, Any] = {"meshes": {}}
    runs = [(spec, {}) for spec in specs[:-1]] + [(specs[-1], {"grad_accum": 2})]
    for spec, changes in runs:
        # Dropout draws per micro-batch, so an accumulating mesh is compared with one device accumulating alike.
        accum = changes.get("grad_accum", 1)
        if accum not in references:
            references[accum] = two_steps("data=1", jax.devices()[:1], **changes)
            out.setdefault("reference", {"losses": references[accum][1], **references[accum][2]})
        ref, ref_losses, _ = references[accum]
        new, losses, info = two_steps(spec, **changes)
        compared = {k: relative(new[k], ref[k]) for k in ref}
        key = spec + "".join(f" {k}={v}" for k, v in changes.items())
        out["meshes"][key] = {
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "adapter_rel_max": max(compared.values()),
            "adapter_rel_worst": max(compared, key=compared.get),
            "a_moved_min": min(relative(new[k], initial[k]) for k in new if k.endswith("lora_a")),
            **info,
        }
    return out


def main() -> None:
    work_dir, *specs = sys.argv[1:]
    out = run(work_dir, specs)
    out["devices"] = jax.device_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
