"""The exact nearest-code search behind every codebook lookup, and its two kernels.

* :func:`nearest_codes`, the entry point: checks the inputs, then hands the call to one of
* :mod:`~fvq.quantizers.search.fused`: a fused AVX2 + FMA CPU kernel (``kernels/nearest_codes_avx2.c``, compiled on
  first use and cached) that folds register tiles of distances into running minima; or
* :mod:`~fvq.quantizers.search.blocked`: the blocked sgemm search on cache-sized blocks of distances (any device).

``FVQ_SEARCH_KERNEL`` (``auto``, ``fused``, ``blocked``) picks between them; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fvq.quantizers.search import blocked, fused
from fvq.quantizers.search.fused import FusedKernelUnavailable

DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20

__all__ = ["DEFAULT_MAX_CHUNK_BYTES", "FusedKernelUnavailable", "nearest_codes"]


def _check_search_inputs(z: Tensor, codebook: Tensor, max_chunk_bytes: int) -> None:
    """Raise a clear error unless ``z`` is ``(N, D)``, ``codebook`` is ``(K >= 1, D)`` and the bound holds a float."""
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, Tensor):
            raise TypeError(f"nearest_codes expects {name} to be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"nearest_codes expects a floating-point {name}, got dtype {t.dtype}")
    if z.ndim != 2:
        raise ValueError(f"nearest_codes expects z of shape (N, D), got {z.ndim} dims: {tuple(z.shape)}")
    if codebook.ndim != 2:
        raise ValueError(
            f"nearest_codes expects codebook of shape (K, D), got {codebook.ndim} dims: {tuple(codebook.shape)}"
        )
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_codes expects z (N, D) and codebook (K, D) with the same D; got D = {z.shape[1]} for z "
            f"{tuple(z.shape)} and D = {codebook.shape[1]} for codebook {tuple(codebook.shape)}"
        )
    if codebook.shape[0] == 0:
        raise ValueError(
            f"nearest_codes expects a codebook with K >= 1 codes, got an empty codebook {tuple(codebook.shape)}"
        )
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 4:
        raise ValueError(f"max_chunk_bytes must be an int >= 4 (one fp32 distance), got {max_chunk_bytes!r}")


def nearest_codes(z: Tensor, codebook: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Exact nearest code under squared L2 distance, in fp32, with bounded memory.

    ``argmin_k ||z_i - c_k||^2 = argmin_k (||c_k||^2 - 2 z_i . c_k)``, as ``||z_i||^2`` is the same for every code.
    On CPUs whose widest vector unit is AVX2 (and where ``FVQ_SEARCH_KERNEL`` allows it) the fused kernel of
    :mod:`fvq.quantizers.search.fused` runs whenever every distance is provably finite: it folds register tiles of
    distances into running minima and holds no distance block at all. Otherwise (AVX-512 CPUs, GPUs, non-finite
    inputs, ``FVQ_SEARCH_KERNEL=blocked``) the blocked sgemm search of :mod:`fvq.quantizers.search.blocked` runs on
    cache-sized blocks of distances, none ever larger than ``max_chunk_bytes``. Both give the ``argmin`` of the full
    ``N x K`` matrix of their fp32 distances with ties going to the lowest index, identical codes included. Everything
    runs in fp32 with autocast disabled: bf16 / fp16 inputs are cast up.

    Args:
        z: ``(N, D)`` query vectors, any float dtype.
        codebook: ``(K, D)`` code vectors, ``K >= 1``, on the same device as ``z``.
        max_chunk_bytes: Upper bound in bytes on one fp32 distance block (at least 4). Within it, the block shape
            is chosen for speed (cache-sized on CPU). Besides the block, the search holds
            ``(min(N, max(rows, blocked._SWEEP_ROWS)) + codes) x (D + 1)`` floats of augmented operands and ``O(N + K)``
            small vectors; on CPU the block and operand buffers are kept for the next call of the same shape on the
            same thread (:func:`~fvq.quantizers.search.blocked._search_buffers`).

    Returns:
        ``(N,)`` int64 indices into ``codebook``.

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong ranks, different ``D``, an empty codebook, different devices or a bound below 4 bytes,
            or an unknown ``FVQ_SEARCH_KERNEL``.
        FusedKernelUnavailable: with ``FVQ_SEARCH_KERNEL=fused`` where that kernel cannot run.
    """
    _check_search_inputs(z, codebook, max_chunk_bytes)
    device = z.device
    out = torch.empty(z.shape[0], dtype=torch.long, device=device)
    if z.shape[0] == 0:
        return out
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        z, codebook = z.detach(), codebook.detach()
        code_sq = blocked._squared_norms(codebook)  # (K,) fp32
        if fused.wanted(device) and fused.distances_are_finite(z, code_sq):
            return fused.nearest_codes_fused(z, codebook, code_sq, out=out)
        return blocked.nearest_codes_blocked(z, codebook, code_sq, max_chunk_bytes, out)
