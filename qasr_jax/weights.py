"""Weights I/O, all of it: checkpoint dirs ↔ the Flax param tree.

- ``abstract_params(config)`` / ``param_logical_axes(config)``: the param tree's shapes and logical axis names,
  from one (cached) ``eval_shape`` of the model's init;
- ``load_pretrained(path, dtype=None, shardings=None)``: a released, "-hf" or Orbax checkpoint dir (or a Hugging
  Face Hub model name, ``qasr_jax.hub``), optionally straight into shardings;
- ``save_params`` / ``restore_params``: Orbax;
- the converted-weights cache: a safetensors checkpoint is converted to the param tree's layout once per machine
  and kept as one raw, page-aligned file per param; later loads map those files (copy-on-write) and the CPU
  device uses the mapped pages in place, so loading is mapping, and each device of a sharded load reads only
  its own slices. ``QASR_WEIGHTS_CACHE`` (or ``weights_cache=``) moves it or turns it off;
- ``export_pretrained``: the released layout (safetensors + config + tokenizer files) from a param tree.

``load_pretrained`` reads a released-layout dir (``thinker.*`` keys; one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``), the transformers-native "-hf" layout (``model.audio_tower.*``,
``model.multi_modal_projector.linear_{1,2}``, ``model.language_model.*``, ``lm_head.*``), or an Orbax
checkpoint written by ``python -m convert``. Pickle files are refused. Every tensor must be consumed and
every param filled; otherwise the error lists what is missing, unexpected and mis-shaped.

Torch layouts are converted once here: Linear ``[out, in]`` → ``[in, out]`` (then split into heads),
Conv2d OIHW → HWIO, per-layer tensors stacked along a leading layer axis for ``nn.scan``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from flax.core import meta
from jax.sharding import PartitionSpec
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qasr_jax import compile_cache
from qasr_jax.config import ThinkerConfig, config_to_dict, load_config
from qasr_jax.errors import CheckpointError, UnsafeCheckpointError
from qasr_jax.hub import resolve_model
from qasr_jax.model import Qwen3ASR

# Files beside the weights that the tokenizer and the processors read; a converted or exported checkpoint dir
# carries them along (config.json is written or copied separately).
SIDE_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)

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


# Rows × columns of one tile of a transposing copy: two tiles of fp32 stay in the L1/L2 cache.
_TRANSPOSE_TILE = 256


# The alignment XLA:CPU needs to use a host buffer in place (``jax.device_put(..., may_alias=True)``).
_XLA_ALIGNMENT = 64
# Host param buffers of at least this many bytes get their own memory map (see ``aligned_empty``).
_MAP_THRESHOLD = 1 << 20


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array whose data starts on a ``_XLA_ALIGNMENT``-byte boundary, so that placing it on the
    CPU device takes the buffer as it is instead of copying it (numpy itself aligns to 16 bytes).

    A large one is its own anonymous memory map (page-aligned) in ordinary pages. numpy's allocator asks the
    kernel for transparent huge pages for arrays of 4 MiB and more; where the kernel only grants them on request
    after compacting memory (``defrag=madvise``, common on VMs), the first write to each page stalls: writing a
    fresh GiB measured 3.4 s that way against 0.37 s in ordinary pages here, and a load writes every byte of
    the params once.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes >= _MAP_THRESHOLD:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return np.frombuffer(region, np.uint8, nbytes).view(dtype).reshape(shape)
    raw = np.empty(nbytes + _XLA_ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _XLA_ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _as_bits(array: np.ndarray) -> np.ndarray:
    """``array`` viewed as unsigned integers of its item size: copying those is a plain memory copy, whereas
    numpy copies an extension dtype such as bfloat16 item by item through the dtype's own functions (10× slower
    for a transposing copy)."""
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def transposed(array: np.ndarray, dtype: Any = None, out: np.ndarray | None = None) -> np.ndarray:
    """``array.T`` of a 2-D array as a new contiguous (aligned) array in ``dtype``, copied tile by tile.

    numpy's own transposing copy walks one side of the matrix with a stride of a whole row, a cache miss per
    element: ≈ 0.25 GB/s for a 3072 × 1024 fp32 kernel here, ≈ 7× slower than this tiled copy. ``out``: a
    C-contiguous array of ``array.T``'s shape and ``dtype`` to write (a layer's slice of a stacked param).
    """
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    if array.dtype != dtype:
        array = array.astype(dtype)  # converted in its own layout first: the transposing copy then moves bits
    rows, cols = array.shape
    if out is None:
        out = aligned_empty((cols, rows), dtype)
    elif out.shape != (cols, rows) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out is {out.shape} {out.dtype}; need contiguous {(cols, rows)} {dtype}")
    source, target = _as_bits(array), _as_bits(out)
    tile = _TRANSPOSE_TILE
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            target[j : j + tile, i : i + tile] = source[i : i + tile, j : j + tile].T
    return out


def _aligned_copy(array: np.ndarray, dtype: Any) -> np.ndarray:
    out = aligned_empty(array.shape, dtype)
    out[...] = array
    return out


def _to_flax(
    array: np.ndarray, leaf: str, expected: tuple[int, ...], dtype: Any, out: np.ndarray | None = None
) -> np.ndarray:
    """Convert one torch tensor to the layout of a Flax leaf of per-layer shape ``expected``, in ``dtype``.

    ``out`` (contiguous, ``expected`` and ``dtype``): where a transposed Linear kernel is written; the result is
    then ``out`` itself. Otherwise the result may be a view of ``array`` (a conv kernel's transposed view): the
    caller's one copy makes it contiguous.
    """
    if leaf == "kernel":
        if array.ndim == 4:  # Conv2d OIHW → HWIO
            array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 2:  # Linear [out, in] → [in, out] (then split heads: a free reshape)
            if array.size != int(np.prod(expected)):
                raise ValueError
            target = None if out is None else out.reshape(array.shape[::-1])
            array = transposed(array, dtype, out=target)
    if array.shape != expected:
        if array.size != int(np.prod(expected)) or leaf in ("scale", "embedding"):
            raise ValueError
        array = array.reshape(expected)
    return array


@functools.lru_cache(maxsize=8)
def _boxed_params(config: ThinkerConfig) -> Any:
    """The model's init traced once per config (no memory allocated): shapes with their logical axes."""
    model = Qwen3ASR(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    feats = jnp.zeros((1, config.audio.num_mel_bins, config.audio.chunk_frames), jnp.float32)
    fmask = jnp.ones((1, config.audio.chunk_frames), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), feats, fmask))[
        "params"
    ]


def abstract_params(config: ThinkerConfig) -> dict:
    """The param tree of ``Qwen3ASR(config)`` as ShapeDtypeStructs (no memory allocated)."""
    return meta.unbox(_boxed_params(config))


def param_logical_axes(config: ThinkerConfig) -> dict:
    """The logical axis names of every param of ``Qwen3ASR(config)``, as a tree of tuples shaped like the params."""
    specs = nn.get_partition_spec(_boxed_params(config))
    return jax.tree_util.tree_map(tuple, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def flatten_params(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` for every leaf of a nested dict, depth first."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flatten_params(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def unflatten_params(flat: dict[tuple[str, ...], Any]) -> dict:
    """The nested dict of ``{path: leaf}`` (the inverse of ``flatten_params``)."""
    return traverse_util.unflatten_dict(flat)


def params_from_state_dict(
    tensors: dict[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    config: ThinkerConfig,
    dtype: Any = None,
    source: str = "checkpoint",
) -> dict:
    """Map a torch-layout state dict (either key layout) to the Flax param tree (numpy arrays).

    Raises CheckpointError listing every missing, unexpected and mis-shaped tensor.
    """
    expected = dict(flatten_params(abstract_params(config)))
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
        target_dtype = np.asarray(array).dtype if dtype is None else np.dtype(dtype)
        target = None
        if layer is not None:
            if path not in filled:
                filled[path] = aligned_empty((n_layers[path[0]], *want), target_dtype)
            target = filled[path][layer]
        try:
            value = _to_flax(np.asarray(array), path[-1], tuple(want), target_dtype, target)
        except ValueError:
            misshaped.append(f"{key}: {tuple(np.shape(array))} does not fit {path} {tuple(want)}")
            continue
        if layer is None:
            # At most one copy: layout (a transposed view becomes contiguous) and dtype together, aligned.
            if not (value.flags.c_contiguous and value.dtype == target_dtype and value.ctypes.data % 64 == 0):
                value = _aligned_copy(value, target_dtype)
            filled[path] = value
            continue
        if not np.may_share_memory(value, target):  # (a transposed kernel is already written in place)
            if value.dtype == target_dtype:  # the one copy, the layout converted on the way
                _as_bits(target)[...] = _as_bits(value)
            else:  # the one copy, converting the layout and dtype on the way
                target[...] = value
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
    return unflatten_params(filled)


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


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` of every tensor in ``files``, read one tensor at a time from the memory-mapped file (so
    the host holds one tensor of the file at a time, not the whole file)."""
    for file in files:
        try:
            with safe_open(file, framework="np", backend="pread") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


# ----------------------------------------------------------------------------------------------------------------
# The converted-weights cache

WEIGHTS_CACHE_ENV = "QASR_WEIGHTS_CACHE"
# Bumped whenever the param tree's layout or the cache's file format changes: old entries are then not used.
_CACHE_FORMAT = 1
_CACHE_INDEX = "index.json"


def weights_cache_dir(setting: str | os.PathLike | bool | None = None) -> str | None:
    """The converted-weights cache directory ``setting`` stands for, or None when it is off.

    ``None``: the ``QASR_WEIGHTS_CACHE`` environment variable if set, else ``$XDG_CACHE_HOME/qasr-jax/weights``
    (``~/.cache/qasr-jax/weights``); a path: that directory; ``False`` or "off"/"0"/"false"/"no"/"": off.
    """
    return compile_cache.resolve_setting(setting, WEIGHTS_CACHE_ENV, "weights")


def _cache_key(files: list[str], config: ThinkerConfig, dtype: Any) -> str:
    """An entry's name: the checkpoint files (name, size, modification time), the config and the dtype asked."""
    stats = []
    for file in files:
        st = os.stat(file)
        stats.append([os.path.abspath(file), st.st_size, st.st_mtime_ns])
    raw = json.dumps(
        {"format": _CACHE_FORMAT, "files": stats, "config": config_to_dict(config),
         "dtype": None if dtype is None else np.dtype(dtype).name},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _read_cache(entry: str, config: ThinkerConfig) -> dict | None:
    """The cached param tree of ``entry`` as copy-on-write mappings of its files, or None when the entry is absent
    or does not hold exactly the params of ``config`` (a missing, short or mis-shaped file)."""
    try:
        with open(os.path.join(entry, _CACHE_INDEX), encoding="utf-8") as handle:
            index = json.load(handle)
        expected = dict(flatten_params(abstract_params(config)))
        if index.get("format") != _CACHE_FORMAT or len(index["params"]) != len(expected):
            return None
        flat = {}
        for item in index["params"]:
            path, shape, dtype = tuple(item["path"]), tuple(item["shape"]), np.dtype(item["dtype"])
            if path not in expected or tuple(expected[path].shape) != shape:
                return None
            file = os.path.join(entry, item["file"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if os.path.getsize(file) != nbytes:
                return None
            # Copy-on-write: a write into a param (a donated buffer) never reaches the file.
            flat[path] = (
                np.memmap(file, dtype=dtype, mode="c", shape=shape) if nbytes else np.zeros(shape, dtype)
            )
        return unflatten_params(flat)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(entry: str, params: dict) -> None:
    """Write ``params`` (host arrays) as ``entry``: into a temporary dir beside it, renamed into place when
    complete, so a reader never sees a half-written entry. A failure (disk full, read-only) leaves no entry."""
    parent = os.path.dirname(entry)
    staging = None
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".writing-", dir=parent)
        items = []
        for i, (path, value) in enumerate(flatten_params(params)):
            value = np.ascontiguousarray(value)
            name = f"{i:04d}.bin"
            with open(os.path.join(staging, name), "wb") as handle:
                handle.write(memoryview(value.reshape(-1).view(np.uint8)))
            items.append(
                {"path": list(path), "shape": list(value.shape), "dtype": value.dtype.name, "file": name}
            )
        with open(os.path.join(staging, _CACHE_INDEX), "w", encoding="utf-8") as handle:
            json.dump({"format": _CACHE_FORMAT, "params": items}, handle)
        os.rename(staging, entry)
        staging = None
    except OSError:
        pass  # another process wrote the same entry first, or the cache dir is not writable: load without it
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _host_params(
    path: str, config: ThinkerConfig, dtype: Any, weights_cache: str | os.PathLike | bool | None
) -> dict:
    """The param tree on the host from a safetensors checkpoint dir: mapped from the converted-weights cache when
    it holds this checkpoint, else converted (and, with the cache on, written to it for the next load)."""
    files = safetensors_files(path)
    cache = weights_cache_dir(weights_cache)
    entry = None if cache is None else os.path.join(cache, _cache_key(files, config, dtype))
    if entry is not None:
        cached = _read_cache(entry, config)
        if cached is not None:
            return cached
    host = params_from_state_dict(iter_safetensors(files), config, dtype=dtype, source=path)
    if entry is not None:
        shutil.rmtree(entry, ignore_errors=True)  # an entry that did not read back whole
        _write_cache(entry, host)
    return host


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ORBAX_PARAMS_DIR))


def shard_array(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array in ``sharding`` from a host array every process holds: each device copies only its slice."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


Shardings = Any  # a pytree of jax.sharding.Sharding shaped like the params, or config → such a pytree


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = None,
    shardings: Shardings | None = None,
    weights_cache: str | os.PathLike | bool | None = None,
    *,
    revision: str | None = None,
) -> tuple[ThinkerConfig, dict]:
    """Load ``(config, params)`` from a checkpoint dir (released, "-hf" or Orbax layout) or a Hugging Face Hub
    model name such as ``Qwen/Qwen3-ASR-0.6B`` at ``revision`` (``hub.resolve_model``: a local path wins).

    Params keep the checkpoint's dtype (bf16 stays bf16) unless ``dtype`` is given. ``shardings`` (a tree, or a
    function of the config giving one, e.g. ``sharding.param_shardings``) places every param straight into its
    sharding: Orbax checkpoints are read by each device for its own slices; safetensors are converted tensor by
    tensor into one host copy, from which each device copies only its slice, the host copy freed leaf by leaf.

    ``weights_cache`` (see ``weights_cache_dir``; default on): a safetensors checkpoint converted once is kept in
    the param layout, and later loads map it instead of converting: on the CPU the mapped pages become the
    params as they are, and with ``shardings`` each device reads only its slices of the mapped files.
    """
    path = resolve_model(path, revision)
    if os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
        raise UnsafeCheckpointError(f"{path}: pickle weight files are not read (they can run arbitrary code)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = load_config(path)
    if callable(shardings):
        shardings = shardings(config)
    if is_orbax_checkpoint(path):
        return config, restore_params(os.path.join(path, ORBAX_PARAMS_DIR), config, dtype, shardings)
    host = _host_params(path, config, dtype, weights_cache)
    leaves, treedef = jax.tree_util.tree_flatten(host)
    del host
    targets = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
    placed = []
    for i, sharding in enumerate(targets):
        if sharding is None:
            # On the CPU the aligned host array becomes the device buffer as it is (no second copy); elsewhere
            # it is copied to the device.
            placed.append(jax.device_put(leaves[i], may_alias=True))
        else:
            placed.append(shard_array(leaves[i], sharding))
        # Drop the host reference once placed: the host holds at most one tensor beside the placed ones.
        leaves[i] = None
        placed[-1].block_until_ready()
    return config, jax.tree_util.tree_unflatten(treedef, placed)


# ----------------------------------------------------------------------------------------------------------------
# Orbax


def save_params(path: str | os.PathLike, params: dict) -> None:
    """Write ``params`` as an Orbax PyTree checkpoint at ``path`` (which must not exist yet)."""
    path = os.path.abspath(os.fspath(path))
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, params)


def restore_params(
    path: str | os.PathLike, config: ThinkerConfig, dtype: Any = None, shardings: Any = None
) -> dict:
    """Restore params saved by ``save_params``, checked against ``config``'s param shapes.

    ``shardings``: an optional pytree of ``jax.sharding.Sharding`` matching the params; each array is then
    read straight into its sharding.
    """
    path = os.path.abspath(os.fspath(path))
    expected = abstract_params(config)
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            meta = ckptr.metadata(path)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{path}: not an Orbax checkpoint ({e})") from e
        tree_meta = getattr(meta, "item_metadata", meta)
        tree_meta = getattr(tree_meta, "tree", tree_meta)
        have = {p: tuple(m.shape) for p, m in flatten_params(dict(tree_meta))}
        want = {p: tuple(s.shape) for p, s in flatten_params(expected)}
        missing = sorted("/".join(p) for p in want if p not in have)
        unexpected = sorted("/".join(p) for p in have if p not in want)
        misshaped = sorted(
            f"{'/'.join(p)}: {have[p]} vs {want[p]}" for p in want if p in have and have[p] != want[p]
        )
        if missing or unexpected or misshaped:
            raise CheckpointError(
                f"{path}: the Orbax params do not match the config; missing {missing}, unexpected {unexpected}, "
                f"mis-shaped {misshaped}"
            )
        if shardings is None:
            shardings = jax.tree_util.tree_map(
                lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), expected
            )
        restore_args = jax.tree_util.tree_map(
            lambda s, d: ocp.ArrayRestoreArgs(sharding=s, dtype=dtype), shardings, expected
        )
        params = ckptr.restore(path, restore_args=restore_args)
    return jax.tree_util.tree_map(jnp.asarray, params)


def tree_equal(a: dict, b: dict) -> list[str]:
    """Paths whose arrays differ (shape, dtype or any bit) between two param trees: a NaN equals the same NaN,
    and -0.0 differs from 0.0."""
    fa, fb = dict(flatten_params(a)), dict(flatten_params(b))
    diffs = [("/".join(p)) for p in fa.keys() ^ fb.keys()]
    for p in fa.keys() & fb.keys():
        x, y = np.asarray(fa[p]), np.asarray(fb[p])
        if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
            diffs.append("/".join(p))
    return sorted(diffs)


# ----------------------------------------------------------------------------------------------------------------
# Export: params → the released layout (the inverse of ``params_from_state_dict``): stacked layers unstacked to
# ``layers.N``, kernels back to torch's Linear ``[out, in]`` (heads merged) and Conv2d OIHW, names with the
# ``thinker.`` prefix. A tied head is also stored as ``thinker.lm_head.weight``, as the released checkpoints store
# it. Both our loader and the official ``from_pretrained`` read the result.

# Linear layers whose kernel has two input axes (heads, head_dim) rather than one.
_MERGED_INPUT = ("o_proj", "out_proj")


def _torch_name(path: tuple[str, ...], layer: int | None) -> str:
    """The released name (without ``thinker.``) of a param path (``layer``: index into a stacked leaf).

    Checked against ``_flax_location``, the loader's mapping, so export and load cannot drift apart.
    """
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


def linear_input_axes(module: str) -> int:
    """How many leading axes of a Linear's kernel are its input (2 for the attention outputs: heads, head_dim)."""
    return 2 if module in _MERGED_INPUT else 1


def module_name(module_path: tuple[str, ...], layer: int | None) -> str:
    """The official model's name of a module (``thinker.model.layers.3.self_attn.q_proj``) from its path in the
    param tree (``("decoder", "layers", "self_attn", "q_proj")``) and layer index (None: not a stacked layer)."""
    return "thinker." + _torch_name((*module_path, "kernel"), layer).rpartition(".")[0]


def module_location(name: str) -> tuple[tuple[str, ...], int | None] | None:
    """(module path in the param tree, layer index or None) of an official module name in either key layout
    (``thinker.…`` or the "-hf" names), or None when the name is no module of the thinker."""
    canonical = canonical_name(name + ".weight")
    location = None if canonical is None else _flax_location(canonical)
    return None if location is None else (location[0], location[1])


def _torch_layout(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """One (per-layer) Flax leaf in torch's layout."""
    leaf = path[-1]
    if leaf == "kernel" and value.ndim == 4:  # Conv2d HWIO → OIHW
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel":
        fan_in = int(np.prod(value.shape[: linear_input_axes(path[-2])]))
        return value.reshape(fan_in, -1).T  # [in, out] → Linear [out, in]
    if leaf == "bias":
        return value.reshape(-1)  # per-head biases [heads, head_dim] → [out]
    return value


def host_array(value: Any) -> np.ndarray:
    """A (possibly sharded, multi-process) array as one host numpy array (a collective on several processes)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def released_tensors(
    params: dict, config: ThinkerConfig, dtype: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` in the released ``thinker.*`` layout for every tensor of ``params``."""
    for path, value in flatten_params(params):
        host = host_array(value)
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


def export_pretrained(
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


__all__ = [
    "ORBAX_PARAMS_DIR",
    "SIDE_FILES",
    "abstract_params",
    "export_pretrained",
    "flatten_params",
    "host_array",
    "is_orbax_checkpoint",
    "iter_safetensors",
    "linear_input_axes",
    "load_pretrained",
    "module_location",
    "module_name",
    "param_logical_axes",
    "params_from_state_dict",
    "released_tensors",
    "restore_params",
    "safetensors_files",
    "save_params",
    "shard_array",
    "tree_equal",
    "unflatten_params",
    "weights_cache_dir",
]
