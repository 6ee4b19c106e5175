"""One train step and a checkpoint round trip, in one process or as one of two processes (4 CPU devices each).

    python -m tests.support.multihost_train multi WORK_DIR PORT PROCESS_ID
    python -m tests.support.multihost_train single WORK_DIR

``multi``: joins a 2-process run at 127.0.0.1:PORT; the mesh ``data=2,fsdp=2,tensor=2`` spans the 8 devices of
both processes; each process feeds its own rows of the batch (``sharding.process_rows``). One AdamW step, then
the state is saved with ``train.checkpointing.Checkpoints`` (every process writes its shards) and restored into
its shardings. Process 0 writes ``WORK_DIR/multi.npz`` (the stepped params) and prints a JSON object.

``single``: the same step on one device (``single.npz``), then the checkpoint the two processes wrote restored
onto that one device; prints a JSON object comparing both with the two-process params.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import json
from typing import Any

import jax
import numpy as np

MULTI_MESH = "data=2,fsdp=2,tensor=2"


def flat(tree: Any) -> dict[str, np.ndarray]:
    from qasr_jax.weights import flatten_params

    return {"/".join(p): np.asarray(v) for p, v in flatten_params(tree)}


def trainer_for(mesh: Any) -> tuple[Any, Any, Any]:
    from qasr_jax.training.config import ModelConfig, OptimConfig
    from qasr_jax.training.step import Trainer
    from tests.support.mesh_fixtures import mesh_test_config, random_params, synthetic_batch

    config = mesh_test_config()
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.1, clip_norm=1.0)
    trainer = Trainer(config, ModelConfig(checkpoint="unused"), optim, 10, mesh)
    return trainer, random_params(config), synthetic_batch(config)


def gathered(tree: Any) -> Any:
    """Every process's copy of a tree of global arrays (spread over the processes' devices)."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def run_multi(work_dir: str, port: str, process_id: int) -> dict[str, Any]:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    from qasr_jax import sharding
    from qasr_jax.training.checkpointing import Checkpoints

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    trainer, params, batch = trainer_for(sharding.make_mesh(MULTI_MESH))
    rows = sharding.process_rows(batch.input_ids.shape[0])
    local = jax.tree_util.tree_map(lambda x: x[rows], batch)
    state = trainer.init_state(params)
    state, metrics = trainer.train_step(state, trainer.shard_batch(local))
    stepped = flat(gathered(state.params))
    metrics = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}  # replicated

    checkpoints = Checkpoints(os.path.join(work_dir, "checkpoints"), keep_last=1)
    checkpoints.save(1, state, {"position": 8}, {"processes": 2})
    checkpoints.wait()
    restored, data_state, meta = checkpoints.restore(1, trainer.abstract_state())
    checkpoints.close()
    again = flat(gathered(restored.params))
    out = {
        "process": jax.process_index(),
        "rows": [rows.start, rows.stop],
        "metrics": metrics,
        "restored_step": int(np.asarray(restored.step.addressable_data(0))),
        "restored_equal": all(np.array_equal(again[k], stepped[k]) for k in stepped),
        "opt_state_equal": all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree_util.tree_leaves(gathered(restored.opt_state)),
                jax.tree_util.tree_leaves(gathered(state.opt_state)),
            )
        ),
        "data_state": data_state,
        "meta": meta,
        "sharded_across_processes": sum(
            not leaf.is_fully_addressable for leaf in jax.tree_util.tree_leaves(state.params)
        ),
    }
    if jax.process_index() == 0:
        np.savez(os.path.join(work_dir, "multi.npz"), **stepped)
    jax.distributed.shutdown()
    return out


def run_single(work_dir: str) -> dict[str, Any]:
    from qasr_jax import sharding
    from qasr_jax.training.checkpointing import Checkpoints
    from tests.support.mesh_fixtures import ZERO_GRADIENT_LEAVES, relative

    trainer, params, batch = trainer_for(sharding.make_mesh("data=1", jax.devices()[:1]))
    before = flat(params)
    state = trainer.init_state(params)
    state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    single = flat(jax.device_get(state.params))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}

    checkpoints = Checkpoints(os.path.join(work_dir, "checkpoints"), keep_last=1, async_save=False)
    restored, _, _ = checkpoints.restore(checkpoints.latest_step(), trainer.abstract_state())
    checkpoints.close()
    from_checkpoint = flat(jax.device_get(restored.params))
    with np.load(os.path.join(work_dir, "multi.npz")) as saved:
        multi = {k: saved[k] for k in saved.files}

    compared = [k for k in single if k not in ZERO_GRADIENT_LEAVES]
    return {
        "metrics": metrics,
        "param_rel_max": max(relative(multi[k], single[k]) for k in compared),
        "restored_rel_max": max(relative(from_checkpoint[k], single[k]) for k in compared),
        "restored_equals_multi": all(np.array_equal(from_checkpoint[k], multi[k]) for k in multi),
        "zero_gradient_leaf_step": max(
            float(np.max(np.abs(multi[k] - before[k]))) for k in ZERO_GRADIENT_LEAVES
        ),
        "changed_leaves": sum(not np.array_equal(single[k], before[k]) for k in single),
        "leaves": len(single),
    }


def main() -> None:
    mode, work_dir, *rest = sys.argv[1:]
    out = run_multi(work_dir, rest[0], int(rest[1])) if mode == "multi" else run_single(work_dir)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
