"""k-means in fp32 with bounded memory, for data-dependent codebook initialisation.

Seeding: k-means++ (Arthur & Vassilvitskii, 2007, "k-means++: The Advantages of Careful Seeding"; drawn in at
most 256 rounds as k-means|| does, so that large codebooks seed in about the time of one Lloyd step) or uniform
random samples; then Lloyd iterations (Lloyd, 1982) whose assignment step is the chunked exact search
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


SEEDING_ROUNDS = 256  # k-means++ draws its centres in at most this many rounds


def kmeans_plus_plus_seeding(
    samples: Tensor,
    num_clusters: int,
    generator: torch.Generator | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Tensor:
    """k-means++ seeding: new centres are samples drawn with probability proportional to ``D(x)^2``, the squared
    distance to the nearest centre chosen so far.

    The centres are drawn in rounds of ``m = ceil(K / 256)``, after each of which ``D(x)^2`` is updated against the
    round's centres by the exact search: up to K = 256 one centre per round, the original algorithm; beyond, each
    round draws ``2 m`` candidates with probability proportional to ``D(x)^2`` and keeps ``m`` of them by k-means++
    among the candidates (the oversampling of k-means||, Bahmani et al., 2012), with 256 sequential rounds instead of
    K. In all it costs ``O(N K D)``, one Lloyd assignment step, at the search's speed (one centre per
    round at K = 65,536 would be 65,536 memory-bound passes over the samples). When fewer samples than a round
    needs are away from every centre (duplicates), the rest are drawn uniformly among the samples not yet chosen.

    Args:
        samples: ``(N, D)`` fp32, ``N >= num_clusters``.
        num_clusters: K.
        generator: Random generator (on the samples' device) for reproducible seeding.
        max_chunk_bytes: Memory bound of one distance block of the search.

    Returns:
        ``(K, D)`` initial centres (distinct rows of ``samples``).
    """
    n = samples.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"k-means++ seeding needs 1 <= num_clusters <= samples ({n}), got {num_clusters}")
    per_round = -(-num_clusters // SEEDING_ROUNDS)
    first = torch.randint(n, (1,), generator=generator, device=samples.device)  # (1,)
    chosen = [first]
    taken = torch.zeros(n, dtype=torch.bool, device=samples.device)  # (N,)
    taken[first] = True
    best = (samples - samples[first]).square().sum(dim=1)  # (N,) squared distance to the nearest chosen centre
    count = 1
    while count < num_clusters:
        want = min(per_round, num_clusters - count)
        away = int((best > 0).sum())  # samples not on a chosen centre
        if want == 1 and away > 0:
            new = torch.multinomial(best, 1, generator=generator)  # (1,)
        elif away > 0:
            new = _spread_draw(samples, best, want, min(2 * want, away), generator)  # (m,)
        else:
            new = torch.multinomial((~taken).float(), want, replacement=False, generator=generator)  # (m,)
        chosen.append(new)
        taken[new] = True
        count += new.numel()
        _, sq = squared_distance_to_nearest(samples, samples.index_select(0, new), max_chunk_bytes)  # (N,)
        best = torch.minimum(best, sq)
        best[new] = 0.0  # exactly on their own centre, whatever the search's rounding
    return samples.index_select(0, torch.cat(chosen)).clone()


def _spread_draw(
    samples: Tensor, best: Tensor, want: int, oversample: int, generator: torch.Generator | None
) -> Tensor:
    """One round's centres: ``oversample`` candidates drawn without replacement with probability proportional to
    ``best`` (``D(x)^2``), then ``want`` of them chosen among the candidates by k-means++ itself (candidates close to
    one already chosen this round lose their weight), so that a round does not seed one cluster twice."""
    cand = torch.multinomial(best, oversample, replacement=False, generator=generator)  # (C,)
    points = samples.index_select(0, cand)  # (C, D)
    weights = best.index_select(0, cand).clone()  # (C,)
    picked = []
    for _ in range(want):
        if not bool((weights > 0).any()):
            break
        j = torch.multinomial(weights, 1, generator=generator)  # (1,)
        picked.append(j)
        weights = torch.minimum(weights, (points - points[j]).square().sum(dim=1))
        weights[j] = 0.0
    return cand[torch.cat(picked)]


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
            centroids = kmeans_plus_plus_seeding(x, num_clusters, generator, max_chunk_bytes)  # (K, D)
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
