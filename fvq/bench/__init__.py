"""Benchmarks, run as ``fvq bench NAME``: :mod:`fvq.bench.search` (the exact nearest-code search) and
:mod:`fvq.bench.quantizers` (every quantizer family). They import the quantizers; nothing in the library imports them.
"""
