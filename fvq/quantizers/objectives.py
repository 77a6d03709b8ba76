"""Auxiliary objectives for codebook utilisation and geometry (survey section 6).

* :func:`soft_assignment_entropy`: soft-assignment entropy regularisation (survey 6.1; Reg-VQ, GigaTok; the
  per-sample + batch form of MaskGIT/MAGVIT-style entropy losses): minimise the entropy of each token's soft
  assignment (confident assignments) and maximise the entropy of the batch-average assignment (all codes used).
* :func:`orthogonality_loss`: mean squared cosine similarity between distinct codes (survey 6.4.1).
* :func:`codebook_variance_loss` and :func:`codebook_covariance_loss`: VICReg terms on the codebook
  (Bardes et al., 2022, https://arxiv.org/abs/2105.04906; survey 6.4.4).

Each is computed only when its weight is non-zero; the quantizer skips the call (and its ``N x K`` work) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fvq.distributed import all_reduce_mean_differentiable
from fvq.quantizers.estimators import assignment_logits, rows_per_chunk
from fvq.quantizers.search import DEFAULT_MAX_CHUNK_BYTES

ENTROPY_EPS = 1e-12


@dataclass
class SoftEntropy:
    """Entropies of soft code assignments ``pi_ik = softmax_k(-||z_i - c_k||^2 / tau)``.

    Attributes:
        sample_entropy: ``mean_i H(pi_i)`` (scalar); low when each token is confidently assigned.
        batch_entropy: ``H(mean_i pi_i)`` (scalar), the average taken over all ranks; high when all codes are used.
    """

    sample_entropy: Tensor
    batch_entropy: Tensor


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """``-sum p log p`` along ``dim`` (with ``0 log 0 = 0``)."""
    return -(p * p.clamp_min(ENTROPY_EPS).log()).sum(dim=dim)


def _entropy_chunk(z: Tensor, codes: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    logits = assignment_logits(z, codes, temperature)  # (n, K)
    log_p = logits.log_softmax(dim=-1)  # (n, K)
    p = log_p.exp()  # (n, K)
    return -(p * log_p).sum(), p.sum(dim=0)  # scalar sum of row entropies, (K,) column sums


def soft_assignment_entropy(
    z: Tensor,
    codes: Tensor,
    temperature: float = 1.0,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> SoftEntropy:
    """Per-sample and batch-average entropies of the soft assignment of ``z`` to ``codes`` (survey 6.1).

    Computed in fp32 in row chunks; with gradients each chunk is recomputed in the backward pass, so memory stays
    ``O(chunk x K)``. Under ``torch.distributed`` the average assignment is averaged over ranks (with gradient), so
    the batch entropy is that of the global batch (ranks are assumed to hold equally many tokens).

    Args:
        z: ``(N, D)`` latents.
        codes: ``(K, D)`` codebook.
        temperature: tau of ``softmax(-||z - c||^2 / tau)``.
        max_chunk_bytes: Memory bound of one ``(n, K)`` block.

    Returns:
        :class:`SoftEntropy` with scalar ``sample_entropy`` and ``batch_entropy`` (nats).
    """
    if temperature <= 0:
        raise ValueError(f"entropy temperature must be > 0, got {temperature}")
    n = z.shape[0]
    chunk = rows_per_chunk(codes.shape[0], max_chunk_bytes)
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or codes.requires_grad)
    h_sum = z.new_zeros((), dtype=torch.float32)
    p_sum = z.new_zeros(codes.shape[0], dtype=torch.float32)
    for i in range(0, n, chunk):
        if needs_grad and n > chunk:
            h, p = checkpoint(_entropy_chunk, z[i : i + chunk], codes, temperature, use_reentrant=False)
        else:
            h, p = _entropy_chunk(z[i : i + chunk], codes, temperature)
        h_sum = h_sum + h
        p_sum = p_sum + p
    count = max(n, 1)
    avg_p = all_reduce_mean_differentiable(p_sum / count)  # (K,)
    return SoftEntropy(sample_entropy=h_sum / count, batch_entropy=entropy(avg_p))


def orthogonality_loss(codes: Tensor, max_codes: int | None = 1024, generator: torch.Generator | None = None) -> Tensor:
    """Mean squared cosine similarity between distinct codes (survey 6.4.1).

    ``||C~ C~^T - I||_F^2 / (k (k - 1))`` on l2-normalised codes ``C~``, i.e. ``mean_{i != j} (c~_i . c~_j)^2``.
    Normalised by the number of pairs so the weight does not depend on K. With K > D codes cannot all be orthogonal;
    the minimum is then ``(K / D - 1) / (K - 1)`` (a tight frame). For large K a random subset of ``max_codes`` codes
    is used each call (an unbiased estimate of the same mean).

    Args:
        codes: ``(K, D)`` codebook.
        max_codes: Subsample size (``None``: all codes).
        generator: Random generator for the subset.

    Returns:
        Scalar fp32 loss.
    """
    k = codes.shape[0]
    if max_codes is not None and k > max_codes:
        rows = torch.randperm(k, generator=generator, device=codes.device)[:max_codes]
        codes = codes.index_select(0, rows)
        k = max_codes
    if k < 2:
        return codes.new_zeros((), dtype=torch.float32)
    c = F.normalize(codes.float(), dim=-1)  # (k, D)
    gram = c @ c.t()  # (k, k)
    off = gram - torch.eye(k, device=c.device, dtype=c.dtype)
    return off.square().sum() / (k * (k - 1))


def codebook_variance_loss(codes: Tensor, target_std: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg variance hinge on the codebook: ``mean_d max(0, gamma - sqrt(Var_k[c_kd] + eps))``.

    Args:
        codes: ``(K, D)`` codebook (K >= 2).
        target_std: gamma, the per-dimension standard deviation below which codes are pushed apart.
        eps: Stabiliser inside the square root.

    Returns:
        Scalar fp32 loss.
    """
    std = (codes.float().var(dim=0) + eps).sqrt()  # (D,)
    return F.relu(target_std - std).mean()


def codebook_covariance_loss(codes: Tensor) -> Tensor:
    """VICReg covariance term on the codebook: ``(1 / D) sum_{i != j} Cov(C)_ij^2``.

    Args:
        codes: ``(K, D)`` codebook (K >= 2).

    Returns:
        Scalar fp32 loss.
    """
    c = codes.float()
    c = c - c.mean(dim=0, keepdim=True)  # (K, D)
    cov = c.t() @ c / max(c.shape[0] - 1, 1)  # (D, D)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.square().sum() / c.shape[1]
