"""Runs in a subprocess with 8 simulated CPU devices: sharded results next to single-device ones.

    python -m tests.support.train_mesh_check train|infer|api|stream WORK_DIR MESH_SPEC [MESH_SPEC ...]

``train``: one optimizer step of the tiny model on a fixed batch, on one device and on each mesh (the last mesh
with gradient accumulation over 2 micro-batches). ``infer``: logits of
the full forward pass and greedy tokens from a checkpoint dir loaded with ``sharding.load_sharded`` (released
safetensors and Orbax), on each mesh, against ``load_pretrained`` on one device. Prints one JSON object.
"""

from __future__ import annotations

import os

# Before jax is imported: 8 CPU devices and exact fp32 matmuls (the process must not inherit a 1-device setup).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import dataclasses
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax import sharding
from qasr_jax.weights import flatten_params
from tests.support.mesh_fixtures import (
    ZERO_GRADIENT_LEAVES,
    mesh_test_config,
    random_params,
    relative,
    synthetic_batch,
)


def run_train(work_dir: str, specs: list[str]) -> dict[str, Any]:
    from qasr_jax.training.config import ModelConfig, OptimConfig
    from qasr_jax.training.step import Trainer

    config = mesh_test_config()
    params = random_params(config)
    batch = synthetic_batch(config)
    model_cfg = ModelConfig(checkpoint=work_dir)
    optim_cfg = OptimConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.1, clip_norm=1.0)

    def one_step(spec: str, devices: Any = None, **changes: Any) -> tuple[dict, dict, float]:
        started = time.perf_counter()
        optim_c = dataclasses.replace(optim_cfg, **changes)
        trainer = Trainer(config, model_cfg, optim_c, 10, sharding.make_mesh(spec, devices))
        state = trainer.init_state(params)
        state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
        new = {"/".join(p): np.asarray(v) for p, v in flatten_params(jax.device_get(state.params))}
        return new, {k: float(v) for k, v in jax.device_get(metrics).items()}, time.perf_counter() - started

    ref_params, ref_metrics, ref_seconds = one_step("data=1", jax.devices()[:1])
    before = {"/".join(p): v for p, v in flatten_params(params)}
    out: dict[str, Any] = {"reference": {"metrics": ref_metrics, "seconds": ref_seconds}, "meshes": {}}
    # The last mesh accumulates gradients over 2 micro-batches: still the same update as one device.
    runs = [(spec, {}) for spec in specs[:-1]] + [(specs[-1], {"grad_accum": 2})]
    for spec, changes in runs:
        new, metrics, seconds = one_step(spec, **changes)
        compared = {k: relative(new[k], ref_params[k]) for k in ref_params if k not in ZERO_GRADIENT_LEAVES}
        key = spec + "".join(f" {k}={v}" for k, v in changes.items())
        out["meshes"][key] = {
            "seconds": seconds,
            "loss_rel": abs(metrics["loss"] - ref_metrics["loss"]) / abs(ref_metrics["loss"]),
            "grad_norm_rel": abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) / ref_metrics["grad_norm"],
            "param_rel_max": max(compared.values()),
            "param_rel_worst": max(compared, key=compared.get),
            # Bounded by the learning rate whatever the rounding noise is.
            "zero_gradient_leaf_step": max(
                float(np.max(np.abs(new[k] - before[k]))) for k in ZERO_GRADIENT_LEAVES
            ),
        }
    return out


def run_infer(work_dir: str, specs: list[str]) -> dict[str, Any]:
    from qasr_jax.engine import DecodeOptions, DecodeRequest, Engine
    from qasr_jax.model import Qwen3ASR
    from qasr_jax.weights import export_pretrained, load_pretrained, save_params
    from tests.support.train_fixtures import DEMO_ASR_DIR

    config = mesh_test_config()
    released = export_pretrained(os.path.join(work_dir, "released"), config, random_params(config, seed=1),
                                 DEMO_ASR_DIR, dtype="float32")  # fmt: skip
    orbax_dir = os.path.join(work_dir, "orbax")
    os.makedirs(orbax_dir, exist_ok=True)
    _, single_params = load_pretrained(released)
    save_params(os.path.join(orbax_dir, "params"), single_params)
    with open(os.path.join(released, "config.json"), encoding="utf-8") as f:
        config_text = f.read()
    with open(os.path.join(orbax_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config_text)

    batch = synthetic_batch(config, seed=3)
    frames = 200
    from qasr_jax import audio

    features, feature_frames = audio.log_mel(jnp.asarray(batch.waveforms), jnp.asarray(batch.wave_lengths),
                                             frames=frames)  # fmt: skip
    feature_mask = (np.arange(frames)[None, :] < np.asarray(feature_frames)[:, None]).astype(np.int32)
    inputs = (batch.input_ids, batch.attention_mask, np.asarray(features), feature_mask)
    model = Qwen3ASR(config)
    forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    options = DecodeOptions(eos_token_ids=(), pad_token_id=0)
    # Greedy decoding of each row's valid prefix as its prompt, 12 tokens.
    requests = [
        DecodeRequest(
            batch.waveforms[r, : batch.wave_lengths[r]],
            batch.input_ids[r, : int(batch.attention_mask[r].sum())].tolist(),
            12,
        )
        for r in range(batch.input_ids.shape[0])
    ]

    ref_logits = np.asarray(forward(single_params, *inputs))
    ref_tokens = [g.token_ids for g in Engine(config, options=options).run(single_params, requests)]
    out: dict[str, Any] = {"meshes": {}}
    for spec in specs:
        started = time.perf_counter()
        mesh = sharding.make_mesh(spec)
        result: dict[str, Any] = {}
        for layout, path in (("released", released), ("orbax", orbax_dir)):
            _, params = sharding.load_sharded(path, mesh)
            result[f"{layout}_params_equal"] = all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(single_params))
            )
        result["sharded_leaves"] = sum(
            any(axis is not None for axis in leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(params)
        )
        with sharding.use_mesh(mesh):
            logits = np.asarray(forward(params, *sharding.shard_batch(inputs, mesh)))
            tokens = [g.token_ids for g in Engine(config, options=options, mesh=mesh).run(params, requests)]
        result["logits_rel"] = relative(logits, ref_logits)
        result["logits_max_abs"] = float(np.max(np.abs(logits - ref_logits)))
        result["tokens_equal"] = tokens == ref_tokens
        result["seconds"] = time.perf_counter() - started
        out["meshes"][spec] = result
    return out


def run_api(work_dir: str, specs: list[str]) -> dict[str, Any]:
    """``Qwen3ASRModel.from_pretrained(..., mesh=spec).transcribe`` against the single-device model."""
    from qasr_jax.asr import Qwen3ASRModel
    from qasr_jax.weights import export_pretrained
    from tests.support.speech import MEDIUM_EN, SHORT_EN, synth
    from tests.support.train_fixtures import DEMO_ASR_DIR

    config = mesh_test_config()
    released = export_pretrained(os.path.join(work_dir, "released"), config, random_params(config, seed=2),
                                 DEMO_ASR_DIR, dtype="float32")  # fmt: skip
    clips = [(synth(SHORT_EN), 16000), (synth(MEDIUM_EN), 16000)]
    kwargs = dict(max_new_tokens=10, eos_token_ids=())

    def run(mesh: Any) -> list[tuple[str, str]]:
        model = Qwen3ASRModel.from_pretrained(released, mesh=mesh, **kwargs)
        return [(r.language, r.text) for r in model.transcribe(clips, language=[None, "English"])]

    reference = run(None)
    out: dict[str, Any] = {"reference": reference, "meshes": {}}
    for spec in specs:
        out["meshes"][spec] = {"equal": run(spec) == reference}
    return out


def run_stream(work_dir: str, specs: list[str]) -> dict[str, Any]:
    """Live streams on a model loaded with ``mesh=``: one stream through the streaming API, and three streams
    updated together by a ``StreamScheduler``, against the single-device model."""
    from qasr_jax.asr import Qwen3ASRModel
    from qasr_jax.serve.streams import StreamScheduler
    from qasr_jax.weights import export_pretrained
    from tests.support.speech import LONG_EN, MEDIUM_EN, SHORT_EN, synth
    from tests.support.train_fixtures import DEMO_ASR_DIR

    config = mesh_test_config()
    released = export_pretrained(os.path.join(work_dir, "released"), config, random_params(config, seed=2),
                                 DEMO_ASR_DIR, dtype="float32")  # fmt: skip
    clips = [synth(MEDIUM_EN), synth(SHORT_EN), synth(LONG_EN)[: 9 * 16000]]
    piece = int(0.7 * 16000)

    def updates(state: Any) -> list[Any]:
        return [[u.chunk_index, u.language, u.text, u.prefix, list(u.token_ids), list(u.logprobs)]
                for u in state.updates]  # fmt: skip

    def run(mesh: Any) -> dict[str, Any]:
        model = Qwen3ASRModel.from_pretrained(released, mesh=mesh, max_new_tokens=8, eos_token_ids=())
        state = model.init_streaming_state(chunk_size_sec=1.0)
        for start in range(0, len(clips[0]), piece):
            model.streaming_transcribe(clips[0][start : start + piece], state)
        model.finish_streaming_transcribe(state)
        engine = StreamScheduler(model.streamer, max_batch=4)
        streams = [engine.open(chunk_size_sec=1.0) for _ in clips]
        for stream, clip in zip(streams, clips):
            engine.feed(stream, clip)
            engine.finish(stream)
        engine.run_until_idle()
        assert all(stream.error is None for stream in streams), [stream.error for stream in streams]
        cache = streams[-1].state.cache.kv[0]["k"] if streams[-1].state.cache.kv else None
        return {"lone": updates(state), "many": [updates(stream.state) for stream in streams],
                "cache_devices": len(cache.sharding.device_set) if cache is not None else 0}  # fmt: skip

    reference = run(None)
    out: dict[str, Any] = {"reference": reference, "meshes": {}}
    for spec in specs:
        got = run(spec)

        def same(a: list, b: list) -> bool:  # equal but the log-probabilities, those to 1e-4
            return len(a) == len(b) and all(
                x[:5] == y[:5] and np.allclose(x[5], y[5], atol=1e-4) for x, y in zip(a, b)
            )

        out["meshes"][spec] = {
            "lone_equal": same(got["lone"], reference["lone"]),
            "many_equal": [same(g, r) for g, r in zip(got["many"], reference["many"])],
            "cache_devices": got["cache_devices"],
        }
    return out


def run_align(work_dir: str, specs: list[str]) -> dict[str, Any]:
    """``Qwen3ForcedAligner.from_pretrained(..., mesh=spec).align`` against the single-device aligner."""
    from qasr_jax.aligner import Qwen3ForcedAligner
    from tests.support import official
    from tests.support.speech import MEDIUM_EN, SHORT_EN, synth

    path = official.build_checkpoint(os.path.join(work_dir, "aligner"), official.small_aligner_config(), seed=3)
    pairs = [(synth(SHORT_EN), 16000), (synth(MEDIUM_EN), 16000)], [SHORT_EN, MEDIUM_EN], ["English", "English"]

    def run(mesh: Any) -> list[list[tuple[str, float, float]]]:
        aligner = Qwen3ForcedAligner.from_pretrained(path, mesh=mesh)
        return [[(w.text, w.start_time, w.end_time) for w in r] for r in aligner.align(*pairs)]

    reference = run(None)
    return {"reference": reference, "meshes": {spec: {"equal": run(spec) == reference} for spec in specs}}


def main() -> None:
    mode, work_dir, *specs = sys.argv[1:]
    runners = {"train": run_train, "infer": run_infer, "api": run_api, "stream": run_stream,
               "align": run_align}  # fmt: skip
    out = runners[mode](work_dir, specs)
    out["devices"] = jax.device_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
