"""Small collective helpers that are no-ops in a single process.

Modules that keep state which must agree across ranks (EMA codebooks, k-means initialisation, dead-code restarts,
usage histograms) and the trainer use these, so one code path serves one process and many under ``torchrun``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it. A no-op in a single process.

    Args:
        tensor: Any shape; every rank must pass a tensor of the same shape and dtype.
    """
    if is_distributed() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value, in place; returns it. No-op in one process.

    Args:
        tensor: Any shape; every rank must pass a tensor of the same shape and dtype.
        src: Rank whose value wins.
    """
    if is_distributed() and world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_mean_differentiable(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over all ranks with a gradient that flows back to every rank's input.

    Used for batch statistics inside a loss (e.g. the average code distribution of an entropy term), where each rank
    must see the global statistic and receive its share of the gradient. Returns ``tensor`` unchanged in one process.

    Args:
        tensor: Any shape, same on every rank.
    """
    if not (is_distributed() and world_size() > 1):
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM) / world_size()


def barrier() -> None:
    """Wait for every rank; a no-op in one process."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


def all_gather_tensor(tensor: Tensor) -> list[Tensor]:
    """Copies of ``tensor`` from every rank, in rank order (``[tensor]`` in one process).

    Args:
        tensor: Same shape and dtype on every rank.
    """
    if not (is_distributed() and world_size() > 1):
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out
