"""``python -m infer ARGS...`` that kills itself (SIGKILL) the moment its merge starts deleting the part files.

    python -m tests.support.die_during_merge transcribe --manifest LIST --output OUT ...

An audit hook (``sys.addaudithook``) watches ``os.remove``: merging a manifest job's parts writes the records into
OUT, makes it durable, then removes the parts, so this process dies with every record merged and every part still
there, the state in which a rerun could write a record twice. Nothing in the program itself is changed.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _die_on_part_removal(event: str, args: tuple) -> None:
    if event == "os.remove" and ".part-" in os.fspath(args[0]):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.addaudithook(_die_on_part_removal)
    sys.argv = ["infer", *sys.argv[1:]]
    runpy.run_module("infer", run_name="__main__", alter_sys=True)
