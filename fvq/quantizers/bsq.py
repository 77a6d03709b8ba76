"""Binary Spherical Quantization (BSQ).

Zhao, Xiong, Krähenbühl, "Image and Video Tokenization with Binary Spherical Quantization", 2024,
https://arxiv.org/abs/2406.07548 .

Project ``D -> L`` with a linear map, l2-normalise onto the unit sphere, quantize each channel to ``sign / sqrt(L)``
(the ``2^L`` hypercube corners lying on the sphere) and project back ``L -> D``. The quantization error is bounded
because input and code both lie on the sphere. The entropy penalty is LFQ's, on the sphere: ``p(c | u) =
softmax_c(2 u.c / temperature)`` with ``c in {-1/sqrt(L), +1/sqrt(L)}^L``, which factorises over bits. The body is
shared with LFQ (:class:`~fvq.quantizers.binary.BinaryQuantizer`).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from fvq.quantizers.binary import BinaryQuantizer


class BinarySphericalQuantizer(BinaryQuantizer):
    """BSQ: linear ``D -> L``, l2-normalise, ``sign / sqrt(L)`` with a straight-through gradient, linear ``L -> D``.

    Bit order: ``id = sum_d [u_d > 0] 2^d`` (channel 0 least significant; ``u_d = 0`` maps to ``-1/sqrt(L)`` as in the
    published code).

    Losses (unweighted in ``losses``, weighted in ``loss``):

    * ``commitment = mean_tokens ||u - sg[q]||^2`` (summed over the L channels, as the paper; bounded by 4 since both
      lie on the unit sphere), weighted by ``commitment_weight``;
    * ``entropy = H_sample - diversity_weight * H_codebook`` weighted by ``entropy_weight``; ``H_sample`` is exact
      (factorised per bit), ``H_codebook`` exact per group of ``entropy_group_bits`` bits and summed over groups
      (``entropy_group_bits=1`` is the paper's fully factorised approximation). Skipped when ``entropy_weight == 0``.

    Args:
        codebook_dim: Channels D of the input.
        num_bits: L, the bottleneck width and bits per code (``codebook_size = 2^L``).
        commitment_weight: Weight of the commitment term.
        entropy_weight: Weight of the entropy penalty (zeta).
        diversity_weight: Weight of the codebook entropy inside the penalty (gamma).
        temperature: tau of the soft assignment (inverse temperature 1 in the published code).
        entropy_group_bits: Bits per exact group of the codebook-entropy term; ``None``: exact up to 12 bits, else
            groups of at most 9 bits.
        sync_entropy: Average the batch distribution over ranks under torch.distributed.

    Shapes: input ``(B, D, H, W)`` or ``(N, D)``; indices ``(B, H, W)`` or ``(N,)``.
    """

    def __init__(
        self,
        codebook_dim: int,
        num_bits: int,
        *,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_weight: float = 1.0,
        temperature: float = 1.0,
        entropy_group_bits: int | None = None,
        sync_entropy: bool = True,
    ) -> None:
        super().__init__(
            codebook_dim,
            num_bits,
            commitment_weight=commitment_weight,
            entropy_weight=entropy_weight,
            diversity_weight=diversity_weight,
            temperature=temperature,
            entropy_group_bits=entropy_group_bits,
            sync_entropy=sync_entropy,
        )
        self.scale = 1.0 / math.sqrt(num_bits)
        self.project_in = nn.Linear(codebook_dim, num_bits)
        self.project_out = nn.Linear(num_bits, codebook_dim)

    @property
    def code_magnitude(self) -> float:
        """``1 / sqrt(L)``: the codes lie on the unit sphere."""
        return self.scale

    def latent(self, flat: Tensor) -> Tensor:
        return F.normalize(self.project_in(flat).float(), dim=-1)  # (N, L), unit norm

    def commitment_loss(self, v: Tensor, q: Tensor) -> Tensor:
        return (v - q).square().sum(dim=-1).mean()  # summed over the L channels, as the paper
