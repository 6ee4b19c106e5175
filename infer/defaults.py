"""The programs' fallback to the demo models shipped under models/ when no checkpoint is named."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from qasr_jax import demo

RELEASED = {False: "Qwen/Qwen3-ASR-0.6B", True: "Qwen/Qwen3-ForcedAligner-0.6B"}


def model_or_demo(
    path: str | None, *, aligner: bool = False, option: str = "--model", stream: TextIO | None = None
) -> str:
    """``path`` when given; otherwise the demo model's dir, saying so in one line on ``stream`` (default stderr)
    with how to use a released checkpoint instead (``option`` is the program's option naming the checkpoint)."""
    if path is not None:
        return path
    released = RELEASED[aligner]
    local = released.split("/")[1]
    try:
        demo_dir = demo.default_aligner_path() if aligner else demo.default_model_path()
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no {option} given and {error}. Pass {option} DIR with a released checkpoint (huggingface-cli "
            f"download {released} --local-dir {local}), or train the demo models: python -m train.demo_recipe"
        ) from None
    what = "forced aligner" if aligner else "model"
    print(
        f"note: no {option} given: using the demo {what} {os.path.relpath(demo_dir)} (synthetic English/German "
        f"speech only); for real speech: huggingface-cli download {released} --local-dir {local} and pass "
        f"{option} {local}",
        file=stream if stream is not None else sys.stderr,
    )
    return os.fspath(demo_dir)
