"""Optimizer: AdamW with warmup + cosine/linear decay, global-norm clipping, weight-decay and freezing masks."""

from __future__ import annotations

from typing import Any

import jax
import optax

from qasr_jax.training.config import OptimConfig

# Which top-level param subtrees each freezable part covers (a tied head lives in embed_tokens).
PARTS: dict[str, tuple[str, ...]] = {
    "encoder": ("audio_tower",),
    "decoder": ("embed_tokens", "decoder", "lm_head"),
    "decoder_layers": ("decoder",),
}


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak (step s < warmup_steps: peak · (s + 1) / warmup_steps, so no step is wasted at
    zero), then ``decay`` to ``end_lr_ratio`` × peak at the last step (``constant`` stays at the peak)."""
    peak = cfg.learning_rate
    end = peak * cfg.end_lr_ratio
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(peak / warmup, peak, warmup - 1)
    return optax.join_schedules([ramp, decay], [warmup])


def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any) -> Any:
    """True for matrices, embeddings and adapter matrices; norms and biases are not decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _path_names(path)[-1] in ("kernel", "embedding", "lora_a", "lora_b"), params
    )


def trainable_mask(params: Any, freeze: tuple[str, ...]) -> Any:
    """True for params that train, False for the frozen parts (``PARTS``)."""
    frozen = {name for part in freeze for name in PARTS[part]}
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_names(path)[0] not in frozen, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, params: Any, freeze: tuple[str, ...] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer over ``params`` (arrays or shapes) and its learning-rate schedule.

    Frozen parts get no updates and no optimizer state; clipping uses the norm of the trainable gradients.
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    steps = []
    if cfg.clip_norm > 0:
        steps.append(optax.clip_by_global_norm(cfg.clip_norm))
    steps.append(
        optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    )
    tx = optax.chain(*steps)
    if freeze:
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable_mask(params, freeze))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


__all__ = ["PARTS", "decay_mask", "learning_rate_schedule", "make_optimizer", "trainable_mask"]
