"""Finite Scalar Quantization (FSQ).

Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", ICLR 2024, https://arxiv.org/abs/2309.15505 .

Each of ``d = len(levels)`` channels is bounded with tanh and rounded to one of ``L_j`` integer levels; the implicit
codebook is the product of the per-channel level sets, ``K = prod_j L_j``. No codebook parameters, no auxiliary loss.
When the input has ``D != d`` channels, learned linear maps project ``D -> d`` before and ``d -> D`` after quantization
(the paper's setting, where the encoder's output is projected to the few FSQ channels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fvq.quantizers.base import Quantizer, QuantizerOutput, channels_last_flat, check_indices, restore_layout
from fvq.quantizers.functional import straight_through
from fvq.quantizers.implicit import MAX_ID_BITS, implicit_code_metrics, mixed_radix_basis

BOUND_EPS = 1e-3


def round_ste(x: Tensor) -> Tensor:
    """Round to the nearest integer with a straight-through gradient (identity), bit-exact in value."""
    return straight_through(x, torch.round(x))


class FiniteScalarQuantizer(Quantizer):
    """FSQ with per-channel levels, exact mixed-radix ids and optional in/out projections.

    Per channel ``j`` with ``L_j`` levels (paper, Section 3 and its reference code): bound
    ``b = tanh(z + shift) * h - offset`` with ``h = (L_j - 1)(1 + eps) / 2``, ``offset = 0.5`` for even ``L_j`` (so the
    rounded grid has ``L_j`` points, ``{-L_j/2, ..., L_j/2 - 1}``) and 0 for odd ``L_j``, ``shift = atanh(offset / h)``;
    round with a straight-through gradient; normalise by ``floor(L_j / 2)`` to ``[-1, 1]``. The digit of channel ``j``
    is ``round(b) + floor(L_j / 2)`` in ``[0, L_j)`` and the id is the little-endian mixed-radix number
    ``sum_j digit_j * prod_{i<j} L_i`` (channel 0 least significant).

    Args:
        levels: Levels per quantized channel, each an int >= 2 (e.g. ``[8, 5, 5, 5]`` for K = 1,000;
            ``[8, 8, 8, 6, 5]`` for K = 15,360 as in the paper's Table 1).
        codebook_dim: Channels D of the input; defaults to ``len(levels)``. When different, linear projections
            ``D -> len(levels) -> D`` are learned.

    Shapes: input ``(B, D, H, W)`` or ``(N, D)``; indices ``(B, H, W)`` or ``(N,)``.
    """

    def __init__(self, levels: Sequence[int], *, codebook_dim: int | None = None) -> None:
        super().__init__()
        levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        if not isinstance(levels, list) or not levels:
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        bad = [lv for lv in levels if isinstance(lv, bool) or not isinstance(lv, int) or lv < 2]
        if bad:
            raise ValueError(f"levels must be ints >= 2 (one per quantized channel), got {levels!r}; bad: {bad!r}")
        size = math.prod(levels)
        if size >= 2**MAX_ID_BITS:
            raise ValueError(f"prod(levels) = {size} does not fit int64 ids (must be < 2^{MAX_ID_BITS})")
        self.levels = levels
        self.num_channels = len(levels)
        self.codebook_size = size
        self.codebook_dim = self.num_channels if codebook_dim is None else int(codebook_dim)
        if self.codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1, got {codebook_dim}")
        lv = torch.tensor(levels, dtype=torch.float64)
        half_l = (lv - 1) * (1 + BOUND_EPS) / 2
        offset = torch.where(lv.remainder(2) == 0, 0.5, 0.0)
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer("_half_width", torch.tensor([lv // 2 for lv in levels], dtype=torch.float32), False)
        self.register_buffer("_basis", torch.tensor(mixed_radix_basis(levels), dtype=torch.long), persistent=False)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        if self.codebook_dim != self.num_channels:
            self.project_in: nn.Module = nn.Linear(self.codebook_dim, self.num_channels)
            self.project_out: nn.Module = nn.Linear(self.num_channels, self.codebook_dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

    # ----------------------------------------------------------------------------------------------------------------
    def bound(self, z: Tensor) -> Tensor:
        """Squash ``(N, d)`` values into ``(-L/2 - offset, L/2 - offset)`` per channel, so rounding gives L levels."""
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def _quantize(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, D)`` input -> (``(N, d)`` normalised codes with STE gradient, ``(N,)`` ids)."""
        y = self.project_in(flat).float()  # (N, d)
        rounded = round_ste(self.bound(y))  # (N, d), integers in value
        codes = rounded / self._half_width  # (N, d) in [-1, 1]
        digits = rounded.detach().long() + self._half_width.long()  # (N, d) in [0, L)
        ids = (digits * self._basis).sum(dim=-1)  # (N,)
        return codes, ids

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(B, D, H, W)`` or ``(N, D)``."""
        flat, grid = channels_last_flat(z, self.codebook_dim)  # (N, D)
        codes, ids = self._quantize(flat)  # (N, d), (N,)
        out = self.project_out(codes).to(flat.dtype)  # (N, D)
        return QuantizerOutput(
            quantized=restore_layout(out, grid),
            indices=ids.reshape(grid),
            loss=flat.new_zeros((), dtype=torch.float32),
            losses={},
            metrics=implicit_code_metrics(ids, self.codebook_size),
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        flat, grid = channels_last_flat(z, self.codebook_dim)
        return self._quantize(flat)[1].reshape(grid)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Ids ``(...)`` -> normalised per-channel codes ``(..., d)`` in ``[-1, 1]`` (before ``project_out``)."""
        check_indices(indices, self.codebook_size)
        digits = (indices.long()[..., None] // self._basis) % self._levels  # (..., d)
        return (digits - self._half_width.long()).float() / self._half_width  # (..., d)

    def decode(self, indices: Tensor) -> Tensor:
        codes = self.indices_to_codes(indices)  # (..., d)
        grid = tuple(indices.shape)
        flat = self.project_out(codes.reshape(-1, self.num_channels))  # (N, D)
        return restore_layout(flat, grid)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}"
