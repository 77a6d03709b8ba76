"""Binary Spherical Quantization (BSQ).

Zhao, Xiong, Krähenbühl, "Image and Video Tokenization with Binary Spherical Quantization", 2024,
https://arxiv.org/abs/2406.07548 .

Project ``D -> L`` with a linear map, l2-normalise onto the unit sphere, quantize each channel to ``sign / sqrt(L)``
(the ``2^L`` hypercube corners lying on the sphere) and project back ``L -> D``. The quantization error is bounded
because input and code both lie on the sphere. The entropy penalty is LFQ's, on the sphere: ``p(c | u) =
softmax_c(2 u.c / temperature)`` with ``c in {-1/sqrt(L), +1/sqrt(L)}^L``, which factorises over bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    channels_last_flat,
    check_indices,
    restore_layout,
    weighted_total,
)
from fvq.quantizers.functional import straight_through
from fvq.quantizers.implicit import (
    MAX_ID_BITS,
    bits_to_ids,
    entropy_groups,
    entropy_penalty,
    ids_to_bits,
    implicit_code_metrics,
)


class BinarySphericalQuantizer(Quantizer):
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
        super().__init__()
        if codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1, got {codebook_dim}")
        if not 1 <= num_bits <= MAX_ID_BITS:
            raise ValueError(f"num_bits must be in [1, {MAX_ID_BITS}] (int64 ids), got {num_bits}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.codebook_dim = codebook_dim
        self.num_bits = num_bits
        self.codebook_size = 2**num_bits
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.diversity_weight = diversity_weight
        self.temperature = temperature
        self.sync_entropy = sync_entropy
        self.entropy_group_sizes = entropy_groups(num_bits, entropy_group_bits)
        self.scale = 1.0 / math.sqrt(num_bits)
        self.project_in = nn.Linear(codebook_dim, num_bits)
        self.project_out = nn.Linear(num_bits, codebook_dim)

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """Bool bits ``(..., L)`` -> points on the unit sphere ``(..., L)`` with entries ``+-1/sqrt(L)``."""
        return torch.where(bits, self.scale, -self.scale).float()

    def _sphere(self, flat: Tensor) -> Tensor:
        return F.normalize(self.project_in(flat).float(), dim=-1)  # (N, L), unit norm

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(B, D, H, W)`` or ``(N, D)``."""
        flat, grid = channels_last_flat(z, self.codebook_dim)  # (N, D)
        u = self._sphere(flat)  # (N, L)
        bits = u > 0  # (N, L)
        q = self.bits_to_codes(bits)  # (N, L)
        ids = bits_to_ids(bits)  # (N,)
        losses = {"commitment": (u - q).square().sum(dim=-1).mean()}
        metrics = implicit_code_metrics(ids, self.codebook_size)
        if self.entropy_weight != 0:
            bit_logits = 4.0 * self.scale * u / self.temperature  # (N, L)
            losses["entropy"], entropy_metrics = entropy_penalty(
                bit_logits, self.entropy_group_sizes, self.diversity_weight, sync=self.sync_entropy
            )
            metrics.update(entropy_metrics)
        loss = weighted_total(losses, {"commitment": self.commitment_weight, "entropy": self.entropy_weight}, like=u)
        out = self.project_out(straight_through(u, q)).to(flat.dtype)  # (N, D)
        return QuantizerOutput(
            quantized=restore_layout(out, grid), indices=ids.reshape(grid), loss=loss, losses=losses, metrics=metrics
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        flat, grid = channels_last_flat(z, self.codebook_dim)
        return bits_to_ids(self._sphere(flat) > 0).reshape(grid)

    def decode(self, indices: Tensor) -> Tensor:
        check_indices(indices, self.codebook_size)
        grid = tuple(indices.shape)
        q = self.bits_to_codes(ids_to_bits(indices.reshape(-1), self.num_bits))  # (N, L)
        flat = self.project_out(q)  # (N, D)
        return restore_layout(flat, grid)

    def extra_repr(self) -> str:
        return (
            f"num_bits={self.num_bits}, codebook_size=2^{self.num_bits}, codebook_dim={self.codebook_dim}, "
            f"entropy_weight={self.entropy_weight}, temperature={self.temperature}"
        )
