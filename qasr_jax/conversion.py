"""Checkpoint dir → Orbax checkpoint dir (params + config, tokenizer and processor files), and its check."""

from __future__ import annotations

import dataclasses
import os
import shutil

from qasr_jax.errors import CheckpointError
from qasr_jax.hub import resolve_model
from qasr_jax.weights import (
    ORBAX_PARAMS_DIR,
    SIDE_FILES,
    flatten_params,
    load_pretrained,
    save_params,
    tree_equal,
)

# Everything beside the weights that a converted dir must carry too.
CARRIED_FILES = ("config.json", *SIDE_FILES)


def convert_checkpoint(src: str, dst: str, dtype: str | None = None, *, revision: str | None = None) -> None:
    """Write ``dst`` = Orbax params of ``src`` (optionally cast to ``dtype``) + its side files. ``src``: a
    checkpoint dir or a Hugging Face Hub model name at ``revision`` (``hub.resolve_model``)."""
    if os.path.exists(dst) and os.listdir(dst):
        raise CheckpointError(f"{dst}: destination exists and is not empty")
    src = resolve_model(src, revision)
    _, params = load_pretrained(src, dtype=dtype)
    os.makedirs(dst, exist_ok=True)
    for name in CARRIED_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    save_params(os.path.join(dst, ORBAX_PARAMS_DIR), params)


@dataclasses.dataclass
class VerifyReport:
    tensors: int
    differing: list[str]
    missing_files: list[str]

    @property
    def ok(self) -> bool:
        return not self.differing and not self.missing_files

    def summary(self) -> str:
        if self.ok:
            return f"verified: {self.tensors} tensors identical; side files present"
        return f"verification FAILED: differing tensors {self.differing}; missing files {self.missing_files}"


def verify_conversion(
    src: str, dst: str, dtype: str | None = None, *, revision: str | None = None
) -> VerifyReport:
    """Reload both dirs and compare every tensor (exactly, after the same dtype cast). ``src``: a checkpoint dir
    or a Hugging Face Hub model name at ``revision``."""
    src = resolve_model(src, revision)
    _, a = load_pretrained(src, dtype=dtype)
    _, b = load_pretrained(dst)
    missing = [
        n
        for n in CARRIED_FILES
        if os.path.exists(os.path.join(src, n)) and not os.path.exists(os.path.join(dst, n))
    ]
    count = sum(1 for _ in flatten_params(a))
    return VerifyReport(tensors=count, differing=tree_equal(a, b), missing_files=missing)
