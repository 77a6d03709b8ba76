"""Run logs: JSONL scalars (always), TensorBoard scalars (when installed), written by rank 0 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricLogger:
    """Appends ``{"step": s, "time": t, **scalars}`` lines to ``DIR/log.jsonl`` and mirrors them to TensorBoard.

    Args:
        run_dir: Run directory.
        enabled: False on ranks other than 0 (every call is then a no-op).
        tensorboard: Also write TensorBoard event files under ``DIR/tensorboard`` when the package is installed.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if value is not None:
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``log.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
