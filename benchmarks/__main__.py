"""``python -m benchmarks``: the benchmark programs, each with the first paragraph of its description."""

from __future__ import annotations

import ast
import os
import sys

PROGRAMS = (
    "transcribe", "forward", "load", "decode", "manifest", "stream", "concurrent_streams", "aligner", "bf16",
    "adapters", "vad", "roofline", "profile_step", "kernels", "train_step", "accelerator_suite",
)  # fmt: skip


def summary(name: str) -> str:
    """The first paragraph of ``benchmarks/NAME.py``'s docstring, on one line, read without importing it."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    with open(path, encoding="utf-8") as handle:
        doc = ast.get_docstring(ast.parse(handle.read())) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def main() -> int:
    print("usage: python -m benchmarks.NAME [--help]\n\nprograms:")
    for name in PROGRAMS:
        print(f"  {name:18s}  {summary(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
