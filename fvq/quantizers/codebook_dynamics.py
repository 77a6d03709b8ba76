"""Codebook update dynamics: EMA updates and dead-code restarts (survey sections 4.1 and 4.2).

EMA codebook (van den Oord et al., 2017, "Neural Discrete Representation Learning", appendix A.1,
https://arxiv.org/abs/1711.00937; Razavi et al., 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2",
https://arxiv.org/abs/1906.00446). Per minibatch, with hard assignments ``k_i``::

    n_k = sum_i 1[k_i = k]                 m_k = sum_i 1[k_i = k] z_i
    N_k <- gamma N_k + (1 - gamma) n_k     M_k <- gamma M_k + (1 - gamma) m_k
    e_k <- M_k / (N_k + eps)                                    (survey, eq. of section 4.1)

With Laplace smoothing (Sonnet's ``VectorQuantizerEMA``) the cluster sizes are smoothed before the division,
``N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j`` and ``e_k <- M_k / N~_k``; this keeps the division finite for
codes that lost all assignments while leaving well-used codes unchanged.

``n_k`` and ``m_k`` are summed over all ranks before the update, so every rank computes the same codebook.

EMA statistics of unused codes decay geometrically; left alone they reach subnormal floats, on which CPU matrix
multiplies run about 100x slower. :func:`flush_subnormals_` sets such values to zero after every update (a local fix,
instead of the process-wide ``torch.set_flush_denormal``).

Dead-code restarts: a code whose EMA usage (assignments per step, over all ranks) falls below a threshold is
reseeded near the data. Strategies: ``"random"`` (a random recent latent plus small noise), ``"highest_error"``
(the recent latents worst represented by the current codebook) and ``"split"`` (a copy of a popular code plus small
noise, whose statistics it shares). Data-dependent choices are made on rank 0 and broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fvq.distributed import all_reduce_sum_, broadcast_, is_main_process
from fvq.quantizers.kmeans import squared_distance_to_nearest
from fvq.quantizers.search import DEFAULT_MAX_CHUNK_BYTES

RESTART_STRATEGIES = ("random", "highest_error", "split")


# ---------------------------------------------------------------------------------------------------------------------
# EMA updates
# ---------------------------------------------------------------------------------------------------------------------
def flush_subnormals_(tensor: Tensor) -> Tensor:
    """Set subnormal (denormal) entries of a float tensor to zero, in place; returns it.

    Unused codes decay geometrically under EMA updates; subnormal values make CPU matmuls about 100x slower.
    """
    tiny = torch.finfo(tensor.dtype).tiny
    return tensor.masked_fill_(tensor.abs() < tiny, 0.0)


def ema_(average: Tensor, value: Tensor, decay: float) -> Tensor:
    """``average <- decay * average + (1 - decay) * value``, in place; returns ``average``."""
    return average.mul_(decay).add_(value, alpha=1.0 - decay)


def laplace_smoothed_counts(cluster_size: Tensor, epsilon: float) -> Tensor:
    """Laplace (additive) smoothing of EMA cluster sizes that keeps their sum.

    ``N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j`` (Sonnet ``VectorQuantizerEMA``).

    Args:
        cluster_size: ``(K,)`` EMA cluster sizes ``N``.
        epsilon: Pseudo-count ``eps`` added to every code.

    Returns:
        ``(K,)`` smoothed cluster sizes.
    """
    total = cluster_size.sum()
    k = cluster_size.numel()
    return (cluster_size + epsilon) / (total + k * epsilon) * total


def batch_cluster_statistics(latents: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Per-code counts ``n_k`` and sums ``m_k`` of one minibatch, summed over all ranks, in fp32.

    Args:
        latents: ``(N, D)`` latents ``z_i``.
        indices: ``(N,)`` assigned code ids ``k_i``.
        codebook_size: K.

    Returns:
        ``(counts, sums)``: ``(K,)`` and ``(K, D)`` fp32, identical on every rank.
    """
    x = latents.detach().float()  # (N, D)
    counts = torch.bincount(indices, minlength=codebook_size).float()  # (K,)
    sums = x.new_zeros(codebook_size, x.shape[1]).index_add_(0, indices, x)  # (K, D)
    # one collective for both statistics
    packed = torch.cat([counts[:, None], sums], dim=1)  # (K, 1 + D)
    all_reduce_sum_(packed)
    return packed[:, 0].contiguous(), packed[:, 1:].contiguous()


@torch.no_grad()
def ema_codebook_update_(
    codebook: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    counts: Tensor,
    sums: Tensor,
    *,
    decay: float,
    epsilon: float,
    laplace_smoothing: bool,
) -> None:
    """One EMA step of the codebook, in place (survey section 4.1).

    Args:
        codebook: ``(K, D)`` codes ``e``, overwritten with ``M / (N + eps)`` or ``M / N~``.
        cluster_size: ``(K,)`` EMA counts ``N`` (fp32), updated in place.
        embed_sum: ``(K, D)`` EMA sums ``M`` (fp32), updated in place.
        counts: ``(K,)`` minibatch counts ``n`` (already summed over ranks).
        sums: ``(K, D)`` minibatch sums ``m`` (already summed over ranks).
        decay: gamma in ``[0, 1)``.
        epsilon: eps of the division (or of the Laplace smoothing).
        laplace_smoothing: Smooth ``N`` before dividing (Sonnet) instead of ``M / (N + eps)`` (survey).
    """
    ema_(cluster_size, counts, decay)
    ema_(embed_sum, sums, decay)
    flush_subnormals_(cluster_size)
    flush_subnormals_(embed_sum)
    if laplace_smoothing:
        denom = laplace_smoothed_counts(cluster_size, epsilon)  # (K,)
    else:
        denom = cluster_size + epsilon  # (K,)
    codebook.copy_((embed_sum / denom[:, None]).to(codebook.dtype))
    flush_subnormals_(codebook)


# ---------------------------------------------------------------------------------------------------------------------
# Dead-code restarts
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RestartPlan:
    """Which codes to reseed and with what, identical on every rank.

    Attributes:
        dead: ``(R,)`` int64 ids of the codes to reseed.
        vectors: ``(R, D)`` fp32 new code vectors.
        sources: ``(R,)`` int64 ids of the popular codes that were split (``"split"`` only, else ``None``).
    """

    dead: Tensor
    vectors: Tensor
    sources: Tensor | None = None


class DeadCodeRestarter(nn.Module):
    """Tracks the EMA usage of each code and reseeds codes that fell below a threshold.

    Usage is an EMA of assignments per step summed over all ranks: ``u_k <- lambda u_k + (1 - lambda) n_k``.
    Every ``every`` observed steps the codes with ``u_k < threshold`` are reseeded with ``strategy``; the choice of
    new vectors is made on rank 0 from its buffer of recent latents and broadcast. A reseeded code gets the mean usage
    of all codes (``"split"``: half of its source's usage, the source keeps the other half), so it is not reseeded
    again before it had a chance to attract data.

    Restarts make usage figures look better by construction (codes are rewritten with current latents): the running
    number of restarted codes is kept in ``restarted_total`` and should be reported beside usage.

    Args:
        codebook_size: K.
        codebook_dim: D.
        strategy: ``"random"``, ``"highest_error"`` or ``"split"``.
        threshold: Dead when the EMA usage (assignments per step, all ranks) is below this.
        every: Check every this many observed training steps.
        usage_decay: lambda of the usage EMA.
        buffer_size: Rows of the FIFO buffer of recent latents (per rank) used by ``"random"`` and ``"highest_error"``.
        noise: Std of the noise added to new codes (``"random"``, ``"split"``), relative to the per-dimension RMS of
            the buffered latents.
        max_chunk_bytes: Memory bound of the distance blocks of ``"highest_error"``.
    """

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        *,
        strategy: str = "random",
        threshold: float = 1.0,
        every: int = 100,
        usage_decay: float = 0.99,
        buffer_size: int = 4096,
        noise: float = 0.01,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        super().__init__()
        if strategy not in RESTART_STRATEGIES:
            raise ValueError(f"restart_strategy must be one of {RESTART_STRATEGIES} or None, got {strategy!r}")
        if threshold <= 0:
            raise ValueError(f"restart_threshold must be > 0, got {threshold}")
        if every < 1:
            raise ValueError(f"restart_every must be >= 1, got {every}")
        if not 0.0 <= usage_decay < 1.0:
            raise ValueError(f"restart_usage_decay must lie in [0, 1), got {usage_decay}")
        if buffer_size < 1:
            raise ValueError(f"restart_buffer_size must be >= 1, got {buffer_size}")
        if noise < 0:
            raise ValueError(f"restart_noise must be >= 0, got {noise}")
        self.codebook_size = codebook_size
        self.strategy = strategy
        self.threshold = threshold
        self.every = every
        self.usage_decay = usage_decay
        self.noise = noise
        self.max_chunk_bytes = max_chunk_bytes
        self.register_buffer("usage", torch.zeros(codebook_size))  # (K,) EMA assignments per step
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # observed training steps
        self.register_buffer("restarted_total", torch.zeros((), dtype=torch.long))
        # recent latents of this rank: not saved, refilled within a few steps after a resume
        self.register_buffer("latents", torch.zeros(buffer_size, codebook_dim), persistent=False)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def observe(self, latents: Tensor, counts: Tensor) -> None:
        """Record one training step.

        Args:
            latents: ``(N, D)`` this rank's latents of the step.
            counts: ``(K,)`` assignments per code of the step, summed over all ranks.
        """
        ema_(self.usage, counts.float(), self.usage_decay)
        flush_subnormals_(self.usage)
        self.steps += 1
        self._push(latents)

    def _push(self, latents: Tensor) -> None:
        size = self.latents.shape[0]
        x = latents.detach().float()  # (N, D)
        if x.shape[0] > size:  # keep a uniform subsample of a batch larger than the buffer
            x = x[torch.randperm(x.shape[0], device=x.device)[:size]]
        n = x.shape[0]
        pos = (int(self.cursor) + torch.arange(n, device=x.device)) % size  # (n,) FIFO slots
        self.latents[pos] = x
        self.cursor.fill_((int(self.cursor) + n) % size)
        self.filled.fill_(min(size, int(self.filled) + n))

    def usage_estimate(self) -> Tensor:
        """``(K,)`` EMA usage with the start-up bias removed: ``u / (1 - lambda^t)`` after ``t`` observed steps.

        Without the correction a zero-initialised EMA reads as "dead" for every code during the first
        ``~1 / (1 - lambda)`` steps.
        """
        steps = int(self.steps)
        if steps == 0:
            return self.usage.clone()
        return self.usage / (1.0 - self.usage_decay**steps)

    def _debias_factor(self) -> float:
        steps = int(self.steps)
        return 1.0 - self.usage_decay**steps if steps else 1.0

    def due(self) -> bool:
        """True when a check should run before this step (identical on every rank)."""
        steps = int(self.steps)
        return steps > 0 and steps % self.every == 0

    @torch.no_grad()
    def plan(self, codes: Tensor) -> RestartPlan | None:
        """Decide which codes to reseed and with what; ``None`` when no code is dead. Collective: call on every rank.

        Args:
            codes: ``(K, D)`` current codebook used for search.
        """
        broadcast_(self.usage)  # guard against any drift: rank 0's usage decides
        dead = torch.nonzero(self.usage_estimate() < self.threshold).flatten()  # (R,)
        num_dead = dead.numel()
        if num_dead == 0:
            return None
        vectors = codes.new_zeros(num_dead, codes.shape[1], dtype=torch.float32)  # (R, D)
        sources = torch.zeros(num_dead, dtype=torch.long, device=codes.device) if self.strategy == "split" else None
        if is_main_process():
            popular = self._popular_codes(dead) if self.strategy == "split" else None
            if popular is not None:
                sources.copy_(popular)
                vectors.copy_(codes.float().index_select(0, sources) + self._noise(num_dead, codes))
            else:  # no strategy-specific choice possible (e.g. "split" with every code dead): random recent latents
                vectors.copy_(self._from_buffer(num_dead, codes, "random" if self.strategy == "split" else None))
                if sources is not None:
                    sources.fill_(-1)
        broadcast_(vectors)
        if sources is not None:
            broadcast_(sources)
            if bool((sources < 0).any()):
                sources = None
        return RestartPlan(dead=dead, vectors=vectors, sources=sources)
        broadcast_(vectors)
        broadcast_(vectors)
        if sources is not None:
            broadcast_(sources)
        return RestartPlan(dead=dead, vectors=vectors, sources=sources)

    def _buffer(self) -> Tensor:
        return self.latents[: int(self.filled)]  # (F, D)

    def _noise(self, rows: int, like: Tensor) -> Tensor:
        buf = self._buffer()
        scale = buf.square().mean().sqrt() if buf.shape[0] else like.float().square().mean().sqrt()
        return torch.randn(rows, like.shape[1], device=like.device) * (self.noise * scale)

    def _from_buffer(self, num_dead: int, codes: Tensor, strategy: str | None = None) -> Tensor:
        strategy = strategy or self.strategy
        buf = self._buffer()  # (F, D)
        if buf.shape[0] == 0:
            raise RuntimeError("dead-code restart needs recent latents, but none were observed on rank 0")
        if strategy == "random":
            if buf.shape[0] >= num_dead:
                rows = torch.randperm(buf.shape[0], device=buf.device)[:num_dead]
            else:
                rows = torch.randint(buf.shape[0], (num_dead,), device=buf.device)
            return buf.index_select(0, rows) + self._noise(num_dead, codes)
        # "highest_error": the latents worst represented by the current codebook, largest error first
        _, err = squared_distance_to_nearest(buf, codes, self.max_chunk_bytes)  # (F,)
        order = err.argsort(descending=True)
        rows = order[torch.arange(num_dead, device=buf.device) % buf.shape[0]]
        return buf.index_select(0, rows)

    def _popular_codes(self, dead: Tensor) -> Tensor | None:
        """``(R,)`` codes to split, the most used first; ``None`` when every code is dead."""
        alive_usage = self.usage.clone()
        alive_usage[dead] = 0.0
        num_alive = int((alive_usage > 0).sum())
        if num_alive == 0:
            return None
        if num_alive >= dead.numel():
            return alive_usage.topk(dead.numel()).indices  # the most used codes, each split once
        return torch.multinomial(alive_usage, dead.numel(), replacement=True)

    @torch.no_grad()
    def commit(self, plan: RestartPlan) -> None:
        """Give reseeded codes a starting usage and count them (after the codebook was rewritten)."""
        if plan.sources is not None:
            for src, dst in zip(plan.sources.tolist(), plan.dead.tolist()):
                half = self.usage[src] / 2
                self.usage[src] = half
                self.usage[dst] = half
        else:
            fresh = self.usage_estimate().mean().clamp_min(self.threshold)  # in debiased units
            self.usage[plan.dead] = fresh * self._debias_factor()
        self.restarted_total += plan.dead.numel()
