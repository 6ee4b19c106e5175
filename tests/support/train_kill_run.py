"""``python -m train`` with a hard kill at a chosen moment, for the kill-and-resume test.

    python -m tests.support.train_kill_run CONFIG.toml [--kill-in-save STEP] [--kill-after-step STEP]

``--kill-in-save STEP``: SIGKILL the process while checkpoint STEP is being committed (its files are written,
the atomic rename that completes it has not happened). ``--kill-after-step STEP``: SIGKILL right after step
STEP's metrics are written, before its checkpoint (if any) is saved; an earlier background save may still be
in flight. Without either, the run finishes normally.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--kill-after-step", type=int, default=None)
    args = parser.parse_args()

    if args.kill_in_save is not None:
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_or_die(self, *a, **kw):  # type: ignore[no-untyped-def]
            if os.path.basename(os.fspath(self.get_final())) == str(args.kill_in_save):
                _kill()
            return await finalize(self, *a, **kw)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die

    callbacks = []
    if args.kill_after_step is not None:

        def kill_after(step: int, metrics: dict) -> None:
            if step == args.kill_after_step:
                _kill()

        callbacks.append(kill_after)

    from qasr_jax.training import load_train_config, train

    summary = train(load_train_config(args.config), callbacks=callbacks)
    print("finished at step", summary["step"])


if __name__ == "__main__":
    main()
