"""k-means in fp32 with bounded memory, for data-dependent codebook initialisation.

Seeding: k-means++ (Arthur & Vassilvitskii, 2007, "k-means++: The Advantages of Careful Seeding") or uniform random
samples; then Lloyd iterations (Lloyd, 1982) whose assignment step is the chunked exact search
:func:`fvq.quantizers.search.nearest_codes`, so ``N x K`` distances are never held at once.

k-means minimises the same squared-distance objective that VQ uses for assignment, which is why seeding a codebook
with its centroids removes most early dead codes (survey section 5, "K-means seeding on early latents").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fvq.quantizers.search import DEFAULT_MAX_CHUNK_BYTES, nearest_codes

SEEDINGS = ("kmeans++", "random")


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centroids: ``(K, D)`` fp32 cluster centres.
        counts: ``(K,)`` fp32 number of samples assigned to each centre by the last assignment.
        inertia: Mean squared distance of the samples to their nearest centre (scalar tensor).
    """

    centroids: Tensor
    counts: Tensor
    inertia: Tensor


def squared_distance_to_nearest(
    samples: Tensor, centroids: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each sample and the squared distance to it.

    Args:
        samples: ``(N, D)``.
        centroids: ``(K, D)``.
        max_chunk_bytes: Memory bound of one distance block.

    Returns:
        ``(indices, sq_dist)``: ``(N,)`` int64 and ``(N,)`` fp32.
    """
    indices = nearest_codes(samples, centroids, max_chunk_bytes)  # (N,)
    sq = (samples.float() - centroids.float().index_select(0, indices)).square().sum(dim=1)  # (N,)
    return indices, sq


def kmeans_plus_plus_seeding(samples: Tensor, num_clusters: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding: each new centre is a sample drawn with probability proportional to ``D(x)^2``.

    Costs ``O(N K D)`` in ``K`` sequential steps of ``O(N D)`` each and ``O(N)`` extra memory.

    Args:
        samples: ``(N, D)`` fp32, ``N >= num_clusters``.
        num_clusters: K.
        generator: Random generator (on the samples' device) for reproducible seeding.

    Returns:
        ``(K, D)`` initial centres (rows of ``samples``).
    """
    n = samples.shape[0]
    first = torch.randint(n, (1,), generator=generator, device=samples.device)
    chosen = torch.empty(num_clusters, dtype=torch.long, device=samples.device)
    chosen[0] = first[0]
    best = (samples - samples[first]).square().sum(dim=1)  # (N,) squared distance to the nearest chosen centre
    for k in range(1, num_clusters):
        total = best.sum()
        if total <= 0:  # every sample coincides with a chosen centre: fall back to uniform draws
            weights = torch.ones_like(best)
        else:
            weights = best
        nxt = torch.multinomial(weights, 1, generator=generator)  # (1,)
        chosen[k] = nxt[0]
        best = torch.minimum(best, (samples - samples[nxt]).square().sum(dim=1))
    return samples.index_select(0, chosen).clone()


def kmeans(
    samples: Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    seeding: str = "kmeans++",
    generator: torch.Generator | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> KMeansResult:
    """Cluster ``samples`` into ``num_clusters`` centres (fp32, deterministic given ``generator``).

    Empty clusters after an assignment step are reseeded with the samples that are currently worst represented
    (largest squared distance to their centre), so every returned centre lies on the data.

    Args:
        samples: ``(N, D)`` float tensor with ``N >= num_clusters``.
        num_clusters: K.
        iters: Number of Lloyd iterations after seeding (0 returns the seeds).
        seeding: ``"kmeans++"`` or ``"random"`` (K distinct samples drawn uniformly).
        generator: Random generator on the samples' device.
        max_chunk_bytes: Memory bound of one distance block in the assignment step.

    Returns:
        :class:`KMeansResult` with ``(K, D)`` centroids, ``(K,)`` counts and the final inertia.
    """
    if samples.ndim != 2:
        raise ValueError(f"kmeans expects samples of shape (N, D), got {tuple(samples.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if samples.shape[0] < num_clusters:
        raise ValueError(
            f"kmeans needs at least as many samples as clusters: got {samples.shape[0]} samples for "
            f"{num_clusters} clusters"
        )
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding must be one of {SEEDINGS}, got {seeding!r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    with torch.no_grad(), torch.autocast(device_type=samples.device.type, enabled=False):
        x = samples.detach().float()  # (N, D)
        if seeding == "kmeans++":
            centroids = kmeans_plus_plus_seeding(x, num_clusters, generator)  # (K, D)
        else:
            perm = torch.randperm(x.shape[0], generator=generator, device=x.device)[:num_clusters]
            centroids = x.index_select(0, perm).clone()  # (K, D)
        for _ in range(iters):
            assign, sq = squared_distance_to_nearest(x, centroids, max_chunk_bytes)  # (N,), (N,)
            counts = torch.bincount(assign, minlength=num_clusters).float()  # (K,)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (K, D)
            nonempty = counts > 0
            centroids = torch.where(nonempty[:, None], sums / counts.clamp_min(1.0)[:, None], centroids)
            num_empty = int((~nonempty).sum())
            if num_empty:
                worst = sq.topk(min(num_empty, x.shape[0])).indices  # samples farthest from their centre
                centroids[~nonempty] = x.index_select(0, worst)
        assign, sq = squared_distance_to_nearest(x, centroids, max_chunk_bytes)
        counts = torch.bincount(assign, minlength=num_clusters).float()
        return KMeansResult(centroids=centroids, counts=counts, inertia=sq.mean())
