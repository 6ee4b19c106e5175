"""Run metrics: one JSON object per line in ``metrics.jsonl``, a line on the log, and a progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

log = logging.getLogger("qasr_jax.training")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends ``{"kind", "step", "time", ...}`` records to a JSONL file (only on process 0) and logs them."""

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.enabled = enabled
        if self.enabled and self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, kind: str, step: int, values: dict[str, Any], echo: bool = True) -> None:
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        if not self.enabled:
            return
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if not echo:
            return
        shown = " ".join(f"{k}={_format(v)}" for k, v in record.items() if k not in ("kind", "step", "time"))
        log.info("%s step %d: %s", kind, step, shown)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (optionally of one kind), in file order."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if kind is None or record.get("kind") == kind:
                    records.append(record)
    return records


class Progress:
    """A tqdm bar with step, loss and throughput on stderr when it is a terminal (or ``force``)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, force: bool = False) -> None:
        self._bar = None
        if enabled and (force or sys.stderr.isatty()):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, steps: int, **values: float) -> None:
        if self._bar is None:
            return
        self._bar.update(steps)
        if values:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


__all__ = ["MetricsWriter", "Progress", "read_metrics"]
