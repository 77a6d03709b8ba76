"""Coarse pass + exact re-rank: a bf16 distance pass that keeps every code that could be nearest, then fp32.

The exact search is bounded by the fp32 matmul peak. A bf16 matmul runs several times faster where the hardware has
it (GPU tensor cores; CPUs with AVX512-BF16 / AMX through oneDNN), but its distances are off by up to about 2^-7 of
``||z|| ||c||``. This search keeps the exact answer anyway: a bf16 pass ranks all codes, a proven bound on its error
keeps every code whose distance could be the minimum, and those candidates are re-ranked with the fixed-order fp32
distances of :mod:`fvq.quantizers.search.reference` (the arithmetic of the fused CPU kernels), ties to the lowest
index. The indices equal the argmin of the full ``N x K`` matrix of those fp32 distances.

Bound (``u = 2^-24`` fp32 unit roundoff, ``v = 2^-8`` bf16 unit roundoff, ``gamma_n = n u / (1 - n u)``). For one
query ``x`` and code ``c`` with the same fp32 ``s = ||c||^2`` used everywhere, let ``e = s - 2 x.c`` (real arithmetic)
and ``S = sum_j |x_j c_j| <= ||x|| ||c||`` (Cauchy-Schwarz).

* Reference: ``d`` is a chain of ``D + 1`` FMAs over the terms ``-2 x_j c_j`` and ``s``; the recursive-summation
  bound gives ``|d - e| <= gamma_{D+1} (2 S + s) =: B_ref``.
* Coarse: bf16 rounding gives ``x^_j = x_j (1 + a_j) + t_j`` with ``|a_j| <= v`` and ``|t_j| <= 2^-134`` (half the
  bf16 subnormal spacing; bf16 has fp32's exponent range). A bf16 x bf16 product is exact in fp32 unless it
  underflows (flushing costs at most ``2^-126`` each). So ``|sum_j x^_j c^_j - x.c| <= (2v + v^2) S + T`` with
  ``T = 2^-134 (1 + v) sqrt(D) (||x|| + ||c||) + D 2^-125``. Summing the ``D`` products in fp32 in any order, even with
  truncation instead of rounding (some matrix units), errs by at most ``g' = gamma'_D = 2 D u / (1 - 2 D u)`` of
  ``sum_j |x^_j c^_j| <= (1 + v)^2 S + T``; an output rounded to bf16 (CPU ``torch.mm`` on bf16 gives bf16) adds
  ``w = v`` of the result's magnitude (``w = 0`` for an fp32 output). Altogether the coarse dot product ``q`` obeys
  ``|q - x.c| <= r S + 2 T`` with ``r = (2v + v^2) + (1 + v)^2 ((1 + w)(1 + g') - 1)``, and the coarse distance
  ``d~ = fl(s - 2 q)`` obeys ``|d~ - e| <= 2 r S + 4 T + u (s + 2 (1 + r) S + 4 T) =: B_c``.
* Selection: let ``k*`` be the reference argmin. For every code ``j``:
  ``d~_k* <= e_k* + B_c <= d_k* + B_c + B_ref <= d_j + B_c + B_ref <= d~_j + 2 (B_c + B_ref)``, the bounds taken at
  the row's largest ``S`` (``||x|| max ||c||``) and ``s`` (``max ||c||^2``). So every code with
  ``d~_k <= min_j d~_j + 2 (B_c + B_ref)`` is kept, which includes ``k*`` and every code tied with it. The margin is
  computed in fp64 from fp64 norms (``max ||c||`` from the fp32 ``s`` inflated by ``1 / (1 - gamma_D)``, with a
  relative slack of ``2^-20``) and the threshold rounded up to the next fp32 value.
* Re-rank: the candidates' fp32 distances are computed exactly as the reference computes them, in ascending code
  order, and the first minimum wins: on CPU by the fused kernels' library (``fvq_rerank``: one scalar ``fmaf``
  chain per candidate, the same roundings as a vector lane's), elsewhere (or without it) by the torch emulation
  :func:`~fvq.quantizers.search.reference.chain_dot`.

Without bf16 matrix units (this includes most CPUs) the coarse pass multiplies the bf16-rounded values through fp32
sgemm instead (exact products, fp32 sums: the same bound with ``w = 0``), which costs as much as the exact search;
:mod:`~fvq.quantizers.search.dispatch` offers this search to ``auto`` only where the units exist.

Rows where the bound does not hold (a non-finite coarse value: bf16 overflows at fp32's very top) or more than
``cap`` codes survive go to the exact path handed in (on CPU the fused kernel, the same arithmetic; on GPU the blocked
sgemm search, which agrees with it except where two distances are within fp32 rounding of each other). The caller
routes non-finite inputs to the blocked search before this runs. :func:`last_stats` reports the candidate counts.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fvq.quantizers.search import fused
from fvq.quantizers.search.reference import chain_dot

DEFAULT_CAP = 64
_U32 = 2.0**-24
_U16 = 2.0**-8
_SLACK = 1.0 + 2.0**-20
# fp64 elements of one re-rank step, (rows, candidates); bounds the re-rank's temporaries
_RERANK_ELEMS = 2**20


@dataclass(frozen=True)
class CoarseStats:
    """Candidate counts of the latest coarse + re-rank search on this thread.

    Attributes:
        rows: queries searched.
        mean_candidates: mean number of codes that survived the coarse pass, over the rows re-ranked.
        max_candidates: largest number that survived in one row (rows over ``cap`` included).
        fallback_rows: rows handed to the exact path (over ``cap``, or the bound could not be applied).
        cap: the candidate cap.
        bf16_output: whether the coarse matmul rounded its output to bf16 (``w = v`` in the bound).
        native: whether the coarse matmul ran on bf16 matrix units (else bf16 values through fp32 sgemm).
    """

    rows: int
    mean_candidates: float
    max_candidates: int
    fallback_rows: int
    cap: int
    bf16_output: bool
    native: bool


class _Last(threading.local):
    stats: CoarseStats | None = None


_LAST = _Last()


def last_stats() -> CoarseStats | None:
    """Candidate counts of the latest coarse + re-rank search on this thread (``None`` before the first)."""
    return _LAST.stats


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 matrix units (CUDA with bf16 support; a CPU that oneDNN runs bf16 on natively)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _coarse_dot(zb: Tensor, cb_t: Tensor) -> tuple[Tensor, bool]:
    """``zb @ cb_t`` of bf16 operands as fp32 ``(r, k)``, and whether it was rounded to bf16 on the way.

    With native bf16 matrix units: a bf16 matmul (fp32 output on CUDA where torch offers it; a bf16 output on CPU).
    Without them (torch would emulate bf16 about 100x slower than sgemm): the bf16 values as fp32 through sgemm,
    whose products are exact and whose sums are fp32, so the same bound holds, at sgemm speed.
    """
    if not native_bf16(zb.device):
        return torch.mm(zb.float(), cb_t.float()), False
    if zb.device.type == "cuda":
        try:
            return torch.mm(zb, cb_t, out_dtype=torch.float32), False
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.mm(zb, cb_t).float(), True


def coarse_margin(z_norm: Tensor, code_norm_max: float, code_sq_max: float, d: int, bf16_output: bool) -> Tensor:
    """``2 (B_c + B_ref)`` of the module docstring for each row, fp64 ``(r,)``, from fp64 ``||x||`` ``(r,)``."""
    v, u = _U16, _U32
    gamma_ref = (d + 1) * u / (1 - (d + 1) * u)
    gamma_acc = 2 * d * u / (1 - 2 * d * u)
    w = v if bf16_output else 0.0
    r = (2 * v + v * v) + (1 + v) ** 2 * ((1 + w) * (1 + gamma_acc) - 1)
    s_max = z_norm * code_norm_max  # (r,) largest S of the row
    t = 2.0**-134 * (1 + v) * math.sqrt(d) * (z_norm + code_norm_max) + d * 2.0**-125  # (r,)
    b_c = 2 * r * s_max + 4 * t + u * (code_sq_max + 2 * (1 + r) * s_max + 4 * t)
    b_ref = gamma_ref * (2 * s_max + code_sq_max)
    return 2 * (b_c + b_ref) * _SLACK


def nearest_codes_coarse(
    z: Tensor,
    codebook: Tensor,
    code_sq: Tensor,
    max_chunk_bytes: int,
    out: Tensor,
    exact: Callable[[Tensor], Tensor],
    cap: int = DEFAULT_CAP,
) -> Tensor:
    """Nearest code of each row of ``z`` by a bf16 coarse pass and an exact fp32 re-rank (module docstring).

    Called by :func:`fvq.quantizers.search.nearest_codes` without autograd and autocast, only where every distance
    is provably finite.

    Args:
        z: ``(N, D)`` queries, ``N >= 1``, any float dtype.
        codebook: ``(K, D)`` codes on the same device.
        code_sq: ``(K,)`` fp32 ``||c_k||^2``.
        max_chunk_bytes: Bound on one fp32 ``(rows, K)`` block of coarse distances (at least one row is taken).
        out: ``(N,)`` int64, overwritten with the indices.
        exact: The exact path for rows the bound cannot settle: ``(r, D)`` queries -> ``(r,)`` int64 indices.
        cap: Most candidates re-ranked per row; rows with more go to ``exact``.

    Memory: one ``(rows, K)`` fp32 block of coarse distances within ``max_chunk_bytes`` and its ``(rows, K)`` mask,
    plus a bf16 copy of the codebook (and, without bf16 units, its values in fp32: ``K x D`` floats).

    Returns:
        ``out``: ``(N,)`` int64 indices into ``codebook``.
    """
    (n, d), k = z.shape, codebook.shape[0]
    device = z.device
    z32 = z.float()
    c32 = codebook.float()
    native_rerank = device.type == "cpu" and fused.available("avx2")[0]
    c_t = None if native_rerank else c32.t().contiguous()  # (D, K): one row per input channel for the gathers
    native = native_bf16(device)
    cb = codebook.to(torch.bfloat16)  # (K, D)
    cb_t = (cb if native else cb.float()).t()  # (D, K): bf16, or its values in fp32 for sgemm, converted once
    gamma_d = d * _U32 / (1 - d * _U32)
    code_sq_max = float(code_sq.max())
    code_norm_max = math.sqrt(max(code_sq_max, 0.0) / (1 - gamma_d)) * _SLACK
    rows_per_block = max(1, min(n, max_chunk_bytes // (4 * k)))
    fallback: list[Tensor] = []
    counted, total, most = 0, 0, 0
    bf16_output = False
    for i in range(0, n, rows_per_block):
        zi = z32[i : i + rows_per_block]  # (r, D)
        zb = zi.to(torch.bfloat16)  # (r, D)
        q, bf16_output = _coarse_dot(zb if native else zb.float(), cb_t)  # (r, K)
        dist = q.mul_(-2.0).add_(code_sq)  # (r, K) coarse distances
        best = dist.amin(dim=1)  # (r,)
        margin = coarse_margin(zi.double().norm(dim=1), code_norm_max, code_sq_max, d, bf16_output)  # (r,)
        threshold = (best.double() + margin).float()  # (r,)
        threshold = torch.nextafter(threshold, torch.full_like(threshold, math.inf))  # round up
        keep = dist <= threshold[:, None]  # (r, K) the codes that could be nearest
        count = torch.count_nonzero(keep, dim=1)  # (r,)
        settled = torch.isfinite(threshold) & torch.isfinite(best) & (count <= cap)  # (r,)
        most = max(most, int(count.max()))
        rows = settled.nonzero().squeeze(1)  # (m,)
        if rows.numel() < settled.numel():
            fallback.append((~settled).nonzero().squeeze(1) + i)
        if rows.numel() == 0:
            continue
        width = int(count[rows].max())
        counted += rows.numel()
        total += int(count[rows].sum())
        cand = _candidates(keep if rows.numel() == keep.shape[0] else keep.index_select(0, rows), count[rows], width)
        if native_rerank:  # the fused kernels' library: scalar fmaf chains, the same arithmetic
            found = torch.empty(rows.numel(), dtype=torch.long)
            out[rows + i] = fused.rerank(zi[rows], c32, code_sq, cand, found)
            continue
        a = -2.0 * zi[rows]  # (m, D) exact scaling
        step = max(1, _RERANK_ELEMS // width)
        for j in range(0, rows.numel(), step):
            cj = cand[j : j + step]  # (s, C)
            exact_dist = _rerank(a[j : j + step], cj, c_t, code_sq)  # (s, C)
            out[rows[j : j + step] + i] = cj.gather(1, exact_dist.argmin(dim=1, keepdim=True)).squeeze(1)
    missing = torch.cat(fallback) if fallback else torch.empty(0, dtype=torch.long, device=device)
    if missing.numel():
        out[missing] = exact(z[missing])
    _LAST.stats = CoarseStats(
        rows=n,
        mean_candidates=total / counted if counted else float("nan"),
        max_candidates=most,
        fallback_rows=int(missing.numel()),
        cap=cap,
        bf16_output=bf16_output,
        native=native,
    )
    return out


def _candidates(keep: Tensor, count: Tensor, width: int) -> Tensor:
    """The kept codes of each row in ascending order, ``(m, width)`` int64, padded with the row's first code (a
    repeat cannot change the first minimum), from the ``(m, K)`` mask ``keep`` and its row counts ``(m,)``."""
    row, code = keep.nonzero(as_tuple=True)  # (M,), (M,): row-major, so ascending codes within a row
    start = torch.cumsum(count, dim=0) - count  # (m,) first entry of each row
    cand = torch.empty(keep.shape[0], width, dtype=torch.long, device=keep.device)
    cand[:, :] = code[start.clamp(max=max(0, code.numel() - 1))][:, None]  # every row holds at least its minimum
    cand[row, torch.arange(row.numel(), device=keep.device) - start[row]] = code
    return cand


def _rerank(a: Tensor, cand: Tensor, c_t: Tensor, code_sq: Tensor) -> Tensor:
    """Fixed-order fp32 distances ``(s, C)`` of candidate codes ``cand`` (``(s, C)``) to queries ``a = -2 z``
    (``(s, D)``); the codes are gathered one input channel at a time from ``c_t`` (``(D, K)``), with no ``(s, C, D)``
    copy."""
    return chain_dot(a, lambda j: c_t[j][cand], code_sq[cand])
