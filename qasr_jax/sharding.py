"""Device meshes and logical-axis rules: where every param and activation lives on a mesh.

The model names the axes of every param (``("embed", "heads", "head_dim")``, ``("vocab", "embed")``, …) and
pins activations with ``("activation_batch", "activation_length", "activation_embed")``. A rule table maps each
logical name to mesh axes; changing the table changes the parallelism without touching the model:

* ``data``: pure data parallelism (params replicated, batch split);
* ``fsdp``: params split along ``embed`` (ZeRO-3 style), batch split too;
* ``tensor``: Megatron-style tensor parallelism over attention heads, MLP width and the vocabulary.

A logical axis whose size the chosen mesh axes do not divide (4 heads over ``tensor=8``) stays replicated
rather than failing, so one rule table serves every model size and mesh shape.

Typical use::

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    config, params = load_sharded(checkpoint_dir, mesh)      # each device holds only its slices
    with use_mesh(mesh):                                      # activations follow the same rules
        logits = jax.jit(model.apply)({"params": params}, *shard_batch(batch, mesh))
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qasr_jax import weights
from qasr_jax.config import ThinkerConfig

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# A logical name may appear more than once: the first entry whose mesh axes are still free in that array's
# spec and divide its size wins (so ``embed_out`` of proj2 falls back when ``embed`` took ``fsdp``).
DEFAULT_RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("embed_out", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    # Conv channels are the major part of the flattened conv features, so both split alike.
    ("conv_out", "tensor"),
    ("conv_flat", "tensor"),
)

_SPEC_ITEM = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*$")


def parse_mesh_spec(spec: str | Mapping[str, int], device_count: int) -> dict[str, int]:
    """Mesh axis sizes from ``"data=2,fsdp=2,tensor=2"`` (or a mapping), completed to every axis of MESH_AXES.

    Missing axes get size 1; one axis may be ``-1`` and takes the devices the others leave. The product must
    equal ``device_count``.
    """
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            match = _SPEC_ITEM.match(item)
            if not match:
                raise ValueError(f"mesh spec {spec!r}: {item!r} is not 'axis=size'")
            if match.group(1) in sizes:
                raise ValueError(f"mesh spec {spec!r}: axis {match.group(1)!r} given twice")
            sizes[match.group(1)] = int(match.group(2))
    else:
        sizes = {str(k): int(v) for k, v in spec.items()}
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh spec {spec!r}: unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh spec {spec!r}: sizes must be positive (or -1 for the rest)")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise ValueError(f"mesh spec {spec!r}: {fixed} does not divide the {device_count} devices")
        sizes[free[0]] = device_count // fixed
    full = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if math.prod(full.values()) != device_count:
        raise ValueError(
            f"mesh spec {spec!r} needs {math.prod(full.values())} devices; {device_count} are available"
        )
    return full


def make_mesh(spec: str | Mapping[str, int] = "data=-1", devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: every device of every process).

    The device order follows the interconnect (``mesh_utils.create_device_mesh``), so the innermost axis
    (``tensor``) gets the closest devices. Axes are in "auto" mode: shardings come from the rules, and the
    compiler inserts the collectives.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def merge_rules(
    overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | None, base: Rules = DEFAULT_RULES
) -> Rules:
    """``base`` with the entries of ``overrides`` replacing those of the same logical name.

    Override values: a mesh axis name, a list of them (split over their product), or None / "" (replicated).
    New names are appended.
    """
    if not overrides:
        return tuple(base)
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    replaced: dict[str, MeshAxes] = {}
    for name, value in items:
        if value is None or value == "" or value == []:
            axes: MeshAxes = None
        elif isinstance(value, str):
            axes = value
        else:
            axes = tuple(str(v) for v in value)
        for axis in _axes_tuple(axes):
            if axis not in MESH_AXES:
                raise ValueError(
                    f"sharding rule {name!r} → {value!r}: {axis!r} is not a mesh axis {MESH_AXES}"
                )
        replaced[str(name)] = axes
    merged = [(name, replaced[name]) if name in replaced else (name, axes) for name, axes in base]
    seen = {name for name, _ in base}
    merged += [(name, axes) for name, axes in replaced.items() if name not in seen]
    return tuple(merged)


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec of an array of ``shape`` whose axes have the logical names ``logical``.

    For each axis the rules are tried in order: an entry applies when none of its mesh axes is used by an
    earlier axis of the same array; of a multi-axis entry the longest prefix whose size divides the array's
    axis is used. An axis nothing divides stays replicated.
    """
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, size in zip(logical, shape):
        chosen: tuple[str, ...] = ()
        for rule_name, axes in rules if name is not None else ():
            if rule_name != name:
                continue
            candidate = tuple(a for a in _axes_tuple(axes) if mesh.shape[a] > 1)
            if any(a in used for a in candidate):
                continue
            while candidate and size % math.prod(mesh.shape[a] for a in candidate):
                candidate = candidate[:-1]
            if candidate:
                chosen = candidate
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def logical_axes(config: ThinkerConfig) -> dict:
    """The logical axis names of every param of ``Qwen3ASR(config)``, as a tree of tuples shaped like the params."""
    return weights.param_logical_axes(config)


def param_shardings(config: ThinkerConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """A NamedSharding for every param of ``Qwen3ASR(config)`` (a tree shaped like ``abstract_params``)."""
    shapes = weights.abstract_params(config)
    names = logical_axes(config)
    return jax.tree_util.tree_map(
        lambda shape, logical: NamedSharding(mesh, logical_to_spec(logical, shape.shape, mesh, rules)),
        shapes,
        names,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def shard_params(params: dict, shardings: dict) -> dict:
    """Place a param tree (host or device arrays) into ``shardings`` (from ``param_shardings``)."""

    def place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        if isinstance(value, jax.Array) and value.is_fully_addressable:
            return jax.device_put(value, sharding)
        return weights.shard_array(value, sharding)

    return jax.tree_util.tree_map(place, params, shardings)


def load_placed(
    path: str | os.PathLike,
    dtype: Any,
    mesh: Mesh | str | Mapping[str, int] | None,
    rules: Any = None,
    weights_cache: str | os.PathLike | bool | None = None,
) -> tuple[ThinkerConfig, dict, Mesh | None, Rules]:
    """``(config, params, mesh, rules)`` for an inference object: params on the default device when ``mesh`` is
    None, else loaded straight into the mesh (``mesh`` may be a spec; ``rules`` overrides the default rules).
    ``weights_cache``: as in ``weights.load_pretrained``."""
    mesh = resolve_mesh(mesh)
    rules = merge_rules(rules)
    shardings = None if mesh is None else (lambda config: param_shardings(config, mesh, rules))
    config, params = weights.load_pretrained(path, dtype, shardings, weights_cache)
    return config, params, mesh, rules


def load_sharded(
    path: str | os.PathLike, mesh: Mesh, rules: Rules = DEFAULT_RULES, dtype: Any = None
) -> tuple[ThinkerConfig, dict]:
    """Load ``(config, params)`` from a checkpoint dir straight into the mesh (``weights.load_pretrained`` with
    the shardings of ``rules``)."""
    return weights.load_pretrained(path, dtype, lambda config: param_shardings(config, mesh, rules))


def batch_sharding(
    mesh: Mesh, shape: Sequence[int] | None = None, rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    """The sharding of a ``[batch, ...]`` input: the batch axis split as ``activation_batch``, the rest replicated.

    With ``shape``, mesh axes that do not divide the batch are left out (a batch of 1 is replicated).
    """
    if shape is None:
        axes = next((_axes_tuple(a) for name, a in rules if name == "activation_batch"), ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        return NamedSharding(mesh, PartitionSpec(axes if axes else None))
    logical = ("activation_batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def resolve_mesh(mesh: Mesh | str | Mapping[str, int] | None) -> Mesh | None:
    """A Mesh from a Mesh, a spec (``"data=2,tensor=4"``, ``{"fsdp": -1}``) or None (no mesh)."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    return make_mesh(mesh)


def place_batch(arrays: Any, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Any:
    """Host ``[batch, ...]`` arrays (the whole batch, on every process) as device arrays split like the batch.

    Without a mesh they simply go to the default device, so single-device callers can use it unconditionally.
    """
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, arrays)
    return jax.tree_util.tree_map(
        lambda a: weights.shard_array(a, batch_sharding(mesh, np.shape(a), rules)), arrays
    )


def batch_struct(
    shape: Sequence[int], dtype: Any, mesh: Mesh | None, rules: Rules = DEFAULT_RULES
) -> jax.ShapeDtypeStruct:
    """The abstract value of a batch input for ``jit(...).lower`` (with its batch sharding on a mesh)."""
    sharding = None if mesh is None else batch_sharding(mesh, shape, rules)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_arrays(tree: Any) -> Any:
    """ShapeDtypeStructs of a tree of arrays, keeping the shardings of committed device arrays."""

    def abstract(x: Any) -> jax.ShapeDtypeStruct:
        placed = getattr(x, "sharding", None) if isinstance(x, jax.Array) and x.committed else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed)

    return jax.tree_util.tree_map(abstract, tree)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Global arrays from this process's rows of a batch (a pytree of ``[local_batch, ...]`` host arrays).

    Every process passes its own consecutive share of the global batch (``process_rows``); with one process
    that is the whole batch.
    """

    def place(local: Any) -> jax.Array:
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        sharding = batch_sharding(mesh, global_shape, rules)
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree_util.tree_map(place, batch)


def process_rows(global_batch: int) -> slice:
    """The rows of a global batch this process loads (consecutive, equal shares)."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise ValueError(
            f"the global batch ({global_batch}) must be a multiple of the process count ({count})"
        )
    share = global_batch // count
    return slice(index * share, (index + 1) * share)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Trace and run under ``mesh`` with ``rules``, so the model's logical activation constraints apply.

    ``None`` is a no-op (single-device code paths use the same call sites).
    """
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "Rules",
    "abstract_arrays",
    "batch_sharding",
    "batch_struct",
    "load_sharded",
    "logical_axes",
    "logical_to_spec",
    "make_mesh",
    "merge_rules",
    "param_shardings",
    "parse_mesh_spec",
    "place_batch",
    "process_rows",
    "replicated",
    "resolve_mesh",
    "shard_batch",
    "shard_params",
    "use_mesh",
]
