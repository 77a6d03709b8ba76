"""Training a tokenizer: the per-model part the shared engine (:mod:`fvq.training.engine`) runs.

Each optimizer step is a generator (tokenizer) update followed, once the adversarial loss has started, by a
discriminator update on the same images and their detached reconstructions. The LR of both is
``base_lr * annealing(step)``. Validation runs through :class:`fvq.evaluation.ReconstructionEvaluator`, so the
``val/*`` figures of training and ``fvq eval`` agree by construction on the same set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fvq.data.images import batch_images
from fvq.distributed import all_gather_objects
from fvq.training.config import TrainConfig
from fvq.training.engine import Engine, StepOutput, TrainResult, run_training, unwrap

VAL_FILES = ("reconstructions.png", "val_code_counts.pt")  # what validation writes into the run folder


@torch.no_grad()
def distinct_code_metrics(quantizer: nn.Module) -> dict[str, float]:
    """``val/distinct_codes``: how many different vectors the search codebook holds. Identical codes can never all
    be used (ties go to the lowest index), so this bounds usage from above; empty for implicit codebooks."""
    codebook_vectors = getattr(quantizer, "codebook_vectors", None)
    if not callable(codebook_vectors):
        return {}
    codes = codebook_vectors()
    return {"val/distinct_codes": float(torch.unique(codes.float(), dim=0).shape[0])}


class TokenizerTask:
    """A :class:`fvq.models.Tokenizer` trained with :class:`fvq.losses.TokenizerLoss`.

    Args:
        engine: The engine that runs the task (device, seeds, DDP wrapping, micro-batch size).
    """

    def __init__(self, engine: Engine) -> None:
        from fvq.data import build_dataset
        from fvq.data.build import warn_if_validation_reads_training
        from fvq.losses import TokenizerLoss
        from fvq.models import Tokenizer

        config: TrainConfig = engine.config
        self.config = config
        device = engine.device
        # the model is built from the same seed on every rank; data randomness then differs by rank
        engine.seed_model()
        tokenizer = Tokenizer.from_config({"model": config.model, "quantizer": config.quantizer}).to(device)
        self.loss = engine.prepare(TokenizerLoss(**vars(config.loss)).to(device))  # its networks see the images
        engine.seed_data()
        # compile: true compiles the convolutional encoder and decoder; the quantizer's search stays eager
        self.model = engine.wrap(
            tokenizer,
            find_unused_parameters=tokenizer.quantizer.may_leave_parameters_unused,
            compile_units=(tokenizer.encoder, tokenizer.decoder),
        )

        scale = config.global_batch_size / config.optim.base_batch_size
        # fused Adam: one kernel over all parameters (about 8x faster than the per-tensor loop on CPU)
        adam = dict(betas=config.optim.betas, weight_decay=config.optim.weight_decay, fused=True)
        base_lr = config.optim.lr * scale
        self.optimizers: dict[str, tuple[torch.optim.Optimizer, float]] = {
            "g": (torch.optim.Adam(tokenizer.parameters(), lr=base_lr, **adam), base_lr)
        }
        disc_params = list(self.loss.discriminator.parameters()) if self.loss.discriminator is not None else []
        if disc_params:
            base_lr_d = (config.optim.discriminator_lr or config.optim.lr) * scale
            self.optimizers["d"] = (torch.optim.Adam(disc_params, lr=base_lr_d, **adam), base_lr_d)

        self.train_set = build_dataset(config.data, split="train")
        self.val_set = build_dataset(config.val_data or config.data, split="val")
        if engine.ctx.is_main:
            warn_if_validation_reads_training(config.data, config.val_data or config.data)

    @property
    def tokenizer(self) -> nn.Module:
        return unwrap(self.model)

    def to_batch(self, batch: Any, device: torch.device) -> Tensor:
        return batch_images(batch).to(device, non_blocking=True)  # (B, 3, H, W)

    # ----------------------------------------------------------------------------------------------------------------
    def train_step(self, engine: Engine, micro_batches: list[Tensor], step: int) -> StepOutput:
        """The generator update over the micro-batches, then (after its start) the discriminator update."""
        self.tokenizer.quantizer.set_step(step)  # step-dependent schedules and rank-shared draws
        self.model.train()
        self.loss.train()
        scalars: dict[str, Tensor] = {}
        reconstructions: list[Tensor] = []

        # 1. Generator: reconstruction, perceptual, adversarial and quantizer losses.
        def generator_loss(images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            out = self.model(images)  # reconstruction (B, 3, H, W), quantizer output
            g = self.loss.generator_loss(
                images, out.reconstruction, out.quantizer, step, last_layer=self.tokenizer.last_layer
            )
            reconstructions.append(out.reconstruction.detach())
            metrics = {f"quantizer/{k}": v.detach().float() for k, v in out.quantizer.metrics.items()}
            return g.loss, {**g.terms, **metrics}

        opt_g = self.optimizers["g"][0]
        finite_g, apply_g = engine.backward_and_clip(self.model, opt_g, micro_batches, generator_loss, scalars)
        out = StepOutput(scalars=scalars, finite=[finite_g], updates=[apply_g])

        # 2. Discriminator on the same images and their detached reconstructions, once the GAN has started. Its
        #    loss does not depend on the generator update, so both updates share the step's one finiteness read.
        if "d" in self.optimizers and self.loss.adversarial_active(step):
            pairs = iter(reconstructions)

            def discriminator_loss(images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
                d = self.loss.discriminator_loss(images, next(pairs), step)
                return d.loss, d.terms

            opt_d = self.optimizers["d"][0]
            finite_d, apply_d = engine.backward_and_clip(
                self.loss.discriminator, opt_d, micro_batches, discriminator_loss, scalars, prefix="discriminator/"
            )
            out.finite.append(finite_d)
            out.updates.append(apply_d)
        return out

    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, engine: Engine, step: int) -> dict[str, float]:
        """Usage over the whole held-out set, PSNR over its first ``val_psnr_images`` images, a reconstruction grid.

        Every rank takes a disjoint slice of the set (no padding: each image is counted once); the evaluator sums
        over ranks.
        """
        from fvq.evaluation.evaluate import EvalNetworks, ReconstructionEvaluator

        model = self.tokenizer
        ctx = engine.ctx
        was_training = model.training
        model.eval()
        with engine.autocast():  # as in the per-batch forward, so the indices are the same
            # the inference form: a projector (VQBridge) maps the codebook once here instead of once per batch
            quantizer = model.quantizer.export().eval()
        evaluator = ReconstructionEvaluator(
            codebook_size=quantizer.codebook_size,
            metrics=("psnr", "usage"),
            networks=EvalNetworks(),
            device=engine.device,
        )
        shard = torch.utils.data.Subset(self.val_set, list(range(ctx.rank, len(self.val_set), ctx.world_size)))
        loader = torch.utils.data.DataLoader(shard, batch_size=self.config.val_batch_size, shuffle=False)
        # held-out image i (global index) is also decoded when i < limit: PSNR and the grid come from those
        limit = len(self.val_set) if self.config.val_psnr_images is None else self.config.val_psnr_images
        first: tuple[Tensor, Tensor] | None = None
        position = 0  # items of this rank's shard seen so far
        for batch in loader:
            images = batch_images(batch).to(engine.device)
            decoded = sum(1 for i in range(images.shape[0]) if ctx.rank + ctx.world_size * (position + i) < limit)
            position += images.shape[0]
            with engine.autocast():
                quantized = quantizer(model.encode_latents(images))
                if decoded:
                    recon = model.decode_latents(quantized.quantized[:decoded]).float()
            if decoded:
                evaluator.update(images[:decoded], recon, quantized.indices[:decoded])
                if first is None:
                    first = (images[: min(decoded, 16)].cpu(), recon[:16].cpu())
            evaluator.count_codes(quantized.indices[decoded:])
        figures, _ = evaluator.compute()
        counts = evaluator.usage.global_counts()  # collective: every rank calls it
        metrics = {
            "val/replicas_in_sync": float(self.replicas_in_sync()),
            **distinct_code_metrics(quantizer),
            "val/usage": figures["usage"],
            "val/perplexity": figures["perplexity"],
            "val/dead_codes": figures["dead_codes"],
            "val/tokens": figures["tokens"],
            "val/psnr": figures["psnr_rgb"],  # 8-bit RGB, capped, as fvq eval
            "val/images": float(len(self.val_set)),
            "val/psnr_images": figures["num_images"],
        }
        if ctx.is_main:
            from fvq.data.grids import save_reconstruction_grid

            if first is not None:
                save_reconstruction_grid(first[0], first[1], engine.run.file("reconstructions.png"))
            torch.save(counts.cpu(), engine.run.file("val_code_counts.pt"))
            engine.write_metrics(
                {
                    "step": step,
                    **metrics,
                    "usage_definition": "fraction of codes used at least once over the whole held-out set, "
                    "histogram summed over all ranks",
                }
            )
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
        return {"loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"])


def describe_validation(metrics: dict[str, float]) -> str:
    """The line printed after each validation."""
    distinct = metrics.get("val/distinct_codes")  # absent for implicit and multi-codebook quantizers
    codes = "" if distinct is None else f" ({int(distinct)} distinct codes)"
    return (
        f"held-out usage {metrics['val/usage']:.2%}{codes}, "
        f"perplexity {metrics['val/perplexity']:.1f}, PSNR {metrics['val/psnr']:.2f} dB"
    )


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
    return run_training(
        config,
        run_dir,
        TokenizerTask,
        resume=resume,
        max_steps=max_steps,
        overwrite=overwrite,
        describe=describe_validation,
    )


def summary(result: TrainResult) -> list[str]:
    """What ``fvq train`` prints at the end of a tokenizer run."""
    lines = []
    if result.metrics:
        m = result.metrics
        lines.append(
            f"held-out usage {m['val/usage']:.2%} ({int(m['val/tokens'])} tokens, {int(m['val/dead_codes'])} dead "
            f"codes), perplexity {m['val/perplexity']:.1f}, PSNR {m['val/psnr']:.2f} dB "
            f"({int(m.get('val/psnr_images', m['val/images']))} images)"
        )
    lines += [
        f"run directory: {result.run_dir}",
        f"  checkpoint:      {result.checkpoint}",
        f"  metrics:         {result.run_dir / 'metrics.json'}",
        f"  reconstructions: {result.run_dir / 'reconstructions.png'}",
        f"  log:             {result.run_dir / 'log.jsonl'}",
    ]
    return lines
