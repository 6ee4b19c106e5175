"""The fine-tuning loop: set up the mesh, model, data and optimizer from a TrainConfig, resume, train, evaluate,
checkpoint and export.

Restarting the same command resumes from the newest complete checkpoint in ``run.output_dir``: params,
optimizer state, step and the data pipeline's position are restored, so the loss trajectory continues exactly
as it would have without the interruption.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from qasr_jax import adapters as lora
from qasr_jax import sharding, weights
from qasr_jax import text as text_io
from qasr_jax.config import load_config
from qasr_jax.hub import resolve_model
from qasr_jax.training import data as data_lib
from qasr_jax.training.augment import SpecAugment
from qasr_jax.training.checkpointing import Checkpoints
from qasr_jax.training.config import TrainConfig, config_to_dict, parse_condition
from qasr_jax.training.evaluate import Evaluator
from qasr_jax.training.losses import Objective
from qasr_jax.training.metrics import MetricsWriter, Progress
from qasr_jax.training.step import StepCallback, Trainer

log = logging.getLogger("qasr_jax.training")


class GateFailed(RuntimeError):
    """A ``run.gates`` check failed: the run stops (its last checkpoint stays) and says which and by how much."""


# The CTC blank of the auxiliary loss: an added token of the released vocabulary that transcription never uses.
CTC_BLANK_TOKEN = "<tts_pad>"


def _load_params(cfg: TrainConfig, checkpoint: str, trainer: Trainer) -> Any:
    if cfg.model.init == "random":
        return trainer.init_random_params(cfg.run.seed)
    _, params = sharding.load_sharded(checkpoint, trainer.mesh, trainer.rules, dtype=trainer.param_dtype)
    return params


def train(cfg: TrainConfig, callbacks: Sequence[StepCallback] = ()) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns the last train and eval metrics.

    ``callbacks`` are called after every step with ``(step, metrics)`` (metrics as floats; calling them waits
    for the step to finish).
    """
    if cfg.mesh.distributed:
        jax.distributed.initialize()
    run_dir = os.path.abspath(cfg.run.output_dir)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_to_dict(cfg), f, indent=2)

    mesh = sharding.make_mesh(cfg.mesh.spec)
    rules = sharding.merge_rules(cfg.mesh.rules)
    # A Hub model name is fetched into (or read from) the hub cache; the name itself stays the adapter's base.
    checkpoint = resolve_model(cfg.model.checkpoint, cfg.model.revision or None)
    config = load_config(checkpoint)
    if (cfg.run.objective == "aligner") != config.is_aligner:
        raise ValueError(
            f"run.objective = {cfg.run.objective!r} does not fit {cfg.model.checkpoint} "
            f"({'an aligner' if config.is_aligner else 'an ASR model'})"
        )
    tokenizer = text_io.Tokenizer.from_pretrained(checkpoint)
    tokens = data_lib.Tokenization(tokenizer, config, cfg.run.ctc_merges)
    shapes = data_lib.Shapes(config, cfg.data.token_multiple, cfg.data.label_multiple)
    train_report = data_lib.read_manifest(
        cfg.data.train_manifest, tokens, cfg.run.objective, cfg.data.max_audio_seconds
    )
    plan = data_lib.BatchPlan(
        train_report.examples, shapes, cfg.data.batch_size, cfg.run.steps, cfg.data.seed, cfg.data.sort_window
    )
    blank = tokenizer.token_to_id(CTC_BLANK_TOKEN)
    loader = data_lib.BatchLoader(plan.examples, tokens, sharding.process_rows(cfg.data.batch_size),
                                  blank if cfg.run.frame_weight > 0 else None)  # fmt: skip
    batches = data_lib.train_iterator(plan, loader, cfg.data.num_threads, cfg.data.prefetch)

    if (cfg.run.ctc_weight > 0 or cfg.run.frame_weight > 0) and blank is None:
        raise ValueError(
            f"run.ctc_weight and run.frame_weight need the token {CTC_BLANK_TOKEN} in {cfg.model.checkpoint}'s tokenizer"
        )
    augment = SpecAugment(**dataclasses.asdict(cfg.augment))
    objective = Objective(
        cfg.run.ce_weight, cfg.run.ctc_weight, blank or 0, cfg.run.frame_weight, augment if augment.active else None
    )
    adapter_spec = None
    if cfg.adapters.enabled:
        a = cfg.adapters
        adapter_spec = lora.LoraSpec(a.targets, a.rank, a.alpha, a.dropout)
    trainer = Trainer(config, cfg.model, cfg.optim, cfg.run.steps, mesh, rules, objective, cfg.run.seed,
                      adapter_spec)  # fmt: skip
    evaluator = None
    if cfg.data.eval_manifest:
        eval_report = data_lib.read_manifest(
            cfg.data.eval_manifest, tokens, cfg.run.objective, cfg.data.max_audio_seconds
        )
        if eval_report.examples:
            evaluator = Evaluator(
                trainer, eval_report.examples, data_lib.BatchLoader(eval_report.examples, tokens), shapes,
                cfg.data.eval_batch_size, cfg.run.objective, tokenizer, cfg.run.eval_max_new_tokens,
                transcribe=cfg.run.ce_weight > 0,
            )  # fmt: skip

    checkpoints = Checkpoints(
        os.path.join(run_dir, "checkpoints"), cfg.run.keep_last, cfg.run.async_checkpointing
    )
    metrics_log = MetricsWriter(os.path.join(run_dir, "metrics.jsonl"), enabled=is_main)
    latest = checkpoints.latest_step()
    bad_rows = 0
    stopped = None
    stop_marker = os.path.join(run_dir, "stopped.json")
    if latest is not None:
        state, data_state, meta = checkpoints.restore(latest, trainer.abstract_state())
        if adapter_spec is not None:  # checkpoints hold the adapters; the frozen base is read again
            trainer.set_base(_load_params(cfg, checkpoint, trainer))
        batches.set_state(data_state)
        bad_rows = int(meta.get("bad_rows", 0))
        if os.path.exists(stop_marker):
            with open(stop_marker, encoding="utf-8") as f:
                marker = json.load(f)
            if marker.get("step") == latest:
                stopped = marker.get("stop_when")
        log.info("resumed from %s at step %d", checkpoints.directory, latest)
    else:
        state = trainer.init_state(_load_params(cfg, checkpoint, trainer))
        metrics_log.write("data", 0, {
            "train_rows": len(train_report.examples), "skipped_rows": len(train_report.skipped),
            **{f"skipped/{k}": v for k, v in train_report.reasons.items()},
        })  # fmt: skip
    start = int(jax.device_get(state.step))
    stop_when = parse_condition(cfg.run.stop_when) if cfg.run.stop_when else None
    gates = [parse_condition(text, gate=True) for text in cfg.run.gates]
    # Gates whose step has passed were checked before the interruption this run resumes from.
    open_gates = [g for g in gates if g.step > start]

    progress = Progress(cfg.run.steps, initial=start, enabled=cfg.run.progress and is_main)
    pending: list[tuple[int, dict[str, jax.Array], dict[str, float]]] = []
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    interval_start = time.perf_counter()
    step = start
    finished = bool(stopped) and stopped == cfg.run.stop_when
    if finished:
        log.info("the run ended at step %d (stop_when %r was met); exporting", start, stopped)
    try:
        while step < cfg.run.steps and not finished:
            loaded = next(batches)
            batch_info = {
                "examples": float(len(loaded.batch.wave_lengths) * jax.process_count()),
                "audio_seconds": float(np.sum(loaded.batch.wave_lengths)) / 16000.0 * jax.process_count(),
                "bad_rows": int(np.sum(loaded.failed)),
            }
            state, metrics = trainer.train_step(state, trainer.shard_batch(loaded.batch))
            step += 1
            bad_rows += batch_info["bad_rows"]
            pending.append((step, metrics, batch_info))
            if callbacks or step % cfg.run.log_every == 0 or step == cfg.run.steps:
                last_train = _flush(pending, metrics_log, progress, interval_start, bad_rows)
                interval_start = time.perf_counter()
                for callback in callbacks:
                    callback(step, last_train)
            if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.steps:
                checkpoints.save(step, state, batches.get_state(), {"bad_rows": bad_rows})
            if evaluator is not None and (
                (cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == cfg.run.steps
            ):
                last_eval = evaluator.evaluate(trainer.model_params(state.params))
                metrics_log.write("eval", step, last_eval)
                for gate in [g for g in open_gates if g.step <= step]:
                    open_gates.remove(gate)
                    held = gate.holds(last_eval)
                    metrics_log.write("gate", step, {"passed": float(bool(held)),
                                                     gate.metric: float(last_eval.get(gate.metric, "nan"))})  # fmt: skip
                    if not held:
                        checkpoints.wait()
                        raise GateFailed(
                            f"gate {gate.text!r} failed at step {step}: {gate.metric} = "
                            f"{last_eval.get(gate.metric, 'not measured')}"
                        )
                    log.info("gate %r passed at step %d", gate.text, step)
                if stop_when is not None and stop_when.holds(last_eval):
                    log.info("stop_when %r met at step %d: %s = %s", stop_when.text, step, stop_when.metric,
                             last_eval[stop_when.metric])  # fmt: skip
                    if not (cfg.run.save_every and step % cfg.run.save_every == 0):
                        checkpoints.save(step, state, batches.get_state(), {"bad_rows": bad_rows})
                    checkpoints.wait()
                    # A marker beside the checkpoints: a rerun exports this step instead of training on.
                    if is_main:
                        with open(stop_marker, "w", encoding="utf-8") as f:
                            json.dump({"step": step, "stop_when": stop_when.text}, f)
                    break
        checkpoints.wait()
        if cfg.run.export_dir and adapter_spec is not None:
            out = lora.save_peft(cfg.run.export_dir, config, state.params, adapter_spec.rank, adapter_spec.alpha,
                                 adapter_spec.dropout, base_model=cfg.model.checkpoint)  # fmt: skip
            log.info("exported the adapter to %s", out)
        elif cfg.run.export_dir:
            out = weights.export_pretrained(
                cfg.run.export_dir, config, state.params, checkpoint, cfg.run.export_dtype
            )
            log.info("exported the trained model to %s", out)
        if adapter_spec is not None and cfg.adapters.export_merged:
            merged = lora.merge_adapter(trainer.base, state.params, adapter_spec.scale)
            out = weights.export_pretrained(
                cfg.adapters.export_merged, config, merged, checkpoint, cfg.run.export_dtype
            )
            log.info("exported the base with the adapter merged in to %s", out)
    finally:
        progress.close()
        checkpoints.close()
    return {"train": last_train, "eval": last_eval, "step": step}


def _flush(
    pending: list[tuple[int, dict[str, jax.Array], dict[str, float]]],
    metrics_log: MetricsWriter,
    progress: Progress,
    interval_start: float,
    bad_rows: int,
) -> dict[str, Any]:
    """Write one record per pending step (waiting for them), update the bar, clear ``pending``."""
    if not pending:
        return {}
    fetched = jax.device_get([m for _, m, _ in pending])
    seconds = max(time.perf_counter() - interval_start, 1e-9)
    examples = sum(info["examples"] for _, _, info in pending)
    audio_seconds = sum(info["audio_seconds"] for _, _, info in pending)
    record: dict[str, Any] = {}
    for i, ((step, _, _), values) in enumerate(zip(pending, fetched)):
        record = {k: float(v) for k, v in values.items()}
        record.update(
            examples_per_second=examples / seconds,
            audio_seconds_per_second=audio_seconds / seconds,
            bad_rows=bad_rows,
        )
        metrics_log.write("train", step, record, echo=i == len(pending) - 1)
    progress.update(len(pending), loss=record.get("loss", record.get("ctc_loss")),
                    ex_per_s=record["examples_per_second"])  # fmt: skip
    pending.clear()
    return record


__all__ = ["GateFailed", "train"]
