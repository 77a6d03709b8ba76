"""Benchmark the exact nearest-code search and a ``VectorQuantizer`` forward + backward at large codebooks.

Run as ``fvq bench search`` or ``python scripts/bench_search.py``. It first prints the hardware FMA peak (cores x GHz
x FLOP per cycle, the clock from ``/proc/cpuinfo``) beside the measured sgemm peak. For each codebook size K it
reports the time of :func:`fvq.quantizers.search.nearest_codes` on ``N x D`` queries, the kernel ``auto`` chose and
why (its measured figures), its speed in GFLOP/s counting
``2 * N * K * D`` FLOPs, its ratio to the sgemm peak measured by the same process in two ways, its peak memory, and
the brute-force ``torch.mm`` + ``argmin`` over the full ``N x K`` matrix for comparison (where that matrix fits in
``--baseline-max-gib``; its indices must equal the search's). The two ratios: *best*, the fastest search against the
fastest sgemm of the whole case; *paired*, the median over the timed calls of each call's speed against the sgemm
peak measured right before and right after it (the larger of the two). On a machine shared with other work, whose
speed changes for seconds at a time, the paired ratio compares the search and sgemm under the same conditions, while
the best ratio also depends on whether a long search call happened to fall into a quiet spell. With ``--coarse``
(default) it also times the bf16 coarse pass + exact re-rank (``FVQ_SEARCH_KERNEL=coarse``) against the same sgemm
peak, with its candidate counts and a check of its indices against the brute force. Then it times a
forward + backward of ``VectorQuantizer`` at the given ``K:N`` shapes and, with ``--memory-check``, checks that one
step at K = 262,144, D = 256, N = 32,768 stays under ``--memory-limit-gib`` (4 GiB).

Every case runs in a fresh subprocess, so no case sees memory held or cached by another. Peak memory on CPU is the
growth of the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the
measured call; where that is not possible, ``ru_maxrss`` above the resident size before the call): it counts every
allocation the call makes, the allocator's slack included. On CUDA it is ``torch.cuda.max_memory_allocated`` above
the memory allocated before the call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fvq.quantizers.search import coarse, dispatch, fused, nearest_codes
from fvq.quantizers.vq import VectorQuantizer

DEFAULT_CODEBOOK_SIZES = (4096, 16_384, 65_536, 262_144)
DEFAULT_VQ_CASES = ("16384:8192", "262144:2048")  # K:N, the shapes quoted for vector-quantize-pytorch
MEMORY_CHECK_CASE = "262144:32768"


# ---- memory accounting ----------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak extra memory of the code run between :meth:`start` and :meth:`stop`, in bytes (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return
        self.base = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
            self.method = "VmHWM growth"
        except OSError:
            self.method = "ru_maxrss growth"

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        if self.method == "VmHWM growth":
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.base)


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), flags=re.MULTILINE)
    except OSError:
        match = None
    if match is None:  # not Linux: fall back to the high-water mark, in bytes on macOS and KiB elsewhere
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss // 1024 if sys.platform == "darwin" else rss
    return int(match.group(1))


# ---- timed cases ----------------------------------------------------------------------------------------------------
def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU, whose calls return when done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Shortest of ``repeats`` timed calls, in seconds (the least disturbed by other work on a shared machine)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_gflops(device: torch.device, size: int = 2048, repeats: int = 7) -> float:
    """sgemm peak: GFLOP/s of the fastest of ``repeats`` fp32 ``size x size`` square ``torch.mm`` calls."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)  # warm-up
    return 2 * size**3 / best_time(lambda: torch.mm(a, b, out=out), repeats, device) / 1e9


def sustained_sgemm_gflops(device: torch.device, seconds: float, size: int = 2048) -> float:
    """sgemm held for about ``seconds``: GFLOP/s of back-to-back fp32 ``size x size`` ``torch.mm`` calls timed as one
    stretch (a CPU's clock over a stretch as long as a timed search can sit below its clock over one short call)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    out = torch.empty(size, size, device=device)
    one = best_time(lambda: torch.mm(a, b, out=out), 1, device)  # warm-up and the length of one call
    calls = max(1, round(seconds / one))
    sync_device(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b, out=out)
    sync_device(device)
    return calls * 2 * size**3 / (time.perf_counter() - t0) / 1e9


def _cpuinfo_mhz() -> float | None:
    """Mean ``cpu MHz`` of ``/proc/cpuinfo`` (the clock the kernel reports; a VM's is the host's nominal one)."""
    try:
        with open("/proc/cpuinfo") as f:
            values = [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        return None
    return sum(values) / len(values) if values else None


def hardware_peak(threads: int) -> dict[str, Any]:
    """The FMA peak of ``threads`` cores: cores x GHz x FLOP per cycle, and where each figure comes from.

    FLOP per cycle assumes two FMA pipes per core, each ``lanes`` fp32 wide, counting 2 FLOPs per FMA: 32 with AVX2,
    64 with AVX-512F, except AMD CPUs with AVX-512 (Zen 4 splits a 512-bit FMA over its 256-bit pipes: 32). The clock
    is ``/proc/cpuinfo``'s ``cpu MHz``, not a measured one; on a VM it is the host's nominal clock, and turbo or
    throttling moves the real one.
    """
    flags = fused.cpu_flags()
    amd = fused.cpu_model().startswith("AMD")
    if "avx512f" in flags:
        isa, per_cycle = "AVX-512F", 32 if amd else 64
    elif "avx2" in flags and "fma" in flags:
        isa, per_cycle = "AVX2 + FMA", 32
    else:
        isa, per_cycle = "SSE", 8
    cores = min(threads, os.cpu_count() or threads)
    mhz = _cpuinfo_mhz()
    return {
        "model": fused.cpu_model(),
        "isa": isa,
        "cores": cores,
        "ghz": mhz / 1000 if mhz else float("nan"),
        "ghz_source": "/proc/cpuinfo cpu MHz" if mhz else "unknown",
        "flop_per_cycle": per_cycle,
        "gflops": cores * (mhz / 1000) * per_cycle if mhz else float("nan"),
    }


def measure_search(
    codebook_size: int,
    tokens: int,
    dim: int,
    repeats: int,
    device: torch.device,
    baseline_max_bytes: int,
    coarse_repeats: int = 0,
) -> dict[str, Any]:
    """Time and peak memory of ``nearest_codes`` on random ``(tokens, dim)`` queries and a ``(K, dim)`` codebook, the
    kernel ``auto`` chose and why, and with ``coarse_repeats`` the coarse + re-rank search's time and candidates."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(tokens, dim, generator=gen).to(device)  # (N, D)
    codebook = torch.randn(codebook_size, dim, generator=gen).to(device)  # (K, D)
    meter = PeakMemory(device)
    meter.start()
    indices = nearest_codes(z, codebook)  # (N,); first call: warm-up, the kernel's choice and the measured peak
    peak_bytes = meter.stop()
    choice = dispatch.last_choice()
    # On a shared machine other work slows the whole machine for seconds at a time. Each timed search is paired with
    # the sgemm peak measured right before and right after it (the larger of the two counts), so that both see the
    # same conditions; the best search is also compared with the best sgemm of the whole case. Each is also paired
    # with sgemm held for as long as the search took (the clock a CPU holds over that stretch).
    flops = 2 * tokens * codebook_size * dim
    peak_gflops, seconds, paired, sustained = sgemm_gflops(device), float("inf"), [], []
    for _ in range(repeats):
        before = sgemm_gflops(device, repeats=3)
        call = best_time(lambda: nearest_codes(z, codebook), 1, device)
        after = sgemm_gflops(device, repeats=3)
        held = sustained_sgemm_gflops(device, call)
        paired.append(flops / call / 1e9 / max(before, after))
        sustained.append(flops / call / 1e9 / held)
        seconds = min(seconds, call)
        peak_gflops = max(peak_gflops, before, after)
    result: dict[str, Any] = {
        "K": codebook_size,
        "N": tokens,
        "D": dim,
        "seconds": seconds,
        "gflops": flops / seconds / 1e9,
        "sgemm_gflops": peak_gflops,
        "ratio": flops / seconds / 1e9 / peak_gflops,
        "paired_ratios": paired,
        "paired_ratio": statistics.median(paired),
        "sustained_ratios": sustained,
        "sustained_ratio": statistics.median(sustained),
        "peak_mib": peak_bytes / 2**20,
        "memory_method": meter.method,
        "threads": torch.get_num_threads(),
        "kernel": choice.kernel if choice else "unknown",
        "kernel_reason": choice.reason if choice else "",
        "kernel_seconds": choice.seconds if choice else {},
    }
    if coarse_repeats > 0:
        result.update(_measure_coarse(z, codebook, indices, coarse_repeats, device))
    if 4 * tokens * codebook_size <= baseline_max_bytes:

        def brute_force() -> torch.Tensor:
            dist = torch.addmm(codebook.square().sum(dim=1), z, codebook.t(), alpha=-2.0)  # (N, K), all at once
            return dist.argmin(dim=1)

        base_seconds = best_time(brute_force, max(1, repeats - 1), device)
        result["baseline_seconds"] = base_seconds
        result["baseline_ratio"] = flops / base_seconds / 1e9 / peak_gflops
        result.update(_compare_with_brute_force(z, codebook, indices))
    return result


def _measure_coarse(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Time of the coarse + re-rank search on the same inputs, paired with the sgemm peak, its candidate counts, and
    rows where its indices differ from the chosen kernel's ``indices``."""
    previous = os.environ.get(dispatch.KERNEL_ENV)
    os.environ[dispatch.KERNEL_ENV] = "coarse"
    try:
        found = nearest_codes(z, codebook)  # warm-up
        stats = coarse.last_stats()
        flops = 2 * z.shape[0] * codebook.shape[0] * z.shape[1]
        seconds, paired, peak = float("inf"), [], 0.0
        for _ in range(repeats):
            before = sgemm_gflops(device, repeats=3)
            call = best_time(lambda: nearest_codes(z, codebook), 1, device)
            after = sgemm_gflops(device, repeats=3)
            paired.append(flops / call / 1e9 / max(before, after))
            seconds, peak = min(seconds, call), max(peak, before, after)
    finally:
        if previous is None:
            os.environ.pop(dispatch.KERNEL_ENV, None)
        else:
            os.environ[dispatch.KERNEL_ENV] = previous
    return {
        "coarse_seconds": seconds,
        "coarse_ratio": flops / seconds / 1e9 / peak,
        "coarse_paired_ratio": statistics.median(paired),
        "coarse_mean_candidates": stats.mean_candidates if stats else float("nan"),
        "coarse_max_candidates": stats.max_candidates if stats else 0,
        "coarse_fallback_rows": stats.fallback_rows if stats else 0,
        "coarse_native_bf16": stats.native if stats else False,
        "coarse_differs": int((found != indices).sum()),
        "coarse_wrong": _compare_with_brute_force(z, codebook, found)["wrong"],
    }


def _compare_with_brute_force(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> dict[str, int]:
    """Rows where ``indices`` differ from the full-matrix fp32 argmin, and those of them that are not near-ties.

    The full matrix and the blocked search round ``||c||^2 - 2 z.c`` in different orders, so two codes whose
    distances agree to within fp32 rounding may swap; any other difference would be a bug.
    """
    dist = torch.addmm(codebook.square().sum(dim=1), z, codebook.t(), alpha=-2.0)  # (N, K)
    reference = dist.argmin(dim=1)  # (N,)
    differ = reference != indices
    gap = dist.gather(1, indices[:, None]) - dist.gather(1, reference[:, None])  # (N, 1)
    tolerance = 1e-5 * (z.square().sum(dim=1, keepdim=True) + dist.abs().amax(dim=1, keepdim=True))  # (N, 1)
    return {"mismatches": int(differ.sum()), "wrong": int((differ[:, None] & (gap > tolerance)).sum())}


def measure_vq_step(
    codebook_size: int, tokens: int, dim: int, repeats: int, device: torch.device, against_lucidrains: bool = False
) -> dict[str, Any]:
    """Time and peak memory of one ``VectorQuantizer`` forward + backward on ``(tokens, dim)`` inputs.

    With ``against_lucidrains``, vector-quantize-pytorch's ``VectorQuantize`` (its defaults: EMA codebook, Euclidean
    distance) runs the same forward + backward on the same input in the same process: its first step's memory is
    measured after fvq's (so it may reuse memory fvq's step freed: the comparison can only flatter it), then the
    timed calls alternate between the two, and ``speedup`` is the median of the paired ratios.
    """
    torch.manual_seed(0)
    quantizer = VectorQuantizer(codebook_size, dim, init="normal", init_scale=1.0).to(device).train()
    z = torch.randn(tokens, dim, device=device, requires_grad=True)  # (N, D)

    def step() -> None:
        out = quantizer(z)
        (out.loss + out.quantized.square().mean()).backward()
        quantizer.zero_grad(set_to_none=True)
        z.grad = None

    first, peak_bytes, memory_method = _first_step(step, device)
    result: dict[str, Any] = {
        "K": codebook_size,
        "N": tokens,
        "D": dim,
        "peak_mib": peak_bytes / 2**20,
        "memory_method": memory_method,
        "threads": torch.get_num_threads(),
    }
    if against_lucidrains:
        result.update(_against_lucidrains(codebook_size, z, step, first, repeats, device))
    else:
        result["seconds"] = best_time(step, repeats, device) if repeats > 0 else first
    result["process_peak_mib"] = _status_kib("VmHWM") / 1024 if device.type == "cpu" else float("nan")
    return result


def _first_step(fn: Callable[[], None], device: torch.device) -> tuple[float, int, str]:
    """Seconds and peak memory growth of the first call of ``fn`` (warm-up and the measured peak), and how the peak
    was measured."""
    meter = PeakMemory(device)
    meter.start()
    start = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - start, meter.stop(), meter.method


def _against_lucidrains(
    codebook_size: int, z: torch.Tensor, step: Callable[[], None], first: float, repeats: int, device: torch.device
) -> dict[str, Any]:
    """vector-quantize-pytorch's figures on the input ``z`` beside fvq's ``step``, timed calls alternating (see
    :func:`measure_vq_step`)."""
    other, version = _lucidrains_quantizer(codebook_size, z.shape[1], device)
    z3 = z.detach()[None].clone().requires_grad_(True)  # (1, N, D): its (batch, sequence, dim) layout

    def other_step() -> None:
        quantized, _, loss = other(z3)
        (loss.sum() + quantized.square().mean()).backward()
        other.zero_grad(set_to_none=True)
        z3.grad = None

    other_first, other_peak, _ = _first_step(other_step, device)
    ours, theirs = [], []
    for _ in range(max(1, repeats)):
        ours.append(best_time(step, 1, device))
        theirs.append(best_time(other_step, 1, device))
    return {
        "seconds": min(ours) if repeats > 0 else first,
        "lucidrains_version": version,
        "lucidrains_seconds": min(theirs) if repeats > 0 else other_first,
        "lucidrains_peak_mib": other_peak / 2**20,
        "speedup": statistics.median(t / o for o, t in zip(ours, theirs)),
    }


_LUCIDRAINS_MISSING = (
    "error: --against-vector-quantize-pytorch needs the package vector-quantize-pytorch, which fvq does not depend on: "
    "pip install vector-quantize-pytorch into this environment after torch (so pip keeps the installed torch)"
)


def _lucidrains_quantizer(codebook_size: int, dim: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """vector-quantize-pytorch's ``VectorQuantize`` with its defaults, or an error saying how to install it."""
    try:
        from importlib.metadata import version

        from vector_quantize_pytorch import VectorQuantize
    except ImportError as err:
        raise SystemExit(_LUCIDRAINS_MISSING) from err
    return VectorQuantize(dim=dim, codebook_size=codebook_size).to(device).train(), version("vector-quantize-pytorch")


# ---- command line ---------------------------------------------------------------------------------------------------
def _vq_case(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"expected a case K:N with positive integers (e.g. 16384:8192), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=_positive, default=8192, help="queries N for the search (8192)")
    parser.add_argument("--dim", type=_positive, default=256, help="code dimension D (256)")
    parser.add_argument(
        "--codebook-sizes",
        type=_positive,
        nargs="*",
        default=list(DEFAULT_CODEBOOK_SIZES),
        help="codebook sizes K for the search (4096 16384 65536 262144); none to skip",
    )
    parser.add_argument(
        "--vq",
        type=_vq_case,
        nargs="*",
        default=[_vq_case(c) for c in DEFAULT_VQ_CASES],
        metavar="K:N",
        help="VectorQuantizer forward + backward cases (16384:8192 262144:2048); none to skip",
    )
    parser.add_argument(
        "--memory-check",
        action="store_true",
        help=f"also run one VectorQuantizer step at K:N = {MEMORY_CHECK_CASE} (about a minute on 2 cores) and check "
        "its peak memory against --memory-limit-gib",
    )
    parser.add_argument("--memory-limit-gib", type=float, default=4.0, help="limit for --memory-check (4)")
    parser.add_argument(
        "--repeats", type=_positive, default=5, help="timed calls per case; the fastest is kept, the ratios paired (5)"
    )
    parser.add_argument(
        "--baseline-max-gib",
        type=float,
        default=2.0,
        help="run the brute-force torch.mm + argmin baseline where its N x K matrix fits in this many GiB (2)",
    )
    parser.add_argument(
        "--coarse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the bf16 coarse pass + exact re-rank (FVQ_SEARCH_KERNEL=coarse), up to 2 calls a case (on)",
    )
    parser.add_argument(
        "--against-vector-quantize-pytorch",
        action="store_true",
        help="also run vector-quantize-pytorch's VectorQuantize (defaults) on each --vq case in the same process, "
        "alternating timed calls, and print fvq's speed-up (needs that package installed)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (cpu)")
    parser.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)


def _child_command(case: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "fvq.bench.search", "--_case", case, "--repeats", str(args.repeats)]
    cmd += ["--dim", str(args.dim), "--device", args.device, "--baseline-max-gib", str(args.baseline_max_gib)]
    cmd += ["--coarse" if args.coarse else "--no-coarse"]
    if args.against_vector_quantize_pytorch:
        cmd += ["--against-vector-quantize-pytorch"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _run_child(case: str, args: argparse.Namespace, label: str, expected_s: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter, printing elapsed time and an estimate while it runs."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else package_root
    print(f"  {label}: running, expected about {expected_s:.0f} s ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        _child_command(case, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(10.0):
            elapsed = time.perf_counter() - start
            left = max(0.0, expected_s - elapsed)
            print(f"    {label}: {elapsed:.0f} s elapsed, about {left:.0f} s left (estimate)", flush=True)

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    stdout, stderr = proc.communicate()
    done.set()
    ticker.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {label} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _run_case(args: argparse.Namespace) -> int:
    """Child process: run the case named by ``--_case`` and print its result as one JSON line."""
    device = torch.device(args.device)
    kind, k, n = args._case.split(":")
    if kind == "search":
        coarse_repeats = min(2, args.repeats) if args.coarse else 0
        result = measure_search(
            int(k), int(n), args.dim, args.repeats, device, int(args.baseline_max_gib * 2**30), coarse_repeats
        )
    elif kind == "vq":
        result = measure_vq_step(int(k), int(n), args.dim, args.repeats, device, args.against_vector_quantize_pytorch)
    elif kind == "vqonce":
        result = measure_vq_step(int(k), int(n), args.dim, 0, device)
    else:
        raise ValueError(f"unknown benchmark case kind {kind!r}; expected search, vq or vqonce")
    print(json.dumps(result))
    return 0


def _same_indices(result: dict[str, Any]) -> str:
    if result["wrong"]:
        return f"NO ({result['wrong']})"
    return "yes" if result["mismatches"] == 0 else f"ties {result['mismatches']}"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`) and print its tables."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._case is not None:
        return _run_case(args)
    if args.against_vector_quantize_pytorch and importlib.util.find_spec("vector_quantize_pytorch") is None:
        print(_LUCIDRAINS_MISSING, file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for CUDA, but torch.cuda.is_available() is False")
    print(
        f"fvq nearest-code search benchmark: torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, D = {args.dim}",
        flush=True,
    )
    peak = sgemm_gflops(device)
    print(f"sgemm peak (fp32 2048 x 2048 torch.mm, best of 7): {peak:.0f} GFLOP/s", flush=True)
    hardware = hardware_peak(torch.get_num_threads()) if device.type == "cpu" else None
    if hardware:
        print(
            f"hardware FMA peak: {hardware['cores']} cores x {hardware['ghz']:.2f} GHz ({hardware['ghz_source']}) x "
            f"{hardware['flop_per_cycle']} FLOP/cycle ({hardware['isa']}, two FMA pipes assumed) = "
            f"{hardware['gflops']:.0f} GFLOP/s; sgemm reaches {peak / hardware['gflops']:.0%} of it. CPU: "
            f"{hardware['model']}",
            flush=True,
        )
    rate = 0.8 * peak * 1e9  # for time estimates only
    results: dict[str, Any] = {
        "device": str(device),
        "sgemm_gflops": peak,
        "hardware_peak": hardware,
        "search": [],
        "vq": [],
    }
    started = time.perf_counter()
    failed = False

    sizes = list(args.codebook_sizes)
    if sizes:
        print(
            f"\nnearest_codes, N = {args.tokens}, D = {args.dim} (2 N K D FLOPs; best: fastest search / fastest "
            f"sgemm of the case; paired: median over {args.repeats} calls of each call / the sgemm peak measured "
            "around it; held: the same against sgemm held for as long as the call)",
            flush=True,
        )
        for i, k in enumerate(sizes, 1):
            flops = 2 * args.tokens * k * args.dim
            baseline = 4 * args.tokens * k <= args.baseline_max_gib * 2**30
            expected = (
                3
                + flops * (args.repeats + 1) / rate
                + args.repeats * 6 * 2 * 2048**3 / (peak * 1e9)  # the sgemm calls around each timed search
                + flops * args.repeats / rate  # sgemm held as long as each timed search
                + (flops * args.repeats / (0.4 * peak * 1e9) if baseline else 0)
                + (flops * 3 / (0.5 * peak * 1e9) if args.coarse else 0)
            )
            res = _run_child(f"search:{k}:{args.tokens}", args, f"[{i}/{len(sizes)}] K = {k}", expected)
            results["search"].append(res)
        print(
            f"\n{'K':>8} {'time':>9} {'GFLOP/s':>8} {'sgemm':>7} {'best':>6} {'paired':>7} {'held':>6} "
            f"{'peak mem':>9}   "
            f"{'mm+argmin':>10} {'ratio':>6} {'same idx':>8}  kernel"
        )
        for r in results["search"]:
            base = (
                f"{_fmt_seconds(r['baseline_seconds']):>10} {r['baseline_ratio']:>6.0%} {_same_indices(r):>8}"
                if "baseline_seconds" in r
                else f"{'-':>10} {'-':>6} {'-':>8}"
            )
            print(
                f"{r['K']:>8} {_fmt_seconds(r['seconds']):>9} {r['gflops']:>8.0f} {r['sgemm_gflops']:>7.0f} "
                f"{r['ratio']:>6.0%} {r['paired_ratio']:>7.0%} {r['sustained_ratio']:>6.0%} "
                f"{r['peak_mib']:>6.0f} MiB   {base}  {r['kernel']}"
            )
        print("\nkernel chosen by FVQ_SEARCH_KERNEL / auto, and why:")
        for r in results["search"]:
            print(f"  K = {r['K']}: {r['kernel']}: {r['kernel_reason']}")
        if args.coarse:
            print(
                "\ncoarse pass + exact re-rank (FVQ_SEARCH_KERNEL=coarse; x sgemm: the multiple of the fp32 sgemm "
                "peak, best / paired; candidates: codes re-ranked per row, mean / max; fallback: rows over the cap)"
            )
            print(
                f"{'K':>8} {'time':>9} {'x sgemm':>8} {'paired':>7} {'cand mean':>10} {'max':>5} {'fallback':>9} "
                f"{'coarse matmul':>26} {'differs':>8} {'wrong':>6}"
            )
            for r in results["search"]:
                how = "bf16 matrix units" if r["coarse_native_bf16"] else "bf16 values in fp32 sgemm"
                print(
                    f"{r['K']:>8} {_fmt_seconds(r['coarse_seconds']):>9} {r['coarse_ratio']:>7.2f}x "
                    f"{r['coarse_paired_ratio']:>6.2f}x {r['coarse_mean_candidates']:>10.2f} "
                    f"{r['coarse_max_candidates']:>5} {r['coarse_fallback_rows']:>9} {how:>26} "
                    f"{r['coarse_differs']:>8} {r['coarse_wrong']:>6}"
                )
            print(
                "(differs: rows whose index differs from the chosen kernel's: 0 against a fused kernel, whose fp32 "
                "order the re-rank shares; fp32 near-ties against the blocked search; wrong: not a near-tie of the "
                "full-matrix argmin)"
            )

    vq_cases = [("vq", k, n) for k, n in args.vq]
    if args.memory_check:
        k, n = _vq_case(MEMORY_CHECK_CASE)
        vq_cases.append(("vqonce", k, n))
    if vq_cases:
        print(
            f"\nVectorQuantizer forward + backward, D = {args.dim} (peak: memory growth during the first step)",
            flush=True,
        )
        for i, (kind, k, n) in enumerate(vq_cases, 1):
            steps = 1 if kind == "vqonce" else args.repeats + 1
            expected = 3 + steps * 2 * n * k * args.dim / rate
            if kind == "vq" and args.against_vector_quantize_pytorch:
                expected *= 4  # its step: about 3x fvq's on CPU
            res = _run_child(f"{kind}:{k}:{n}", args, f"[{i}/{len(vq_cases)}] K = {k}, N = {n}", expected)
            res["memory_check"] = kind == "vqonce"
            results["vq"].append(res)
        print(f"\n{'K':>8} {'N':>7} {'time':>9} {'peak mem':>10} {'process peak':>13}")
        for r in results["vq"]:
            line = (
                f"{r['K']:>8} {r['N']:>7} {_fmt_seconds(r['seconds']):>9} {r['peak_mib']:>6.0f} MiB "
                f"{r['process_peak_mib']:>9.0f} MiB"
            )
            if "speedup" in r:
                line += (
                    f"   vector-quantize-pytorch {r['lucidrains_version']}: {_fmt_seconds(r['lucidrains_seconds'])}, "
                    f"{r['lucidrains_peak_mib']:.0f} MiB; fvq {r['speedup']:.2f}x faster (median of paired calls)"
                )
            if r["memory_check"]:
                ok = r["peak_mib"] <= args.memory_limit_gib * 1024
                failed |= not ok
                line += f"   memory check: {'PASS' if ok else 'FAIL'} (limit {args.memory_limit_gib:g} GiB)"
            print(line)
        print(
            f"(peak mem: {results['vq'][0]['memory_method']} during the first step, on top of the codebook, inputs "
            "and torch already in memory; process peak: the whole process's peak resident size)"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    mismatched = any(r.get("wrong", 0) or r.get("coarse_wrong", 0) for r in results["search"])
    if mismatched:
        print("error: nearest_codes disagreed with the brute-force argmin (see 'same idx')", file=sys.stderr)
    elif any(r.get("mismatches", 0) for r in results["search"]):
        print(
            "'ties N': N rows where two codes are equally near to within fp32 rounding and the two orders of "
            "summation picked different ones"
        )
    return 1 if mismatched or (args.memory_check and failed) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fvq.bench.search", description=__doc__.strip().splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
