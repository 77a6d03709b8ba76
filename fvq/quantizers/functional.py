"""Small named helpers shared by the quantizers: the straight-through estimator.

The nearest-code search lives in :mod:`fvq.quantizers.search`, the other gradient estimators (rotation trick, soft
and Gumbel assignments) in :mod:`fvq.quantizers.estimators`, code statistics in :mod:`fvq.quantizers.usage`.
"""

from __future__ import annotations

from torch import Tensor


def straight_through(z: Tensor, quantized: Tensor) -> Tensor:
    """Straight-through estimator (Bengio et al., 2013): forward value ``quantized``, gradient of identity to ``z``.

    Written as ``sg[q] + (z - sg[z])`` rather than the usual ``z + sg[q - z]``: ``z - sg[z]`` is exactly 0, so the
    value is bit-identical to ``quantized`` (``decode(encode(z))`` equals the forward output exactly), while the
    gradient reaches ``z`` unchanged and nothing reaches ``quantized``.
    """
    return quantized.detach() + (z - z.detach())
