#!/usr/bin/env python
"""Benchmark class-conditional sampling (GPT with the KV cache vs full recomputation, the 50k protocol); ``--help``
lists the options.

Examples::

    python scripts/bench_sampling.py                      # GPT-B, V = 16,384, 256 tokens, batch 8 with CFG 1.5
    python scripts/bench_sampling.py --device cuda --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from fvq.bench.sampling import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
