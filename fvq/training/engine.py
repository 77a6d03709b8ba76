"""The training engine every fvq model kind shares: one readable loop for one CPU process or many GPUs.

The engine owns what does not depend on the model: process placement, the micro-batch split of the global batch,
the data position (a pure function of the step, so a resumed run reads what the uninterrupted one read), the
learning-rate factor (a pure function of the step), gradient accumulation under DDP, clipping, the non-finite-step
guard, logging, validation, checkpoints and exact resume. A :class:`TrainingTask` supplies the rest: the model, its
optimizers, the loss of one optimizer step and the validation.

Several processes either replicate the model (DDP, :meth:`Engine.wrap`) or shard it (PyTorch's FSDP2
``fully_shard``, :meth:`Engine.shard`). Checkpoints hold the full, unsharded model and optimizer states in the same
layout either way (gathered on rank 0 through ``torch.distributed.checkpoint.state_dict``).

Host synchronisations: a step reads nothing on the host. Whether every rank's loss and gradients were finite is a
boolean tensor, combined over ranks on the device, and each update is applied under it by the fused optimizer's own
skip (:func:`guarded_step`), so a non-finite step never changes the weights. The skip counts (:class:`SkipCounter`),
losses and metrics stay tensors until a sync point (a log, validation or checkpoint step), where they are reduced
over ranks and read once.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fvq.distributed import (
    DistributedContext,
    all_gather_objects,
    all_reduce_sum_,
    barrier,
    cleanup_distributed,
    init_distributed,
    is_distributed,
    world_size,
)
from fvq.quantizers.base import trusted_values
from fvq.runs import RunFolder, load_checkpoint, save_checkpoint
from fvq.training.checkpoint import rng_state, set_rng_state
from fvq.training.config import compile_options
from fvq.training.logging import MetricLogger
from fvq.training.lr_schedule import AnnealingSchedule

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: ask the kernel
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive steps whose loss or gradients were not finite."""


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: The run directory.
        steps: Optimizer steps completed.
        checkpoint: Path of the last checkpoint written.
        metrics: Latest validation figures (``val/...``).
        skipped_steps: Steps skipped because of a non-finite loss or gradient.
        is_main: Whether this process is rank 0 (the one that reports).
    """

    run_dir: Path
    steps: int
    checkpoint: Path | None
    metrics: dict[str, float]
    skipped_steps: int
    is_main: bool = True


@dataclass
class StepOutput:
    """What a task's :meth:`TrainingTask.train_step` returns.

    Attributes:
        scalars: Detached scalar tensors to log (``loss``, ``grad_norm``, ...), averaged over the micro-batches. They
            are read on the host only at log steps.
        finite: One boolean tensor per optimizer update of the step (from :meth:`Engine.backward_and_clip`); the
            engine combines them over ranks on the device.
        updates: One callable per entry of ``finite``, called with ``ok`` (the update's flag and the main one's):
            applies that update when ``ok`` is true and changes nothing when not. When every callable is marked with
            :func:`device_update` (as those :meth:`Engine.backward_and_clip` returns are), ``ok`` is a boolean tensor
            on the device and the step reads nothing on the host; otherwise the flags are read once and ``ok`` is a
            bool. The first entry is the main update: when it is not finite the whole step is skipped and counted.
    """

    scalars: dict[str, Tensor]
    finite: list[Tensor] = field(default_factory=list)
    updates: list[Callable[[Any], None]] = field(default_factory=list)


class TrainingTask(Protocol):
    """The per-model part of training (see :class:`fvq.training.tokenizer_task.TokenizerTask`).

    Attributes:
        model: The trained module (DDP-wrapped by the engine when several processes run).
        optimizers: ``name -> (optimizer, base_lr)``; the engine sets ``lr = base_lr * schedule(step)`` each step and
            saves the optimizers' states.
        train_set: Map-style or iterable dataset of training samples.
    """

    model: nn.Module
    optimizers: dict[str, tuple[torch.optim.Optimizer, float]]
    train_set: Any

    def to_batch(self, batch: Any, device: torch.device) -> Any:
        """A loader batch moved to the device in the form ``train_step`` takes."""

    def train_step(self, engine: Engine, micro_batches: list[Any], step: int) -> StepOutput:
        """Forward and backward over the micro-batches of one optimizer step (see :meth:`Engine.backward_and_clip`)."""

    def validate(self, engine: Engine, step: int) -> dict[str, float]:
        """Held-out figures (``val/...``), reduced over ranks; rank 0 may write pictures into the run folder."""

    def state_dict(self) -> dict[str, Any]:
        """Task state beyond the model and optimizers (e.g. a loss module's buffers)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # Optional hooks (looked up with getattr):
    #   check_checkpoint(state) -> None: raise a ValueError that explains why a checkpoint does not fit, before any
    #       state is loaded (e.g. another architecture).
    #   finish(engine) -> None: called once on every rank when the run reaches its last step (e.g. an export).


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (itself when not wrapped, or sharded in place by FSDP2)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (:func:`torch.distributed.fsdp.fully_shard`)."""
    return isinstance(model, FSDPModule)


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # every tensor gathered whole, on the CPU, on rank 0 only (the other ranks get an empty dict)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict of ``model`` (collective when sharded: every rank calls it; only rank 0 gets tensors)."""
    if not is_sharded(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state_options())


def load_model_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict (as :func:`model_state_dict` returns) into ``model``, sharded or not (strict)."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of ``optimizer``'s parameters, group by group (the order ``optimizer.state_dict()`` numbers them)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()``; for a sharded ``model`` the full state gathered on rank 0 in that same layout
    (parameters numbered in group order), so checkpoints of replicated and sharded runs are interchangeable.
    Collective when sharded; the other ranks get ``{}``."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    if not full:
        return {}
    ids = {name: i for i, name in enumerate(n for group in _parameter_names(model, optimizer) for n in group)}
    return {
        "state": {ids[name]: value for name, value in full["state"].items()},
        "param_groups": [{**group, "params": [ids[n] for n in group["params"]]} for group in full["param_groups"]],
    }


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`optimizer_state_dict` returned into ``optimizer`` (whose parameters are ``model``'s)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for group in _parameter_names(model, optimizer) for n in group]
    full = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def seed_process(seed: int) -> None:
    """Seed python, numpy and torch of this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on this CPU (x86 FTZ/DAZ); returns whether the CPU supports it.

    Training drives some values into the subnormal range (softmax weights of peaked attention in the VQBridge, Adam
    moments of parameters that stopped receiving gradient), and CPU kernels run 5-15x slower on them: a trained
    VQBridge's attention backward at 1,024 tokens took 69 ms per call instead of 12 ms at initialisation. The flag
    is per thread and worker threads copy it when they are created, so this must run before the first parallel
    operation of the process; :func:`run_training` calls it first thing.
    """
    return bool(torch.set_flush_denormal(True))


def device_update(update: Callable[[Tensor], None]) -> Callable[[Tensor], None]:
    """Mark an update of :attr:`StepOutput.updates` as one that takes its flag as a boolean tensor on the device and
    decides there (masking its work, e.g. with :func:`guarded_step` or ``torch.where``). A step whose updates are
    all marked reads nothing on the host; otherwise the engine reads the flags once and passes them as bools."""
    update.takes_device_flag = True  # type: ignore[attr-defined]
    return update


def guarded_step(optimizer: torch.optim.Optimizer, ok: Tensor) -> None:
    """``optimizer.step()`` that changes nothing unless ``ok`` (a boolean tensor on the parameters' device) is true,
    decided on the device: no host read.

    PyTorch's fused Adam, AdamW and SGD kernels take a ``found_inf`` tensor (the hook ``GradScaler`` uses to skip
    steps with inf gradients): when it is 1 the kernel returns before touching the parameters and the moments, and
    the step count is put back. ``optimizer`` must be such a fused optimizer (``_step_supports_amp_scaling``).
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise TypeError(f"{type(optimizer).__name__} without fused=True cannot skip a step on the device")
    optimizer.found_inf = (~ok).to(torch.float32).reshape(())  # read by Adam/AdamW/SGD.step
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class SkipCounter:
    """The non-finite-step guard's counts, kept on the device and read only at the engine's sync points.

    ``counts`` holds ``[skipped, current run of skipped steps, longest run, last skipped step]`` (int64); the host
    copies below are those of the last :meth:`update_from` (exact then).

    Args:
        device: Where the counts live (the training device).
        skipped: Skipped steps so far (from a checkpoint).
    """

    KEYS = ("guard/skipped", "guard/run", "guard/longest_run", "guard/last_skipped")

    def __init__(self, device: torch.device, skipped: int = 0) -> None:
        self.counts = torch.tensor([skipped, 0, 0, -1], dtype=torch.int64, device=device)
        self.skipped, self.run, self.longest_run, self.last_skipped = skipped, 0, 0, -1

    def record(self, ok: Tensor, step: int) -> None:
        """Count step ``step``, whose main update was applied when ``ok`` (a boolean tensor) is true."""
        bad = (~ok).to(torch.int64)
        skipped, run, longest, last = self.counts.unbind()
        run = (run + 1) * bad
        self.counts = torch.stack([skipped + bad, run, torch.maximum(longest, run), torch.where(ok, last, step)])

    def as_scalars(self) -> dict[str, Tensor]:
        """The counts as scalars to read with the log step's others (equal on every rank)."""
        return dict(zip(self.KEYS, self.counts.unbind()))

    def update_from(self, values: dict[str, float]) -> bool:
        """Take the read counts out of ``values``; returns whether steps were skipped since the last read."""
        before = self.skipped
        self.skipped, self.run, self.longest_run, self.last_skipped = (int(values.pop(k)) for k in self.KEYS)
        return self.skipped > before


def reduce_scalars(scalars: dict[str, Tensor], device: torch.device) -> dict[str, float]:
    """Average scalar tensors over ranks and read them on the host: one collective and one read for all.

    Every rank must pass the same keys (checked: a mismatch would silently pair different figures).
    """
    keys = sorted(scalars)
    if is_distributed():
        every = all_gather_objects(keys)
        if any(other != keys for other in every):
            raise RuntimeError(f"ranks report different metrics: {every}; metrics must have the same keys on all ranks")
    if not keys:
        return {}
    values = torch.stack([torch.as_tensor(scalars[k], device=device).detach().double().reshape(()) for k in keys])
    all_reduce_sum_(values)
    values /= world_size()
    return dict(zip(keys, values.tolist()))


class Engine:
    """Runs a :class:`TrainingTask` for ``config``'s steps in ``run_dir``.

    Args:
        config: The run's config (a :class:`fvq.training.config.TrainConfig` or another with the same run fields:
            ``global_batch_size``, ``grad_accum_steps``, ``max_steps``, ``epochs``, ``precision``, ``seed``,
            ``num_workers``, ``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ``channels_last``,
            ``compile``, ``log_every``, ``val_every``, ``checkpoint_every``, ``keep_checkpoints``,
            ``max_nonfinite_steps``, ``tensorboard``, ``optim.grad_clip``, ``schedule``, and ``to_dict()``).
        run_dir: The run folder.
        ctx: Process placement (from :func:`fvq.distributed.init_distributed`).
    """

    def __init__(self, config: Any, run_dir: str | Path, ctx: DistributedContext) -> None:
        config.validate()
        self.config = config
        self.ctx = ctx
        self.device = ctx.device
        self.run = RunFolder(run_dir)
        micro = config.global_batch_size // (ctx.world_size * config.grad_accum_steps)
        if micro * ctx.world_size * config.grad_accum_steps != config.global_batch_size:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} must be divisible by world_size ({ctx.world_size}) "
                f"x grad_accum_steps ({config.grad_accum_steps})"
            )
        self.micro_batch_size = micro
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision=fp16 needs CUDA; use precision=fp32 or bf16 on CPU")
        if config.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning(
                "precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): autocast emulates it, usually "
                "slower than fp32"
            )
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.task: TrainingTask | None = None
        self.step = 0
        self.guard = SkipCounter(self.device)
        self.last_checkpoint: Path | None = None
        self.val_metrics: dict[str, float] = {}
        self.logger = MetricLogger(self.run.path, enabled=ctx.is_main, tensorboard=config.tensorboard)

    # ----------------------------------------------------------------------------------------------------------------
    # set-up
    @property
    def run_dir(self) -> Path:
        return self.run.path

    def seed_model(self) -> None:
        """Seed every rank alike before the task builds its model (identical initial weights on all ranks)."""
        torch.manual_seed(self.config.seed)

    def seed_data(self) -> None:
        """Per-rank seeds after the model is built: data randomness differs by rank."""
        seed_process(self.config.seed + self.ctx.rank)

    def wrap(
        self,
        model: nn.Module,
        find_unused_parameters: bool = False,
        compile_units: Sequence[nn.Module] | None = None,
    ) -> nn.Module:
        """``model`` prepared for training: in the config's memory format, its ``compile_units`` (default: the whole
        model) compiled in place when the config asks, and in DDP when several processes run (buffers are not
        broadcast: modules keep their own in sync).

        Args:
            model: The trained module, on the engine's device.
            find_unused_parameters: DDP's option (for models whose steps leave some parameters without gradient).
            compile_units: The submodules to compile with ``compile: true`` (e.g. the convolutional parts of a
                model whose other parts change their control flow from step to step).
        """
        self.prepare(model)
        options = compile_options(self.config.compile)
        if options is not None:
            for unit in [model] if compile_units is None else compile_units:
                # nn.Module.compile compiles in place: the state dict keeps its keys (no ``_orig_mod.`` prefix)
                unit.compile(**options)
        if not self.ctx.distributed:
            return model
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
        )

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` (in place) in the config's memory format: channels-last 4-d weights with ``channels_last``.
        Call it on every module that sees the images (e.g. a loss with its own networks); :meth:`wrap` calls it on
        the model, before any DDP wrapping, whose gradient buckets follow the parameters' layout."""
        if self.memory_format is not torch.preserve_format:
            module.to(memory_format=self.memory_format)
        return module

    def to_memory_format(self, batch: Any) -> Any:
        """``batch`` with every 4-d tensor in the config's memory format (inside tuples, named tuples, lists and
        dicts too); the batch itself without ``channels_last``."""
        if self.memory_format is torch.preserve_format:
            return batch
        if isinstance(batch, Tensor):
            return batch.contiguous(memory_format=self.memory_format) if batch.ndim == 4 else batch
        if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
            return type(batch)(self.to_memory_format(item) for item in batch)
        if isinstance(batch, tuple):  # a named tuple
            return type(batch)(*(self.to_memory_format(item) for item in batch))
        if isinstance(batch, dict):
            return {key: self.to_memory_format(value) for key, value in batch.items()}
        return batch

    def shard(self, model: nn.Module, units: Sequence[nn.Module] = ()) -> nn.Module:
        """``model`` sharded with FSDP2 when several processes run: each of ``units`` (e.g. transformer blocks) gets
        its own parameter group, then the root takes the rest. Parameters, gradients and optimizer states are split
        over the ranks; each unit's parameters are gathered just for its forward and backward. One process: the
        model as :meth:`wrap` prepares it (memory format, compilation).
        """
        if not self.ctx.distributed:
            return self.wrap(model)
        if compile_options(self.config.compile) is not None:
            raise ValueError("compile is not supported with FSDP sharding yet; use sharding: ddp or compile: false")
        self.prepare(model)
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit)
        return fully_shard(model)

    def attach(self, task: TrainingTask) -> None:
        """Take the task: its training set gives the loader, the epoch length and the schedule's length."""
        from fvq.data import build_loader

        cfg = self.config
        self.task = task
        if len(task.train_set) == 0:
            raise ValueError("the training set is empty")
        self.train_loader = build_loader(
            task.train_set,
            batch_size=self.micro_batch_size,
            shuffle=True,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory,
            persistent_workers=cfg.persistent_workers,
            prefetch_factor=cfg.prefetch_factor,
        )
        self.steps_per_epoch = len(self.train_loader) // cfg.grad_accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"one epoch of {len(task.train_set)} samples gives no full optimizer step at a global batch of "
                f"{cfg.global_batch_size}; lower global_batch_size or add data"
            )
        if cfg.epochs is not None:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        else:
            self.total_steps = cfg.max_steps
        self.schedule = AnnealingSchedule(total_steps=self.total_steps, **vars(cfg.schedule))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision of the config (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def lr_factor(self, step: int) -> float:
        """The schedule's factor at ``step``; also sets every optimizer's LR to ``base_lr * factor``."""
        factor = self.schedule(step)
        for optimizer, base_lr in self.task.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = base_lr * factor
        return factor

    # ----------------------------------------------------------------------------------------------------------------
    # one update
    def backward_and_clip(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_batches: Sequence[Any],
        loss_fn: Callable[[Any], tuple[Tensor, dict[str, Tensor]]],
        scalars: dict[str, Tensor],
        prefix: str = "",
    ) -> tuple[Tensor, Callable[[bool | Tensor], None]]:
        """Accumulate the gradients of ``loss_fn`` over the micro-batches, unscale, clip; no host read.

        Args:
            model: The module whose parameters ``optimizer`` updates. Under DDP (wrapped by :meth:`wrap`) or FSDP2
                (:meth:`shard`) gradients are synchronised on the last micro-batch only; a module that is neither has
                its gradients averaged over ranks here.
            optimizer: Its optimizer.
            micro_batches: This rank's micro-batches of the step.
            loss_fn: ``micro_batch -> (loss, terms)``; ``terms`` are detached scalar tensors to log.
            scalars: Where the terms' means over micro-batches go (with ``prefix`` + ``grad_norm``).
            prefix: Prefix of the gradient-norm key (``"discriminator/"``).

        Returns:
            ``(finite, apply)``: a boolean tensor, true when the loss and gradients are finite (on this rank; the
            engine combines ranks), and the callable that applies or discards the update.
        """
        accum = len(micro_batches)
        optimizer.zero_grad(set_to_none=True)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        ddp = isinstance(model, DistributedDataParallel)
        sharded = is_sharded(model)
        for i, micro in enumerate(micro_batches):
            sync = i == accum - 1
            if sharded:  # FSDP2 has no no_sync(): it reduce-scatters unless told not to
                model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or not ddp else model.no_sync():
                with self.autocast():
                    loss, terms = loss_fn(micro)
                finite &= torch.isfinite(loss.detach())
                self.scaler.scale(loss / accum).backward()
            for key, value in terms.items():
                scalars[key] = scalars[key] + value / accum if key in scalars else value / accum
        params = [p for p in model.parameters() if p.grad is not None]
        if not (ddp or sharded) and self.ctx.distributed:  # e.g. the discriminator: average its gradients by hand
            for p in params:
                all_reduce_sum_(p.grad).div_(self.ctx.world_size)
        self.scaler.unscale_(optimizer)
        # the total norm is finite exactly when every gradient is: one reduction instead of one read per tensor
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        if isinstance(grad_norm, DTensor):  # sharded gradients: the norm over all shards, replicated on every rank
            grad_norm = grad_norm.full_tensor()
        finite &= torch.isfinite(grad_norm)
        scalars[f"{prefix}grad_norm"] = grad_norm.detach()

        def apply(ok: bool | Tensor) -> None:
            if isinstance(ok, Tensor):
                if getattr(optimizer, "_step_supports_amp_scaling", False):
                    guarded_step(optimizer, ok)
                    return
                ok = bool(ok)  # an optimizer without a fused kernel decides on the host: one read
            if ok:
                self.scaler.step(optimizer)
            else:
                optimizer.zero_grad(set_to_none=True)

        return finite, device_update(apply)

    def _finish_step(self, out: StepOutput, step: int) -> Tensor:
        """Combine every rank's finiteness flags and apply each update under its flag, on the device: no host read.
        Returns the main update's flag (a boolean tensor)."""
        flags = torch.stack(out.finite).to(torch.float32)
        if self.ctx.distributed:  # a flag is true only when it is true on every rank
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        ok = flags > 0
        main = ok[0]
        if all(getattr(update, "takes_device_flag", False) for update in out.updates):
            for i, update in enumerate(out.updates):  # a non-finite main update discards the whole step
                update(main if i == 0 else main & ok[i])
        else:  # some update decides on the host: one read for all of them
            fine = ok.tolist()
            for update, flag in zip(out.updates, fine):
                update(fine[0] and flag)
        self.scaler.update()
        self.guard.record(main, step)
        return main

    # ----------------------------------------------------------------------------------------------------------------
    # state
    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far as of the last sync point (:meth:`read_guard` reads the exact count)."""
        return self.guard.skipped

    def read_guard(self, scalars: dict[str, Tensor] | None = None) -> tuple[int, dict[str, float]]:
        """Read the skip counts (with ``scalars``, reduced over ranks: one read for all) and stop the run when too
        many steps in a row were skipped.

        Returns:
            ``(skipped_steps, values)``: the exact count so far and the reduced ``scalars``.
        """
        values = reduce_scalars({**(scalars or {}), **self.guard.as_scalars()}, self.device)
        if self.guard.update_from(values):
            self.logger.log(
                self.step,
                {
                    "train/skipped_nonfinite": float(self.guard.skipped),
                    "train/last_skipped_step": self.guard.last_skipped,
                },
            )
        if self.guard.longest_run >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.guard.longest_run} consecutive steps had a non-finite loss or gradient (last at step "
                f"{self.guard.last_skipped}; {self.guard.skipped} skipped in all); stopping without writing "
                f"non-finite weights (skipped steps never change them). Lower the learning rate or check the data; "
                f"the last good checkpoint is {self.last_checkpoint}"
            )
        return self.guard.skipped, values

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (collective: gathers every rank's RNG state)."""
        rngs = all_gather_objects(rng_state())
        task = self.task
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "model": model_state_dict(task.model),
            **{f"optim_{name}": optimizer_state_dict(task.model, opt) for name, (opt, _) in task.optimizers.items()},
            **task.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "skipped_steps": self.read_guard()[0],
            "world_size": self.ctx.world_size,
            "val_metrics": self.val_metrics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        task = self.task
        check = getattr(task, "check_checkpoint", None)
        if check is not None:
            check(state)
        load_model_state_dict(task.model, state["model"])
        for name, (opt, _) in task.optimizers.items():
            saved = state.get(f"optim_{name}")
            if saved:
                load_optimizer_state_dict(task.model, opt, saved)
        task.load_state_dict(state)
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.guard = SkipCounter(self.device, skipped=int(state["skipped_steps"]))
        self.val_metrics = dict(state.get("val_metrics", {}))
        rngs = state["rng"]
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:  # resumed on a different number of ranks: data order stays exact, per-rank randomness is reseeded
            seed_process(self.config.seed + self.ctx.rank + 1_000_003 * self.step)

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes ``checkpoints/step_XXXXXXXX.pt`` atomically; never a checkpoint with non-finite weights."""
        state = self.state_dict()  # collective (gathers RNG states): every rank calls it
        path = None
        if self.ctx.is_main:
            weights = [t for t in state["model"].values() if t.is_floating_point()]
            if weights and not bool(torch.stack([torch.isfinite(t).all() for t in weights]).all()):
                raise NonFiniteLossError(f"refusing to write a checkpoint with non-finite weights at step {self.step}")
            path = save_checkpoint(state, self.run.checkpoint_dir, self.step, self.config.keep_checkpoints)
        barrier()
        self.last_checkpoint = path
        return path

    def resume(self) -> None:
        """Continue from the newest checkpoint of the run folder; the config must be the checkpoint's."""
        path = self.run.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint found in {self.run.checkpoint_dir}")
        state = load_checkpoint(path, map_location=self.device)
        saved = type(self.config).from_dict(state["config"]).to_dict()
        current = self.config.to_dict()
        if saved != current:
            diff = sorted(k for k in saved if saved[k] != current.get(k))
            raise ValueError(
                f"--resume: the config differs from the checkpoint's in {diff}; resume with the same config "
                f"(it is saved in {self.run.config_file})"
            )
        self.load_state_dict(state)

    def write_metrics(self, payload: dict[str, Any]) -> None:
        """Write the run's ``metrics.json`` (rank 0 only)."""
        from fvq.weights import atomic_write_bytes

        if self.ctx.is_main:
            atomic_write_bytes(self.run.metrics_file, (json.dumps(payload, indent=2) + "\n").encode())

    # ----------------------------------------------------------------------------------------------------------------
    # the loop
    def micro_batches(self) -> Iterator[list[Any]]:
        """Yield lists of ``grad_accum_steps`` micro-batches, starting at the data position of ``self.step``."""
        accum = self.config.grad_accum_steps
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        while True:
            self.train_loader.set_epoch(epoch, start_batch=offset * accum)
            batches: list[Any] = []
            produced = offset
            for batch in self.train_loader:
                batches.append(self.to_memory_format(self.task.to_batch(batch, self.device)))
                if len(batches) == accum:
                    yield batches
                    batches = []
                    produced += 1
                    if produced >= self.steps_per_epoch:
                        break
            epoch, offset = epoch + 1, 0

    def train_step(self, micro_batches: list[Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimizer step of the task; returns whether it was applied (a boolean tensor on the device, read
        only when needed) and its (unreduced) scalars."""
        factor = self.lr_factor(step)
        with trusted_values():  # no host read per batch to scan inputs; the finiteness guard covers them
            out = self.task.train_step(self, micro_batches, step)
        applied = self._finish_step(out, step)
        first_lr = next(iter(self.task.optimizers.values()))[1] * factor
        as_scalar = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731 - logged as exactly computed
        out.scalars.update({"lr": as_scalar(first_lr), "lr_factor": as_scalar(factor)})
        return applied, out.scalars

    def fit(
        self, max_steps: int | None = None, describe: Callable[[dict[str, float]], str] | None = None
    ) -> TrainResult:
        """Train until ``total_steps`` (or until ``max_steps`` optimizer steps in this call, for interruption).

        Args:
            max_steps: Stop after this many steps of this call (the schedule still spans the whole run).
            describe: ``val_metrics -> one line`` printed after each validation (rank 0).
        """
        cfg = self.config
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        if self.ctx.is_main:
            self.run.write_config(cfg.to_dict())
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.ctx.is_main,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        data = self.micro_batches()
        timed_from, t0 = self.step, time.perf_counter()  # images/s over the steps since the last log
        try:
            while self.step < end:
                step = self.step
                # 1. The step: forward, backward, clipping and the updates, each applied on the device only when
                #    its loss and gradients are finite on every rank (a skipped step leaves the weights untouched).
                #    Nothing is read on the host: the GPU runs ahead until the next sync point.
                _, scalars = self.train_step(next(data), step)
                self.step += 1
                bar.update(1)
                last = self.step == self.total_steps
                log = bool(cfg.log_every) and (self.step % cfg.log_every == 0 or self.step == 1)
                validate = bool(cfg.val_every) and (self.step % cfg.val_every == 0 or last)
                checkpoint = (
                    (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last or self.step == end
                )
                # without logging, the guard is still read every max_nonfinite_steps steps
                check = not cfg.log_every and self.step % cfg.max_nonfinite_steps == 0
                if not (log or validate or checkpoint or check):
                    continue
                # 2. Sync point: the skip counts (and at log steps the scalars) are reduced over ranks and read
                #    once; too many skipped steps in a row stop the run here.
                _, values = self.read_guard(scalars if log else None)
                if log and self.guard.last_skipped != step:  # a skipped step's scalars are not finite
                    values["images_per_s"] = (
                        cfg.global_batch_size * (self.step - timed_from) / max(time.perf_counter() - t0, 1e-9)
                    )
                    self.logger.log(self.step, {f"train/{k}" if "/" not in k else k: v for k, v in values.items()})
                    shown = {"loss": f"{values.get('loss', float('nan')):.4f}"}
                    if "quantizer/usage" in values:
                        shown["usage"] = f"{values['quantizer/usage']:.3f}"
                    bar.set_postfix(**shown, lr=f"{values['lr']:.2e}")
                # 3. Validation and checkpoints (their time is left out of images/s).
                if validate:
                    self.val_metrics = self.task.validate(self, self.step)
                    self.logger.log(self.step, self.val_metrics)
                    if self.ctx.is_main and describe is not None:
                        bar.write(f"step {self.step}: {describe(self.val_metrics)}")
                if checkpoint:
                    self.save_checkpoint()
                if log or validate or checkpoint:
                    timed_from, t0 = self.step, time.perf_counter()
        finally:
            bar.close()
        finish = getattr(self.task, "finish", None)
        if finish is not None and self.step == self.total_steps:
            finish(self)
        self.logger.close()
        return TrainResult(
            run_dir=self.run.path,
            steps=self.step,
            checkpoint=self.last_checkpoint,
            metrics=self.val_metrics,
            skipped_steps=self.skipped_steps,
            is_main=self.ctx.is_main,
        )


def run_training(
    config: Any,
    run_dir: str | Path,
    build_task: Callable[[Engine], TrainingTask],
    *,
    resume: bool = False,
    max_steps: int | None = None,
    overwrite: bool = False,
    describe: Callable[[dict[str, float]], str] | None = None,
) -> TrainResult:
    """Set up the processes and the run folder, build the task, resume if asked, train.

    Launch under ``torchrun --nproc_per_node N -m fvq train ...`` for several processes: the code path is the same.

    Args:
        config: The run's config.
        run_dir: The run folder.
        build_task: ``engine -> task``: builds the model, loss, optimizers and datasets on the engine's device.
        resume: Continue from the newest checkpoint in ``run_dir/checkpoints``.
        max_steps: Stop after this many steps of this call.
        overwrite: Delete a previous run's outputs in ``run_dir`` first.
        describe: ``val_metrics -> one line`` printed after each validation.
    """
    flush_denormals()
    ctx = init_distributed(config.device)
    engine = None
    try:
        run = RunFolder(run_dir)
        run.prepare(resume=resume, overwrite=overwrite, is_main=ctx.is_main)
        barrier()
        engine = Engine(config, run_dir, ctx)
        engine.attach(build_task(engine))
        if resume:
            engine.resume()
        return engine.fit(max_steps=max_steps, describe=describe)
    finally:
        # DDP's reducer talks to the process group when it is destroyed: free it before the group goes (a reducer
        # collected after the teardown can hang that rank)
        engine = None
        gc.collect()
        cleanup_distributed()
