"""Sign quantization to the corners of a hypercube: the body shared by LFQ and BSQ.

Both quantizers map ``L`` latent channels to their signs, ``{-s, +s}^L``: the implicit codebook is the ``2^L`` corners
of a hypercube and the id is the binary number of the signs. Both regularise with the MAGVIT-v2 entropy penalty
(per-sample entropy minus ``diversity_weight`` times the entropy of the batch-averaged assignment), computed in the
exact factorised form of :func:`~fvq.quantizers.implicit.binary_entropy_terms`, never with the ``N x 2^L`` softmax that
is infeasible at 18 bits. They differ only in the latent (LFQ: a linear map, or none; BSQ: a linear map onto the unit
sphere), the magnitude ``s`` and the commitment term.
"""

from __future__ import annotations

import torch
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


class BinaryQuantizer(Quantizer):
    """Sign quantization with binary ids and the MAGVIT-v2 entropy penalty; the base of LFQ and BSQ.

    Bit order: channel ``d`` of the latent ``v`` is bit ``d`` of the id, ``id = sum_d [v_d > 0] 2^d`` (channel 0 least
    significant); ``v_d = 0`` maps to ``-s``.

    Losses (unweighted in ``losses``, weighted in ``loss``): ``commitment`` (:meth:`commitment_loss`) weighted by
    ``commitment_weight``, and ``entropy = H_sample - diversity_weight * H_codebook`` weighted by ``entropy_weight``,
    where ``p(c | v) = softmax_c(2 v.c / temperature)`` over the ``2^L`` codes; both entropies are also in ``metrics``.
    The entropy is skipped when ``entropy_weight == 0``.

    A subclass sets ``project_in`` (``D -> L``) and ``project_out`` (``L -> D``) after calling this constructor, and
    defines :attr:`code_magnitude`, :meth:`latent` and :meth:`commitment_loss`.

    Args:
        codebook_dim: Channels D of the input.
        num_bits: L, bits per code (``codebook_size = 2^L``).
        commitment_weight: Weight of the commitment term.
        entropy_weight: Weight of the entropy penalty.
        diversity_weight: gamma in front of the codebook entropy.
        temperature: tau of the soft assignment.
        entropy_group_bits: Bits per exact group of the codebook-entropy term (see
            :func:`~fvq.quantizers.implicit.entropy_groups`).
        sync_entropy: Average the batch distribution over ranks under torch.distributed.

    Shapes: input ``(B, D, H, W)`` or ``(N, D)``; indices ``(B, H, W)`` or ``(N,)``.
    """

    project_in: nn.Module
    project_out: nn.Module

    def __init__(
        self,
        codebook_dim: int,
        num_bits: int,
        *,
        commitment_weight: float,
        entropy_weight: float,
        diversity_weight: float,
        temperature: float,
        entropy_group_bits: int | None,
        sync_entropy: bool,
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

    @property
    def code_magnitude(self) -> float:
        """s, the magnitude of every entry of a code."""
        raise NotImplementedError

    def latent(self, flat: Tensor) -> Tensor:
        """The fp32 latent ``(N, L)`` whose signs are the bits, from input vectors ``(N, D)``."""
        raise NotImplementedError

    def commitment_loss(self, v: Tensor, q: Tensor) -> Tensor:
        """Scalar commitment term between the latent ``v`` and its code ``q``, both ``(N, L)``."""
        raise NotImplementedError

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """Bool bits ``(..., L)`` -> code values ``(..., L)`` in ``{-s, +s}``."""
        s = self.code_magnitude
        return torch.where(bits, s, -s).float()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(B, D, H, W)`` or ``(N, D)``."""
        flat, grid = channels_last_flat(z, self.codebook_dim)  # (N, D)
        v = self.latent(flat)  # (N, L)
        bits = v > 0  # (N, L)
        q = self.bits_to_codes(bits)  # (N, L)
        ids = bits_to_ids(bits)  # (N,)
        losses = {"commitment": self.commitment_loss(v, q)}
        metrics = implicit_code_metrics(ids, self.codebook_size)
        if self.entropy_weight != 0:
            # logit of bit d: (2 v_d s - (-2 v_d s)) / tau
            bit_logits = 4.0 * self.code_magnitude * v / self.temperature  # (N, L)
            losses["entropy"], entropy_metrics = entropy_penalty(
                bit_logits, self.entropy_group_sizes, self.diversity_weight, sync=self.sync_entropy
            )
            metrics.update(entropy_metrics)
        loss = weighted_total(losses, {"commitment": self.commitment_weight, "entropy": self.entropy_weight}, like=v)
        out = self.project_out(straight_through(v, q)).to(flat.dtype)  # (N, D)
        return QuantizerOutput(
            quantized=restore_layout(out, grid), indices=ids.reshape(grid), loss=loss, losses=losses, metrics=metrics
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        flat, grid = channels_last_flat(z, self.codebook_dim)
        return bits_to_ids(self.latent(flat) > 0).reshape(grid)

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
