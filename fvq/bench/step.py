"""Profile of one tokenizer training step and of one validation, by part, for a config (``tiny_fvq`` by default).

Run as ``fvq bench step [CONFIG] [key=value ...]``. It builds the run exactly as ``fvq train`` does (the shared
engine and :class:`~fvq.training.tokenizer_task.TokenizerTask`, in a temporary folder), runs warm-up steps, then
times ``--steps`` real steps with timestamps taken by module hooks, so the figures are of the real code path:

* ``data``: fetching the next batch from the loader (the crop pipeline runs in this process unless
  ``num_workers > 0``);
* ``encoder`` / ``decoder``: forward and backward of the encoder (with ``quant_conv``) and of the decoder (with
  ``post_quant_conv``);
* ``projector``: forward and backward of the codebook projector (VQBridge), once per step over the whole codebook;
* ``quantizer``: the rest of the quantizer's forward and backward (the nearest-code search, the estimator, the
  codebook and commitment losses); ``search`` is the search alone, timed separately at the step's shapes;
* ``losses``: the tokenizer loss after the model's forward (reconstruction, perceptual, adversarial terms);
* ``optimizer``: gradient clipping, the finiteness read and the Adam update;
* ``other``: what is left (schedules, hooks' own cost, Python).

The validation profile times one full :meth:`TokenizerTask.validate`, split into the encoder, the decoder (only the
``val_psnr_images`` images are decoded) and the rest (data, the exported quantizer's search over all held-out
tokens, counting, the grid). Timestamps are wall clock; on CUDA each hook synchronises first, which slows the step
but keeps the split honest.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

STEP_PARTS = ("data", "encoder", "projector", "quantizer", "decoder", "losses", "optimizer", "other")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="tiny_fvq", help="config name or YAML path (default tiny_fvq)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for fvq train")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-validation", action="store_true", help="skip the validation profile")


class _Clock:
    """Wall-clock stamps, synchronising the device first on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: dict[str, list[float]] = defaultdict(list)

    def now(self) -> float:
        from fvq.bench.search import sync_device

        sync_device(self.device)
        return time.perf_counter()

    def mark(self, key: str) -> None:
        self.stamps[key].append(self.now())

    def clear(self) -> None:
        self.stamps.clear()


def _hook(module: nn.Module, name: str, clock: _Clock, backward: bool = True) -> list[Any]:
    """Stamp ``name:fwd0/fwd1`` around the forward and ``name:bwd0/bwd1`` around the backward of ``module``."""
    handles = [
        module.register_forward_pre_hook(lambda *_: clock.mark(f"{name}:fwd0")),
        module.register_forward_hook(lambda *_: clock.mark(f"{name}:fwd1")),
    ]
    if backward:
        handles += [
            module.register_full_backward_pre_hook(lambda *_: clock.mark(f"{name}:bwd0")),
            module.register_full_backward_hook(lambda *_: clock.mark(f"{name}:bwd1")),
        ]
    return handles


def _span(stamps: dict[str, list[float]], key: str) -> float:
    """Summed duration of the ``key0 -> key1`` intervals."""
    starts, ends = stamps.get(f"{key}0", []), stamps.get(f"{key}1", [])
    return sum(end - start for start, end in zip(starts, ends))


def _time_search(flat: torch.Tensor, codes: torch.Tensor, clock: _Clock, repeats: int = 3) -> float:
    from fvq.quantizers.search import nearest_codes

    times = []
    for _ in range(repeats):
        start = clock.now()
        nearest_codes(flat, codes)
        times.append(clock.now() - start)
    return statistics.median(times)


def profile_steps(engine: Any, task: Any, steps: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per-part seconds of ``steps`` timed training steps (each a list over steps), and the step's shapes."""
    clock = _Clock(engine.device)
    model = task.tokenizer
    quantizer = model.quantizer
    projector = getattr(quantizer, "projector", None)
    # the encoder part is encoder + quant_conv, the decoder part post_quant_conv + decoder (as in the forward)
    groups: dict[str, list[nn.Module]] = {
        "encoder": [model.encoder, model.quant_conv],
        "decoder": [model.post_quant_conv, model.decoder],
    }
    if isinstance(projector, nn.Module) and any(p.requires_grad for p in projector.parameters()):
        groups["projector"] = [projector]
    handles = [h for name, mods in groups.items() for i, m in enumerate(mods) for h in _hook(m, f"{name}{i}", clock)]
    handles += _hook(model, "model", clock, backward=False) + _hook(quantizer, "quantizer", clock, backward=False)
    shapes: dict[str, Any] = {}

    def capture_latents(_module: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: the input is unchanged
        shapes.setdefault("latents", args[0].detach())

    capture = quantizer.register_forward_pre_hook(capture_latents)

    data = engine.micro_batches()
    parts: dict[str, list[float]] = defaultdict(list)
    try:
        with warnings.catch_warnings():
            # post_quant_conv's and the decoder's hooks on a straight-through path: torch warns that they fire on the
            # outputs' gradients; the stamps are what is wanted either way
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for step in range(warmup + steps):
                clock.clear()
                start = clock.now()
                batches = next(data)
                fetched = clock.now()
                # the images require a gradient so that the encoder's backward hook fires at its end (it adds the
                # input gradient of the first convolution: three channels, a small share of the encoder's backward)
                batches = [b.requires_grad_(True) if torch.is_tensor(b) else b for b in batches]
                engine.train_step(batches, step)
                end = clock.now()
                if step < warmup:
                    continue
                s = clock.stamps
                seconds = {"data": fetched - start}
                for name, mods in groups.items():
                    seconds[name] = sum(
                        _span(s, f"{name}{i}:fwd") + _span(s, f"{name}{i}:bwd") for i in range(len(mods))
                    )
                # the quantizer returns a dataclass, which module backward hooks cannot see: its backward is the gap
                # between the decoder's backward reaching post_quant_conv's input and the encoder's reaching quant_conv
                quantizer_backward = sum(a - b for a, b in zip(s["encoder1:bwd0"], s["decoder0:bwd1"]))
                seconds["quantizer"] = _span(s, "quantizer:fwd") + quantizer_backward
                if "projector" in seconds:  # the projector runs inside the quantizer's forward and backward
                    seconds["quantizer"] -= seconds["projector"]
                backward_starts = [v for k, v in s.items() if k.endswith(":bwd0")]
                backward_ends = [v for k, v in s.items() if k.endswith(":bwd1")]
                first_backward = min(t for v in backward_starts for t in v)
                last_backward = max(t for v in backward_ends for t in v)
                seconds["losses"] = sum(first_backward - t for t in s["model:fwd1"][:1])
                # between the last module's backward and the step's end: the tail of autograd, clipping, the
                # finiteness read and Adam
                seconds["optimizer"] = end - last_backward
                seconds["other"] = (end - start) - sum(seconds.values())
                seconds["step"] = end - start
                for key, value in seconds.items():
                    parts[key].append(value)
    finally:
        for handle in handles + [capture]:
            handle.remove()
    latents = shapes["latents"]
    flat = latents.movedim(1, -1).reshape(-1, latents.shape[1]).float()
    with torch.no_grad():
        codes = quantizer.codebook_vectors().float() if hasattr(quantizer, "codebook_vectors") else None
    info = {"tokens_per_step": flat.shape[0], "codebook": tuple(codes.shape) if codes is not None else None}
    if codes is not None:
        parts["search"] = [_time_search(flat, codes, clock)]
    return parts, info


def profile_validation(engine: Any, task: Any) -> dict[str, float]:
    """Seconds of one validation, split into encoder, decoder and the rest."""
    clock = _Clock(engine.device)
    model = task.tokenizer
    handles = _hook(model.encoder, "encoder", clock, backward=False) + _hook(model.decoder, "decoder", clock, False)
    try:
        start = clock.now()
        metrics = task.validate(engine, engine.step)
        total = clock.now() - start
    finally:
        for handle in handles:
            handle.remove()
    s = clock.stamps
    seconds = {"encoder": _span(s, "encoder:fwd"), "decoder": _span(s, "decoder:fwd")}
    seconds["quantize, count, data"] = total - sum(seconds.values())
    seconds["total"] = total
    seconds["images"] = metrics.get("val/images", float("nan"))
    seconds["decoded"] = metrics.get("val/psnr_images", float("nan"))
    return seconds


def _table(rows: list[tuple[str, float, float]], total: float) -> str:
    lines = ["| part | ms | share |", "| --- | ---: | ---: |"]
    for name, ms, share in rows:
        lines.append(f"| {name} | {ms:.1f} | {share:.1%} |")
    lines.append(f"| **step** | **{total:.1f}** | 100 % |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fvq.bench.sampling import cpu_model
    from fvq.distributed import init_distributed
    from fvq.training.config import load_config
    from fvq.training.engine import Engine, flush_denormals
    from fvq.training.tokenizer_task import TokenizerTask

    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got --steps {args.steps} --warmup {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    flush_denormals()
    config = load_config(args.config, ["tensorboard=false", *args.overrides])
    if config.task != "tokenizer":
        raise ValueError(f"fvq bench step profiles tokenizer training; {args.config} is a {config.task} config")
    ctx = init_distributed(config.device)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine(config, run_dir, ctx)
        task = TokenizerTask(engine)
        engine.attach(task)
        machine = cpu_model() if ctx.device.type == "cpu" else torch.cuda.get_device_name(ctx.device)
        isa = torch.backends.cpu.get_cpu_capability()
        print(f"{machine} ({isa}); torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"config {args.config} {' '.join(args.overrides)}: batch {config.global_batch_size}")
        parts, info = profile_steps(engine, task, args.steps, args.warmup)
        median: Callable[[str], float] = lambda key: statistics.median(parts[key]) * 1000  # noqa: E731
        total = median("step")
        rows = [(p, median(p), median(p) / total) for p in STEP_PARTS if p in parts]
        print(
            f"\none training step: median of {args.steps} ({info['tokens_per_step']} tokens, codebook "
            f"{info['codebook']})"
        )
        print(_table(rows, total))
        if "search" in parts:
            print(f"search alone at these shapes: {parts['search'][0] * 1000:.1f} ms (inside 'quantizer')")
        if not args.no_validation and config.val_every:
            val = profile_validation(engine, task)
            print(f"\none validation ({int(val['images'])} held-out images, {int(val['decoded'])} decoded):")
            lines = ["| part | s | share |", "| --- | ---: | ---: |"]
            for key in ("encoder", "decoder", "quantize, count, data"):
                lines.append(f"| {key} | {val[key]:.2f} | {val[key] / val['total']:.1%} |")
            lines.append(f"| **validation** | **{val['total']:.2f}** | 100 % |")
            print("\n".join(lines))
    return 0
