"""The fixed summation order of the exact search, emulated bit for bit in torch on any device.

The fused CPU kernels (:mod:`fvq.quantizers.search.fused`) compute every distance as the augmented dot product
``[-2 z, 1] . [c, ||c||^2]`` summed in index order from 0 with one fused multiply-add (one rounding) per term:

    acc_0 = 0,  acc_{j+1} = fma(-2 z_j, c_j, acc_j) for j < D,  d = fl(acc_D + ||c||^2).

:func:`reference_distances` computes the same fp32 values with torch ops, for any subset of ``(query, code)`` pairs,
on CPU or GPU. An fp32 FMA is emulated exactly in fp64: the product of two fp32 values is exact in fp64 (24 + 24 <
53 significand bits), the sum with ``acc`` is taken with its exact error (Knuth's TwoSum), and the one case where
rounding that fp64 sum to fp32 differs from rounding the exact sum (the fp64 sum lands exactly halfway between two
fp32 values while the error is not zero: a double rounding) is corrected towards the error's side. Any fp32 value
rounded from the exact sum at a rounding boundary ``M`` (a value representable in fp64) would otherwise need ``M``
strictly between the fp64 sum and the exact sum, which contradicts the fp64 sum being the nearest fp64 value.

This is the reference the coarse + re-rank search (:mod:`fvq.quantizers.search.coarse`) re-ranks its candidates
with, and what the tests check the fused kernels against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def fma32(a: Tensor, b: Tensor, acc: Tensor) -> Tensor:
    """``fl32(a * b + acc)`` with one rounding (an fp32 fused multiply-add), for fp32 tensors that broadcast.

    All three must be fp32 and finite, with a finite result; returns fp32.
    """
    p = a.double() * b.double()  # exact
    c = acc.double()
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)  # TwoSum: p + c == s + err exactly
    f = s.float()  # round to nearest even
    back = f.double()
    off = s - back  # exact (Sterbenz): where s lies from f
    toward = torch.nextafter(f, torch.where(off > 0, math.inf, -math.inf).to(f.dtype))  # f's neighbour on s's side
    midpoint = (off != 0) & (2 * off == toward.double() - back)
    return torch.where(midpoint & (err * off > 0), toward, f)


def chain_dot(a: Tensor, column: Callable[[int], Tensor], code_sq: Tensor) -> Tensor:
    """``fl(fma-chain(a . c) + ||c||^2)``: the fused kernels' distances for given ``(query, code)`` pairs.

    Args:
        a: ``(R, D)`` fp32 ``-2 z`` (the exact scaling of the queries).
        column: ``column(j)`` gives input channel ``j`` of the codes met by each row: ``(R, C)``, or ``(C,)`` when
            every row meets the same codes.
        code_sq: ``(R, C)`` or ``(C,)`` fp32 ``||c||^2`` of those codes.

    Returns:
        ``(R, C)`` fp32 distances ``||c||^2 - 2 z.c`` in the fixed order.
    """
    acc = a[:, :1] * column(0)  # (R, C): the first term rounds once, as fma(a, b, 0) does
    for j in range(1, a.shape[1]):
        acc = fma32(a[:, j : j + 1], column(j), acc)  # (R, C)
    return acc + code_sq  # fp32 addition rounds once, as fma(1, ||c||^2, acc) does


def reference_distances(z: Tensor, codebook: Tensor, code_sq: Tensor) -> Tensor:
    """``(N, K)`` fp32 distances ``||c_k||^2 - 2 z_i . c_k`` exactly as the fused kernels compute them.

    For tests and small problems: it costs about 15 elementwise fp64 passes over ``N x K`` per input channel.
    """
    codes = codebook.float()
    return chain_dot(-2.0 * z.float(), lambda j: codes[:, j], code_sq.float())


def reference_argmin(z: Tensor, codebook: Tensor, code_sq: Tensor) -> Tensor:
    """``(N,)`` int64 argmin of :func:`reference_distances`, ties to the lowest index."""
    return reference_distances(z, codebook, code_sq).argmin(dim=1)
