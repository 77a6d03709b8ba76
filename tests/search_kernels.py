"""Shared test helper: run a test on one nearest-code search kernel, or skip where a fused one cannot run."""

import os

import pytest

from fvq.quantizers.search import fused as fused_search


def use_search_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """Select ``kernel`` (``fused``, ``avx2``, ``avx512``, ``blocked`` or ``coarse``) through ``FVQ_SEARCH_KERNEL``
    for the rest of the test.

    Where a fused kernel cannot run the test is skipped with the reason. Where the AVX2 kernel cannot be built,
    ``FVQ_REQUIRE_FUSED_SEARCH=1`` (as ``make test`` sets it) turns that into a failure; the AVX-512 kernel is skipped
    on CPUs without AVX-512F ("needs AVX-512F; this CPU lacks it") unless ``FVQ_REQUIRE_AVX512_SEARCH=1``, for the
    verification run on an AVX-512 machine.
    """
    if kernel in ("fused", "avx2", "avx512"):
        name = "avx2" if kernel == "fused" else kernel
        if name == "avx512" and not fused_search.cpu_supports("avx512"):
            if os.environ.get("FVQ_REQUIRE_AVX512_SEARCH") == "1":
                raise fused_search.FusedKernelUnavailable("FVQ_REQUIRE_AVX512_SEARCH=1 on a CPU without AVX-512F")
            pytest.skip("the avx512 kernel needs AVX-512F; this CPU lacks it")
        try:
            fused_search._load(name)
        except fused_search.FusedKernelUnavailable as err:
            if os.environ.get("FVQ_REQUIRE_FUSED_SEARCH") == "1" or (
                name == "avx512" and os.environ.get("FVQ_REQUIRE_AVX512_SEARCH") == "1"
            ):
                raise
            pytest.skip(f"the {name} kernel cannot run here: {err}")
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", kernel)
