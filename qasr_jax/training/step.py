"""The train state and the compiled train/eval steps on a device mesh.

One step: the global batch (sharded over ``data``×``fsdp``) is cut into ``grad_accum`` micro-batches that are
processed one after another (``lax.scan``), each spread over every device; gradients and loss are summed and
divided by the batch's total target weight, so accumulation gives the same update as one big batch. Frozen
parts get no gradient computation (``stop_gradient``) and no optimizer update.

With adapters (``qasr_jax.adapters.LoraSpec``) the state's params are the adapters alone: the base params are an
argument of the step, never differentiated and without optimizer state, and each forward pass applies
``adapters.combine(base, adapters, alpha / rank)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from qasr_jax import adapters as lora
from qasr_jax import sharding, weights
from qasr_jax.config import ThinkerConfig
from qasr_jax.model import Qwen3ASR
from qasr_jax.training import losses
from qasr_jax.training.config import ModelConfig, OptimConfig
from qasr_jax.training.data import Batch
from qasr_jax.training.optim import make_optimizer, trainable_mask

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
    """Everything a step updates: the step count, master params and optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def build_model(config: ThinkerConfig, cfg: ModelConfig, lora_dropout: float = 0.0) -> Qwen3ASR:
    """The model with the compute/param dtypes and rematerialisation of the train config."""
    return Qwen3ASR(
        config,
        dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        attention_impl=cfg.attention_impl,
        remat=cfg.remat == "layers",
        lora_dropout=lora_dropout,
    )


def _micro_batches(batch: Batch, count: int) -> Batch:
    """``[B, ...]`` → ``[count, B / count, ...]`` taking every count-th row, so each micro-batch keeps rows on
    every device of the batch axis."""
    return jax.tree_util.tree_map(
        lambda x: x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1), batch
    )


class Trainer:
    """Compiled steps for one model, optimizer and mesh.

    ``init_state(params)`` → TrainState placed on the mesh; ``train_step(state, batch)`` → (state, metrics);
    ``eval_step(params, batch)`` → (argmax predictions ``[B, L]``, loss sums). Batches are global arrays from
    ``sharding.shard_batch``.
    """

    def __init__(
        self,
        config: ThinkerConfig,
        model_cfg: ModelConfig,
        optim_cfg: OptimConfig,
        total_steps: int,
        mesh: Mesh,
        rules: sharding.Rules = sharding.DEFAULT_RULES,
        objective: losses.Objective | None = None,
        seed: int = 0,
        adapters: lora.LoraSpec | None = None,
    ) -> None:
        """``objective``: the loss weights (``losses.Objective``; None: CE only). ``seed``: the augmentation's
        draws (a step's are a function of the seed and the step, so a resumed run draws the same), and the
        adapters' initial draw. ``adapters``: train LoRA adapters on the frozen base instead of the params."""
        self.config = config
        self.seed = seed
        self.objective = objective or losses.Objective()
        self.adapters = adapters
        self.model = build_model(config, model_cfg, adapters.dropout if adapters else 0.0)
        self.mesh = mesh
        self.rules = rules
        self.grad_accum = optim_cfg.grad_accum
        self.freeze = tuple(model_cfg.freeze)
        self.base_shardings = sharding.param_shardings(config, mesh, rules)
        self.param_dtype = DTYPES[model_cfg.param_dtype]
        self.base: Any = None  # the frozen base params (adapters only; ``set_base``)
        if adapters is None:
            self.param_shardings = self.base_shardings
            shapes = weights.abstract_params(config)
            self.trained_dtype = self.param_dtype
        else:
            self.param_shardings = lora.adapter_shardings(config, adapters, mesh, rules)
            shapes = lora.abstract_adapters(config, adapters)
            self.trained_dtype = jnp.float32
        self.abstract_params = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, self.trained_dtype, sharding=sh),
            shapes,
            self.param_shardings,
        )
        self.tx, self.schedule = make_optimizer(optim_cfg, total_steps, self.abstract_params, self.freeze)
        self.trainable = trainable_mask(shapes, self.freeze)
        replicated = sharding.replicated(mesh)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        # Optimizer moments are placed like their params; counters and the like are replicated. Frozen parts
        # hold MaskedNode placeholders (no state), which stay as they are.
        opt_shardings = optax.tree_utils.tree_map_params(
            self.tx,
            lambda leaf, s: leaf if isinstance(leaf, optax.MaskedNode) else s,
            abstract_opt,
            self.param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
        self.state_shardings = TrainState(
            step=replicated, params=self.param_shardings, opt_state=opt_shardings
        )
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._train = jax.jit(
            self._train_step, out_shardings=(self.state_shardings, replicated), donate_argnums=0
        )
        self._init_adapters = jax.jit(
            lambda: lora.init_adapters(config, adapters, jax.random.key(seed)), out_shardings=self.param_shardings
        ) if adapters is not None else None  # fmt: skip
        self._eval = jax.jit(self._eval_step, out_shardings=replicated)
        self._audio_use = jax.jit(
            lambda params, batch: losses.audio_use(self.model, params, batch, self.objective.blank_id),
            out_shardings=replicated,
        )

    # -- state --

    def _init_state(self, params: Any) -> TrainState:
        params = jax.tree_util.tree_map(lambda p: p.astype(self.trained_dtype), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def init_state(self, params: Any) -> TrainState:
        """A fresh state around ``params`` (any placement; they are moved into the mesh's shardings). With
        adapters, ``params`` become the frozen base and the state holds freshly drawn adapters."""
        if self.adapters is not None:
            self.set_base(params)
            with sharding.use_mesh(self.mesh, self.rules):
                params = self._init_adapters()
        params = sharding.shard_params(params, self.param_shardings)
        with sharding.use_mesh(self.mesh, self.rules):
            return self._init(params)

    def set_base(self, params: Any) -> None:
        """The frozen base params of adapter training (placed in the mesh's shardings, ``model.param_dtype``)."""
        params = lora.strip_adapters(params)
        params = jax.tree_util.tree_map(lambda p: p.astype(self.param_dtype), params)
        self.base = sharding.shard_params(params, self.base_shardings)

    def model_params(self, params: Any) -> Any:
        """The params the model applies for the state's ``params``: themselves, or base + adapters (scaled)."""
        if self.adapters is None:
            return params
        if self.base is None:
            raise ValueError("adapter training needs its base params: call init_state or set_base first")
        return lora.combine(self.base, params, self.adapters.scale)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (the target of a checkpoint restore)."""
        shapes = jax.eval_shape(self._init_state, self.abstract_params)
        return jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )

    def init_random_params(self, seed: int) -> Any:
        """Params from the model's own initialisers, created directly in their shardings.

        The "rbg" generator compiles several times faster than the default on CPU; its values depend on the
        seed and, unlike the default's, may also depend on the mesh shape.
        """
        cfg = self.config

        def init() -> Any:
            ids = jnp.zeros((1, 4), jnp.int32)
            feats = jnp.zeros((1, cfg.audio.num_mel_bins, cfg.audio.chunk_frames), jnp.float32)
            fmask = jnp.ones((1, cfg.audio.chunk_frames), jnp.int32)
            variables = self.model.init(
                jax.random.key(seed, impl="rbg"), ids, jnp.ones_like(ids), feats, fmask
            )
            return flax.core.meta.unbox(variables["params"])

        with sharding.use_mesh(self.mesh, self.rules):
            return jax.jit(init, out_shardings=self.base_shardings)()

    # -- steps --

    def _masked_params(self, params: Any) -> Any:
        if not self.freeze:
            return params
        return jax.tree_util.tree_map(
            lambda p, t: p if t else jax.lax.stop_gradient(p), params, self.trainable
        )

    def _train_step(
        self, state: TrainState, batch: Batch, base: Any = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:

        # Each loss is divided by its total over the whole batch, so the micro-batches' gradients add up.
        ce_total = jnp.maximum(jnp.sum(batch.label_weights.astype(jnp.float32)), 1e-9)
        ctc_total = jnp.maximum(losses.ctc_label_count(self.config.audio, batch), 1e-9)
        frame_total = None
        if batch.frame_weights is not None:
            frame_total = jnp.maximum(jnp.sum(batch.frame_weights.astype(jnp.float32)), 1e-9)

        # The augmentation's draws: one key per step (and micro-batch), from the run's seed.
        step_key = jax.random.fold_in(jax.random.key(self.seed), state.step)

        def objective(params: Any, micro: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
            if self.adapters is not None:
                params = lora.combine(jax.lax.stop_gradient(base), params, self.adapters.scale)
            return losses.loss_sums(
                self.model,
                self._masked_params(params),
                micro,
                self.objective,
                ce_total,
                ctc_total,
                frame_total,
                key,
            )

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if self.grad_accum == 1:
            (_, counts), grads = grad_fn(state.params, batch, step_key)
        else:

            def accumulate(carry: tuple, xs: tuple[Batch, jax.Array]) -> tuple[tuple, None]:
                grads_sum, totals = carry
                micro, index = xs
                (_, counts), grads = grad_fn(state.params, micro, jax.random.fold_in(step_key, index))
                grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
                return (grads_sum, jax.tree_util.tree_map(jnp.add, totals, counts)), None

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            micro = _micro_batches(batch, self.grad_accum)
            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            count_zeros = jax.tree_util.tree_map(
                lambda c: jnp.zeros(c.shape, jnp.float32),
                jax.eval_shape(objective, state.params, first, step_key)[1],
            )
            indices = jnp.arange(self.grad_accum, dtype=jnp.int32)
            (grads, counts), _ = jax.lax.scan(accumulate, (zeros, count_zeros), (micro, indices))
        # A batch whose rows all failed to load has no targets: its update is zero rather than NaN.
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "targets": counts["weight"],
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": self.schedule(state.step),
        }
        if "ce" in counts:
            metrics["loss"] = counts["ce"] / ce_total
            metrics["accuracy"] = counts["correct"] / ce_total
        if "ctc" in counts:
            metrics["ctc_loss"] = counts["ctc"] / ctc_total
            metrics["ctc_labels"] = counts["ctc_labels"]
        if "frame" in counts:
            metrics["frame_loss"] = counts["frame"] / jnp.maximum(counts["frames"], 1e-9)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update (``state`` is donated: do not use it afterwards)."""
        with sharding.use_mesh(self.mesh, self.rules):
            return self._train(state, batch, self.base)

    def _eval_step(self, params: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        return losses.predictions(self.model, params, batch)

    def eval_step(self, params: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Argmax predictions at the targets ``[B, L]`` and the loss sums (``ce_sum``, ``weight``, ``correct``)."""
        with sharding.use_mesh(self.mesh, self.rules):
            return self._eval(params, batch)

    def audio_use(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """``losses.audio_use`` on a placed batch: the audio-use gauge's sums and the greedy CTC argmax."""
        with sharding.use_mesh(self.mesh, self.rules):
            return self._audio_use(params, batch)

    def shard_batch(self, batch: Batch) -> Batch:
        """Global arrays from this process's rows of a host batch."""
        return sharding.shard_batch(batch, self.mesh, self.rules)

    def compiled_programs(self) -> int:
        """Train-step programs compiled so far (one per batch shape)."""
        return self._train._cache_size()


StepCallback = Callable[[int, dict[str, float]], None]

__all__ = ["DTYPES", "StepCallback", "TrainState", "Trainer", "build_model"]
