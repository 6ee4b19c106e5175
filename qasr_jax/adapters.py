"""LoRA adapters: low-rank updates of chosen projections, trained on a frozen base, stored in the PEFT layout,
merged into the base, or served side by side in one batch.

An adapter adds ``scale · (x · A) · B`` to a projection ``x · W``: ``A [*in, rank]``, ``B [rank, *out]`` in the
layout of the projection's kernel (``W [*in, *out]``), ``scale = alpha / rank``. In the param tree an adapter is
two more leaves beside the kernel, ``lora_a`` and ``lora_b`` (``model.layers.Dense`` adds the update when they are
there), so the model runs with or without adapters through the same code; the scale is folded into ``lora_b``
before the model sees it (``combine``). Stacked layers keep their leading layer axis.

* ``LoraSpec``: which projections (patterns over the official module names), rank, alpha, dropout;
  ``select_targets`` resolves the patterns, ``init_adapters`` draws fresh adapters (A as PEFT draws it, B = 0),
  ``adapter_logical_axes`` names their axes so the mesh rules place them like their kernels.
* ``combine`` / ``merge_adapter``: base + adapter for a forward pass, or folded into the kernels for export.
* ``save_peft`` / ``load_peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` as ``peft`` writes and reads
  them for the official ``qwen-asr`` model (``base_model.model.thinker.…​.lora_A.weight [rank, in]``,
  ``lora_B.weight [out, rank]``, scaling ``lora_alpha / r``).
* ``AdapterStack``: several adapters stacked ``[adapters + 1, ...]`` (slot 0 is zeros: the base model), and
  ``select_rows`` picks each batch row's adapter, so rows with different adapters run in one program.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qasr_jax import weights
from qasr_jax.config import ThinkerConfig
from qasr_jax.errors import AdapterError, UnknownAdapterError

LORA_A = "lora_a"
LORA_B = "lora_b"
RANK_AXIS = "lora_rank"
ADAPTERS_AXIS = "adapters"

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Decoder attention and MLP projections of every layer: the usual LoRA targets.
DECODER_TARGETS = ("model.layers.*.self_attn.[qkvo]_proj", "model.layers.*.mlp.*_proj")
ENCODER_ATTENTION_TARGETS = ("audio_tower.layers.*.self_attn.*_proj",)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how. ``targets``: patterns over the official model's module names
    (``thinker.model.layers.3.self_attn.q_proj``); a pattern matches a name it equals or ends with after a dot,
    as peft's ``target_modules`` list does, and may hold ``*``/``?``/``[...]`` wildcards (``model.layers.*.mlp.*``).
    ``rank``, ``alpha``: the update is scaled by ``alpha / rank``. ``dropout``: on the adapters' input in
    training."""

    targets: tuple[str, ...] = DECODER_TARGETS
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise AdapterError(f"adapter rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise AdapterError(f"adapter alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise AdapterError("adapter targets are empty: name at least one projection pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Target:
    """One adaptable projection: its module path in the param tree, its stacked layer count (None: one module),
    the input and output shapes of its kernel and their logical axis names."""

    path: tuple[str, ...]
    layers: int | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]

    def names(self) -> list[str]:
        """The official module name of each layer (one name for an unstacked module)."""
        if self.layers is None:
            return [weights.module_name(self.path, None)]
        return [weights.module_name(self.path, i) for i in range(self.layers)]

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)

    def shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_a`` and ``lora_b`` (with the layer axis in front when stacked)."""
        lead = () if self.layers is None else (self.layers,)
        return (*lead, *self.in_shape, rank), (*lead, rank, *self.out_shape)


def projections(config: ThinkerConfig) -> list[Target]:
    """Every projection of ``Qwen3ASR(config)`` an adapter can attach to (the ``Dense`` layers: attention, MLP,
    projector, an untied head)."""
    shapes = dict(weights.flatten_params(weights.abstract_params(config)))
    axes = dict(weights.flatten_params(weights.param_logical_axes(config)))
    out = []
    for path, shape in shapes.items():
        if path[-1] != "kernel" or "frontend" in path:
            continue
        module = path[:-1]
        stacked = len(module) > 2 and module[1] == "layers"
        dims, names = tuple(shape.shape), tuple(axes[path])
        if stacked:
            dims, names = dims[1:], names[1:]
        n_in = weights.linear_input_axes(module[-1])
        out.append(Target(module, shape.shape[0] if stacked else None, dims[:n_in], dims[n_in:], names[:n_in],
                          names[n_in:]))  # fmt: skip
    return out


def matches(name: str, pattern: str) -> bool:
    """Whether an official module name is selected by a target pattern (see ``LoraSpec``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def select_targets(config: ThinkerConfig, patterns: Sequence[str]) -> list[Target]:
    """The projections the patterns select. A pattern that selects nothing, or a stacked projection selected in
    some layers only, is an ``AdapterError``."""
    chosen, used = [], set()
    for target in projections(config):
        names = target.names()
        hits = [any(matches(n, p) for p in patterns) for n in names]
        used.update(p for p in patterns if any(matches(n, p) for n in names))
        if all(hits):
            chosen.append(target)
        elif any(hits):
            raise AdapterError(
                f"adapter targets {list(patterns)} select {target.path[-1]} in {sum(hits)} of {len(names)} layers; "
                "an adapter covers a projection in every layer or in none"
            )
    unused = [p for p in patterns if p not in used]
    if unused:
        example = projections(config)[0].names()[0]
        raise AdapterError(
            f"adapter targets {unused} match no projection of this model (names look like {example!r})"
        )
    return chosen


def adapter_paths(tree: Mapping) -> list[tuple[str, ...]]:
    """Module paths of an adapter tree (those holding ``lora_a``)."""
    return [path[:-1] for path, _ in weights.flatten_params(dict(tree)) if path[-1] == LORA_A]


def init_adapters(config: ThinkerConfig, spec: LoraSpec, key: jax.Array) -> dict:
    """Fresh adapters for ``spec``: A uniform in ±1/√fan_in (peft's default Kaiming draw), B zeros, so the
    adapted model starts equal to the base. A nested dict shaped like the params (only the adapted modules)."""
    flat: dict = {}
    for i, target in enumerate(select_targets(config, spec.targets)):
        shape_a, shape_b = target.shapes(spec.rank)
        bound = 1.0 / math.sqrt(target.fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), shape_a, jnp.float32, -bound, bound)
        flat[(*target.path, LORA_A)] = a
        flat[(*target.path, LORA_B)] = jnp.zeros(shape_b, jnp.float32)
    return weights.unflatten_params(flat)


def abstract_adapters(config: ThinkerConfig, spec: LoraSpec, dtype: Any = jnp.float32) -> dict:
    """The adapter tree of ``spec`` as ShapeDtypeStructs."""
    flat: dict = {}
    for target in select_targets(config, spec.targets):
        shape_a, shape_b = target.shapes(spec.rank)
        flat[(*target.path, LORA_A)] = jax.ShapeDtypeStruct(shape_a, dtype)
        flat[(*target.path, LORA_B)] = jax.ShapeDtypeStruct(shape_b, dtype)
    return weights.unflatten_params(flat)


def adapter_logical_axes(config: ThinkerConfig, spec: LoraSpec) -> dict:
    """Logical axis names of the adapter tree: A takes its kernel's input axes, B its output axes, and the rank
    axis is ``lora_rank`` (replicated by the default rules); stacked layers keep ``layers`` in front."""
    flat: dict = {}
    for target in select_targets(config, spec.targets):
        lead = () if target.layers is None else ("layers",)
        flat[(*target.path, LORA_A)] = (*lead, *target.in_axes, RANK_AXIS)
        flat[(*target.path, LORA_B)] = (*lead, RANK_AXIS, *target.out_axes)
    return weights.unflatten_params(flat)


def adapter_shardings(config: ThinkerConfig, spec: LoraSpec, mesh: Any, rules: Any) -> dict:
    """A NamedSharding for every adapter leaf from the mesh rules (``qasr_jax.sharding``)."""
    from jax.sharding import NamedSharding

    from qasr_jax import sharding

    shapes = abstract_adapters(config, spec)
    names = adapter_logical_axes(config, spec)
    return jax.tree_util.tree_map(
        lambda s, logical: NamedSharding(mesh, sharding.logical_to_spec(logical, s.shape, mesh, rules)),
        shapes,
        names,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def combine(params: Mapping, adapter: Mapping, scale: float = 1.0) -> dict:
    """The params with the adapter's leaves beside their kernels (``lora_b`` times ``scale``): what the model
    applies. Works on traced values (a train step differentiates through it)."""
    out = _copy_dicts(params)
    for path in adapter_paths(adapter):
        node = out
        for key in path:
            if key not in node:
                raise AdapterError(f"adapter module {'/'.join(path)} is not a module of the model's params")
            node = node[key]
        module = _lookup(adapter, path)
        node[LORA_A] = module[LORA_A]
        node[LORA_B] = module[LORA_B] * scale if scale != 1.0 else module[LORA_B]
    return out


def _copy_dicts(tree: Mapping) -> dict:
    return {k: _copy_dicts(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _lookup(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def strip_adapters(params: Mapping) -> dict:
    """The params without any adapter leaves."""
    return {
        k: strip_adapters(v) if isinstance(v, Mapping) else v
        for k, v in params.items()
        if k not in (LORA_A, LORA_B)
    }


def low_rank_delta(a: jax.Array, b: jax.Array, stacked: bool) -> jax.Array:
    """``A · B`` in the kernel's layout ``[L?, *in, *out]`` (fp32)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if not stacked:
        return jnp.tensordot(a, b, axes=1)
    contract = ((a.ndim - 1,), (1,))
    return jax.lax.dot_general(a, b, (contract, ((0,), (0,))), precision=jax.lax.Precision.HIGHEST)


def merge_adapter(params: Mapping, adapter: Mapping, scale: float = 1.0) -> dict:
    """The params with ``scale · A · B`` added to each adapted kernel (in the kernel's dtype): a plain param tree
    that computes what base + adapter compute."""
    out = strip_adapters(params)  # new dicts all the way down: the kernels can be replaced in place
    for path in adapter_paths(adapter):
        module = _lookup(adapter, path)
        node = _lookup(out, path)
        kernel = node["kernel"]
        stacked = len(path) > 2 and path[1] == "layers"
        delta = low_rank_delta(module[LORA_A], module[LORA_B], stacked) * scale
        if delta.shape != kernel.shape:
            raise AdapterError(
                f"adapter module {'/'.join(path)}: A·B has shape {delta.shape}, the kernel {kernel.shape}"
            )
        node["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Adapters for inference, and the PEFT files


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A loaded adapter: ``weights`` (a tree like ``init_adapters``'s, its scale already folded into ``lora_b``),
    its rank and where it came from."""

    name: str
    weights: dict
    rank: int
    source: str = ""

    @property
    def paths(self) -> list[tuple[str, ...]]:
        return adapter_paths(self.weights)


def _target_index(config: ThinkerConfig) -> dict[tuple[str, ...], Target]:
    return {t.path: t for t in projections(config)}


def peft_tensors(config: ThinkerConfig, adapter: Mapping) -> dict[str, np.ndarray]:
    """The adapter's tensors under peft's names and shapes (fp32): ``lora_A.weight [rank, in]``,
    ``lora_B.weight [out, rank]`` per module and layer."""
    targets = _target_index(config)
    tensors = {}
    for path in adapter_paths(adapter):
        target = targets.get(path)
        if target is None:
            raise AdapterError(f"adapter module {'/'.join(path)} is not a projection of this model")
        module = _lookup(adapter, path)
        a = weights.host_array(module[LORA_A]).astype(np.float32)
        b = weights.host_array(module[LORA_B]).astype(np.float32)
        layers = [None] if target.layers is None else list(range(target.layers))
        for layer in layers:
            a_l = a if layer is None else a[layer]
            b_l = b if layer is None else b[layer]
            rank = a_l.shape[-1]
            name = weights.module_name(path, layer)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_l.reshape(target.fan_in, rank).T)
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_l.reshape(rank, target.fan_out).T)
    return tensors


def save_peft(
    out_dir: str | os.PathLike,
    config: ThinkerConfig,
    adapter: Mapping,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    base_model: str | None = None,
) -> str:
    """Write an adapter tree (unscaled: the model applies ``alpha / rank``) as a peft LoRA adapter dir that
    ``peft.PeftModel.from_pretrained`` loads onto the official model. Only process 0 writes; every process must
    call it (gathering sharded adapters is collective). Returns the dir."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    tensors = peft_tensors(config, adapter)
    if jax.process_index() != 0:
        return out_dir
    names = sorted({key[len(PEFT_PREFIX) :].rsplit(".", 2)[0] for key in tensors})
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    staging = out_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(peft_config, f, indent=2, sort_keys=True)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft(path: str | os.PathLike, config: ThinkerConfig, name: str | None = None) -> Adapter:
    """A peft LoRA adapter dir (``adapter_config.json`` + ``adapter_model.safetensors``, trained here or with
    ``peft`` on the official model, in the ``thinker.*`` or the transformers-native "-hf" names) as an ``Adapter``
    for ``config``'s model. Layers the adapter leaves out get zeros. Raises ``AdapterError`` naming the file and
    what does not fit (a tensor of another base's shape, an unknown module, a rank that disagrees with the config,
    peft features that change the computation: DoRA, biases, modules_to_save, fan_in_fan_out)."""
    path = os.fspath(path)
    config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for required in (config_path, weights_path):
        if not os.path.isfile(required):
            raise AdapterError(f"{path}: not an adapter dir ({os.path.basename(required)} is missing)")
    try:
        with open(config_path, encoding="utf-8") as f:
            peft_config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{config_path}: not readable JSON ({error})") from None
    if str(peft_config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{config_path}: peft_type {peft_config.get('peft_type')!r} is not LORA")
    unsupported = [
        what
        for what, present in (
            ("use_dora", bool(peft_config.get("use_dora"))),
            ("bias", peft_config.get("bias", "none") not in (None, "none")),
            ("modules_to_save", bool(peft_config.get("modules_to_save"))),
            ("fan_in_fan_out", bool(peft_config.get("fan_in_fan_out"))),
            ("lora_bias", bool(peft_config.get("lora_bias"))),
        )
        if present
    ]
    if unsupported:
        raise AdapterError(f"{config_path}: unsupported adapter settings {unsupported} (plain LoRA only)")
    try:
        rank_default = int(peft_config["r"])
        alpha_default = float(peft_config.get("lora_alpha", rank_default))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{config_path}: 'r' and 'lora_alpha' must be numbers") from None
    rslora = bool(peft_config.get("use_rslora"))
    rank_pattern = peft_config.get("rank_pattern") or {}
    alpha_pattern = peft_config.get("alpha_pattern") or {}

    try:
        with safe_open(weights_path, "np") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({error})") from None

    targets = _target_index(config)
    per_module: dict[str, dict[str, np.ndarray]] = {}
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    for key, value in tensors.items():
        m = pattern.match(key)
        if not m:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA weight (…lora_A/lora_B.weight)")
        per_module.setdefault(m.group(1), {})[m.group(2)] = value
    if not per_module:
        raise AdapterError(f"{weights_path}: holds no LoRA weights")

    built: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    ranks = set()
    for module, pair in sorted(per_module.items()):
        where = f"{weights_path}: {module}"
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{where}: has lora_{next(iter(pair))} without its lora_{'B' if 'A' in pair else 'A'}")
        location = weights.module_location(module)
        target = None if location is None else targets.get(location[0])
        if target is None:
            raise AdapterError(f"{where}: no projection of this model has that name (an adapter for another model?)")
        a, b = np.asarray(pair["A"], np.float32), np.asarray(pair["B"], np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: lora_A {a.shape} and lora_B {b.shape} do not share a rank")
        rank = a.shape[0]
        expected_rank = int(_pattern_value(rank_pattern, module, rank_default))
        if rank != expected_rank:
            raise AdapterError(f"{where}: rank {rank} in the weights, {expected_rank} in {CONFIG_FILE}")
        if a.shape[1] != target.fan_in or b.shape[0] != target.fan_out:
            raise AdapterError(
                f"{where}: lora_A {a.shape} / lora_B {b.shape} do not fit this model's projection "
                f"({target.fan_in} → {target.fan_out}): an adapter for another base model"
            )
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        ranks.add(rank)
        entry = built.setdefault(target.path, {})
        entry[location[1]] = (a, b * scale)
    rank = max(ranks)
    flat: dict = {}
    for module_path, layers in built.items():
        target = targets[module_path]
        shape_a, shape_b = target.shapes(rank)
        a_all, b_all = np.zeros(shape_a, np.float32), np.zeros(shape_b, np.float32)
        for layer, (a, b) in layers.items():
            r = a.shape[0]
            a_k = a.T.reshape(*target.in_shape, r)
            b_k = b.T.reshape(r, *target.out_shape)
            if layer is None:
                a_all[..., :r], b_all[:r] = a_k, b_k
            else:
                a_all[layer, ..., :r], b_all[layer, :r] = a_k, b_k
        flat[(*module_path, LORA_A)] = a_all
        flat[(*module_path, LORA_B)] = b_all
    return Adapter(name or os.path.basename(os.path.normpath(path)), weights.unflatten_params(flat), rank, path)


def save_adapter(out_dir: str | os.PathLike, config: ThinkerConfig, adapter: Adapter) -> str:
    """Write a loaded ``Adapter`` as a peft adapter dir (its scale is in B, so ``lora_alpha = r``)."""
    return save_peft(out_dir, config, adapter.weights, adapter.rank, float(adapter.rank))


# ----------------------------------------------------------------------------------------------------------------
# Several adapters in one batch


@dataclasses.dataclass(frozen=True)
class AdapterStack:
    """Adapters stacked for per-row use: every leaf ``[adapters + 1, ...]`` (after the layer axis of stacked
    layers); slot 0 is zeros (the base model), slot i + 1 is ``names[i]``. Ranks are padded with zeros to the
    largest, and modules an adapter leaves out are zeros in its slot: both add nothing."""

    names: tuple[str, ...]
    weights: dict
    rank: int

    def slot(self, name: str | None) -> int:
        """The slot of an adapter name; None or "" is the base (slot 0)."""
        if not name:
            return 0
        if name not in self.names:
            raise UnknownAdapterError(
                f"adapter {name!r} is not loaded (loaded: {sorted(self.names) or 'none'})"
            )
        return self.names.index(name) + 1

    @property
    def signature(self) -> tuple:
        """What a compiled program depends on: the leaves' paths and shapes."""
        return tuple((path, tuple(np.shape(leaf))) for path, leaf in weights.flatten_params(self.weights))


def stack_adapters(config: ThinkerConfig, adapters: Sequence[Adapter], dtype: Any = jnp.float32) -> AdapterStack:
    """One ``AdapterStack`` of ``adapters`` (names must be distinct)."""
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be distinct: {names}")
    targets = _target_index(config)
    rank = max((a.rank for a in adapters), default=1)
    paths = sorted({p for a in adapters for p in a.paths})
    n = len(adapters) + 1
    flat: dict = {}
    for path in paths:
        target = targets.get(path)
        if target is None:
            raise AdapterError(f"adapter module {'/'.join(path)} is not a projection of this model")
        shape_a, shape_b = target.shapes(rank)
        axis = 0 if target.layers is None else 1
        a_all = np.zeros((*shape_a[:axis], n, *shape_a[axis:]), np.float32)
        b_all = np.zeros((*shape_b[:axis], n, *shape_b[axis:]), np.float32)
        for slot, adapter in enumerate(adapters, start=1):
            if path not in adapter.paths:
                continue
            module = _lookup(adapter.weights, path)
            a, b = np.asarray(module[LORA_A], np.float32), np.asarray(module[LORA_B], np.float32)
            r = a.shape[-1]
            if axis == 0:
                a_all[slot, ..., :r], b_all[slot, :r] = a, b
            else:
                a_all[:, slot, ..., :r], b_all[:, slot, :r] = a, b
        flat[(*path, LORA_A)] = jnp.asarray(a_all, dtype)
        flat[(*path, LORA_B)] = jnp.asarray(b_all, dtype)
    return AdapterStack(tuple(names), weights.unflatten_params(flat), rank)


def select_rows(stacked: Mapping, rows: jax.Array, layered: bool | None = None) -> dict:
    """Each row's adapter from a stacked tree: leaves ``[.., adapters + 1, ...]`` → ``[.., rows, ...]`` at slots
    ``rows [batch]`` (the adapter axis is 1 under stacked layers, else 0; ``layered=False`` forces 0, for one
    layer's tree)."""

    def pick(path: tuple, leaf: jax.Array) -> jax.Array:
        names = [str(getattr(k, "key", k)) for k in path]
        under_layers = len(names) > 2 and names[1] == "layers"
        axis = 1 if (under_layers if layered is None else layered) else 0
        return jnp.take(leaf, rows, axis=axis)

    return jax.tree_util.tree_map_with_path(pick, dict(stacked))


__all__ = [
    "ADAPTERS_AXIS",
    "CONFIG_FILE",
    "DECODER_TARGETS",
    "ENCODER_ATTENTION_TARGETS",
    "LORA_A",
    "LORA_B",
    "RANK_AXIS",
    "WEIGHTS_FILE",
    "Adapter",
    "AdapterStack",
    "LoraSpec",
    "Target",
    "abstract_adapters",
    "adapter_logical_axes",
    "adapter_paths",
    "adapter_shardings",
    "combine",
    "init_adapters",
    "load_peft",
    "matches",
    "merge_adapter",
    "peft_tensors",
    "projections",
    "save_adapter",
    "save_peft",
    "select_rows",
    "select_targets",
    "stack_adapters",
    "strip_adapters",
]
