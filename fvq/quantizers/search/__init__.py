"""The exact nearest-code search behind every codebook lookup, and its kernels.

* :func:`nearest_codes`, the entry point: checks the inputs, then hands the call to one of
* :mod:`~fvq.quantizers.search.fused`: fused CPU kernels (AVX2 + FMA, ``kernels/nearest_codes_avx2.c``; AVX-512F,
  ``kernels/nearest_codes_avx512.c``, compiled but not yet verified), compiled on first use and cached, that fold
  register tiles of distances into running minima;
* :mod:`~fvq.quantizers.search.blocked`: the blocked sgemm search on cache-sized blocks of distances (any device);
* :mod:`~fvq.quantizers.search.coarse`: a bf16 coarse pass that keeps every code a proven error bound cannot rule
  out, then an exact fp32 re-rank (any device; worth it only where bf16 matrix units exist).

:mod:`~fvq.quantizers.search.dispatch` picks one: ``FVQ_SEARCH_KERNEL`` (``auto``, ``fused``, ``avx2``, ``avx512``,
``blocked``, ``coarse``), and in ``auto`` a short one-time measurement of the eligible kernels.
:mod:`~fvq.quantizers.search.reference` emulates the fused kernels' fixed-order fp32 arithmetic in torch.
docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fvq.quantizers.search import blocked, coarse, dispatch, fused
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
    :mod:`fvq.quantizers.search.dispatch` picks the kernel (``FVQ_SEARCH_KERNEL``; in ``auto`` the fastest eligible
    one by a one-time measurement). Where every distance is provably finite it may be a fused CPU kernel of
    :mod:`fvq.quantizers.search.fused` (register tiles of distances folded into running minima, no distance block)
    or the coarse bf16 pass + exact re-rank of :mod:`fvq.quantizers.search.coarse`; otherwise (and when chosen) the
    blocked sgemm search of :mod:`fvq.quantizers.search.blocked` runs on cache-sized blocks of distances, none ever
    larger than ``max_chunk_bytes``. Each gives the ``argmin`` of the full ``N x K`` matrix of its fp32 distances with
    ties going to the lowest index, identical codes included (the fused kernels and the coarse search share one fixed
    summation order, :mod:`fvq.quantizers.search.reference`; the blocked search's BLAS may round a distance one ulp
    apart). Everything runs in fp32 with autocast disabled: bf16 / fp16 inputs are cast up.

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
            or an unknown ``FVQ_SEARCH_KERNEL`` / ``FVQ_SEARCH_TUNING``.
        FusedKernelUnavailable: with ``FVQ_SEARCH_KERNEL`` naming a fused kernel that cannot run here.
    """
    _check_search_inputs(z, codebook, max_chunk_bytes)
    device = z.device
    out = torch.empty(z.shape[0], dtype=torch.long, device=device)
    if z.shape[0] == 0:
        return out
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        z, codebook = z.detach(), codebook.detach()
        code_sq = blocked._squared_norms(codebook)  # (K,) fp32
        if device.type != "cpu":  # off the CPU, the blocked search needs no finiteness check: no host read
            known = dispatch.known_choice(z, codebook)
            if known is not None and known.kernel == "blocked":
                dispatch.note_choice(known)
                return blocked.nearest_codes_blocked(z, codebook, code_sq, max_chunk_bytes, out)
        if not fused.distances_are_finite(z, code_sq):
            dispatch.note_non_finite()
            return blocked.nearest_codes_blocked(z, codebook, code_sq, max_chunk_bytes, out)
        choice = dispatch.choose(z, codebook, code_sq, lambda kernel, *args: _run(kernel, *args, max_chunk_bytes))
        return _run(choice.kernel, z, codebook, code_sq, max_chunk_bytes, out)


def _run(
    kernel: str, z: Tensor, codebook: Tensor, code_sq: Tensor, max_chunk_bytes: int, out: Tensor | None = None
) -> Tensor:
    """Search with ``kernel`` (``avx2``, ``avx512``, ``blocked`` or ``coarse``) on finite inputs."""
    if out is None:
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    if kernel in fused.KERNELS:
        return fused.nearest_codes_fused(z, codebook, code_sq, out=out, kernel=kernel)
    if kernel == "coarse":
        return coarse.nearest_codes_coarse(
            z,
            codebook,
            code_sq,
            max_chunk_bytes,
            out,
            exact=lambda rows: _exact(rows, codebook, code_sq, max_chunk_bytes),
        )
    return blocked.nearest_codes_blocked(z, codebook, code_sq, max_chunk_bytes, out)


def _exact(z: Tensor, codebook: Tensor, code_sq: Tensor, max_chunk_bytes: int) -> Tensor:
    """The exact path for rows the coarse pass leaves: a verified fused kernel on CPU (the re-rank's arithmetic),
    else the blocked search."""
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    if z.device.type == "cpu":
        for kernel in ("avx512", "avx2"):
            if kernel in fused.VERIFIED_KERNELS and fused.available(kernel)[0]:
                return fused.nearest_codes_fused(z, codebook, code_sq, out=out, kernel=kernel)
    return blocked.nearest_codes_blocked(z, codebook, code_sq, max_chunk_bytes, out)
