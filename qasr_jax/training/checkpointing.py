"""Orbax checkpoints of the whole train state: params, optimizer state, step and the data iterator's position.

Saves are atomic: Orbax writes a step into a temporary directory and renames it when every file is written,
so a process killed mid-save leaves only a temporary directory, which is ignored (and removed) on restart;
``latest_step`` is always a complete checkpoint. The last ``keep_last`` steps are kept. With
``async_save`` the arrays are copied off the devices and written in the background while training goes on.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from qasr_jax.training.step import TrainState


class Checkpoints:
    """The checkpoints of one run directory (``<output_dir>/checkpoints/<step>/{state,data,meta}``)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, async_save: bool = True) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Save ``state`` with the data iterator state and run metadata (JSON) as ``step``."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(
        self, step: int, abstract_state: TrainState
    ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """(state, data iterator state, metadata) of ``step``, the arrays read straight into their shardings."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["data"]), dict(restored["meta"])

    def wait(self) -> None:
        """Block until background saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


__all__ = ["Checkpoints"]
