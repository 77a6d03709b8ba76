"""Measure fvq's training and sampling on a CUDA machine in one run (see :mod:`fvq.bench.gpu`).

    python scripts/gpu_check.py [--budget-s 450] [--out gpu_check.json] [--no-compile] [--batch 32]
    python scripts/gpu_check.py --smoke --out /tmp/gpu_check.json     # tiny sizes, on CPU too: checks the script

Prints a markdown table and writes every figure to the JSON file (rewritten after each part).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fvq.bench.gpu import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
