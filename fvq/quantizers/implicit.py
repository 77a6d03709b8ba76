"""Helpers shared by the implicit-codebook quantizers (FSQ, LFQ, BSQ).

* Packing per-channel digits into one token id: mixed radix (FSQ) and binary (LFQ, BSQ), both *little-endian*:
  channel 0 is the least significant digit, so ``id = sum_d digit_d * prod_{j<d} L_j`` (``sum_d bit_d 2^d`` for
  binary codes), as in the survey's formulas for LFQ and BSQ and in FSQ's reference implementation.
* The entropy regulariser of LFQ / BSQ in its exact factorised form (no ``N x 2^L`` softmax).
* Batch usage / perplexity for implicit codebooks, whose size (up to ``2^62``) rules out a dense histogram.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fvq.distributed import all_reduce_mean_differentiable
from fvq.quantizers.search import DEFAULT_MAX_CHUNK_BYTES
from fvq.quantizers.usage import usage_and_perplexity

MAX_ID_BITS = 62  # ids are int64; keep one bit of head-room so ``codebook_size`` itself fits too
EXACT_ENTROPY_MAX_BITS = 12
DEFAULT_ENTROPY_GROUP_BITS = 9


# ---------------------------------------------------------------------------------------------------------------------
# id packing
def bits_to_ids(bits: Tensor) -> Tensor:
    """Pack ``(..., L)`` bits (bool or {0, 1}) into int64 ids ``(...)``: ``id = sum_d bit_d * 2^d``."""
    num_bits = bits.shape[-1]
    weights = torch.ones(num_bits, dtype=torch.long, device=bits.device) << torch.arange(num_bits, device=bits.device)
    return (bits.long() * weights).sum(dim=-1)


def ids_to_bits(ids: Tensor, num_bits: int) -> Tensor:
    """Unpack int64 ids ``(...)`` into bool bits ``(..., num_bits)``; inverse of :func:`bits_to_ids`."""
    shifts = torch.arange(num_bits, device=ids.device)
    return ((ids.long()[..., None] >> shifts) & 1).bool()


def mixed_radix_basis(levels: list[int]) -> list[int]:
    """Place values of a little-endian mixed-radix number with digit ranges ``levels``: ``[1, L0, L0*L1, ...]``."""
    basis, acc = [], 1
    for level in levels:
        basis.append(acc)
        acc *= level
    return basis


# ---------------------------------------------------------------------------------------------------------------------
# entropy regulariser (MAGVIT-v2 LFQ, BSQ)
def entropy_groups(num_bits: int, group_bits: int | None) -> list[int]:
    """Split ``num_bits`` into contiguous groups for the codebook-entropy term.

    ``group_bits=None`` means: one exact group when ``num_bits <= 12``, else groups of at most 9 bits of (nearly) equal
    size (18 bits -> 9 + 9, as Open-MAGVIT2's factorised sub-codebooks). ``group_bits=1`` is BSQ's fully factorised
    per-bit approximation.
    """
    if group_bits is None:
        group_bits = num_bits if num_bits <= EXACT_ENTROPY_MAX_BITS else DEFAULT_ENTROPY_GROUP_BITS
    if group_bits < 1:
        raise ValueError(f"entropy_group_bits must be >= 1, got {group_bits}")
    num_groups = math.ceil(num_bits / group_bits)
    base, extra = divmod(num_bits, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def binary_entropy_terms(
    bit_logits: Tensor,
    group_sizes: list[int],
    *,
    sync: bool = True,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple[Tensor, Tensor]:
    """Per-sample and codebook entropy of the soft assignment of binary codes, without the ``2^L`` softmax.

    LFQ (Yu et al., 2023, https://arxiv.org/abs/2310.05737) and BSQ (Zhao et al., 2024,
    https://arxiv.org/abs/2406.07548) assign each vector ``v`` to the codes ``c in {-s, +s}^L`` with
    ``p(c | v) = softmax_c(2 v.c / tau)``. Because ``v.c = sum_d v_d c_d``, this distribution factorises over bits:
    ``p(c | v) = prod_d p(c_d | v_d)`` with ``logit p(c_d = +s | v_d) = 4 s v_d / tau`` (the ``bit_logits``). Hence

    * the per-sample entropy ``E_v[H(p(c | v))] = E_v[sum_d H_b(p_d)]`` is computed *exactly* from ``L`` binary
      entropies;
    * the codebook entropy ``H(E_v[p(c | v)])`` does not factorise (a mixture of product distributions); it is computed
      exactly over each group of bits (``2^g`` joint sub-codes, summed over groups). One group of all bits is exact;
      smaller groups give the upper bound ``sum_g H(marginal_g) >= H(joint)`` used by Open-MAGVIT2 (two 9-bit
      groups for 18 bits) and BSQ (group size 1).

    Args:
        bit_logits: ``(N, L)`` logits of each bit being 1.
        group_sizes: Sizes of contiguous bit groups summing to ``L`` (see :func:`entropy_groups`).
        sync: Average the batch distribution over ranks (all-reduce) when torch.distributed is initialised, so the
            codebook entropy is that of the global batch.
        max_chunk_bytes: Memory bound of one ``(n, 2^g)`` block.

    Returns:
        ``(per_sample_entropy, codebook_entropy)``, fp32 scalars in nats.
    """
    if bit_logits.ndim != 2 or sum(group_sizes) != bit_logits.shape[1]:
        raise ValueError(
            f"bit_logits must be (N, L) with L = sum(group_sizes) = {sum(group_sizes)}; got {tuple(bit_logits.shape)}"
        )
    logits = bit_logits.float()  # (N, L)
    log_p1 = F.logsigmoid(logits)  # (N, L)
    log_p0 = F.logsigmoid(-logits)  # (N, L)
    p1 = log_p1.exp()
    per_sample = -(p1 * log_p1 + (1.0 - p1) * log_p0).sum(dim=1).mean()  # scalar
    n = logits.shape[0]
    codebook_entropy = logits.new_zeros(())
    start = 0
    for size in group_sizes:
        table = ids_to_bits(torch.arange(2**size, device=logits.device), size).float()  # (2^g, g)
        rows = max(1, max_chunk_bytes // (4 * 2**size))
        total = logits.new_zeros(2**size)  # (2^g,)
        for i in range(0, n, rows):
            lp1 = log_p1[i : i + rows, start : start + size]  # (n, g)
            lp0 = log_p0[i : i + rows, start : start + size]  # (n, g)
            log_joint = lp1 @ table.t() + lp0 @ (1.0 - table).t()  # (n, 2^g): log prod_d p(c_d | v_d)
            total = total + log_joint.exp().sum(dim=0)
        avg = all_reduce_mean_differentiable(total / max(n, 1)) if sync else total / max(n, 1)  # (2^g,)
        codebook_entropy = codebook_entropy - (avg * avg.clamp_min(1e-12).log()).sum()
        start += size
    return per_sample, codebook_entropy


# ---------------------------------------------------------------------------------------------------------------------
# metrics
def entropy_penalty(
    bit_logits: Tensor, group_sizes: list[int], diversity_weight: float, sync: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """The LFQ / BSQ entropy term ``H(q | z) - diversity_weight * H(q)`` from per-bit logits ``(N, L)``, and its two
    parts as detached metrics (``per_sample_entropy``, ``codebook_entropy``)."""
    h_sample, h_codebook = binary_entropy_terms(bit_logits, group_sizes, sync=sync)
    metrics = {"per_sample_entropy": h_sample.detach(), "codebook_entropy": h_codebook.detach()}
    return h_sample - diversity_weight * h_codebook, metrics


def implicit_code_metrics(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Batch usage (distinct ids / K) and perplexity of ``indices``, for codebooks too large for a histogram."""
    with torch.no_grad():
        _, counts = torch.unique(indices.reshape(-1), return_counts=True)  # (M,) counts of the ids that occur
        usage, perplexity = usage_and_perplexity(counts, codebook_size)
        return {"usage": usage.float(), "perplexity": perplexity.float()}
