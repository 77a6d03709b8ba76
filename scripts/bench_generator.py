#!/usr/bin/env python
"""Benchmark generator training: tokens/s, model-FLOP utilisation against the sgemm peak, peak memory.

Examples::

    python scripts/bench_generator.py                                  # gpt_tiny at batch 32, GPT-B at batch 4
    python scripts/bench_generator.py --cases gpt_b:8 --steps 5        # another batch, more timed steps
    python scripts/bench_generator.py --device cuda --precision bf16 --cases gpt_l:32
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from fvq.bench.generator import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
