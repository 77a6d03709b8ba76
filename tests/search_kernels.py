"""Shared test helper: run a test on one nearest-code search kernel, or skip where the fused one cannot run."""

import os

import pytest

from fvq.quantizers.search import fused as fused_search


def use_search_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """Select ``kernel`` (``fused`` or ``blocked``) through ``FVQ_SEARCH_KERNEL`` for the rest of the test.

    Where the fused kernel cannot be built the test is skipped, unless ``FVQ_REQUIRE_FUSED_SEARCH=1`` (as
    ``make test`` sets it), which turns that into a failure.
    """
    if kernel == "fused":
        try:
            fused_search._load()
        except fused_search.FusedKernelUnavailable as err:
            if os.environ.get("FVQ_REQUIRE_FUSED_SEARCH") == "1":
                raise
            pytest.skip(f"the fused kernel cannot run here: {err}")
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", kernel)
