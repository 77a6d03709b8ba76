"""Code statistics: usage and perplexity of a code histogram, and codebook health over many batches (usage,
perplexity and dead codes, reduced across ranks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fvq.distributed import all_reduce_sum_
from fvq.quantizers.base import check_indices

# smallest positive fp64: log() of a zero probability reads this instead of 0 (its term is 0 * log(tiny) = 0)
_TINY = torch.finfo(torch.float64).tiny


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """Histogram of code ids: ``(codebook_size,)`` int64 counts of ``indices`` (any shape, values in ``[0, K)``)."""
    return torch.bincount(indices.reshape(-1), minlength=codebook_size)


def usage_and_perplexity(counts: Tensor, codebook_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Usage and perplexity of a code histogram, as fp64 scalar tensors on its device (no host read).

    ``usage`` is the fraction of the K codes counted at least once; ``perplexity`` is ``exp(H(p))`` of the empirical
    distribution ``p = counts / sum(counts)``: K when all K codes are used equally, 1 when one code takes every
    token, 0 for an empty histogram.

    Args:
        counts: ``(M,)`` non-negative counts, any dtype: the dense histogram of all K codes (``M = K``), or only the
            counts of the codes that occur (for implicit codebooks too large for a dense histogram).
        codebook_size: K, when ``counts`` does not hold every code; defaults to ``M``.

    Returns:
        ``(usage, perplexity)``, fp64 scalars.
    """
    counts = counts.double()  # (M,)
    total = counts.sum()
    p = counts / total.clamp_min(1.0)  # (M,)
    entropy = -(p * p.clamp_min(_TINY).log()).sum()
    perplexity = torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))
    usage = (counts > 0).sum().double() / (counts.numel() if codebook_size is None else codebook_size)
    return usage, perplexity


@dataclass
class UsageReport:
    """Codebook health of a whole set of indices.

    Attributes:
        usage: Fraction of codes seen at least once, in [0, 1].
        perplexity: ``exp`` of the entropy of the code histogram (K for perfectly uniform use).
        dead_codes: Number of codes never seen.
        codebook_size: K.
        num_tokens: Number of indices counted (over all ranks).
    """

    usage: float
    perplexity: float
    dead_codes: int
    codebook_size: int
    num_tokens: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}usage": self.usage,
            f"{prefix}perplexity": self.perplexity,
            f"{prefix}dead_codes": float(self.dead_codes),
            f"{prefix}tokens": float(self.num_tokens),
        }


class CodebookUsage:
    """Accumulates a code histogram over many batches (never a rolling buffer).

    Usage is the fraction of the K codes seen at least once in everything passed to :meth:`update`; under
    ``torch.distributed`` :meth:`compute` all-reduces the histogram first, so every rank reports the same figure
    for the whole (sharded) set.

    Args:
        codebook_size: K.
        device: Where the histogram lives (the device of the indices by default).
    """

    def __init__(self, codebook_size: int, device: torch.device | str | None = None) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, indices: Tensor) -> None:
        """Count ``indices`` (any shape, values in ``[0, K)``)."""
        check_indices(indices, self.codebook_size)
        self.counts += code_counts(indices.to(self.counts.device), self.codebook_size)

    def global_counts(self) -> Tensor:
        """The histogram summed over all ranks (a copy)."""
        counts = self.counts.clone()
        return all_reduce_sum_(counts)

    def compute(self) -> UsageReport:
        counts = self.global_counts()
        usage, perplexity = usage_and_perplexity(counts)
        used = int((counts > 0).sum())
        return UsageReport(
            usage=float(usage),
            perplexity=float(perplexity),
            dead_codes=self.codebook_size - used,
            codebook_size=self.codebook_size,
            num_tokens=int(counts.sum()),
        )
