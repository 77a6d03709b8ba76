#!/usr/bin/env python
"""Benchmark the exact nearest-code search (same as ``fvq bench search``); ``--help`` lists the options.

Examples::

    python scripts/bench_search.py                   # K in {4096, 16384, 65536, 262144}, D = 256, N = 8192
    python scripts/bench_search.py --memory-check    # plus the 4 GiB check at K = 262,144, N = 32,768
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from fvq.bench.search import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
