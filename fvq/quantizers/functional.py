"""Small named helpers shared by the quantizers: search, straight-through, code statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20


def nearest_codes(z: Tensor, codebook: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Exact nearest code under squared L2 distance, in fp32, with bounded memory.

    ``argmin_k ||z_i - c_k||^2 = argmin_k (||c_k||^2 - 2 z_i . c_k)``; ties go to the lowest index, as a
    brute-force ``argmin`` over the full distance matrix would give. The search never materialises an ``N x K``
    block larger than ``max_chunk_bytes``.

    Args:
        z: ``(N, D)`` query vectors (any float dtype; computed in fp32, also under autocast).
        codebook: ``(K, D)`` code vectors.
        max_chunk_bytes: Bound on the size of one fp32 distance block.

    Returns:
        ``(N,)`` int64 indices into ``codebook``.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_codes expects z (N, D) and codebook (K, D) with the same D; "
            f"got z {tuple(z.shape)} and codebook {tuple(codebook.shape)}"
        )
    n, k = z.shape[0], codebook.shape[0]
    if k == 0:
        raise ValueError("codebook is empty (K = 0)")
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        z = z.detach().float()
        codebook = codebook.detach().float()
        code_sq = codebook.square().sum(dim=1)  # (K,)
        out = torch.empty(n, dtype=torch.long, device=z.device)
        if n == 0:
            return out
        max_elems = max(1, max_chunk_bytes // 4)
        k_chunk = min(k, max_elems)
        n_chunk = max(1, min(n, max_elems // k_chunk))
        for i in range(0, n, n_chunk):
            zi = z[i : i + n_chunk]  # (n, D)
            best_val = None
            best_idx = None
            for j in range(0, k, k_chunk):
                # (n, k): ||c||^2 - 2 z.c ; ||z||^2 is constant per row and does not change the argmin
                dist = torch.addmm(code_sq[j : j + k_chunk], zi, codebook[j : j + k_chunk].t(), alpha=-2.0)
                val, idx = dist.min(dim=1)
                idx = idx + j
                if best_val is None:
                    best_val, best_idx = val, idx
                else:
                    better = val < best_val  # strict: earlier chunks win ties
                    best_val = torch.where(better, val, best_val)
                    best_idx = torch.where(better, idx, best_idx)
            out[i : i + n_chunk] = best_idx
        return out


def straight_through(z: Tensor, quantized: Tensor) -> Tensor:
    """Straight-through estimator (Bengio et al., 2013): forward value ``quantized``, gradient of identity to ``z``.

    Written as ``sg[q] + (z - sg[z])`` rather than the usual ``z + sg[q - z]``: ``z - sg[z]`` is exactly 0, so the
    value is bit-identical to ``quantized`` (``decode(encode(z))`` equals the forward output exactly), while the
    gradient reaches ``z`` unchanged and nothing reaches ``quantized``.
    """
    return quantized.detach() + (z - z.detach())


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """Histogram of code ids: ``(codebook_size,)`` int64 counts."""
    return torch.bincount(indices.reshape(-1), minlength=codebook_size)


def usage_from_counts(counts: Tensor) -> float:
    """Fraction of codes used at least once."""
    return float((counts > 0).sum()) / counts.numel()


def perplexity_from_counts(counts: Tensor) -> float:
    """``exp(H(p))`` of the empirical code distribution; equals K when all K codes are used equally."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts.double() / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))
