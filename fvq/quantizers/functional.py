"""Small named helpers shared by the quantizers: the straight-through estimator, code statistics.

The nearest-code search lives in :mod:`fvq.quantizers.search`; the other gradient estimators (rotation trick, soft
and Gumbel assignments) in :mod:`fvq.quantizers.estimators`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
