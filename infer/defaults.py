"""The programs' checkpoint options: their help, and the fallback to the demo models shipped under models/ when
no checkpoint is named."""

from __future__ import annotations

import os
import sys
from typing import TextIO

RELEASED = {False: "Qwen/Qwen3-ASR-0.6B", True: "Qwen/Qwen3-ForcedAligner-0.6B"}

REVISION_HELP = "the Hugging Face Hub branch, tag or commit of a --model NAME (default: main)"


def model_help(aligner: bool = False) -> str:
    """How a checkpoint option reads its value: a local dir, or a Hub model name (``qasr_jax.hub``)."""
    return (
        f"a local directory, or a Hugging Face Hub model name such as {RELEASED[aligner]} (fetched once into "
        "the hub cache; with HF_HUB_OFFLINE=1 only the cache is read)"
    )


def model_or_demo(
    path: str | None, *, aligner: bool = False, option: str = "--model", stream: TextIO | None = None
) -> str:
    """``path`` (a dir or a Hub model name) when given; otherwise the demo model's dir, saying so in one line on
    ``stream`` (default stderr) with how to use a released checkpoint instead (``option`` is the program's option
    naming the checkpoint)."""
    if path is not None:
        return path
    from qasr_jax import demo  # imports the package: not needed for the programs' --help

    released = RELEASED[aligner]
    local = released.split("/")[1]
    try:
        demo_dir = demo.default_aligner_path() if aligner else demo.default_model_path()
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no {option} given and {error}. Pass {option} {released} (a Hugging Face Hub name) or a checkpoint "
            f"dir (huggingface-cli download {released} --local-dir {local}), or train the demo models: "
            "python -m train.demo_recipe"
        ) from None
    what = "forced aligner" if aligner else "model"
    print(
        f"note: no {option} given: using the demo {what} {os.path.relpath(demo_dir)} (synthetic English/German "
        f"speech only); for real speech pass {option} {released}, or huggingface-cli download {released} "
        f"--local-dir {local} and pass {option} {local}",
        file=stream if stream is not None else sys.stderr,
    )
    return os.fspath(demo_dir)
