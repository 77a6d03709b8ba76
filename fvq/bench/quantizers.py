"""Benchmark every quantizer family: forward + backward time and peak memory at comparable settings.

Defaults: N = 4096 tokens (16 feature maps of 16 x 16), D = 256 input channels, about 2^14 codes where a codebook
size applies. Run as ``fvq bench quantizers`` or ``python -m fvq.bench.quantizers``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the step; on CPU, each case runs
in a fresh subprocess and reports its peak resident set size (``ru_maxrss``) above the resident size measured just
before the first step (it includes allocator slack, so read it as an upper bound).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from fvq.quantizers.registry import QUANTIZERS, build_quantizer


def bench_configs(dim: int = 256, codebook_size: int = 16_384) -> dict[str, dict[str, Any]]:
    """Benchmark cases: case name -> quantizer config, at comparable vocabulary sizes (~``codebook_size``)."""
    bits = max(1, codebook_size.bit_length() - 1)
    vq = {"type": "vq", "codebook_size": codebook_size, "codebook_dim": dim}
    bridge = {"type": "vq_bridge"}
    return {
        "vq": vq,
        "vq+vq_bridge": {**vq, "projector": bridge},
        "vq+linear": {**vq, "projector": "linear"},
        "fsq": {"type": "fsq", "levels": [8, 8, 8, 6, 5], "codebook_dim": dim},  # 15,360 codes
        "lfq": {"type": "lfq", "codebook_dim": dim, "num_bits": bits},
        "bsq": {"type": "bsq", "codebook_dim": dim, "num_bits": bits},
        "residual(4, shared)": {"type": "residual", "num_quantizers": 4, "shared_codebook": True, "quantizer": vq},
        "residual(4, shared)+vq_bridge": {
            "type": "residual",
            "num_quantizers": 4,
            "shared_codebook": True,
            "quantizer": {**vq, "projector": bridge},
        },
        "grouped(4)": {
            "type": "grouped",
            "num_groups": 4,
            "codebook_dim": dim,
            "quantizer": {"type": "vq", "codebook_size": codebook_size},
        },
        "multiscale(VAR)": {"type": "multiscale", "quantizer": vq},
        "multiscale(VAR)+vq_bridge": {"type": "multiscale", "quantizer": {**vq, "projector": bridge}},
    }


def _family(config: dict[str, Any]) -> str:
    return config["type"]


def _build(config: dict[str, Any]) -> torch.nn.Module:
    return build_quantizer(json.loads(json.dumps(config)))  # a deep copy: the builder never sees shared dicts


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(config: dict[str, Any], *, tokens: int, dim: int, repeats: int, device: str) -> dict[str, float]:
    """Time ``repeats`` forward + backward steps (after one warm-up) and the peak memory of one step.

    Returns:
        ``{"ms": median milliseconds per step, "peak_mib": peak extra memory in MiB, "params": parameter count}``.
    """
    torch.manual_seed(0)
    q = _build(config).to(device).train()
    side = 16
    batch = max(1, tokens // (side * side))
    z = torch.randn(batch, dim, side, side, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        out = q(z)
        (out.quantized.square().mean() + out.loss).backward()
        q.zero_grad(set_to_none=True)
        z.grad = None

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()  # warm-up, also the step whose peak memory is reported
    sync()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "ms": 1e3 * times[len(times) // 2],
        "peak_mib": max(peak, 0) / 2**20,
        "params": float(sum(p.numel() for p in q.parameters())),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (N), as 16x16 maps (4096)")
    parser.add_argument("--dim", type=int, default=256, help="input channels D (256)")
    parser.add_argument("--codebook-size", type=int, default=16_384, help="codes where a size applies (16384)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case after one warm-up (3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these case names")
    parser.add_argument("--in-process", action="store_true", help="on CPU, skip the per-case subprocess")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)


def _run_case_subprocess(name: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "fvq.bench.quantizers", "--_case", name]
    cmd += ["--tokens", str(args.tokens), "--dim", str(args.dim), "--codebook-size", str(args.codebook_size)]
    cmd += ["--repeats", str(args.repeats), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark case {name!r} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = bench_configs(args.dim, args.codebook_size)
    if args._case is not None:  # worker mode: one case, one JSON line
        print(
            json.dumps(
                measure(configs[args._case], tokens=args.tokens, dim=args.dim, repeats=args.repeats, device=args.device)
            )
        )
        return 0
    names = list(configs) if not args.only else args.only
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown benchmark cases {unknown}; valid: {list(configs)}")
    covered = {_family(c) for c in configs.values()}
    uncovered = sorted(set(QUANTIZERS) - covered)
    isolate = args.device == "cpu" and not args.in_process
    print(
        f"quantizers: forward+backward, N={args.tokens} tokens (16x16 maps), D={args.dim}, K~{args.codebook_size}, "
        f"device={args.device}, threads={torch.get_num_threads()}, median of {args.repeats}"
    )
    header = f"{'case':<30} {'family':<11} {'codes/pos':>9} {'params':>10} {'ms/step':>9} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    results = {}
    for name in names:
        cfg = configs[name]
        if isolate:
            r = _run_case_subprocess(name, args)
        else:
            r = measure(cfg, tokens=args.tokens, dim=args.dim, repeats=args.repeats, device=args.device)
        q = _build(cfg)
        per_pos = getattr(q, "num_tokens", None)
        cpp = f"{per_pos}/map" if per_pos else str(q.codes_per_position)
        results[name] = {**r, "family": _family(cfg)}
        print(
            f"{name:<30} {_family(cfg):<11} {cpp:>9} {int(r['params']):>10,} {r['ms']:>9.1f} {r['peak_mib']:>9.1f}",
            flush=True,
        )
    if uncovered:
        print(f"registered families without a benchmark case: {uncovered}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fvq.bench.quantizers", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
