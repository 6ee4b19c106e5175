"""Orbax save/restore of the param tree, restoring straight into a target sharding when one is given."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.config import ThinkerConfig
from qasr_jax.errors import CheckpointError

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


def save_params(path: str | os.PathLike, params: dict) -> None:
    """Write ``params`` as an Orbax PyTree checkpoint at ``path`` (which must not exist yet)."""
    import orbax.checkpoint as ocp

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
    import orbax.checkpoint as ocp

    from qasr_jax.weights import _flatten, abstract_params

    path = os.path.abspath(os.fspath(path))
    expected = abstract_params(config)
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            meta = ckptr.metadata(path)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{path}: not an Orbax checkpoint ({e})") from e
        tree_meta = getattr(meta, "item_metadata", meta)
        tree_meta = getattr(tree_meta, "tree", tree_meta)
        have = {p: tuple(m.shape) for p, m in _flatten(dict(tree_meta))}
        want = {p: tuple(s.shape) for p, s in _flatten(expected)}
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
    """Paths whose arrays differ (shape, dtype or any value) between two param trees."""
    from qasr_jax.weights import _flatten

    fa, fb = dict(_flatten(a)), dict(_flatten(b))
    diffs = [("/".join(p)) for p in fa.keys() ^ fb.keys()]
    for p in fa.keys() & fb.keys():
        x, y = np.asarray(fa[p]), np.asarray(fb[p])
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
            diffs.append("/".join(p))
    return sorted(diffs)
