"""Process-group setup and small collective helpers that are no-ops in a single process.

Modules that keep state which must agree across ranks (EMA codebooks, k-means initialisation, dead-code restarts,
usage histograms) and the trainer use these, so one code path serves one process and many under ``torchrun``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def placement(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the values given (e.g. to split data for a rank other than this
    one), else the process group's, else ``(0, 1)``.

    Raises:
        ValueError: The rank is outside ``[0, world_size)``.
    """
    rank = (dist.get_rank() if is_distributed() else 0) if rank is None else int(rank)
    world_size = (dist.get_world_size() if is_distributed() else 1) if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}"
        )
    return rank, world_size


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


@dataclass
class DistributedContext:
    """Where this process runs.

    Attributes:
        rank: Global rank (0 without torchrun).
        world_size: Number of processes (1 without torchrun).
        local_rank: Rank on this machine (selects the CUDA device).
        device: Device this rank computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); otherwise a single process.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but CUDA is not available; use device=cpu or device=auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group (after a barrier: tearing down while a peer still sends can abort it)."""
    if is_distributed():
        barrier()
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (identity in a single process)."""
    if not values or not is_distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (a list of one element in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
