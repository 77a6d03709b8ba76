"""Training the class-conditional generator: the per-model part the shared engine (:mod:`fvq.training.engine`) runs.

LlamaGen's recipe (Sun et al. 2024, https://arxiv.org/abs/2406.06525, ``autoregressive/train/train_c2i.py``): the GPT
of :mod:`fvq.generation` predicts every token of a tokenizer's raster-ordered grid from the class and the tokens
before it; one cross-entropy; AdamW (0.9, 0.95) with weight decay 0.05 on matrices only; LR ``1e-4 x batch / 256``;
gradients clipped at 1.0; labels replaced by the null class with probability 0.1 (classifier-free guidance). The
vocabulary, the grid and the classes come from the token store, so they are never typed twice.

What the engine does not know and this task adds:

* Class dropout draws from a generator seeded by ``(seed, step, rank, micro-batch)``: a resumed run draws what the
  uninterrupted one drew, whatever else used the global RNG.
* An optional exponential moving average of the weights, kept in the same layout as the parameters (sharded under
  FSDP) and saved whole in the checkpoint.
* Validation: held-out next-token cross-entropy (nats and bits per token) and top-1 accuracy of the trained (and EMA)
  weights, beside two baselines that need no model: the uniform distribution (``log2 V`` bits) and the class-
  conditional unigram estimated on the training tokens (Laplace-smoothed).
* At the end, the model exported to ``RUN/model/`` (``config.json`` + ``model.safetensors``, EMA weights when kept)
  with the tokenizer's identity recorded, for sampling.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from fvq.distributed import all_gather_objects, all_reduce_sum_, barrier
from fvq.generation.gpt import GPT, GPTConfig, gpt_config
from fvq.generation.layout import check_token_layout
from fvq.runs import RunFolder
from fvq.training.config import GeneratorTrainConfig
from fvq.training.engine import (
    Engine,
    StepOutput,
    TrainResult,
    device_update,
    is_sharded,
    model_state_dict,
    run_training,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# token data
def open_tokens(path: str | os.PathLike, *, split: str, seed: int) -> Any:
    """The token dataset of a store written by ``fvq encode`` (:class:`fvq.data.tokens.TokenDataset`); a store
    without class labels is refused (the generator is class-conditional).

    Args:
        path: The token store.
        split: ``"train"`` (one view per sample and epoch) or ``"val"`` (the plain centre crop).
        seed: Seed of the view draws.
    """
    from fvq.data.tokens import TokenDataset

    return TokenDataset(path, split=split, seed=seed, require_labels=True)


@dataclass(frozen=True)
class TokenData:
    """What the generator takes from a token store.

    Attributes:
        vocab_size: Distinct token ids (the tokenizer's ``codebook_size``).
        grid: Token grid ``(h, w)``; sequences have ``h * w`` tokens.
        num_classes: Class labels ``0 .. num_classes - 1`` of the data.
        class_names: One name per class (may be empty).
        model_identity: Identity of the tokenizer that made the tokens.
    """

    vocab_size: int
    grid: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...]
    model_identity: str

    @classmethod
    def of(cls, dataset: Any, what: str) -> TokenData:
        """Read and check a token dataset's layout: one code per grid position, ``h * w`` tokens per sample.

        Args:
            dataset: A :class:`fvq.data.tokens.TokenDataset` (or anything with its attributes and items).
            what: Its name for messages (e.g. the path).
        """
        if len(dataset) == 0:
            raise ValueError(f"{what} holds no sequences")
        grid = tuple(int(g) for g in dataset.grid)
        tokens = _sample_tokens(dataset[0])
        declared = getattr(dataset, "codes_per_position", None)
        per_position = int(declared) if declared is not None else (int(tokens.shape[-1]) if tokens.ndim == 2 else 1)
        check_token_layout(per_position, what=what)
        if tokens.ndim != 1 or tokens.shape[0] != grid[0] * grid[1]:
            raise ValueError(
                f"{what}: a sample's tokens must have shape ({grid[0] * grid[1]},) (the {grid[0]}x{grid[1]} grid in "
                f"raster order), got {tuple(tokens.shape)}"
            )
        num_classes = int(dataset.num_classes)
        if num_classes < 1:
            raise ValueError(f"{what} has no class labels; the generator is class-conditional")
        return cls(
            vocab_size=int(dataset.codebook_size),
            grid=(grid[0], grid[1]),
            num_classes=num_classes,
            class_names=tuple(str(n) for n in getattr(dataset, "class_names", ()) or ()),
            model_identity=str(dataset.model_identity),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "grid": list(self.grid),
            "num_classes": self.num_classes,
            "model_identity": self.model_identity,
        }


def _sample_tokens(sample: Any) -> Tensor:
    return sample.tokens if hasattr(sample, "tokens") else sample[0]


def _sample_label(sample: Any) -> Tensor:
    return torch.as_tensor(sample.label if hasattr(sample, "label") else sample[1])


def _batch_parts(batch: Any) -> tuple[Tensor, Tensor]:
    """``(tokens (B, T), labels (B,))`` of a collated batch: a ``TokenSample``, a pair, or a mapping."""
    if hasattr(batch, "tokens"):
        return batch.tokens, batch.label
    if isinstance(batch, dict):
        return batch["tokens"], batch["label"]
    return batch[0], batch[1]


# ---------------------------------------------------------------------------------------------------------------------
# small helpers
def draw_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (NumPy's ``SeedSequence`` hash)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def class_dropout_generator(seed: int, step: int, rank: int, micro_batch: int, device: torch.device) -> torch.Generator:
    """The random source of one micro-batch's class dropout: seeded by ``(seed, step, rank, micro_batch)``, so the
    draws of a step do not depend on anything that ran before it (an exact resume needs nothing saved)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(draw_seed(seed, step, rank, micro_batch))
    return generator


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as LlamaGen: ``weight_decay`` on matrices (``ndim >= 2``: linear and embedding weights), none on
    vectors (norm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _local(t: Tensor) -> Tensor:
    """This rank's part of a (possibly sharded) tensor, sharing its storage."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _full(t: Tensor) -> Tensor:
    """The whole tensor on the CPU (collective for a sharded one: every rank calls it)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True)


class WeightEMA:
    """Exponential moving average of a model's parameters, ``ema <- decay * ema + (1 - decay) * param`` after every
    applied update, held in the parameters' own layout (each rank keeps its shard under FSDP).

    Args:
        model: The trained model (after sharding, so the average is sharded alike).
        decay: The decay, e.g. 0.9999.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, applied: Tensor | None = None) -> None:
        """Move the average towards the parameters; with ``applied`` (a boolean tensor on the parameters' device)
        only where it is true, decided on the device (a skipped step leaves the average as it was)."""
        shadow, params = [_local(s) for s in self.shadow], [_local(p) for p in self.params]
        if applied is None:
            torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
            return
        # foreach lerp takes its weight as a host scalar (reading a tensor would wait for the device); a tensor
        # multiplies: shadow += flag * (1 - decay) * (param - shadow), exactly shadow where the flag is false
        step = torch._foreach_sub(params, shadow)
        torch._foreach_mul_(step, applied.to(torch.float32) * (1.0 - self.decay))
        torch._foreach_add_(shadow, step)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the parameters and the average (twice restores both exactly)."""
        for p, s in zip(self.params, self.shadow):
            held = _local(p).clone()
            _local(p).copy_(_local(s))
            _local(s).copy_(held)

    def state_dict(self) -> dict[str, Tensor]:
        """``name -> whole tensor`` on the CPU (collective under FSDP)."""
        return {name: _full(s) for name, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {missing[:8]}")
        for name, s in zip(self.names, self.shadow):
            full = state[name].to(_local(s).device, s.dtype)
            if isinstance(s, DTensor):  # every rank holds the whole tensor: cut out its own shard, no communication
                full = distribute_tensor(full, s.device_mesh, s.placements, src_data_rank=None)
            _local(s).copy_(_local(full))


@torch.no_grad()
def state_in_sync(state: dict[str, Tensor]) -> bool:
    """True when every rank holds bit-identical tensors (fingerprints: float64 sum and sum of squares)."""
    prints = torch.stack(
        [torch.stack([t.double().sum(), t.double().square().sum()]) for t in state.values() if t.numel()]
    ).cpu()
    gathered = all_gather_objects(prints)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


# ---------------------------------------------------------------------------------------------------------------------
# baselines
@torch.no_grad()
def unigram_baselines(
    train_set: Any,
    val_tokens: Tensor,
    val_labels: Tensor,
    *,
    vocab_size: int,
    num_classes: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1024,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Cross-entropy (nats per token) of the held-out tokens under unigram models of the training tokens.

    ``class_unigram``: ``p(v | c) = (n(c, v) + 1) / (n(c) + V)``; ``unigram``: ``p(v) = (n(v) + 1) / (n + V)``
    (Laplace smoothing). Only the counts of the ``(class, token)`` pairs that occur in the held-out set are kept, so
    memory does not grow with ``num_classes x V``. Each rank counts every ``world_size``-th training sequence and the
    counts are summed over ranks (collective).

    Args:
        train_set: The training sequences (items ``(tokens (T,), label ())``).
        val_tokens: ``(N, T)`` held-out tokens (all of them, the same on every rank).
        val_labels: ``(N,)`` their classes.
        vocab_size: ``V``.
        num_classes: Classes of the model.
        rank, world_size: This rank's share of the training set.
        batch_size, num_workers: Of the counting pass.
        device: Where the counts are summed over ranks (the process group's device).
    """
    length = val_tokens.shape[1]
    val_keys = (val_labels.long()[:, None] * vocab_size + val_tokens.long()).reshape(-1)  # (N * T,)
    pairs, inverse = torch.unique(val_keys, return_inverse=True)  # (U,), (N * T,)
    pair_counts = torch.zeros(pairs.numel(), dtype=torch.float64)
    class_counts = torch.zeros(num_classes, dtype=torch.float64)
    token_counts = torch.zeros(vocab_size, dtype=torch.float64)
    share = torch.utils.data.Subset(train_set, list(range(rank, len(train_set), world_size)))
    loader = torch.utils.data.DataLoader(share, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in loader:
        tokens, labels = _batch_parts(batch)
        tokens, labels = tokens.long(), labels.long()
        if ((labels < 0) | (labels >= num_classes)).any():
            bad = sorted({int(v) for v in labels[(labels < 0) | (labels >= num_classes)].tolist()})[:8]
            raise ValueError(f"training labels must be in [0, {num_classes}), got {bad}")
        keys = (labels[:, None] * vocab_size + tokens).reshape(-1)  # (B * T,)
        where = torch.searchsorted(pairs, keys).clamp_(max=pairs.numel() - 1)
        found = pairs[where] == keys
        pair_counts += torch.bincount(where[found], minlength=pairs.numel()).double()
        class_counts += torch.bincount(labels, minlength=num_classes).double() * length
        token_counts += torch.bincount(tokens.reshape(-1), minlength=vocab_size).double()
    counts = torch.cat([pair_counts, class_counts, token_counts]).to(device or "cpu")
    counts = all_reduce_sum_(counts).cpu()
    pair_counts, class_counts, token_counts = counts.split([pairs.numel(), num_classes, vocab_size])
    labels_per_token = val_labels.long()[:, None].expand(-1, length).reshape(-1)  # (N * T,)
    p_class = (pair_counts[inverse] + 1) / (class_counts[labels_per_token] + vocab_size)
    p_marginal = (token_counts[val_tokens.reshape(-1).long()] + 1) / (token_counts.sum() + vocab_size)
    return {
        "class_unigram": float(-p_class.log().mean()),
        "unigram": float(-p_marginal.log().mean()),
        "training_tokens": float(token_counts.sum()),
    }


# ---------------------------------------------------------------------------------------------------------------------
# the task
class GeneratorTask:
    """LlamaGen's class-conditional GPT trained on a token store.

    Args:
        engine: The engine that runs the task (device, seeds, DDP or FSDP, micro-batch size).
        train_set: The training token dataset; default ``config.tokens`` opened with :func:`open_tokens`.
        val_set: The held-out token dataset; default ``config.val_tokens`` (else the ``val`` split of ``tokens``).
    """

    def __init__(self, engine: Engine, train_set: Any = None, val_set: Any = None) -> None:
        config: GeneratorTrainConfig = engine.config
        self.config = config
        self.ctx = engine.ctx
        device = engine.device

        # 1. Data first: the vocabulary, grid and classes of the model come from it.
        if train_set is None:
            train_set = open_tokens(config.tokens, split="train", seed=config.seed)
        self.train_set = train_set
        self.held_out = val_set is not None or config.val_tokens is not None
        if val_set is None:
            val_set = open_tokens(config.val_tokens or config.tokens, split="val", seed=config.seed)
            if config.val_tokens is None and self.ctx.is_main:
                logger.warning(
                    "validation reads the 'val' split of the training store %s; give a held-out store with "
                    "val_tokens=PATH",
                    config.tokens,
                )
        self.val_set = val_set
        self.data = TokenData.of(self.train_set, f"token store {config.tokens}")
        val_data = TokenData.of(val_set, f"held-out token store {config.val_tokens or config.tokens}")
        if (val_data.vocab_size, val_data.grid, val_data.model_identity) != (
            self.data.vocab_size,
            self.data.grid,
            self.data.model_identity,
        ):
            raise ValueError(
                f"the held-out tokens were made by another tokenizer than the training tokens "
                f"(identity {val_data.model_identity}, {val_data.vocab_size} codes, grid {val_data.grid} vs "
                f"{self.data.model_identity}, {self.data.vocab_size} codes, grid {self.data.grid})"
            )
        num_classes = config.num_classes if config.num_classes is not None else self.data.num_classes
        widest = max(self.data.num_classes, val_data.num_classes)
        if widest > num_classes:
            raise ValueError(
                f"the token data has {widest} classes but the model only num_classes={num_classes}: class ids "
                f"outside the model's classes; leave num_classes unset to take the data's"
            )

        # 2. The model, from the same seed on every rank; data randomness then differs by rank.
        shape = dict(config.model)
        preset = shape.pop("preset", None)
        common = {
            "vocab_size": self.data.vocab_size,
            "grid": self.data.grid,
            "num_classes": num_classes,
            "activation_checkpointing": config.activation_checkpointing,
        }
        self.gpt_config = gpt_config(preset, **common, **shape) if preset else GPTConfig(**shape, **common)
        engine.seed_model()
        with torch.device(device):
            gpt = GPT(self.gpt_config)
        engine.seed_data()
        self.gpt = gpt
        if config.sharding == "fsdp":  # one parameter group per block, then the root (embeddings, norm, head)
            self.model = engine.shard(gpt, units=list(gpt.blocks))
        else:
            self.model = engine.wrap(gpt)
        self.sharded = is_sharded(self.model)

        # 3. AdamW after sharding (it must see the sharded parameters); fused: one kernel over all parameters.
        base_lr = config.base_lr
        groups = parameter_groups(self.gpt, config.optim.weight_decay)
        adamw = torch.optim.AdamW(groups, lr=base_lr, betas=config.optim.betas, fused=True)
        self.optimizers: dict[str, tuple[torch.optim.Optimizer, float]] = {"gpt": (adamw, base_lr)}
        self.ema = WeightEMA(self.gpt, config.ema) if config.ema is not None else None
        self.baselines: dict[str, float] = {}

    # -----------------------------------------------------------------------------------------------------------------
    def to_batch(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        tokens, labels = _batch_parts(batch)
        return tokens.to(device, non_blocking=True).long(), labels.to(device, non_blocking=True).long()  # (B, T), (B,)

    def train_step(self, engine: Engine, micro_batches: list[tuple[Tensor, Tensor]], step: int) -> StepOutput:
        """One AdamW update over the micro-batches; the EMA follows every applied update."""
        self.model.train()
        scalars: dict[str, Tensor] = {}
        micro_index = iter(range(len(micro_batches)))

        def loss_fn(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            tokens, classes = batch  # (B, T), (B,)
            generator = class_dropout_generator(self.config.seed, step, self.ctx.rank, next(micro_index), engine.device)
            out = self.model(tokens, classes, generator=generator)  # logits (B, T, V), mean cross-entropy
            loss = out.loss.detach()
            return out.loss, {"loss": loss, "bits_per_token": loss / math.log(2)}

        optimizer = self.optimizers["gpt"][0]
        finite, apply = engine.backward_and_clip(self.model, optimizer, micro_batches, loss_fn, scalars)

        @device_update
        def update(ok: Tensor) -> None:
            apply(ok)
            if self.ema is not None:
                self.ema.update(ok)

        return StepOutput(scalars=scalars, finite=[finite], updates=[update])

    # -----------------------------------------------------------------------------------------------------------------
    def _val_indices(self) -> list[int]:
        limit = self.config.val_samples
        return list(range(len(self.val_set) if limit is None else min(limit, len(self.val_set))))

    def _val_batches(self, engine: Engine) -> Iterator[tuple[Tensor, Tensor] | None]:
        """This rank's held-out batches (every ``world_size``-th sequence), then ``None`` until every rank has run
        as many forwards as the busiest one: under FSDP every forward is collective."""
        ctx = engine.ctx
        indices = self._val_indices()
        shard = torch.utils.data.Subset(self.val_set, indices[ctx.rank :: ctx.world_size])
        size = self.config.val_batch_size
        loader = torch.utils.data.DataLoader(shard, batch_size=size, shuffle=False)
        busiest = math.ceil(math.ceil(len(indices) / ctx.world_size) / size)
        done = 0
        for batch in loader:
            done += 1
            yield self.to_batch(batch, engine.device)
        for _ in range(busiest - done):
            yield None

    @torch.no_grad()
    def _next_token_figures(self, engine: Engine) -> dict[str, float]:
        """Held-out cross-entropy (nats per token) and top-1 accuracy of the model's current weights, over ranks."""
        sums = torch.zeros(3, dtype=torch.float64, device=engine.device)  # nats, correct, tokens
        for batch in self._val_batches(engine):
            if batch is None:  # keep the collective forwards of FSDP in step with the other ranks
                first = self.val_set[0]
                with engine.autocast():
                    self.model(*self.to_batch((_sample_tokens(first)[None], _sample_label(first)[None]), engine.device))
                continue
            tokens, classes = batch  # (B, T), (B,)
            with engine.autocast():
                logits = self.model(tokens, classes).logits  # (B, T, V) fp32
            flat = logits.reshape(-1, logits.shape[-1])  # (B * T, V)
            targets = tokens.reshape(-1)  # (B * T,)
            sums[0] += F.cross_entropy(flat, targets, reduction="sum").double()
            sums[1] += (flat.argmax(dim=-1) == targets).sum().double()
            sums[2] += targets.numel()
        all_reduce_sum_(sums)
        nats, correct, tokens = sums.tolist()
        return {"loss": nats / tokens, "bits_per_token": nats / tokens / math.log(2), "accuracy": correct / tokens}

    def _compute_baselines(self, engine: Engine) -> dict[str, float]:
        """The unigram baselines (once per run: the data do not change; saved in the checkpoint)."""
        indices = self._val_indices()
        samples = [self.val_set[i] for i in indices]
        val_tokens = torch.stack([_sample_tokens(s) for s in samples]).long()  # (N, T)
        val_labels = torch.stack([_sample_label(s) for s in samples]).long()  # (N,)
        # counted on the views of the epoch in progress (a function of the step, so a resumed run counts the same)
        figures = unigram_baselines(
            self.train_set,
            val_tokens,
            val_labels,
            vocab_size=self.data.vocab_size,
            num_classes=self.gpt_config.num_classes,
            rank=engine.ctx.rank,
            world_size=engine.ctx.world_size,
            num_workers=self.config.num_workers,
            device=engine.device,
        )
        return {
            "uniform_bits": math.log2(self.data.vocab_size),
            "class_unigram_bits": figures["class_unigram"] / math.log(2),
            "unigram_bits": figures["unigram"] / math.log(2),
            "training_tokens": figures["training_tokens"],
        }

    @torch.no_grad()
    def validate(self, engine: Engine, step: int) -> dict[str, float]:
        """Held-out next-token figures of the trained (and EMA) weights beside the uniform and unigram baselines;
        rank 0 writes them to ``metrics.json``."""
        was_training = self.model.training
        self.model.eval()
        if not self.baselines:
            self.baselines = self._compute_baselines(engine)
        figures = self._next_token_figures(engine)
        metrics = {f"val/{k}": v for k, v in figures.items()}
        if self.ema is not None:
            self.ema.swap()
            try:
                metrics.update({f"val/ema/{k}": v for k, v in self._next_token_figures(engine).items()})
            finally:
                self.ema.swap()
        metrics.update({f"val/{k}": v for k, v in self.baselines.items()})
        metrics["val/tokens"] = float(len(self._val_indices()) * self.gpt_config.seq_len)
        metrics["val/sequences"] = float(len(self._val_indices()))
        metrics["val/held_out"] = float(self.held_out)
        if not self.sharded:
            metrics["val/replicas_in_sync"] = float(state_in_sync(self.gpt.state_dict()))
        if engine.ctx.is_main:
            engine.write_metrics(
                {
                    "step": step,
                    **metrics,
                    "definitions": {
                        "loss": "held-out next-token cross-entropy, nats per token (bits_per_token: the same in bits)",
                        "accuracy": "fraction of held-out tokens whose most likely prediction is the token",
                        "uniform_bits": "log2 of the vocabulary size",
                        "class_unigram_bits": "held-out cross-entropy of p(token | class) counted on the training "
                        "tokens, (count + 1) / (class tokens + V)",
                        "unigram_bits": "the same without the class, (count + 1) / (tokens + V)",
                        "ema": "the same figures for the moving average of the weights",
                    },
                }
            )
        self.model.train(was_training)
        return metrics

    # -----------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": {"data": self.data.to_dict(), "baselines": dict(self.baselines)}}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()  # collective under FSDP
        return state

    def check_checkpoint(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture or made on tokens of another tokenizer."""
        saved = (state.get("generator") or {}).get("data")
        if saved is None:
            raise ValueError("the checkpoint is not a generator checkpoint (no 'generator' entry)")
        current = self.data.to_dict()
        if saved != current:
            diff = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(
                f"the checkpoint was trained on other token data ({', '.join(diff)} differ: {saved} vs {current}); "
                f"resume with the token store it was trained on"
            )
        self.gpt.check_state_dict(state["model"], source="the checkpoint")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baselines = dict(state["generator"].get("baselines") or {})
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the config keeps an EMA (ema is set) but the checkpoint has none")
            self.ema.load_state_dict(state["ema"])

    # -----------------------------------------------------------------------------------------------------------------
    def finish(self, engine: Engine) -> None:
        """Export the final model to ``RUN/model/`` (the EMA weights when kept) with the tokenizer's identity."""
        state = dict(model_state_dict(self.model))  # collective under FSDP
        if self.ema is not None:
            state.update(self.ema.state_dict())  # collective under FSDP
        if engine.ctx.is_main:
            export_generator(
                state,
                self.gpt_config,
                engine.run.export_dir,
                data=self.data,
                training={
                    "run": str(engine.run.path),
                    "step": engine.step,
                    "weights": "ema" if self.ema is not None else "trained",
                    "ema_decay": self.config.ema,
                    "tokens": self.config.tokens,
                },
            )
        barrier()


def export_generator(
    state: dict[str, Tensor], config: GPTConfig, directory: Path, *, data: TokenData, training: dict[str, Any]
) -> Path:
    """Write ``directory/config.json`` + ``model.safetensors`` (:meth:`GPT.save_pretrained`) and record in the config
    what the tokens were: ``tokenizer`` (``model_identity``, ``codebook_size``, ``grid``), ``class_names`` and
    ``training`` (run, step, which weights)."""
    import json

    from fvq.weights import atomic_write_bytes

    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict({k: v.detach().to("cpu") for k, v in state.items()}, assign=True)
    model.save_pretrained(directory)
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    saved["tokenizer"] = {
        "model_identity": data.model_identity,
        "codebook_size": data.vocab_size,
        "grid": list(data.grid),
    }
    saved["class_names"] = list(data.class_names)
    saved["training"] = training
    atomic_write_bytes(path, (json.dumps(saved, indent=2, sort_keys=True) + "\n").encode())
    return directory


# ---------------------------------------------------------------------------------------------------------------------
# entry points
def describe_validation(metrics: dict[str, float]) -> str:
    """The line printed after each validation."""
    line = (
        f"held-out {metrics['val/bits_per_token']:.3f} bits/token, top-1 {metrics['val/accuracy']:.1%} "
        f"(uniform {metrics['val/uniform_bits']:.2f}, class unigram {metrics['val/class_unigram_bits']:.3f} bits)"
    )
    if "val/ema/bits_per_token" in metrics:
        line += f"; EMA {metrics['val/ema/bits_per_token']:.3f} bits/token"
    return line


def train(
    config: GeneratorTrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    max_steps: int | None = None,
    overwrite: bool = False,
    build_task: Callable[[Engine], GeneratorTask] = GeneratorTask,
) -> TrainResult:
    """Train the generator; ``resume=True`` continues from the newest checkpoint in ``run_dir/checkpoints``,
    ``overwrite=True`` deletes a previous run's outputs in ``run_dir`` first (its export included).

    Launch under ``torchrun --nproc_per_node N -m fvq train ...`` for several processes: the code path is the same.

    Args:
        build_task: ``engine -> task`` (e.g. a :class:`GeneratorTask` given datasets in memory).
    """
    return run_training(
        config,
        run_dir,
        build_task,
        resume=resume,
        max_steps=max_steps,
        overwrite=overwrite,
        describe=describe_validation,
    )


def summary(result: TrainResult) -> list[str]:
    """What ``fvq train`` prints at the end of a generator run."""
    lines = []
    if result.metrics:
        lines.append(describe_validation(result.metrics))
    export = RunFolder(result.run_dir).export_dir
    lines += [
        f"run directory: {result.run_dir}",
        f"  checkpoint: {result.checkpoint}",
        f"  model:      {export if export.is_dir() else '(written when the run reaches its last step)'}",
        f"  metrics:    {result.run_dir / 'metrics.json'}",
        f"  log:        {result.run_dir / 'log.jsonl'}",
    ]
    return lines
