"""Benchmark class-conditional sampling: the GPT with its KV cache against full recomputation, and the 50k protocol.

Run as ``python scripts/bench_sampling.py`` or ``python -m fvq.bench.sampling``. Defaults: GPT-B (vocabulary 16,384,
16 x 16 = 256 tokens, 1,000 classes), a batch of 8 with classifier-free guidance (16 sequences per forward), random
weights (the time of a forward does not depend on their values).

* **KV cache**: one full :func:`fvq.generation.generate` call (prefill, then one token per step), best of
  ``--repeats``; tokens/s counts the batch's images' tokens (8 x 256), not the doubled guidance rows.
* **Full recomputation** (``use_cache=False``: the whole prefix through the model at every step) costs ``O(T^2)`` and
  takes many minutes per batch for GPT-B on a CPU, so not every step runs. The first ``--recompute-tokens`` steps run
  one after the other, as ``generate``'s loop does them (the model's logits for the prefix, guidance, filtering, the
  draw; fed the cached run's tokens, so both paths do the same work), and are compared with the same steps of the
  cache (measured, no estimate). Then single steps at the positions ``--probe-steps`` (default 64, 128, 192 and the
  last one) are timed, and the time of the whole loop is the sum over all ``T`` steps of the piecewise-linear
  interpolation between the measured steps: an estimate inside the measured range, not an extrapolation past it. A
  least-squares line through the first steps alone, summed over all steps, is kept in the JSON for comparison
  (``line_from_first_steps_s``): it leaves out the growth of each position's cost with the prefix (attention, and
  activations that outgrow the caches), and came out 10 % lower for GPT-B on a 2-core EPYC.
* **Peak memory**: growth of the process's peak resident set size during each measured call on a CPU (``VmHWM``,
  :class:`fvq.bench.search.PeakMemory`), ``torch.cuda.max_memory_allocated`` on a GPU; the weights are already in
  memory, the KV cache is counted.
* **Decoding** (``--decode``, default on): one image through a tokenizer decoder of the ``--tokenizer-preset`` (random
  weights) at the grid's image size, one image per pass as ``fvq sample`` decodes.
* **The protocol**: ``--protocol-samples`` (50,000) images in batches of ``--batch-size`` on one device, from the
  measured cached batch time (and the decode time): ``ceil(N / B) x batch time + N x decode time``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from fvq.bench.search import PeakMemory, sync_device
from fvq.generation import build_gpt, generate
from fvq.generation.sampling import apply_guidance, gumbel_noise, sample_from_logits
from fvq.quantizers.search import fused


def cpu_model() -> str:
    """The CPU's model name (``lscpu``, else ``/proc/cpuinfo`` as the search kernels read it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return fused.cpu_model()


def _now(device: torch.device) -> float:
    sync_device(device)
    return time.perf_counter()


@torch.no_grad()
def stepwise(
    model: Any, classes: torch.Tensor, tokens: torch.Tensor, steps: list[int], *, cache: bool, cfg_scale: float
) -> tuple[list[float], torch.Tensor]:
    """Steps of :func:`fvq.generation.generate`'s loop, timed one by one, fed ``tokens``.

    Args:
        model: The GPT (eval mode).
        classes: ``(B,)`` class ids.
        tokens: ``(B, T)`` tokens of an earlier run, fed as the sampled ones (same work on both paths).
        steps: Token positions to run: ``0, 1, .., n - 1`` with the cache (each step needs the one before); any
            positions without it (step ``t`` forwards the class and ``t`` tokens).
        cache: KV cache (prefill + one token per step) or the whole prefix every step.
        cfg_scale: Guidance scale (``!= 1`` doubles the batch).

    Returns:
        Seconds of each step, and the guided logits ``(B, V)`` of the last step.
    """
    if cache and steps != list(range(len(steps))):
        raise ValueError("with the cache, steps must be 0, 1, .., n - 1")
    device = model.device
    batch = classes.shape[0]
    guided = cfg_scale != 1.0
    run_classes = torch.cat([classes, classes]) if guided else classes  # (B',)
    drop = torch.arange(run_classes.shape[0], device=device) >= batch if guided else None  # (B',)
    indices = torch.arange(batch, device=device)  # (B,) sample indices
    if cache:
        model.ensure_cache(run_classes.shape[0])
    times, logits = [], None
    for t in steps:
        start = _now(device)
        if cache and t == 0:
            logits = model.prefill(run_classes, drop_classes=drop)  # (B', V)
        elif cache:
            fed = tokens[:, t - 1]
            logits = model.decode_step(torch.cat([fed, fed]) if guided else fed, t)  # (B', V)
        else:
            prefix = tokens[:, :t]
            prefix = torch.cat([prefix, prefix]) if guided else prefix  # (B', t)
            logits = model.prefix_logits(run_classes, prefix, drop_classes=drop)[:, -1]  # (B', V)
        if guided:
            logits = apply_guidance(logits[:batch], logits[batch:], cfg_scale)  # (B, V)
        noise = gumbel_noise(0, indices, t, logits.shape[-1])  # (B, V)
        sample_from_logits(logits, noise)  # (B,), discarded: the earlier run's token is fed
        times.append(_now(device) - start)
    return times, logits


def interpolated_total(points: dict[int, float], total_steps: int) -> float:
    """Sum over steps ``0 .. total_steps - 1`` of the piecewise-linear interpolation through ``{step: seconds}``
    (measured steps count as measured; past the last point, the last segment's slope continues)."""
    ts = sorted(points)
    if len(ts) < 2:
        raise ValueError("need at least two measured steps")
    total = 0.0
    for t in range(total_steps):
        if t in points:
            total += points[t]
            continue
        right = next((i for i, u in enumerate(ts) if u > t), len(ts) - 1)
        left = max(0, right - 1)
        t0, t1 = ts[left], ts[right]
        total += points[t0] + (points[t1] - points[t0]) * (t - t0) / (t1 - t0)
    return total


def extrapolate(step_seconds: list[float], total_steps: int) -> dict[str, float]:
    """Least-squares line ``a + b t`` through the step times ``t = 1 .. n - 1`` (step 0 has no prefix), summed over
    ``total_steps`` steps (step 0 counted as measured)."""
    ts = list(range(1, len(step_seconds)))
    ys = step_seconds[1:]
    n = len(ts)
    if n < 2:
        raise ValueError("need at least 3 measured steps to extrapolate")
    mean_t, mean_y = sum(ts) / n, sum(ys) / n
    slope = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / sum((t - mean_t) ** 2 for t in ts)
    intercept = mean_y - slope * mean_t
    rest = range(1, total_steps)
    total = step_seconds[0] + sum(intercept + slope * t for t in rest)
    return {"intercept_s": intercept, "slope_s_per_token": slope, "total_s": total}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt_b", help="GPT preset (default gpt_b)")
    parser.add_argument("--vocab-size", type=int, default=16_384, help="codebook size (default 16384)")
    parser.add_argument("--grid", type=int, default=16, help="token grid side (default 16: 256 tokens)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes (default 1000)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call (default 8)")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale (default 1.5; 1: no CFG)")
    parser.add_argument(
        "--recompute-tokens", type=int, default=32, help="first steps run both ways, one after the other (32)"
    )
    parser.add_argument(
        "--probe-steps",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[64, 128, 192, 255],
        metavar="T1,T2,..",
        help="single recomputation steps timed further on (default 64,128,192,255; past the end: the last step)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed full cached runs, best kept (default 1)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and KV cache dtype")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--tokenizer-preset", default="vq16", help="decoder timed by --decode (default vq16)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decoder timing")
    parser.add_argument("--protocol-samples", type=int, default=50_000, help="samples of the protocol (50000)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`) and print the figures."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for CUDA, but torch.cuda.is_available() is False")
    if args.recompute_tokens < 3:
        raise ValueError("--recompute-tokens must be >= 3 (a line is fitted through steps 1 ..)")
    if any(t < 0 for t in args.probe_steps):
        raise ValueError(f"--probe-steps must be positions >= 0, got {args.probe_steps}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    grid = (args.grid, args.grid)
    length = args.grid * args.grid
    machine = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"fvq sampling benchmark: torch {torch.__version__}, {device} ({machine}), {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    model = build_gpt(
        args.preset, vocab_size=args.vocab_size, grid=grid, num_classes=args.num_classes, device=device
    ).eval()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.02)  # a fresh head is zero (uniform logits); any values time the same
    model = model.to(dtype)
    params = model.num_parameters()
    guided = args.cfg_scale != 1.0
    rows = args.batch_size * (2 if guided else 1)
    print(
        f"{args.preset}: {params:,} parameters, vocabulary {args.vocab_size}, {length} tokens, batch "
        f"{args.batch_size}{f' with CFG {args.cfg_scale} ({rows} sequences per forward)' if guided else ''}, "
        f"{args.dtype}",
        flush=True,
    )
    classes = torch.arange(args.batch_size, device=device) * 7 % args.num_classes  # (B,)
    results: dict[str, Any] = {
        "command": "python scripts/bench_sampling.py " + " ".join(_argv_of(args)),
        "device": str(device),
        "machine": machine,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "preset": args.preset,
        "parameters": params,
        "vocab_size": args.vocab_size,
        "tokens_per_image": length,
        "batch_size": args.batch_size,
        "cfg_scale": args.cfg_scale,
        "dtype": args.dtype,
    }

    # 1. KV cache: full generate calls (the first one also warms up and allocates the cache).
    model.clear_cache()
    meter = PeakMemory(device)
    meter.start()
    start = _now(device)
    tokens = generate(model, classes, cfg_scale=args.cfg_scale, seed=0)  # (B, T)
    first = _now(device) - start
    cached_peak = meter.stop()
    best = first
    for _ in range(args.repeats - 1):
        start = _now(device)
        generate(model, classes, cfg_scale=args.cfg_scale, seed=0)
        best = min(best, _now(device) - start)
    cached = {
        "seconds": best,
        "first_call_seconds": first,
        "tokens_per_s": args.batch_size * length / best,
        "images_per_s": args.batch_size / best,
        "peak_bytes": cached_peak,
        "peak_method": meter.method,
    }
    results["cached"] = cached
    print(
        f"\nKV cache, {length} tokens: {best:.2f} s per batch ({cached['tokens_per_s']:.0f} tokens/s, "
        f"{cached['images_per_s']:.3f} images/s), peak memory +{_gib(cached_peak)} (first call, cache allocated)",
        flush=True,
    )

    # 2. The first steps of both paths, step by step, fed the same tokens; then single recomputation steps further on.
    first_steps = list(range(min(args.recompute_tokens, length)))
    cache_steps, cache_logits = stepwise(model, classes, tokens, first_steps, cache=True, cfg_scale=args.cfg_scale)
    model.clear_cache()
    meter = PeakMemory(device)
    meter.start()
    full_steps, full_logits = stepwise(model, classes, tokens, first_steps, cache=False, cfg_scale=args.cfg_scale)
    probes = sorted({min(t, length - 1) for t in args.probe_steps} - set(first_steps))
    probe_steps, _ = stepwise(model, classes, tokens, probes, cache=False, cfg_scale=args.cfg_scale)
    full_peak = meter.stop()
    measured = {**dict(zip(first_steps, full_steps)), **dict(zip(probes, probe_steps))}
    estimate = interpolated_total(measured, length)
    agree = float((cache_logits.float() - full_logits.float()).abs().max())
    recompute = {
        "first_steps": len(first_steps),
        "first_steps_seconds": sum(full_steps),
        "cached_seconds_same_steps": sum(cache_steps),
        "first_steps_speedup": sum(full_steps) / sum(cache_steps),
        "step_seconds": {str(t): v for t, v in sorted(measured.items())},
        "estimated_seconds": estimate,
        "estimate": "piecewise-linear interpolation between the measured steps, summed over every step",
        "line_from_first_steps_s": extrapolate(full_steps, length)["total_s"],
        "tokens_per_s_estimated": args.batch_size * length / estimate,
        "speedup_estimated": estimate / best,
        "peak_bytes": full_peak,
        "max_abs_logit_difference_at_last_first_step": agree,
    }
    results["recompute"] = recompute
    print(
        f"full recomputation, first {len(first_steps)} steps (measured): {recompute['first_steps_seconds']:.2f} s vs "
        f"{recompute['cached_seconds_same_steps']:.2f} s with the cache ({recompute['first_steps_speedup']:.1f}x); "
        f"logits agree to {agree:.1e}",
        flush=True,
    )
    shown = ", ".join(f"t={t}: {measured[t]:.2f} s" for t in probes)
    print(
        f"full recomputation, single steps ({shown}); all {length} steps, interpolated between the measured ones: "
        f"{estimate:.0f} s per batch ({recompute['tokens_per_s_estimated']:.1f} tokens/s); the cache is "
        f"{recompute['speedup_estimated']:.0f}x faster; peak memory +{_gib(full_peak)}",
        flush=True,
    )

    # 3. Decoding one image, as fvq sample does.
    decode_seconds = None
    if not args.no_decode:
        from fvq.models import Tokenizer

        tokenizer = Tokenizer.from_config(
            {
                "model": {"preset": args.tokenizer_preset},
                "quantizer": {"type": "vq", "codebook_size": args.vocab_size, "codebook_dim": 8},
            }
        )
        tokenizer = tokenizer.to(device).eval()
        indices = tokens[:1].reshape(1, *grid).to(device)  # (1, h, w)
        with torch.inference_mode():
            tokenizer.decode(indices)  # warm-up
            start = _now(device)
            image = tokenizer.decode(indices)  # (1, 3, H, W)
            decode_seconds = _now(device) - start
        results["decode"] = {
            "tokenizer_preset": args.tokenizer_preset,
            "image_size": list(image.shape[-2:]),
            "seconds_per_image": decode_seconds,
        }
        print(
            f"decoding one {image.shape[-2]}x{image.shape[-1]} image ({args.tokenizer_preset} decoder): "
            f"{decode_seconds:.2f} s",
            flush=True,
        )

    # 4. The protocol on one device.
    n = args.protocol_samples
    batches = math.ceil(n / args.batch_size)
    protocol = {
        "samples": n,
        "batches": batches,
        "tokens_seconds": batches * best,
        "tokens_seconds_recompute": batches * estimate,
        "decode_seconds": None if decode_seconds is None else n * decode_seconds,
    }
    protocol["total_seconds"] = protocol["tokens_seconds"] + (protocol["decode_seconds"] or 0.0)
    results["protocol"] = protocol
    decode_part = "" if decode_seconds is None else f" + decoding {_duration(protocol['decode_seconds'])}"
    print(
        f"\n{n:,} samples on this device at batch {args.batch_size}: tokens {_duration(protocol['tokens_seconds'])}"
        f"{decode_part} = {_duration(protocol['total_seconds'])} (without the cache the tokens alone: "
        f"{_duration(protocol['tokens_seconds_recompute'])})",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The options that differ from the defaults, as command-line flags (for the record)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    out = []
    for key, value in vars(args).items():
        if key in defaults and value != defaults[key] and key != "json":
            flag = "--" + key.replace("_", "-")
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            out += [flag] if isinstance(value, bool) else [flag, text]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fvq.bench.sampling", description=__doc__.strip().splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
