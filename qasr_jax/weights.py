"""Checkpoint weights → the Flax param tree.

Reads a released-layout dir (``thinker.*`` keys; one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``), the transformers-native "-hf" layout (``model.audio_tower.*``,
``model.multi_modal_projector.linear_{1,2}``, ``model.language_model.*``, ``lm_head.*``), or an Orbax
checkpoint written by ``python -m convert``. Pickle files are refused. Every tensor must be consumed and
every param filled; otherwise the error lists what is missing, unexpected and mis-shaped.

Torch layouts are converted once here: Linear ``[out, in]`` → ``[in, out]`` (then split into heads),
Conv2d OIHW → HWIO, per-layer tensors stacked along a leading layer axis for ``nn.scan``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.config import ThinkerConfig, load_config
from qasr_jax.errors import CheckpointError, UnsafeCheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ORBAX_PARAMS_DIR = "params"

# "-hf" (transformers-native) key prefixes → the released layout's names (without "thinker."), following
# transformers' Qwen3-ASR conversion: the projector is split out of the audio tower, the aligner head is "score".
_HF_PREFIXES = (
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.linear_1.", "audio_tower.proj1."),
    ("model.multi_modal_projector.linear_2.", "audio_tower.proj2."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
    ("score.", "lm_head."),  # the aligner's class head in the -hf layout
)
_FRONTEND = {f"audio_tower.{m}" for m in ("conv2d1", "conv2d2", "conv2d3", "conv_out")}
_LAYER = re.compile(r"^(audio_tower|model)\.layers\.(\d+)\.(.+)$")


def canonical_name(key: str) -> str | None:
    """The released-layout name of ``key`` without the ``thinker.`` prefix, or None if it is foreign."""
    if key.startswith("thinker."):
        return key[len("thinker.") :]
    for prefix, repl in _HF_PREFIXES:
        if key.startswith(prefix):
            return repl + key[len(prefix) :]
    return None


def _flax_location(name: str) -> tuple[tuple[str, ...], int | None, str] | None:
    """(module path in the param tree, layer index or None, torch param name) for a canonical name."""
    module, _, param = name.rpartition(".")
    m = _LAYER.match(module + "." + param)
    if m:
        tower, layer, rest = m.group(1), int(m.group(2)), m.group(3)
        sub_module, _, param = rest.rpartition(".")
        root = ("audio_tower", "layers") if tower == "audio_tower" else ("decoder", "layers")
        return (*root, *sub_module.split(".")), layer, param
    if module == "model.embed_tokens":
        return ("embed_tokens",), None, param
    if module == "model.norm":
        return ("decoder", "norm"), None, param
    if module == "lm_head":
        return ("lm_head",), None, param
    if module in _FRONTEND:
        return ("audio_tower", "frontend", module[len("audio_tower.") :]), None, param
    if module.startswith("audio_tower.") and "." not in module[len("audio_tower.") :]:
        return ("audio_tower", module[len("audio_tower.") :]), None, param
    return None


def _to_flax(array: np.ndarray, leaf: str, expected: tuple[int, ...]) -> np.ndarray:
    """Convert one torch tensor to the layout of a Flax leaf of per-layer shape ``expected``."""
    if leaf == "kernel":
        if array.ndim == 4:  # Conv2d OIHW → HWIO
            array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 2:  # Linear [out, in] → [in, out], then split heads
            array = array.T
    if array.shape != expected:
        if array.size != int(np.prod(expected)) or leaf in ("scale", "embedding"):
            raise ValueError
        array = array.reshape(expected)
    return np.ascontiguousarray(array)


def abstract_params(config: ThinkerConfig) -> dict:
    """The param tree of ``Qwen3ASR(config)`` as ShapeDtypeStructs (no memory allocated)."""
    from flax.core import meta

    from qasr_jax.model import Qwen3ASR

    model = Qwen3ASR(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    feats = jnp.zeros((1, config.audio.num_mel_bins, config.audio.chunk_frames), jnp.float32)
    fmask = jnp.ones((1, config.audio.chunk_frames), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), feats, fmask))
    return meta.unbox(shapes["params"])


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def params_from_state_dict(
    tensors: dict[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    config: ThinkerConfig,
    dtype: Any = None,
    source: str = "checkpoint",
) -> dict:
    """Map a torch-layout state dict (either key layout) to the Flax param tree (numpy arrays).

    Raises CheckpointError listing every missing, unexpected and mis-shaped tensor.
    """
    expected = dict(_flatten(abstract_params(config)))
    stacked = {p for p in expected if len(p) > 1 and p[1] == "layers"}
    n_layers = {"audio_tower": config.audio.encoder_layers, "decoder": config.text.num_hidden_layers}
    filled: dict[tuple[str, ...], Any] = {}
    layer_seen: dict[tuple[str, ...], set[int]] = {}
    unexpected, misshaped = [], []
    items = tensors.items() if isinstance(tensors, dict) else tensors
    for key, array in items:
        name = canonical_name(key)
        loc = _flax_location(name) if name is not None else None
        if name == "lm_head.weight" and config.tied_head:
            continue  # a tied head is the embedding; a saved copy is redundant
        if loc is None:
            unexpected.append(key)
            continue
        module, layer, pname = loc
        leaf = {"bias": "bias"}.get(pname)
        if pname == "weight":
            leaf = next((c for c in ("kernel", "scale", "embedding") if (*module, c) in expected), None)
        path = (*module, leaf) if leaf else None
        if path not in expected or (layer is None) != (path not in stacked):
            unexpected.append(key)
            continue
        want = expected[path].shape[1:] if layer is not None else expected[path].shape
        if layer is not None and layer >= n_layers[path[0]]:
            unexpected.append(key)
            continue
        try:
            value = _to_flax(np.asarray(array), path[-1], tuple(want))
        except ValueError:
            misshaped.append(f"{key}: {tuple(np.shape(array))} does not fit {path} {tuple(want)}")
            continue
        if dtype is not None:
            value = value.astype(dtype)
        if layer is None:
            filled[path] = value
            continue
        if path not in filled:
            filled[path] = np.zeros((n_layers[path[0]], *want), value.dtype)
        filled[path][layer] = value
        layer_seen.setdefault(path, set()).add(layer)
    missing = []
    for path in expected:
        if path not in filled:
            missing.append("/".join(path))
        elif path in stacked:
            absent = sorted(set(range(n_layers[path[0]])) - layer_seen[path])
            if absent:
                missing.append(f"{'/'.join(path)} (layers {absent})")
    if missing or unexpected or misshaped:
        lines = [f"{source}: the weights do not match the config"]
        for title, items_ in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items_:
                shown = items_[:40] + ([f"... and {len(items_) - 40} more"] if len(items_) > 40 else [])
                lines.append(f"  {title} ({len(items_)}): " + "; ".join(shown))
        raise CheckpointError("\n".join(lines))
    return _unflatten(filled)


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint dir, refusing pickles and checking the shard index."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if absent:
            raise CheckpointError(f"{index}: shard files listed but not present: {absent}")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(path, f) for f in others]
    pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeCheckpointError(
            f"{path}: only pickle weight files ({', '.join(pickles)}); they can run arbitrary code when loaded "
            "and are not read. Convert them to safetensors first."
        )
    raise CheckpointError(f"{path}: no model.safetensors, shard index or Orbax '{ORBAX_PARAMS_DIR}/' found")


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    for file in files:
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
        yield from tensors.items()


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ORBAX_PARAMS_DIR))


def load_pretrained(path: str | os.PathLike, dtype: Any = None) -> tuple[ThinkerConfig, dict]:
    """Load ``(config, params)`` from a checkpoint dir (released, "-hf" or Orbax layout).

    Params keep the checkpoint's dtype (bf16 stays bf16) unless ``dtype`` is given.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
        raise UnsafeCheckpointError(f"{path}: pickle weight files are not read (they can run arbitrary code)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = load_config(path)
    if is_orbax_checkpoint(path):
        from qasr_jax.checkpoint import restore_params

        params = restore_params(os.path.join(path, ORBAX_PARAMS_DIR), config, dtype=dtype)
        return config, params
    params = params_from_state_dict(
        _iter_safetensors(safetensors_files(path)), config, dtype=dtype, source=path
    )
    return config, jax.tree_util.tree_map(jnp.asarray, params)
