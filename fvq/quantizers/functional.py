"""Small named helpers shared by the quantizers: search, straight-through, code statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20

# Shape of one distance block on CPU, tuned on a 2-core AVX-512 Xeon (2 MiB L2 per core; see docs/benchmarks.md).
# A block of 1024 x 2048 fp32 (8 MiB) keeps sgemm near its peak while the two cheap reduction passes that follow
# it still read from cache; the N x K matrix as one block runs at about half the speed (write-back to DRAM, then a
# slow indexed min over it). ``max_chunk_bytes`` remains a hard upper bound on the block.
_CPU_BLOCK_ROWS = 1024
_CPU_BLOCK_CODES = 2048
# Codes per group in the two-level argmin (a multiple of the 16-float AVX-512 lane width).
_ARGMIN_GROUP = 128
# Codes per chunk when computing ||c||^2 (bounds the (chunk, D) temporary).
_NORM_CHUNK = 4096


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


def _search_block_shape(n: int, k: int, max_chunk_bytes: int, device: torch.device) -> tuple[int, int]:
    """``(rows, codes)`` of one distance block: cache-sized on CPU, as large as allowed elsewhere, within the bound."""
    max_elems = max_chunk_bytes // 4
    if device.type == "cpu":
        codes = min(k, _CPU_BLOCK_CODES, max_elems)
        rows = min(n, _CPU_BLOCK_ROWS * _CPU_BLOCK_CODES // codes, max_elems // codes)  # small K: more rows
    else:
        codes = min(k, max_elems)
        rows = min(n, max(1, max_elems // codes))
    if codes > _ARGMIN_GROUP and codes < k:
        codes -= codes % _ARGMIN_GROUP  # full blocks split into whole groups; only the last block has a tail
    return max(1, rows), codes


def _squared_norms(codebook: Tensor) -> Tensor:
    """``||c_k||^2`` in fp32 as a sum of squares, ``(K,)``, without a ``(K, D)`` temporary."""
    k = codebook.shape[0]
    out = torch.empty(k, dtype=torch.float32, device=codebook.device)
    for j in range(0, k, _NORM_CHUNK):
        torch.sum(codebook[j : j + _NORM_CHUNK].float().square(), dim=1, out=out[j : j + _NORM_CHUNK])
    return out


def _block_min(block: Tensor, group_min: Tensor) -> tuple[Tensor, Tensor]:
    """Row minimum and its first (lowest) column of an ``(n, k)`` block: values ``(n,)`` fp32, indices ``(n,)``.

    Two levels, because an indexed ``min`` is several times slower than a plain ``amin`` on CPU: ``amin`` over
    contiguous groups of ``_ARGMIN_GROUP`` columns, an indexed ``min`` over the ``k / group`` group minima (the first
    group holding the row minimum also holds its lowest column), then an indexed ``min`` inside that one group.
    Gives exactly what ``block.min(dim=1)`` gives, ties included.
    """
    n, k = block.shape
    g = _ARGMIN_GROUP
    if k % g != 0 or k == g:
        return block.min(dim=1)
    groups = block.view(n, k // g, g)  # (n, G, g)
    minima = group_min[: n * (k // g)].view(n, k // g)  # (n, G)
    torch.amin(groups, dim=2, out=minima)
    _, first_group = minima.min(dim=1)  # (n,)
    members = groups.gather(1, first_group.view(n, 1, 1).expand(n, 1, g)).view(n, g)  # (n, g)
    value, offset = members.min(dim=1)  # (n,), (n,)
    return value, first_group * g + offset


def nearest_codes(z: Tensor, codebook: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Exact nearest code under squared L2 distance, in fp32, with bounded memory.

    ``argmin_k ||z_i - c_k||^2 = argmin_k (||c_k||^2 - 2 z_i . c_k)`` (``||z_i||^2`` is the same for every code).
    The distances are computed block by block, ``(rows, codes)`` at a time, as one ``addmm`` each (``||c||^2`` enters
    as the bias, the ``-2`` as ``alpha``, both exact), and reduced while the block is still in cache; per-block
    minima are then reduced across blocks. The result equals ``argmin`` over the full distance matrix
    ``||c||^2 - 2 z c^T`` computed in fp32, with ties going to the lowest index; no block is ever larger than
    ``max_chunk_bytes``. Everything runs in fp32 with autocast disabled: bf16 / fp16 inputs are cast up first.

    Args:
        z: ``(N, D)`` query vectors, any float dtype.
        codebook: ``(K, D)`` code vectors, ``K >= 1``, on the same device as ``z``.
        max_chunk_bytes: Upper bound in bytes on one fp32 distance block (at least 4). Within it, the block shape
            is chosen for speed (cache-sized on CPU).

    Returns:
        ``(N,)`` int64 indices into ``codebook``.

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong ranks, different ``D``, an empty codebook, different devices or a bound below 4 bytes.
    """
    _check_search_inputs(z, codebook, max_chunk_bytes)
    n, k = z.shape[0], codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        z = z.detach().float()  # (N, D)
        codebook = codebook.detach().float()  # (K, D)
        code_sq = _squared_norms(codebook)  # (K,)
        rows, codes = _search_block_shape(n, k, max_chunk_bytes, z.device)
        num_blocks = -(-k // codes)
        block_buf = torch.empty(rows * codes, dtype=torch.float32, device=z.device)  # one (rows, codes) block
        group_buf = torch.empty(rows * max(1, codes // _ARGMIN_GROUP), dtype=torch.float32, device=z.device)
        best_val = torch.empty(rows, num_blocks, dtype=torch.float32, device=z.device)  # per-block minima
        best_idx = torch.empty(rows, num_blocks, dtype=torch.long, device=z.device)
        for i in range(0, n, rows):
            zi = z[i : i + rows]  # (r, D)
            r = zi.shape[0]
            for b, j in enumerate(range(0, k, codes)):
                c = min(codes, k - j)
                dist = block_buf[: r * c].view(r, c)  # (r, c)
                torch.addmm(code_sq[j : j + c], zi, codebook[j : j + c].t(), alpha=-2.0, out=dist)
                value, index = _block_min(dist, group_buf)  # (r,), (r,)
                best_val[:r, b] = value
                best_idx[:r, b] = index + j
            _, block = best_val[:r].min(dim=1)  # (r,): first block holding the row minimum = lowest index
            out[i : i + r] = best_idx[:r].gather(1, block.view(r, 1)).view(r)
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
