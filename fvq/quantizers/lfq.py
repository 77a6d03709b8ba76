"""Lookup-Free Quantization (LFQ).

Yu et al., "Language Model Beats Diffusion - Tokenizer is Key to Visual Generation" (MAGVIT-v2), ICLR 2024,
https://arxiv.org/abs/2310.05737 .

Each of ``L`` channels is quantized to its sign, ``{-1, +1}`` (times ``codebook_scale``); the implicit codebook is the
``2^L`` corners of a hypercube and the id is the binary number of the signs. An entropy penalty (per-sample entropy
minus ``diversity_weight`` times the entropy of the batch-averaged assignment) keeps every bit informative and the
codes used; it is computed in the exact factorised form of :func:`~fvq.quantizers.implicit.binary_entropy_terms`,
never with the ``N x 2^L`` softmax that is infeasible at 18 bits. The body is shared with BSQ
(:class:`~fvq.quantizers.binary.BinaryQuantizer`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fvq.quantizers.binary import BinaryQuantizer


class LookupFreeQuantizer(BinaryQuantizer):
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
        super().__init__(
            codebook_dim,
            codebook_dim if num_bits is None else num_bits,
            commitment_weight=commitment_weight,
            entropy_weight=entropy_weight,
            diversity_weight=diversity_weight,
            temperature=temperature,
            entropy_group_bits=entropy_group_bits,
            sync_entropy=sync_entropy,
        )
        if codebook_scale <= 0:
            raise ValueError(f"codebook_scale must be > 0, got {codebook_scale}")
        self.codebook_scale = codebook_scale
        if self.num_bits != codebook_dim:
            self.project_in = nn.Linear(codebook_dim, self.num_bits)
            self.project_out = nn.Linear(self.num_bits, codebook_dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

    @property
    def code_magnitude(self) -> float:
        return self.codebook_scale

    def latent(self, flat: Tensor) -> Tensor:
        return self.project_in(flat).float()  # (N, L)

    def commitment_loss(self, v: Tensor, q: Tensor) -> Tensor:
        return F.mse_loss(v, q)
