"""The tokenizer trainer: one readable loop for one CPU process or many GPUs under ``torchrun``.

Each optimizer step is a generator (tokenizer) step followed, once the adversarial loss has started, by a
discriminator step. The LR of both is ``base_lr * annealing(step)``, a pure function of the step. Rank 0 writes
logs, pictures and checkpoints; everything that is reported is reduced over ranks first.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fvq.data.images import batch_images
from fvq.distributed import (
    DistributedContext,
    all_gather_objects,
    all_reduce_mean,
    any_rank,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from fvq.evaluation.evaluate import PSNR_CAP
from fvq.evaluation.metrics import psnr
from fvq.quantizers.usage import CodebookUsage
from fvq.runs import RunFolder, load_checkpoint, save_checkpoint
from fvq.training.checkpoint import rng_state, set_rng_state
from fvq.training.config import TrainConfig
from fvq.training.logging import MetricLogger
from fvq.training.lr_schedule import AnnealingSchedule


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive steps whose loss or gradients were not finite."""


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: The run directory.
        steps: Optimizer steps completed.
        checkpoint: Path of the last checkpoint written.
        metrics: Latest validation figures (``val/usage``, ``val/perplexity``, ``val/psnr``, ...).
        skipped_steps: Steps skipped because of a non-finite loss.
        is_main: Whether this process is rank 0 (the one that reports).
    """

    run_dir: Path
    steps: int
    checkpoint: Path | None
    metrics: dict[str, float]
    skipped_steps: int
    is_main: bool = True


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _average_gradients(module: nn.Module) -> None:
    """All-reduce (mean) the gradients of a module that is not wrapped in DDP (the discriminator)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad /= world


def _grads_finite(module: nn.Module) -> bool:
    return all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def _params_finite(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


@torch.no_grad()
def distinct_code_metrics(quantizer: nn.Module) -> dict[str, float]:
    """``val/distinct_codes``: how many different vectors the search codebook holds. Identical codes can never all
    be used (ties go to the lowest index), so this bounds usage from above; empty for implicit codebooks."""
    codebook_vectors = getattr(quantizer, "codebook_vectors", None)
    if not callable(codebook_vectors):
        return {}
    codes = codebook_vectors()
    return {"val/distinct_codes": float(torch.unique(codes.float(), dim=0).shape[0])}


class Trainer:
    """Trains a :class:`fvq.models.Tokenizer` with :class:`fvq.losses.TokenizerLoss`.

    Args:
        config: The run's configuration.
        run_dir: Where logs, pictures, ``metrics.json`` and ``checkpoints/`` go.
        ctx: Process placement (from :func:`init_distributed`).
    """

    def __init__(self, config: TrainConfig, run_dir: str | Path, ctx: DistributedContext) -> None:
        from fvq.data import build_dataset, build_loader
        from fvq.losses import TokenizerLoss
        from fvq.models import Tokenizer

        config.validate()
        self.config = config
        self.ctx = ctx
        self.run_dir = Path(run_dir)
        self.device = ctx.device
        micro = config.global_batch_size // (ctx.world_size * config.grad_accum_steps)
        if micro * ctx.world_size * config.grad_accum_steps != config.global_batch_size:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} must be divisible by world_size ({ctx.world_size}) "
                f"x grad_accum_steps ({config.grad_accum_steps})"
            )
        self.micro_batch_size = micro
        if config.precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"precision={config.precision} needs CUDA; use precision=fp32 on CPU")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]

        # Per-rank seeds: the model is built from the same seed on every rank, data randomness differs by rank.
        torch.manual_seed(config.seed)
        model = Tokenizer.from_config({"model": config.model, "quantizer": config.quantizer}).to(self.device)
        loss_kwargs = {k: v for k, v in vars(config.loss).items()}
        self.loss = TokenizerLoss(**loss_kwargs).to(self.device)
        self._seed_process(config.seed + ctx.rank)

        self.model = model
        if ctx.distributed:
            self.model = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # quantizers keep their own buffers in sync (all-reduce + broadcast)
                find_unused_parameters=model.quantizer.may_leave_parameters_unused,
            )

        scale = config.global_batch_size / config.optim.base_batch_size
        self.base_lr = config.optim.lr * scale
        self.base_lr_d = (config.optim.discriminator_lr or config.optim.lr) * scale
        # fused Adam: one kernel over all parameters (about 8x faster than the per-tensor loop on CPU)
        adam = dict(betas=config.optim.betas, weight_decay=config.optim.weight_decay, fused=True)
        self.opt_g = torch.optim.Adam(model.parameters(), lr=self.base_lr, **adam)
        disc_params = list(self.loss.discriminator.parameters()) if self.loss.discriminator is not None else []
        self.opt_d = torch.optim.Adam(disc_params, lr=self.base_lr_d, **adam) if disc_params else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")

        self.train_set = build_dataset(config.data, split="train")
        self.val_set = build_dataset(config.val_data or config.data, split="val")
        if len(self.train_set) == 0:
            raise ValueError("the training set is empty")
        self.train_loader = build_loader(
            self.train_set,
            batch_size=micro,
            shuffle=True,
            seed=config.seed,
            num_workers=config.num_workers,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.train_loader) // config.grad_accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"one epoch of {len(self.train_set)} images gives no full optimizer step at a global batch of "
                f"{config.global_batch_size}; lower global_batch_size or add data"
            )
        if config.epochs is not None:
            self.total_steps = max(1, math.ceil(config.epochs * self.steps_per_epoch))
        else:
            self.total_steps = config.max_steps
        self.schedule = AnnealingSchedule(total_steps=self.total_steps, **vars(config.schedule))

        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.last_checkpoint: Path | None = None
        self.val_metrics: dict[str, float] = {}
        self.logger = MetricLogger(self.run_dir, enabled=ctx.is_main, tensorboard=config.tensorboard)

    # ----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _seed_process(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def tokenizer(self) -> nn.Module:
        return _unwrap(self.model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _set_lr(self, step: int) -> float:
        factor = self.schedule(step)
        for group in self.opt_g.param_groups:
            group["lr"] = self.base_lr * factor
        if self.opt_d is not None:
            for group in self.opt_d.param_groups:
                group["lr"] = self.base_lr_d * factor
        return factor

    # ----------------------------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[Tensor], step: int) -> dict[str, float]:
        """One optimizer step: generator update on all micro-batches, then (after its start) a discriminator update.

        Returns the step's scalars (already averaged over ranks), or ``{"skipped": 1.0}`` when the loss or the
        gradients were not finite on any rank (the step is then not applied).
        """
        cfg = self.config
        lr_factor = self._set_lr(step)
        self.tokenizer.quantizer.set_step(step)  # step-dependent schedules and rank-shared draws
        accum = len(micro_batches)
        self.model.train()
        self.loss.train()

        # 1. Generator step: reconstruction, perceptual, adversarial and quantizer losses; gradients accumulate over
        #    the micro-batches (DDP synchronises only on the last one).
        self.opt_g.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        reconstructions: list[Tensor] = []
        finite = True
        for i, images in enumerate(micro_batches):
            sync = i == accum - 1 or not isinstance(self.model, DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    out = self.model(images)  # reconstruction (B, 3, H, W), quantizer output
                    g = self.loss.generator_loss(
                        images, out.reconstruction, out.quantizer, step, last_layer=self.tokenizer.last_layer
                    )
                finite &= bool(torch.isfinite(g.loss))
                self.scaler.scale(g.loss / accum).backward()
            reconstructions.append(out.reconstruction.detach())
            for key, value in {**g.terms, **{f"quantizer/{k}": v for k, v in out.quantizer.metrics.items()}}.items():
                terms[key] = terms.get(key, 0.0) + float(value) / accum

        # 2. A non-finite loss or gradient on any rank skips the step on every rank (weights stay untouched).
        self.scaler.unscale_(self.opt_g)
        finite &= _grads_finite(self.model)
        if any_rank(not finite, self.device):
            self.opt_g.zero_grad(set_to_none=True)
            self.scaler.update()
            return {"skipped": 1.0}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.opt_g)
        self.scaler.update()

        # 3. Discriminator step on the same images and their (detached) reconstructions, once the GAN has started.
        if self.opt_d is not None and self.loss.adversarial_active(step):
            self.opt_d.zero_grad(set_to_none=True)
            for images, recon in zip(micro_batches, reconstructions):
                with self._autocast():
                    d = self.loss.discriminator_loss(images, recon, step)
                (d.loss / accum).backward()
                for key, value in d.terms.items():
                    terms[key] = terms.get(key, 0.0) + float(value) / accum
            _average_gradients(self.loss.discriminator)
            if _grads_finite(self.loss.discriminator):
                torch.nn.utils.clip_grad_norm_(self.loss.discriminator.parameters(), cfg.optim.grad_clip)
                self.opt_d.step()
            else:
                self.opt_d.zero_grad(set_to_none=True)

        terms = all_reduce_mean(terms, self.device)
        terms.update({"lr": self.base_lr * lr_factor, "lr_factor": lr_factor, "grad_norm": float(grad_norm)})
        return terms

    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Usage over the whole held-out set (histogram gathered across ranks), PSNR, and a reconstruction grid."""
        model = self.tokenizer
        was_training = model.training
        model.eval()
        with self._autocast():  # as in the per-batch forward, so the indices are the same
            # the inference form: a projector (VQBridge) maps the codebook once here instead of once per batch
            quantizer = model.quantizer.export().eval()
        usage = CodebookUsage(quantizer.codebook_size, device=self.device)
        psnr_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        # every rank takes a disjoint slice of the held-out set (no padding: each image is counted once)
        shard = torch.utils.data.Subset(
            self.val_set, list(range(self.ctx.rank, len(self.val_set), self.ctx.world_size))
        )
        loader = torch.utils.data.DataLoader(shard, batch_size=self.config.val_batch_size, shuffle=False)
        # held-out image i (global index) is also decoded when i < limit: PSNR and the grid come from those
        limit = len(self.val_set) if self.config.val_psnr_images is None else self.config.val_psnr_images
        first: tuple[Tensor, Tensor] | None = None
        position = 0  # items of this rank's shard seen so far
        for batch in loader:
            images = batch_images(batch).to(self.device)
            global_index = self.ctx.rank + self.ctx.world_size * (position + torch.arange(images.shape[0]))
            decoded = int((global_index < limit).sum())  # a prefix of the batch
            position += images.shape[0]
            with self._autocast():
                quantized = quantizer(model.encode_latents(images))
                usage.update(quantized.indices)
                if decoded == 0:
                    continue
                recon = model.decode_latents(quantized.quantized[:decoded]).float()
            psnr_sum += psnr(images[:decoded], recon).clamp(max=PSNR_CAP).sum()  # 8-bit RGB, as fvq eval
            count += decoded
            if first is None:
                first = (images[: min(decoded, 16)].cpu(), recon[:16].cpu())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(psnr_sum)
            torch.distributed.all_reduce(count)
        report = usage.compute()
        in_sync = self.replicas_in_sync()
        metrics = {
            "val/replicas_in_sync": float(in_sync),
            **distinct_code_metrics(quantizer),
            "val/usage": report.usage,
            "val/perplexity": report.perplexity,
            "val/dead_codes": float(report.dead_codes),
            "val/tokens": float(report.num_tokens),
            "val/psnr": float(psnr_sum / count.clamp_min(1)),
            "val/images": float(len(self.val_set)),
            "val/psnr_images": float(count),
        }
        if self.ctx.is_main:
            from fvq.visualize import save_reconstruction_grid

            if first is not None:
                save_reconstruction_grid(first[0], first[1], self.run_dir / "reconstructions.png")
            torch.save(usage.global_counts().cpu(), self.run_dir / "val_code_counts.pt")
            payload = {
                "step": step,
                **metrics,
                "usage_definition": "fraction of codes used at least once over the whole held-out set, "
                "histogram summed over all ranks",
            }
            _write_json(self.run_dir / "metrics.json", payload)
        else:
            usage.global_counts()  # keep collective calls matched across ranks
        model.train(was_training)
        return metrics

    @torch.no_grad()
    def replicas_in_sync(self) -> bool:
        """True when every rank holds bit-identical tokenizer weights and buffers (codebooks included).

        Compares per-tensor fingerprints (float64 sum and sum of squares) gathered from all ranks.
        """
        state = self.tokenizer.state_dict()
        prints = torch.stack(
            [torch.stack([t.double().sum(), t.double().square().sum()]) for t in state.values() if t.numel()]
        ).cpu()
        gathered = all_gather_objects(prints)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])

    # ----------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rngs = all_gather_objects(rng_state())
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "model": self.tokenizer.state_dict(),
            "loss": self.loss.state_dict(),
            "optim_g": self.opt_g.state_dict(),
            "optim_d": self.opt_d.state_dict() if self.opt_d is not None else {},
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "skipped_steps": self.skipped_steps,
            "world_size": self.ctx.world_size,
            "val_metrics": self.val_metrics,
        }

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes ``checkpoints/step_XXXXXXXX.pt`` atomically; never a checkpoint with non-finite weights."""
        state = self.state_dict()  # collective (gathers RNG states): every rank calls it
        path = None
        if self.ctx.is_main:
            if not _params_finite(self.tokenizer):
                raise NonFiniteLossError(f"refusing to write a checkpoint with non-finite weights at step {self.step}")
            path = save_checkpoint(state, self.run_dir / "checkpoints", self.step, self.config.keep_checkpoints)
        barrier()
        self.last_checkpoint = path
        return path

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokenizer.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.opt_g.load_state_dict(state["optim_g"])
        if self.opt_d is not None and state["optim_d"]:
            self.opt_d.load_state_dict(state["optim_d"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.val_metrics = dict(state.get("val_metrics", {}))
        rngs = state["rng"]
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:  # resumed on a different number of ranks: data order stays exact, per-rank randomness is reseeded
            self._seed_process(self.config.seed + self.ctx.rank + 1_000_003 * self.step)

    # ----------------------------------------------------------------------------------------------------------------
    def _micro_batches(self):
        """Yield lists of ``grad_accum_steps`` micro-batches, starting at the data position of ``self.step``."""
        accum = self.config.grad_accum_steps
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        while True:
            self.train_loader.set_epoch(epoch, start_batch=offset * accum)
            batches: list[Tensor] = []
            produced = offset
            for batch in self.train_loader:
                batches.append(batch_images(batch).to(self.device, non_blocking=True))
                if len(batches) == accum:
                    yield batches
                    batches = []
                    produced += 1
                    if produced >= self.steps_per_epoch:
                        break
            epoch, offset = epoch + 1, 0

    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train until ``total_steps`` (or until ``max_steps`` optimizer steps in this call, for interruption)."""
        cfg = self.config
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "config.yaml", "w") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.ctx.is_main,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        data = self._micro_batches()
        t0 = time.time()
        while self.step < end:
            step = self.step
            scalars = self.train_step(next(data), step)
            if "skipped" in scalars:
                self.skipped_steps += 1
                self.consecutive_nonfinite += 1
                self.logger.log(step, {"train/skipped_nonfinite": float(self.skipped_steps)})
                if self.consecutive_nonfinite >= cfg.max_nonfinite_steps:
                    bar.close()
                    raise NonFiniteLossError(
                        f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                        f"(last at step {step}; {self.skipped_steps} skipped in all); stopping without writing "
                        f"non-finite weights. Lower the learning rate or check the data; the last good checkpoint "
                        f"is {self.last_checkpoint}"
                    )
            else:
                self.consecutive_nonfinite = 0
            self.step += 1
            bar.update(1)
            if "skipped" not in scalars and cfg.log_every and (self.step % cfg.log_every == 0 or self.step == 1):
                scalars["train/images_per_s"] = cfg.global_batch_size * (self.step - step) / max(time.time() - t0, 1e-9)
                self.logger.log(self.step, {f"train/{k}" if "/" not in k else k: v for k, v in scalars.items()})
                bar.set_postfix(
                    loss=f"{scalars.get('loss', float('nan')):.4f}",
                    usage=f"{scalars.get('quantizer/usage', float('nan')):.3f}",
                    lr=f"{scalars['lr']:.2e}",
                )
            t0 = time.time()
            last = self.step == self.total_steps
            if cfg.val_every and (self.step % cfg.val_every == 0 or last):
                self.val_metrics = self.validate(self.step)
                self.logger.log(self.step, self.val_metrics)
                if self.ctx.is_main:
                    m = self.val_metrics
                    bar.write(
                        f"step {self.step}: held-out usage {m['val/usage']:.2%} "
                        f"({int(m.get('val/distinct_codes', -1))} distinct codes), "
                        f"perplexity {m['val/perplexity']:.1f}, PSNR {m['val/psnr']:.2f} dB"
                    )
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last or self.step == end:
                self.save_checkpoint()
        bar.close()
        self.logger.close()
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            checkpoint=self.last_checkpoint,
            metrics=self.val_metrics,
            skipped_steps=self.skipped_steps,
            is_main=self.ctx.is_main,
        )


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from fvq.weights import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on this CPU (x86 FTZ/DAZ); returns whether the CPU supports it.

    Training drives some values into the subnormal range (softmax weights of peaked attention in the VQBridge, Adam
    moments of parameters that stopped receiving gradient), and CPU kernels run 5-15x slower on them: a trained
    VQBridge's attention backward at 1,024 tokens took 69 ms per call instead of 12 ms at initialisation. The flag
    is per thread and worker threads copy it when they are created, so this must run before the first parallel
    operation of the process;
    :func:`train` calls it first thing.
    """
    return bool(torch.set_flush_denormal(True))


def train(
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    max_steps: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a tokenizer; ``resume=True`` continues from the newest checkpoint in ``run_dir/checkpoints``,
    ``overwrite=True`` deletes a previous run's outputs in ``run_dir`` first.

    Launch under ``torchrun --nproc_per_node N -m fvq train ...`` for several processes: the code path is the same.
    """
    flush_denormals()
    ctx = init_distributed(config.device)
    try:
        run = RunFolder(run_dir)
        run.prepare(resume=resume, overwrite=overwrite, is_main=ctx.is_main)
        barrier()
        trainer = Trainer(config, run_dir, ctx)
        if resume:
            path = run.latest_checkpoint()
            if path is None:
                raise FileNotFoundError(f"--resume: no checkpoint found in {run.checkpoint_dir}")
            state = load_checkpoint(path, map_location=ctx.device)
            saved = TrainConfig.from_dict(state["config"]).to_dict()
            if saved != config.to_dict():
                diff = sorted(k for k in saved if saved[k] != config.to_dict().get(k))
                raise ValueError(
                    f"--resume: the config differs from the checkpoint's in {diff}; resume with the same config "
                    f"(it is saved in {run.config_file})"
                )
            trainer.load_state_dict(state)
        return trainer.fit(max_steps=max_steps)
    finally:
        cleanup_distributed()
