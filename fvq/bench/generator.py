"""Benchmark generator training: tokens per second and model-FLOP utilisation of the real training step.

Run as ``python scripts/bench_generator.py`` (or ``python -m fvq.bench.generator``). Each case (a GPT preset and a
batch) runs in a fresh subprocess: it builds :class:`fvq.training.generator_task.GeneratorTask` on the shared
:class:`fvq.training.engine.Engine` over random tokens held in memory, and times ``Engine.train_step`` (forward,
backward, clipping, fused AdamW, the step's finiteness read) after warm-up steps.

Figures:

* tokens/s: ``batch x T`` over the median step time.
* Model FLOPs per training token (PaLM, Chowdhery et al. 2022, appendix B): ``6 N + 12 L d S``, with ``N`` the
  parameters outside the embedding tables (the output head counted), ``L`` layers, ``d`` width and ``S`` the sequence
  length fed (``T``: the class and ``T - 1`` tokens); the attention term counts the full ``S x S`` score matrix
  (causal masking not subtracted). Elementwise work (norms, SwiGLU gates, rotary, softmax, dropout, the optimizer) is
  not counted. LlamaGen's dropouts (0.1 on embeddings, residual and feed-forward; 0.1 class dropout) are on.
* MFU: achieved model FLOP/s over the sgemm peak of the same process (fp32 2048 x 2048 ``torch.mm``, as
  :func:`fvq.bench.search.sgemm_gflops`), measured before and after the timed steps; the larger is used.
* Peak memory: growth of the process's peak resident set (CPU) or ``max_memory_allocated`` (CUDA) from just before the
  first training step to the end (gradients, AdamW states, activations), as :class:`fvq.bench.search.PeakMemory`;
  and the whole process's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fvq.bench.search import PeakMemory, _status_kib, sgemm_gflops, sync_device
from fvq.generation.gpt import GPTConfig

DEFAULT_CASES = ("gpt_tiny:32", "gpt_b:4")


def training_flops_per_token(config: GPTConfig) -> dict[str, float]:
    """Model FLOPs of one training token (forward + backward) of a GPT: ``6 N + 12 L d S`` (see the module docstring).

    Returns:
        ``non_embedding_params`` (N, output head included), ``forward`` (``2 N + 4 L d S``) and ``training`` (3x).
    """
    d, layers, seq = config.dim, config.n_layer, config.seq_len
    hidden = config.ffn_hidden_dim
    per_block = 3 * d * d + d * d + 3 * d * hidden + 2 * d  # qkv, proj, SwiGLU (w1, w2, w3), two norms
    params = layers * per_block + d + d * config.vocab_size  # blocks, final norm, output head
    forward = 2 * params + 4 * layers * d * seq
    return {"non_embedding_params": float(params), "forward": float(forward), "training": float(3 * forward)}


class RandomTokens(torch.utils.data.Dataset):
    """Uniform random tokens and labels with the token dataset's interface (for timing only)."""

    class Sample(NamedTuple):
        tokens: torch.Tensor
        label: torch.Tensor

    def __init__(self, n: int, vocab_size: int, grid: tuple[int, int], num_classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab_size, (n, grid[0] * grid[1]), generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        self.grid, self.codebook_size, self.num_classes = grid, vocab_size, num_classes
        self.class_names: list[str] = []
        self.model_identity = "random-tokens"

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> RandomTokens.Sample:
        return self.Sample(self.tokens[i], self.labels[i])


def measure_training(
    preset: str,
    batch: int,
    *,
    vocab_size: int,
    grid: tuple[int, int],
    num_classes: int,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
) -> dict[str, Any]:
    """Time ``steps`` training steps of ``preset`` at ``batch`` sequences per step (after ``warmup`` steps)."""
    from fvq.distributed import init_distributed
    from fvq.training.config import GeneratorTrainConfig
    from fvq.training.engine import Engine
    from fvq.training.generator_task import GeneratorTask

    config = GeneratorTrainConfig.from_dict(
        {
            "task": "generator",
            "model": {"preset": preset},
            "tokens": "(random tokens in memory)",
            "global_batch_size": batch,
            "max_steps": warmup + steps,
            "device": device.type,
            "precision": precision,
            "activation_checkpointing": activation_checkpointing,
            "log_every": 0,
            "val_every": 0,
            "checkpoint_every": 0,
            "tensorboard": False,
        }
    )
    data = RandomTokens(batch * (warmup + steps), vocab_size, grid, num_classes)
    peak_before = sgemm_gflops(device)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine(config, run_dir, init_distributed(config.device))
        task = GeneratorTask(engine, train_set=data, val_set=data)
        engine.attach(task)
        batches = engine.micro_batches()
        memory = PeakMemory(device)
        memory.start()
        times = []
        for step in range(warmup + steps):
            micro = next(batches)
            sync_device(device)
            t0 = time.perf_counter()
            applied, _ = engine.train_step(micro, step)
            sync_device(device)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
            assert applied, "a benchmark step was not finite"
        peak_bytes = memory.stop()
        gpt_config = task.gpt.config
        params = task.gpt.num_parameters()
        engine.logger.close()
    peak_after = sgemm_gflops(device)
    flops = training_flops_per_token(gpt_config)
    seconds = statistics.median(times)
    tokens_per_s = batch * gpt_config.seq_len / seconds
    peak = max(peak_before, peak_after)
    achieved = flops["training"] * tokens_per_s / 1e9
    return {
        "preset": preset,
        "batch": batch,
        "seq_len": gpt_config.seq_len,
        "vocab_size": vocab_size,
        "params": params,
        "non_embedding_params": flops["non_embedding_params"],
        "training_gflop_per_token": flops["training"] / 1e9,
        "step_seconds": seconds,
        "step_seconds_all": times,
        "tokens_per_s": tokens_per_s,
        "achieved_gflops": achieved,
        "sgemm_gflops": peak,
        "sgemm_gflops_before_after": [peak_before, peak_after],
        "mfu": achieved / peak,
        "peak_mib": peak_bytes / 2**20,
        "memory_method": memory.method,
        "process_peak_mib": _status_kib("VmHWM") / 1024 if device.type == "cpu" else float("nan"),
        "dropout": "LlamaGen's: 0.1 embeddings, residual, feed-forward; 0.1 class dropout",
        "precision": precision,
        "threads": torch.get_num_threads(),
    }


def _case(text: str) -> tuple[str, int]:
    try:
        preset, batch = text.split(":")
        if int(batch) < 1:
            raise ValueError
        return preset, int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRESET:BATCH like gpt_b:4, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cases",
        type=_case,
        nargs="+",
        default=[_case(c) for c in DEFAULT_CASES],
        metavar="PRESET:BATCH",
        help=f"GPT presets and sequences per step ({' '.join(DEFAULT_CASES)})",
    )
    parser.add_argument("--vocab-size", type=int, default=16_384, help="codebook size V (16384)")
    parser.add_argument("--grid", type=int, default=16, help="token grid side: T = grid^2 (16: 256 px at f16)")
    parser.add_argument("--classes", type=int, default=1000, help="classes (1000)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case; the median is reported (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    parser.add_argument("--precision", default="fp32", help="fp32, or bf16 on CUDA (fp32)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in the backward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)


def _child(args: argparse.Namespace, preset: str, batch: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter (its memory figures see nothing of another case)."""
    cmd = [sys.executable, "-m", "fvq.bench.generator", "--_case", f"{preset}:{batch}"]
    cmd += ["--vocab-size", str(args.vocab_size), "--grid", str(args.grid), "--classes", str(args.classes)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    cmd += ["--precision", args.precision] + (["--activation-checkpointing"] if args.activation_checkpointing else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark case {preset}:{batch} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    """Run the cases of ``args`` (see :func:`add_arguments`) and print one table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    grid = (args.grid, args.grid)
    if args._case is not None:
        preset, batch = _case(args._case)
        result = measure_training(
            preset,
            batch,
            vocab_size=args.vocab_size,
            grid=grid,
            num_classes=args.classes,
            steps=args.steps,
            warmup=args.warmup,
            device=device,
            precision=args.precision,
            activation_checkpointing=args.activation_checkpointing,
        )
        print(json.dumps(result))
        return 0
    print(
        f"fvq generator training benchmark: torch {torch.__version__}, device {device}, {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} CPUs, V = {args.vocab_size}, T = {args.grid}x{args.grid}, {args.classes} classes, "
        f"{args.precision}, median of {args.steps} steps after {args.warmup}",
        flush=True,
    )
    results = []
    for preset, batch in args.cases:
        print(f"  {preset} batch {batch}: running ...", flush=True)
        results.append(_child(args, preset, batch))
    print(
        f"\n{'preset':<9} {'params':>8} {'batch':>5} {'step':>8} {'tokens/s':>9} {'GFLOP/tok':>9} {'GFLOP/s':>8} "
        f"{'sgemm':>6} {'MFU':>6} {'peak mem':>9} {'process':>9}"
    )
    for r in results:
        print(
            f"{r['preset']:<9} {r['params'] / 1e6:>7.1f}M {r['batch']:>5} {r['step_seconds']:>7.2f}s "
            f"{r['tokens_per_s']:>9.0f} {r['training_gflop_per_token']:>9.3f} {r['achieved_gflops']:>8.1f} "
            f"{r['sgemm_gflops']:>6.0f} {r['mfu']:>6.1%} {r['peak_mib']:>5.0f} MiB {r['process_peak_mib']:>5.0f} MiB"
        )
    print(
        "(GFLOP/tok: 6 N + 12 L d S per training token, N without the embedding tables, the head counted; MFU: "
        "model FLOP/s over the larger sgemm peak measured before and after the case; peak mem: growth from the "
        f"first step on, {results[0]['memory_method'] if results else ''}; dropout on as LlamaGen)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "cases": results}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_generator", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
