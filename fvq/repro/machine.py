"""What a result records about the machine and the time it took: CPU model and features, torch, wall and CPU time."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

# instruction-set features that decide CPU speed for this code (sgemm, bf16, the fused nearest-code kernels)
FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def _lscpu() -> dict[str, str]:
    if shutil.which("lscpu") is None:
        return {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def machine_info() -> dict[str, Any]:
    """The CPU (``lscpu`` model name, cores, the flags of :data:`FLAGS_OF_INTEREST` it has), torch and Python."""
    import torch

    info = _lscpu()
    flags = set(info.get("Flags", "").split())
    return {
        "cpu_model": info.get("Model name") or platform.processor() or "unknown",
        "cpus": os.cpu_count(),
        "threads_per_core": info.get("Thread(s) per core"),
        "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The checkout's commit (with ``+dirty`` when tracked files differ), or ``None`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


@dataclass
class Stopwatch:
    """Wall and CPU time (all threads of this process) since :meth:`start`."""

    wall0: float = 0.0
    cpu0: float = 0.0

    def start(self) -> Stopwatch:
        self.wall0, self.cpu0 = time.time(), time.process_time()
        return self

    def read(self) -> dict[str, float]:
        return {"wall_s": time.time() - self.wall0, "cpu_s": time.process_time() - self.cpu0}
