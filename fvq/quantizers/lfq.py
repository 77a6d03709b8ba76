"""Lookup-Free Quantization (LFQ).

Yu et al., "Language Model Beats Diffusion - Tokenizer is Key to Visual Generation" (MAGVIT-v2), ICLR 2024,
https://arxiv.org/abs/2310.05737 .

Each of ``L`` channels is quantized to its sign, ``{-1, +1}`` (times ``codebook_scale``); the implicit codebook is the
``2^L`` corners of a hypercube and the id is the binary number of the signs. An entropy penalty (per-sample entropy
minus ``diversity_weight`` times the entropy of the batch-averaged assignment) keeps every bit informative and the
codes used; it is computed in the exact factorised form of :func:`~fvq.quantizers.implicit.binary_entropy_terms`,
never with the ``N x 2^L`` softmax that is infeasible at 18 bits.
"""

from __future__ import annotations

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


class LookupFreeQuantizer(Quantizer):
    """Sign quantization to ``{-s, +s}^L`` with binary ids and the MAGVIT-v2 entropy penalty.

    Bit order: channel ``d`` (after ``project_in``) is bit ``d`` of the id, ``id = sum_d [v_d > 0] 2^d`` (channel 0
    least significant); ``v_d = 0`` maps to ``-s`` as in MAGVIT-v2.

    Losses (unweighted in ``losses``, weighted in ``loss``):

    * ``commitment = mean((v - sg[q])^2)`` weighted by ``commitment_weight``;
    * ``entropy = H_sample - diversity_weight * H_codebook`` weighted by ``entropy_weight``, where
      ``p(c | v) = softmax_c(2 v.c / temperature)`` over the ``2^L`` codes, ``H_sample = E_v[H(p(c | v))]`` (exact,
      factorised over bits) and ``H_codebook = H(E_v[p(c | v)])`` (exact over groups of ``entropy_group_bits`` bits,
      summed over groups; see :func:`~fvq.quantizers.implicit.entropy_groups`). Both are also in ``metrics``.
      Skipped when ``entropy_weight == 0``.

    Args:
        codebook_dim: Channels D of the input.
        num_bits: L, bits per code (``codebook_size = 2^L``); defaults to D. When ``L != D``, linear projections
            ``D -> L -> D`` are learned.
        commitment_weight: Weight of the commitment term (0.25 in MAGVIT-v2).
        entropy_weight: Weight of the entropy penalty (0.1 in MAGVIT-v2).
        diversity_weight: gamma in front of the codebook entropy (1.0).
        temperature: tau of the soft assignment (0.01, i.e. inverse temperature 100 as commonly used).
        entropy_group_bits: Bits per exact group of the codebook-entropy term; ``None``: exact up to 12 bits, else
            groups of at most 9 bits.
        codebook_scale: s, the magnitude of the quantized values (1.0).
        sync_entropy: Average the batch distribution over ranks under torch.distributed.

    Shapes: input ``(B, D, H, W)`` or ``(N, D)``; indices ``(B, H, W)`` or ``(N,)``.
    """

    def __init__(
        self,
        codebook_dim: int,
        *,
        num_bits: int | None = None,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_weight: float = 1.0,
        temperature: float = 0.01,
        entropy_group_bits: int | None = None,
        codebook_scale: float = 1.0,
        sync_entropy: bool = True,
    ) -> None:
        super().__init__()
        num_bits = codebook_dim if num_bits is None else num_bits
        if codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1, got {codebook_dim}")
        if not 1 <= num_bits <= MAX_ID_BITS:
            raise ValueError(f"num_bits must be in [1, {MAX_ID_BITS}] (int64 ids), got {num_bits}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if codebook_scale <= 0:
            raise ValueError(f"codebook_scale must be > 0, got {codebook_scale}")
        self.codebook_dim = codebook_dim
        self.num_bits = num_bits
        self.codebook_size = 2**num_bits
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.diversity_weight = diversity_weight
        self.temperature = temperature
        self.codebook_scale = codebook_scale
        self.sync_entropy = sync_entropy
        self.entropy_group_sizes = entropy_groups(num_bits, entropy_group_bits)
        if num_bits != codebook_dim:
            self.project_in: nn.Module = nn.Linear(codebook_dim, num_bits)
            self.project_out: nn.Module = nn.Linear(num_bits, codebook_dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """Bool bits ``(..., L)`` -> code values ``(..., L)`` in ``{-s, +s}``."""
        s = self.codebook_scale
        return torch.where(bits, s, -s).float()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(B, D, H, W)`` or ``(N, D)``."""
        flat, grid = channels_last_flat(z, self.codebook_dim)  # (N, D)
        v = self.project_in(flat).float()  # (N, L)
        bits = v > 0  # (N, L)
        q = self.bits_to_codes(bits)  # (N, L)
        ids = bits_to_ids(bits)  # (N,)
        losses = {"commitment": F.mse_loss(v, q)}
        metrics = implicit_code_metrics(ids, self.codebook_size)
        if self.entropy_weight != 0:
            # logit of bit d: (2 v_d s - (-2 v_d s)) / tau
            bit_logits = 4.0 * self.codebook_scale * v / self.temperature  # (N, L)
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
        return bits_to_ids(self.project_in(flat).float() > 0).reshape(grid)

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
