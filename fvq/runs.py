"""The run folder: what ``fvq train`` writes, where, and how every reader finds it.

One module knows the layout, so the trainer (the writer) and the loader, ``fvq eval``, ``fvq report`` and the token
tools (the readers) agree by construction::

    RUN/
      config.yaml            the run's config as plain data (also stored in every checkpoint)
      log.jsonl              one JSON line of scalars per logged step
      tensorboard/           the same scalars for TensorBoard (when installed)
      metrics.json           the latest validation
      checkpoints/           step_XXXXXXXX.pt, written atomically by rank 0 (the newest few are kept)
      ...                    pictures and statistics of the latest validation (each task names its own)
      model/                 the final model as an export folder (generator runs)
      eval/                  what ``fvq eval`` writes for the run

Checkpoints hold tensors and plain data only and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from fvq.weights import atomic_path, atomic_write_bytes

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)\.pt$")
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
EXPORT_DIR = (
    "model"  # a run's final model as an export folder (config.json + model.safetensors), when its task writes one
)
# what a training run writes besides config.yaml: a folder holding any of these holds a run
RUN_OUTPUTS = (
    CHECKPOINT_DIR,
    LOG_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    EXPORT_DIR,
    "reconstructions.png",
    "val_code_counts.pt",
)


@dataclass(frozen=True)
class RunFolder:
    """Paths of one training run.

    Attributes:
        path: The run folder (the ``--out`` of ``fvq train``).
    """

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT_DIR

    def file(self, name: str) -> Path:
        """Another file of the run (a picture or statistic a task writes at validation)."""
        return self.path / name

    @classmethod
    def containing(cls, path: str | os.PathLike) -> RunFolder | None:
        """The run that ``path`` is or belongs to: a run folder, or a checkpoint inside ``RUN/checkpoints``;
        ``None`` for anything else (an exported model folder, a loose checkpoint file)."""
        path = Path(path)
        if path.is_dir() and not (path / "config.json").is_file():
            return cls(path)
        if path.is_file() and path.parent.name == CHECKPOINT_DIR:
            return cls(path.parent.parent)
        return None

    def previous_outputs(self) -> list[str]:
        """Names of the outputs of an earlier run present in the folder."""
        return [name for name in RUN_OUTPUTS if (self.path / name).exists()]

    def prepare(self, *, resume: bool, overwrite: bool, is_main: bool) -> None:
        """Refuse to mix two runs in one folder: a folder with a previous run needs ``resume`` or ``overwrite``
        (which deletes the previous run's outputs on rank 0; callers synchronise ranks afterwards)."""
        previous = self.previous_outputs()
        if resume or not previous:
            return
        if not overwrite:
            raise ValueError(
                f"{self.path} already holds a run ({', '.join(previous)}); continue it with --resume, start over "
                f"with --overwrite, or choose another --out"
            )
        if is_main:
            for name in previous:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()

    def write_config(self, config: dict[str, Any]) -> None:
        """Write ``config.yaml`` (rank 0 only)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.config_file, yaml.safe_dump(config, sort_keys=False).encode())

    def read_config(self) -> dict[str, Any]:
        """The run's config: ``config.yaml``, else the newest checkpoint's; ``{}`` when there is neither."""
        if self.config_file.is_file():
            with open(self.config_file) as f:
                config = yaml.safe_load(f) or {}
            if not isinstance(config, dict):
                raise ValueError(f"{self.config_file} must hold a YAML mapping, got {type(config).__name__}")
            return config
        newest = self.latest_checkpoint()
        if newest is None:
            return {}
        return dict(read_checkpoint_entry(newest, "config") or {})

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.checkpoint_dir)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_dir)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint files
def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep: int) -> Path:
    """Write ``state`` to ``directory/step_{step:08d}.pt`` atomically, then keep only the ``keep`` newest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}.pt"
    with atomic_path(final) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code is unpickled).

    Args:
        path: The checkpoint file.
        map_location: Where tensors go.
        mmap: Memory-map the file (tensors stay on disk until touched); legacy non-zip files fall back to a read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if mmap:
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                pass
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


def read_checkpoint_entry(path: str | Path, key: str) -> Any:
    """One entry of a checkpoint (e.g. ``"config"``), read memory-mapped so the tensors stay on disk."""
    state = load_checkpoint(path, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not an fvq training checkpoint (expected a mapping)")
    return state.get(key)
