"""Auxiliary objectives for codebook utilisation and geometry (survey section 6).

* :func:`soft_assignment_entropy`: soft-assignment entropy regularisation (survey 6.1; Reg-VQ, GigaTok; the
  per-sample + batch form of MaskGIT/MAGVIT-style entropy losses): minimise the entropy of each token's soft
  assignment (confident assignments) and maximise the entropy of the batch-average assignment (all codes used).
* :func:`orthogonality_loss`: mean squared cosine similarity between distinct codes (survey 6.4.1).
* :func:`codebook_variance_loss` and :func:`codebook_covariance_loss`: VICReg terms on the codebook
  (Bardes et al., 2022, https://arxiv.org/abs/2105.04906; survey 6.4.4).
* :func:`codebook_variance_hinge_loss`: the plain variance hinge ``max(0, gamma - Var)`` on the whole codebook
  (survey 6.4.2).
* :func:`codebook_repulsion_loss`: Gaussian-kernel repulsion between codes (survey 6.3.2; the potential of the
  uniformity loss of Wang & Isola, 2020, https://arxiv.org/abs/2005.10242).
* :func:`contrastive_codebook_loss`: InfoNCE between each input and its assigned code, the other codes as negatives
  (survey 6.4.3; van den Oord et al., 2018, https://arxiv.org/abs/1807.03748; used on codebooks by CVQ-VAE, Zheng &
  Vedaldi, 2023, https://arxiv.org/abs/2307.15139).

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


def _subsample_codes(codes: Tensor, max_codes: int | None, generator: torch.Generator | None) -> Tensor:
    """``max_codes`` random rows of ``codes`` (all of them when there are no more): the subset the pairwise codebook
    terms average over, an unbiased estimate of the mean over all pairs."""
    k = codes.shape[0]
    if max_codes is None or k <= max_codes:
        return codes
    rows = torch.randperm(k, generator=generator, device=codes.device)[:max_codes]
    return codes.index_select(0, rows)


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
    codes = _subsample_codes(codes, max_codes, generator)  # (k, D)
    k = codes.shape[0]
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


def codebook_variance_hinge_loss(codes: Tensor, target_variance: float = 1.0) -> Tensor:
    """Plain variance hinge on the codebook (survey 6.4.2): ``max(0, gamma - Var[{e_k}])``.

    ``Var[{e_k}]`` is the spread of the codes around their mean, ``mean_k ||e_k - mean(e)||^2 / D`` (the mean
    per-dimension variance, so gamma does not depend on D). Unlike the VICReg term (:func:`codebook_variance_loss`,
    one hinge per dimension on the standard deviation) it constrains only the total spread: zero once the codes
    spread at least gamma, whatever the directions.

    Args:
        codes: ``(K, D)`` codebook (K >= 2).
        target_variance: gamma.

    Returns:
        Scalar fp32 loss.
    """
    c = codes.float()
    variance = c.var(dim=0, unbiased=False).mean()  # mean_k ||e_k - mean||^2 / D
    return F.relu(target_variance - variance)


def codebook_repulsion_loss(
    codes: Tensor, temperature: float = 1.0, max_codes: int | None = 1024, generator: torch.Generator | None = None
) -> Tensor:
    """Soft repulsion between codes (survey 6.3.2): ``mean_{i != j} exp(-||e_i - e_j||^2 / tau)``.

    The survey's sum over pairs, divided by the number of pairs so the weight does not depend on K. Each pair adds
    a Gaussian-kernel potential, largest for codes that coincide, so minimising it spreads crowded codes apart; it is
    the potential of the uniformity loss of Wang & Isola (2020). For large K a random subset of ``max_codes`` codes is
    used each call (an unbiased estimate of the same mean).

    Args:
        codes: ``(K, D)`` codebook.
        temperature: tau, the squared distance at which the push fades (``exp(-1)``).
        max_codes: Subsample size (``None``: all codes).
        generator: Random generator for the subset.

    Returns:
        Scalar fp32 loss in ``[0, 1]``.
    """
    if temperature <= 0:
        raise ValueError(f"repulsion temperature must be > 0, got {temperature}")
    codes = _subsample_codes(codes, max_codes, generator)  # (k, D)
    k = codes.shape[0]
    if k < 2:
        return codes.new_zeros((), dtype=torch.float32)
    c = codes.float()  # (k, D)
    norms = c.square().sum(dim=1)  # (k,)
    sq = (norms[:, None] + norms[None, :] - 2.0 * (c @ c.t())).clamp_min(0.0)  # (k, k) squared distances
    kernel = torch.exp(-sq / temperature)  # (k, k)
    off_diagonal = kernel.sum() - kernel.diagonal().sum()
    return off_diagonal / (k * (k - 1))


def _contrastive_chunk(z: Tensor, codes: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logits = z.float() @ codes.float().t() / temperature  # (n, K)
    return F.cross_entropy(logits, targets, reduction="sum")


def contrastive_codebook_loss(
    z: Tensor,
    codes: Tensor,
    indices: Tensor,
    temperature: float = 0.07,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Tensor:
    """InfoNCE between inputs and codes (survey 6.4.3): ``mean_i -log softmax_k(z_i . e_k / tau)[indices_i]``.

    Each input is pulled toward its assigned code and pushed from the others, which separates the codes; gradients
    reach both the inputs and the codebook. Dot products as in the survey (with ``distance="cosine"`` the quantizer
    hands in l2-normalised inputs and codes, giving the cosine form of CVQ-VAE). Computed in fp32 in row chunks, each
    recomputed in the backward pass, so memory stays ``O(chunk x K)``.

    Args:
        z: ``(N, D)`` inputs.
        codes: ``(K, D)`` codebook.
        indices: ``(N,)`` assigned codes (the positives).
        temperature: tau.
        max_chunk_bytes: Memory bound of one ``(n, K)`` block.

    Returns:
        Scalar fp32 loss.
    """
    if temperature <= 0:
        raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
    if indices.shape != z.shape[:1]:
        raise ValueError(f"indices must be ({z.shape[0]},) for z of shape {tuple(z.shape)}, got {tuple(indices.shape)}")
    n = z.shape[0]
    chunk = rows_per_chunk(codes.shape[0], max_chunk_bytes)
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or codes.requires_grad)
    total = z.new_zeros((), dtype=torch.float32)
    targets = indices.long()
    for i in range(0, n, chunk):
        args = (z[i : i + chunk], codes, targets[i : i + chunk], temperature)
        if needs_grad and n > chunk:
            total = total + checkpoint(_contrastive_chunk, *args, use_reentrant=False)
        else:
            total = total + _contrastive_chunk(*args)
    return total / max(n, 1)
