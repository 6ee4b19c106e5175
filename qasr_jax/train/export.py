"""Trained params → a checkpoint dir in the released layout (config.json + safetensors + tokenizer files).

The inverse of ``qasr_jax.weights``: stacked layers are unstacked to ``layers.N``, kernels go back to torch's
Linear ``[out, in]`` (heads merged) and Conv2d OIHW, names get the ``thinker.`` prefix. A tied head is also
stored as ``thinker.lm_head.weight``, as the released checkpoints store it. Both our loader and the official
``from_pretrained`` read the result.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from qasr_jax.checkpoint import SIDE_FILES
from qasr_jax.config import ThinkerConfig, config_to_dict

# Linear layers whose kernel has two input axes (heads, head_dim) rather than one.
_MERGED_INPUT = ("o_proj", "out_proj")


def _torch_name(path: tuple[str, ...], layer: int | None) -> str:
    """The released name (without ``thinker.``) of a param path (``layer``: index into a stacked leaf).

    Checked against ``weights._flax_location``, the loader's mapping, so export and load cannot drift apart.
    """
    from qasr_jax.weights import _flax_location

    *module, leaf = path
    param = "bias" if leaf == "bias" else "weight"
    if layer is not None:
        tower = "audio_tower" if module[0] == "audio_tower" else "model"
        name = f"{tower}.layers.{layer}.{'.'.join(module[2:])}.{param}"
    elif module[0] == "embed_tokens":
        name = f"model.embed_tokens.{param}"
    elif module[0] == "lm_head":
        name = f"lm_head.{param}"
    elif module == ["decoder", "norm"]:
        name = f"model.norm.{param}"
    else:  # audio tower modules keep their own name whatever group they sit in (e.g. the conv front end)
        name = f"audio_tower.{module[-1]}.{param}"
    if _flax_location(name) != (tuple(module), layer, param):
        raise ValueError(f"no released name for param {'/'.join(path)} (tried {name})")
    return name


def _torch_layout(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """One (per-layer) Flax leaf in torch's layout."""
    leaf = path[-1]
    if leaf == "kernel" and value.ndim == 4:  # Conv2d HWIO → OIHW
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel":
        n_in = 2 if path[-2] in _MERGED_INPUT else 1
        fan_in = int(np.prod(value.shape[:n_in]))
        return value.reshape(fan_in, -1).T  # [in, out] → Linear [out, in]
    if leaf == "bias":
        return value.reshape(-1)  # per-head biases [heads, head_dim] → [out]
    return value


def _host(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def released_tensors(
    params: dict, config: ThinkerConfig, dtype: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` in the released ``thinker.*`` layout for every tensor of ``params``."""
    from qasr_jax.weights import _flatten

    for path, value in _flatten(params):
        host = _host(value)
        if dtype is not None:
            host = host.astype(dtype)
        if len(path) > 2 and path[1] == "layers":
            for i in range(host.shape[0]):
                yield f"thinker.{_torch_name(path, i)}", np.ascontiguousarray(_torch_layout(host[i], path))
            continue
        array = np.ascontiguousarray(_torch_layout(host, path))
        yield f"thinker.{_torch_name(path, None)}", array
        if path == ("embed_tokens", "embedding") and config.tied_head:
            yield "thinker.lm_head.weight", array


def _write_weights(
    out_dir: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int
) -> list[str]:
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors:
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(a.nbytes for shard in shards for a in shard.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2
        )
    return [*names, "model.safetensors.index.json"]


def export_checkpoint(
    out_dir: str | os.PathLike,
    config: ThinkerConfig,
    params: dict,
    source_dir: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 4 << 30,
) -> str:
    """Write ``params`` as a released-layout checkpoint dir; returns the dir.

    ``source_dir``: the checkpoint the run started from; its tokenizer, chat-template, preprocessor and
    generation files are copied. ``dtype``: "bfloat16" (as released) or "float32". Only process 0 writes;
    every process must call this (gathering sharded params is collective). The dir is written next to its
    final name and renamed into place, so a reader never sees a half-written export.
    """
    import ml_dtypes

    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    out_dir = os.path.abspath(os.fspath(out_dir))
    writer = jax.process_index() == 0
    tensors = released_tensors(params, config, np_dtype)
    if not writer:
        for _ in tensors:  # take part in the gathers
            pass
        return out_dir
    staging = out_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    _write_weights(staging, tensors, max_shard_bytes)
    released = config_to_dict(config)
    released["torch_dtype"] = dtype
    released["thinker_config"]["text_config"]["torch_dtype"] = dtype
    with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
        json.dump(released, f, indent=2, sort_keys=True)
    if source_dir is not None:
        for name in SIDE_FILES:
            src = os.path.join(os.fspath(source_dir), name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(staging, name))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir


__all__ = ["SIDE_FILES", "export_checkpoint", "released_tensors"]
