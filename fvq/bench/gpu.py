"""One run that measures what a CUDA machine does with fvq's training and sampling, within a time budget.

Run as ``python scripts/gpu_check.py`` (or ``fvq bench gpu``); ``--smoke`` runs every part at tiny sizes, on CPU too,
to check the script itself. The parts run in this order and each is skipped (and marked so) when the time left in
``--budget-s`` is below its estimate, so one call always ends with a JSON file (rewritten after every part) and a
markdown table:

1. **environment**: GPU, torch, CUDA, and the measured dense matmul peaks (bf16, fp32 with TF32 off, fp32 with TF32).
2. **tokenizer**: training steps of ``fvq_16k_imagenet`` and ``fvq_262k_imagenet`` (VQ-16 at 256 px, VQBridge, LPIPS,
   PatchGAN discriminator active from step 0) in bf16, channels-last off and on, through the real
   :class:`~fvq.training.engine.Engine` and :class:`~fvq.training.tokenizer_task.TokenizerTask`, from JPEG and PNG
   files of the embedded photos written to a temporary folder (``data.type: folder``, loader workers, pinned
   memory). Per case: images/s over the timed steps (data loading included; one synchronisation at each end), the
   time the loop waited for data, the peak GPU memory, host reads of one step (:mod:`fvq.training.host_syncs`) and
   the synchronisations CUDA reports for one step (``torch.cuda.set_sync_debug_mode("warn")``), and the VQBridge's
   share of a step (its forward and backward over the whole codebook, timed alone, over the step time).
   LPIPS uses random weights written for the run (the time of a forward does not depend on their values).
3. **search**: :func:`fvq.quantizers.search.nearest_codes` at K = 262,144 codes and N = 32,768 tokens, D = 256, fp32
   with TF32 off (the exact baseline) and on; GFLOP/s count ``2 N K D``; the indices are compared with the baseline.
4. **generator**: GPT-B and GPT-L training steps in bf16 (:func:`fvq.bench.generator.measure_training`): tokens/s
   and MFU, model FLOPs ``6 N + 12 L d S`` per token over the measured bf16 matmul peak and over the data-sheet
   dense bf16 peak where the GPU is known.
5. **sampling**: 8 images with classifier-free guidance (GPT-B and GPT-L, bf16 weights and KV cache, random weights)
   and their decoding by a VQ-16 decoder.
6. **compile**: the ``fvq_16k_imagenet`` step with ``compile: true`` (encoder and decoder), when time is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fvq.bench.search import best_time, sync_device

# data-sheet dense bf16 peaks (TFLOP/s, without sparsity) of the GPUs this check is meant for
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "A100": 312.0}


@dataclass
class Sizes:
    """What each part measures: the full sizes for a GPU, or tiny ones (``--smoke``)."""

    tokenizer_presets: tuple[str, ...] = ("fvq_16k_imagenet", "fvq_262k_imagenet")
    tokenizer_overrides: tuple[str, ...] = ()
    batch: int = 32
    image_size: int = 256
    files: int = 256
    warmup: int = 2
    steps: int = 8
    num_workers: int = 8
    precision: str = "bf16"
    search: tuple[int, int, int] = (262_144, 32_768, 256)  # K, N, D
    gpt_cases: tuple[tuple[str, int], ...] = (("gpt_b", 64), ("gpt_l", 32))
    gpt_vocab: int = 16_384
    gpt_grid: int = 16
    gpt_classes: int = 1000
    gpt_steps: int = 5
    sampling_presets: tuple[str, ...] = ("gpt_b", "gpt_l")
    sampling_batch: int = 8
    repeats: int = 2  # timed repeats of a sampling call, after an untimed one
    decoder_preset: str = "vq16"
    compile: bool = True
    # seconds each part is expected to take (a part starts only when this much of the budget is left)
    estimates: dict[str, float] = field(
        default_factory=lambda: {"tokenizer": 45, "search": 20, "generator": 45, "sampling": 30, "compile": 200}
    )


SMOKE = Sizes(
    tokenizer_presets=("fvq_16k_imagenet",),
    tokenizer_overrides=(
        "model.preset=tiny_f4",
        "quantizer.codebook_size=64",
        "quantizer.codebook_dim=16",
        "quantizer.projector.group_size=8",
        "quantizer.projector.hidden_dim=32",
        "loss.discriminator.base_channels=8",
        "loss.discriminator.num_layers=2",
    ),
    batch=2,
    image_size=16,
    files=6,
    warmup=1,
    steps=1,
    num_workers=0,
    precision="fp32",
    search=(1024, 256, 16),
    gpt_cases=(("gpt_tiny", 2),),
    gpt_vocab=64,
    gpt_grid=4,
    gpt_classes=10,
    gpt_steps=1,
    sampling_presets=("gpt_tiny",),
    sampling_batch=2,
    repeats=1,
    decoder_preset="tiny_f4",
    compile=False,
    estimates={"tokenizer": 0, "search": 0, "generator": 0, "sampling": 0, "compile": 0},
)


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Shortest of ``repeats`` calls of ``fn`` in seconds, after one untimed call."""
    fn()
    return best_time(fn, repeats, device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, tf32: bool = False) -> float:
    """TFLOP/s of the fastest of three ``size x size`` square matmuls in ``dtype``."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        return 2 * size**3 / _timed(lambda: a @ b, device) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def spec_bf16_tflops(name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU by name, when this module knows it."""
    for key, value in SPEC_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


class PeakMemory:
    """Peak memory growth in MiB between :meth:`start` and :meth:`stop`: CUDA's ``max_memory_allocated``, or the
    process's peak resident set on CPU (:class:`fvq.bench.search.PeakMemory`)."""

    def __init__(self, device: torch.device) -> None:
        from fvq.bench.search import PeakMemory as _Peak

        self.meter = _Peak(device)

    def start(self) -> None:
        self.meter.start()

    def stop(self) -> float:
        return self.meter.stop() / 2**20


def write_photo_folder(folder: Path, count: int) -> dict[str, Any]:
    """``count`` image files of the embedded photos in ``folder`` (JPEG at quality 90, every fourth one PNG), as a
    folder dataset reads them."""
    from fvq.data.embedded import PHOTOS, load_photo

    photos = [image for image in (load_photo(name) for name in sorted(PHOTOS)) if image is not None]
    if not photos:
        raise RuntimeError("no embedded photo could be read (scikit-image's data files are missing)")
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {"jpg": 0, "png": 0}
    for i in range(count):
        kind = "png" if i % 4 == 3 else "jpg"
        image = photos[i % len(photos)]
        path = folder / f"photo_{i:05d}.{kind}"
        if kind == "jpg":
            image.save(path, quality=90)
        else:
            image.save(path)
        kinds[kind] += 1
    return {"files": count, "photos": len(photos), **kinds}


def random_lpips_weights(folder: Path) -> Path:
    """A VGG LPIPS weight file with random values (timing only), in the format :func:`fvq.losses.lpips.find_weights`
    reads."""
    from safetensors.torch import save_file

    from fvq.losses.lpips import FORMAT_TAG, LPIPS

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in LPIPS("vgg", pretrained=False).state_dict().items()}
    path = folder / "vgg16.safetensors"
    save_file(state, str(path), metadata={"format": FORMAT_TAG, "net": "vgg16", "source": "random, timing only"})
    return path


# ---- parts -----------------------------------------------------------------------------------------------------------
def environment(device: torch.device, smoke: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpus": os.cpu_count(),
    }
    if device.type != "cuda":
        from fvq.bench.sampling import cpu_model

        out["name"] = cpu_model()
        return out
    props = torch.cuda.get_device_properties(device)
    size = 1024 if smoke else 8192
    out.update(
        {
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "matmul_size": size,
            "bf16_tflops": matmul_tflops(device, torch.bfloat16, size),
            "fp32_tflops_tf32_off": matmul_tflops(device, torch.float32, size, tf32=False),
            "fp32_tflops_tf32_on": matmul_tflops(device, torch.float32, size, tf32=True),
            "spec_bf16_tflops": spec_bf16_tflops(props.name),
        }
    )
    return out


def count_step_syncs(engine: Any, batch: Any, step: int) -> dict[str, Any]:
    """Host reads of one training step as fvq's counter sees them, and on CUDA the synchronisations the runtime
    reports in warn mode."""
    from fvq.training.host_syncs import count_host_syncs

    with count_host_syncs() as counts:
        engine.train_step(batch, step)
    out: dict[str, Any] = {"host_reads": sum(counts.values()), "host_reads_by_kind": dict(counts)}
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.train_step(batch, step + 1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        out["cuda_syncs_reported"] = len(caught)
        out["cuda_sync_sites"] = sorted({f"{w.filename}:{w.lineno}" for w in caught})[:20]  # the Python callers
    return out


def bridge_seconds(task: Any, engine: Any) -> float | None:
    """Forward and backward of the quantizer's projector (the VQBridge) over the whole codebook, timed alone."""
    quantizer = task.tokenizer.quantizer
    if getattr(quantizer, "projector", None) is None:
        return None

    def once() -> None:
        with engine.autocast():
            codes = quantizer.codebook_vectors()  # (K, D)
        codes.float().square().mean().backward()

    seconds = _timed(once, engine.device)
    task.tokenizer.zero_grad(set_to_none=True)
    return seconds


def tokenizer_case(
    preset: str, sizes: Sizes, folder: Path, device: torch.device, *, channels_last: bool, compile: bool = False
) -> dict[str, Any]:
    """Images/s, data wait, peak memory, host syncs and the bridge's share of ``preset``'s training step."""
    from fvq.distributed import DistributedContext
    from fvq.training.config import load_config
    from fvq.training.engine import Engine
    from fvq.training.tokenizer_task import TokenizerTask

    data = f"{{type: folder, path: {folder}, image_size: {sizes.image_size}}}"
    overrides = [
        f"data={data}",
        f"val_data={data}",
        f"global_batch_size={sizes.batch}",
        f"precision={sizes.precision}",
        f"channels_last={str(channels_last).lower()}",
        f"compile={str(compile).lower()}",
        f"num_workers={sizes.num_workers}",
        f"device={device.type}",
        "loss.adversarial_start=0",  # the discriminator's update is part of nearly every step of a run
        "tensorboard=false",
        "log_every=0",
        *sizes.tokenizer_overrides,
    ]
    if sizes.num_workers:
        overrides += ["persistent_workers=true", "prefetch_factor=4"]
    config = load_config(preset, overrides)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine(config, run_dir, ctx)
        task = TokenizerTask(engine)
        engine.attach(task)
        batches = engine.micro_batches()
        memory = PeakMemory(device)
        memory.start()
        t0 = time.perf_counter()
        for step in range(sizes.warmup):
            engine.train_step(next(batches), step)
        sync_device(device)
        warmup_s = time.perf_counter() - t0
        waited = 0.0
        start = time.perf_counter()
        for step in range(sizes.warmup, sizes.warmup + sizes.steps):
            t = time.perf_counter()
            micro = next(batches)
            waited += time.perf_counter() - t
            engine.train_step(micro, step)
        skipped, _ = engine.read_guard()  # the one read: also waits for the last step
        sync_device(device)
        seconds = time.perf_counter() - start
        peak = memory.stop()
        step_s = seconds / sizes.steps
        bridge = bridge_seconds(task, engine)
        syncs = count_step_syncs(engine, next(batches), sizes.warmup + sizes.steps)
        params = sum(p.numel() for p in task.tokenizer.parameters())
        engine.logger.close()
    return {
        "preset": preset,
        "channels_last": channels_last,
        "compile": compile,
        "precision": sizes.precision,
        "batch": sizes.batch,
        "image_size": sizes.image_size,
        "parameters": params,
        "codebook_size": config.quantizer["codebook_size"],
        "steps": sizes.steps,
        "skipped_steps": skipped,
        "images_per_s": sizes.batch * sizes.steps / seconds,
        "step_ms": 1000 * step_s,
        "data_wait_ms_per_step": 1000 * waited / sizes.steps,
        "first_steps_s": warmup_s,
        "peak_memory_mib": peak,
        "bridge_ms": None if bridge is None else 1000 * bridge,
        "bridge_share": None if bridge is None else bridge / step_s,
        **syncs,
    }


def search_part(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    from fvq.quantizers.search import nearest_codes

    k, n, d = sizes.search
    g = torch.Generator(device="cpu").manual_seed(0)
    codebook = torch.randn(k, d, generator=g).to(device)
    z = torch.randn(n, d, generator=g).to(device)
    out: dict[str, Any] = {"codebook_size": k, "tokens": n, "dim": d, "gflop": 2 * n * k * d / 1e9}
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        baseline = None
        for tf32 in (False, True) if device.type == "cuda" else (False,):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            indices: list[torch.Tensor] = []
            memory = PeakMemory(device)
            memory.start()
            seconds = _timed(lambda: indices.append(nearest_codes(z, codebook)), device)  # noqa: B023
            peak = memory.stop()
            found = indices[-1]
            if baseline is None:
                baseline = found
            key = "tf32_on" if tf32 else "fp32"
            out[key] = {
                "ms": 1000 * seconds,
                "gflops": out["gflop"] / seconds,
                "tokens_per_s": n / seconds,
                "peak_memory_mib": peak,
                "same_indices_as_fp32": float((found == baseline).double().mean()),
            }
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return out


def generator_case(preset: str, batch: int, sizes: Sizes, device: torch.device, peaks: dict[str, Any]) -> dict:
    """Tokens/s, MFU and peak memory of GPT training steps on random tokens (the engine's real step; one
    synchronisation at each end of the timed steps)."""
    from fvq.bench.generator import RandomTokens, training_flops_per_token
    from fvq.distributed import DistributedContext
    from fvq.training.config import GeneratorTrainConfig
    from fvq.training.engine import Engine
    from fvq.training.generator_task import GeneratorTask

    steps = sizes.gpt_steps
    config = GeneratorTrainConfig.from_dict(
        {
            "task": "generator",
            "model": {"preset": preset},
            "tokens": "(random tokens in memory)",
            "global_batch_size": batch,
            "max_steps": 2 + steps,
            "device": device.type,
            "precision": sizes.precision,
            "log_every": 0,
            "val_every": 0,
            "checkpoint_every": 0,
            "tensorboard": False,
        }
    )
    grid = (sizes.gpt_grid, sizes.gpt_grid)
    data = RandomTokens(batch * (2 + steps), sizes.gpt_vocab, grid, sizes.gpt_classes)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine(config, run_dir, ctx)
        task = GeneratorTask(engine, train_set=data, val_set=data)
        engine.attach(task)
        loader = engine.micro_batches()
        batches = [next(loader) for _ in range(2 + steps)]  # on the device before the timing
        memory = PeakMemory(device)
        memory.start()
        for step in range(2):  # warm-up
            engine.train_step(batches[step], step)
        sync_device(device)
        start = time.perf_counter()
        for step in range(2, 2 + steps):
            engine.train_step(batches[step], step)
        skipped, _ = engine.read_guard()
        sync_device(device)
        seconds = (time.perf_counter() - start) / steps
        peak = memory.stop()
        gpt = task.gpt.config
        params = task.gpt.num_parameters()
        engine.logger.close()
    tokens_per_s = batch * gpt.seq_len / seconds
    achieved = training_flops_per_token(gpt)["training"] * tokens_per_s / 1e12  # model TFLOP/s
    measured, spec = peaks.get("bf16_tflops"), peaks.get("spec_bf16_tflops")
    return {
        "preset": preset,
        "batch": batch,
        "seq_len": gpt.seq_len,
        "params": params,
        "precision": sizes.precision,
        "skipped_steps": skipped,
        "step_seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "model_tflops": achieved,
        "mfu_vs_measured_bf16": achieved / measured if measured else None,
        "mfu_vs_spec_bf16": achieved / spec if spec else None,
        "peak_memory_mib": peak,
    }


def sampling_case(preset: str, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Seconds to sample ``sizes.sampling_batch`` token grids with CFG (KV cache) and to decode them to images."""
    from fvq.generation import build_gpt, generate
    from fvq.models import Tokenizer

    dtype = torch.bfloat16 if sizes.precision == "bf16" else torch.float32
    grid = (sizes.gpt_grid, sizes.gpt_grid)
    tokenizer = Tokenizer.from_config(
        {
            "model": {"preset": sizes.decoder_preset},
            "quantizer": {"type": "vq", "codebook_size": sizes.gpt_vocab, "codebook_dim": 8},
        }
    )
    tokenizer = tokenizer.to(device).eval()
    model = build_gpt(preset, vocab_size=sizes.gpt_vocab, grid=grid, num_classes=sizes.gpt_classes, device=device)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.02)  # a fresh head is zero; any values time the same
    model = model.to(dtype).eval()
    classes = torch.arange(sizes.sampling_batch, device=device) % sizes.gpt_classes  # (B,)
    tokens: list[torch.Tensor] = []
    seconds = _timed(lambda: tokens.append(generate(model, classes, cfg_scale=2.0, seed=0)), device, sizes.repeats)
    indices = tokens[-1].reshape(-1, *grid)  # (B, h, w)
    mixed = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.inference_mode(), mixed:
        decode_s = _timed(lambda: tokenizer.decode(indices), device, sizes.repeats)
    model.clear_cache()
    return {
        "preset": preset,
        "images": sizes.sampling_batch,
        "cfg_scale": 2.0,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_image": grid[0] * grid[1],
        "sampling_s": seconds,
        "tokens_per_s": sizes.sampling_batch * grid[0] * grid[1] / seconds,
        "decode_s": decode_s,
        "images_per_s": sizes.sampling_batch / (seconds + decode_s),
    }


# ---- the run ---------------------------------------------------------------------------------------------------------
class Report:
    """The results so far, rewritten to ``path`` after every part; a part's failure is recorded, not raised."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.data: dict[str, Any] = {"budget_s": budget_s, "parts": {}, "skipped": {}, "errors": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, estimate: float, fn: Callable[[], Any], into: str | None = None) -> Any:
        """Run part ``name`` when ``estimate`` seconds of the budget are left; its result goes to ``parts[name]``, or
        is appended to the list ``parts[into]``."""
        if self.left() < estimate:
            self.data["skipped"][name] = f"{self.left():.0f} s of the budget left, {estimate:.0f} s expected"
            print(f"[gpu check] {name}: skipped ({self.data['skipped'][name]})", flush=True)
            self.save()
            return None
        print(f"[gpu check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as error:  # a failure of one part leaves the others' figures
            self.data["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
            traceback.print_exc()
            result = None
        else:
            if into is None:
                self.data["parts"][name] = result
            else:
                self.data["parts"].setdefault(into, []).append(result)
        self.data.setdefault("seconds", {})[name] = time.perf_counter() - t0
        self.save()
        if device_is_cuda():
            torch.cuda.empty_cache()
        return result

    def save(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def device_is_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _f(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown(data: dict[str, Any]) -> str:
    """The results as markdown tables."""
    parts = data["parts"]
    lines = []
    env = parts.get("environment", {})
    lines += [
        f"**{env.get('name', '?')}**, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}: matmul peaks "
        f"bf16 {_f(env.get('bf16_tflops'), '.0f')}, fp32 {_f(env.get('fp32_tflops_tf32_off'), '.1f')} (TF32 off), "
        f"{_f(env.get('fp32_tflops_tf32_on'), '.0f')} (TF32 on) TFLOP/s",
        "",
    ]
    cases = parts.get("tokenizer") or []
    if cases:
        lines += [
            "| tokenizer step | precision | channels-last | compile | batch | images/s | step ms | data wait ms | "
            "peak GiB | bridge share | host reads | CUDA syncs |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in cases:
            lines.append(
                f"| {c['preset']} | {c['precision']} | {c['channels_last']} | {c['compile']} | {c['batch']} | "
                f"{c['images_per_s']:.1f} | {c['step_ms']:.1f} | {c['data_wait_ms_per_step']:.1f} | "
                f"{c['peak_memory_mib'] / 1024:.1f} | {_f(c['bridge_share'], '.1%')} | {c['host_reads']} | "
                f"{c.get('cuda_syncs_reported', '-')} |"
            )
        lines.append("")
    search = parts.get("search")
    if search:
        lines += ["| search | K | N | D | ms | GFLOP/s | same indices as fp32 |", "|---|---:|---:|---:|---:|---:|---:|"]
        for key in ("fp32", "tf32_on"):
            if key in search:
                s = search[key]
                lines.append(
                    f"| {key} | {search['codebook_size']} | {search['tokens']} | {search['dim']} | {s['ms']:.1f} | "
                    f"{s['gflops']:.0f} | {s['same_indices_as_fp32']:.4f} |"
                )
        lines.append("")
    if parts.get("generator"):
        lines += [
            "| GPT training | batch | params | tokens/s | model TFLOP/s | MFU (measured bf16) | MFU (data sheet) | "
            "peak GiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for g in parts["generator"]:
            lines.append(
                f"| {g['preset']} {g['precision']} | {g['batch']} | {g['params'] / 1e6:.0f}M | {g['tokens_per_s']:.0f} "
                f"| {g['model_tflops']:.1f} | {_f(g['mfu_vs_measured_bf16'], '.1%')} | "
                f"{_f(g['mfu_vs_spec_bf16'], '.1%')} | {g['peak_memory_mib'] / 1024:.1f} |"
            )
        lines.append("")
    if parts.get("sampling"):
        lines += [
            "| sampling | images | CFG | dtype | sampling s | tokens/s | decode s |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for s in parts["sampling"]:
            lines.append(
                f"| {s['preset']} | {s['images']} | {s['cfg_scale']} | {s['dtype']} | {s['sampling_s']:.2f} | "
                f"{s['tokens_per_s']:.0f} | {s['decode_s']:.3f} |"
            )
        lines.append("")
    for kind in ("skipped", "errors"):
        for name, why in data.get(kind, {}).items():
            lines.append(f"- {name} {kind[:-1] if kind == 'errors' else 'skipped'}: {why.splitlines()[0]}")
    lines.append(f"\n{data.get('elapsed_s', 0):.0f} s in all (budget {data['budget_s']:.0f} s)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script itself (CPU is fine)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time budget in seconds (450)")
    parser.add_argument("--out", default="gpu_check.json", help="JSON file of the results (gpu_check.json)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile part")
    parser.add_argument("--batch", type=int, default=None, help="tokenizer images per step (32; smoke 2)")


def run(args: argparse.Namespace) -> int:
    from fvq.training.engine import flush_denormals

    flush_denormals()
    sizes = SMOKE if args.smoke else Sizes()
    if args.batch:
        sizes.batch = args.batch
    if args.no_compile:
        sizes.compile = False
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if device.type != "cuda" and not args.smoke:
        print("[gpu check] no CUDA device: the full sizes would take hours here; use --smoke", file=sys.stderr)
        return 2
    if device.type == "cuda" and sizes.precision == "fp32":
        sizes.precision = "bf16"
    report = Report(Path(args.out), args.budget_s)
    report.data.update({"smoke": bool(args.smoke), "arguments": vars(args)})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        report.data["data"] = write_photo_folder(folder, max(sizes.files, sizes.batch * 2))
        lpips = random_lpips_weights(Path(tmp))
        with _env("FVQ_LPIPS_WEIGHTS", str(lpips)):
            env = report.run("environment", 0, lambda: environment(device, args.smoke)) or {}
            for preset in sizes.tokenizer_presets:
                for channels_last in (False, True):
                    report.run(
                        f"tokenizer {preset} channels_last={channels_last}",
                        sizes.estimates["tokenizer"],
                        lambda p=preset, cl=channels_last: tokenizer_case(p, sizes, folder, device, channels_last=cl),
                        into="tokenizer",
                    )
            report.run("search", sizes.estimates["search"], lambda: search_part(sizes, device))
            for preset, batch in sizes.gpt_cases:
                report.run(
                    f"generator {preset}",
                    sizes.estimates["generator"],
                    lambda p=preset, b=batch: generator_case(p, b, sizes, device, env),
                    into="generator",
                )
            for preset in sizes.sampling_presets:
                report.run(
                    f"sampling {preset}",
                    sizes.estimates["sampling"],
                    lambda p=preset: sampling_case(p, sizes, device),
                    into="sampling",
                )
            if sizes.compile:
                report.run(
                    f"compile {sizes.tokenizer_presets[0]}",
                    sizes.estimates["compile"],
                    lambda: tokenizer_case(
                        sizes.tokenizer_presets[0], sizes, folder, device, channels_last=True, compile=True
                    ),
                    into="tokenizer",
                )
            else:
                report.data["skipped"]["compile"] = "--smoke or --no-compile"
    report.data["host_syncs_per_step"] = {
        f"{c['preset']} channels_last={c['channels_last']} compile={c['compile']}": {
            "host_reads": c["host_reads"],
            "cuda_syncs_reported": c.get("cuda_syncs_reported"),
        }
        for c in report.data["parts"].get("tokenizer", [])
    }
    report.save()
    print(markdown(report.data))
    print(f"\n[gpu check] results in {report.path}")
    return 0


@contextlib.contextmanager
def _env(key: str, value: str):
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
