"""Which search runs: ``FVQ_SEARCH_KERNEL``, and in ``auto`` a short one-time measurement of the eligible kernels.

Kernels (names as ``FVQ_SEARCH_KERNEL`` takes them):

* ``avx2``, ``avx512``: the fused CPU kernels of :mod:`fvq.quantizers.search.fused` (``fused`` names the verified
  fused kernel this CPU runs, i.e. ``avx2``);
* ``blocked``: the blocked sgemm search of :mod:`fvq.quantizers.search.blocked` (any device);
* ``coarse``: the bf16 coarse pass + exact fp32 re-rank of :mod:`fvq.quantizers.search.coarse` (any device).

``auto`` (the default) chooses by measurement, not by the widest ISA. The eligible kernels on a device are
``blocked``, every fused kernel in :data:`fvq.quantizers.search.fused.VERIFIED_KERNELS` that this CPU runs, and
``coarse`` where the device has native bf16 matrix units (emulated bf16 is slow). With more than one eligible, the
first search of a shape class (device, threads, D, and K and N by powers of two) times each of them on a slice of its
own inputs (up to 1,024 queries x 8,192 codes), alternating, best of :data:`_ROUNDS`, and keeps the fastest for the
rest of the process. ``FVQ_SEARCH_TUNING`` says how: ``measure`` (default: once per process), ``persist`` (also
stored in ``search-dispatch.json`` beside the compiled kernels, keyed by CPU model, threads and shape class, and read
back by later processes) or ``off``. The deterministic rule used without a measurement (``off``, searches too small
to be worth timing, a single eligible kernel, or a failed measurement): the verified fused kernel whose ISA is the
CPU's widest, else ``blocked``. :func:`last_choice` tells which kernel the latest search took and why.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fvq.quantizers.search import coarse, fused
from fvq.weights import atomic_path

KERNEL_ENV = "FVQ_SEARCH_KERNEL"
KERNEL_CHOICES = ("auto", "fused", "avx2", "avx512", "blocked", "coarse")
TUNING_ENV = "FVQ_SEARCH_TUNING"
TUNING_CHOICES = ("measure", "persist", "off")
# searches below this many multiply-adds (N K D) use the deterministic rule: timing them would cost more than it saves
MIN_MEASURED_WORK = 2**28
_SAMPLE_ROWS = 1024
_SAMPLE_CODES = 8192
_ROUNDS = 3
_PERSIST_FILE = "search-dispatch.json"


@dataclass(frozen=True)
class Choice:
    """The kernel a search takes and why.

    Attributes:
        kernel: ``avx2``, ``avx512``, ``blocked`` or ``coarse``.
        reason: One line: forced, measured (with the figures), or the deterministic rule and why it applied.
        seconds: Best measured seconds of each eligible kernel on the sample (empty when nothing was measured).
        sample: ``(rows, codes, D)`` of the measured sample (``None`` when nothing was measured).
    """

    kernel: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    sample: tuple[int, int, int] | None = None


class _Last(threading.local):
    choice: Choice | None = None


_LAST = _Last()
_lock = threading.Lock()
_measured: dict[tuple, Choice] = {}
_warned: set[str] = set()


def last_choice() -> Choice | None:
    """The choice of the latest search on this thread (``None`` before the first)."""
    return _LAST.choice


def kernel_choice() -> str:
    """``$FVQ_SEARCH_KERNEL`` (``auto`` when unset), checked against :data:`KERNEL_CHOICES`."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNEL_CHOICES)}; got {choice!r}")
    return choice


def tuning() -> str:
    """``$FVQ_SEARCH_TUNING`` (``measure`` when unset), checked against :data:`TUNING_CHOICES`."""
    value = os.environ.get(TUNING_ENV, "measure").strip().lower() or "measure"
    if value not in TUNING_CHOICES:
        raise ValueError(f"{TUNING_ENV} must be one of {', '.join(TUNING_CHOICES)}; got {value!r}")
    return value


def _usable_fused(kernel: str, choice: str) -> bool:
    """Whether fused ``kernel`` runs here; in ``auto`` a build failure is reported once as a warning."""
    ok, why = fused.available(kernel)
    if not ok and choice == "auto" and fused.cpu_supports(kernel) and kernel not in _warned:
        _warned.add(kernel)
        warnings.warn(
            f"fvq: the fused nearest-code kernel is unavailable, using the blocked search: {why}", stacklevel=4
        )
    return ok


def eligible(device: torch.device) -> list[str]:
    """Kernels ``auto`` may take on ``device``, in the order of the deterministic rule's preference."""
    if device.type != "cpu":
        return ["blocked", "coarse"] if coarse.native_bf16(device) else ["blocked"]
    verified = [k for k in ("avx512", "avx2") if k in fused.VERIFIED_KERNELS and fused.cpu_supports(k)]
    kernels = [k for k in verified if _usable_fused(k, "auto")] + ["blocked"]
    if coarse.native_bf16(device):
        kernels.append("coarse")
    return kernels


def rule(device: torch.device, kernels: list[str]) -> str:
    """The deterministic choice: the verified fused kernel whose ISA is the CPU's widest, else ``blocked``."""
    if device.type == "cpu":
        widest = "avx512" if fused.cpu_supports("avx512") else "avx2" if fused.cpu_supports("avx2") else None
        if widest in kernels:
            return widest
    return "blocked"


def forced(device: torch.device, choice: str) -> Choice:
    """The kernel named by ``FVQ_SEARCH_KERNEL``; raises :class:`~fvq.quantizers.search.fused.FusedKernelUnavailable`
    where a fused one cannot run."""
    if choice in ("blocked", "coarse"):
        return Choice(choice, f"{KERNEL_ENV}={choice}")
    if device.type != "cpu":
        raise fused.FusedKernelUnavailable(
            f"{KERNEL_ENV}={choice}, but the fused kernels run on CPU only, not {device}"
        )
    kernel = "avx2" if choice == "fused" else choice
    ok, why = fused.available(kernel)
    if not ok:
        raise fused.FusedKernelUnavailable(f"{KERNEL_ENV}={choice}, but the fused kernel cannot run: {why}")
    note = "" if kernel in fused.VERIFIED_KERNELS else " (not yet verified on this ISA; forced)"
    return Choice(kernel, f"{KERNEL_ENV}={choice}{note}")


def shape_class(device: torch.device, n: int, k: int, d: int) -> tuple:
    """Key of a measured choice: device, threads, D, and K and N rounded to powers of two."""
    return (str(device), torch.get_num_threads(), d, max(1, k).bit_length(), max(1, min(n, _SAMPLE_ROWS)).bit_length())


def choose(
    z: Tensor, codebook: Tensor, code_sq: Tensor, run: Callable[[str, Tensor, Tensor, Tensor], Tensor]
) -> Choice:
    """The kernel for this search (module docstring); ``run(kernel, z, codebook, code_sq)`` runs one for timing.

    The measurement only runs where every distance is finite (the caller checks), on the first
    ``min(N, 1024)`` queries and ``min(K, 8192)`` codes.
    """
    result = known_choice(z, codebook)
    if result is None:
        kernels = eligible(z.device)
        result = _measured_choice(z, codebook, code_sq, run, kernels, rule(z.device, kernels), tuning())
    _LAST.choice = result
    return result


def known_choice(z: Tensor, codebook: Tensor) -> Choice | None:
    """The kernel for a search of these shapes where it is settled without running anything or reading a value
    (forced, the only eligible one, the rule, or already measured for this shape class); ``None`` where ``auto``
    still has to measure."""
    device = z.device
    choice = kernel_choice()
    if choice != "auto":
        return forced(device, choice)
    kernels = eligible(device)
    (n, d), k = z.shape, codebook.shape[0]
    default = rule(device, kernels)
    mode = tuning()
    if len(kernels) == 1:
        return Choice(default, f"the only eligible kernel on {device}")
    if mode == "off":
        return Choice(default, f"{TUNING_ENV}=off: the deterministic rule (widest verified fused ISA)")
    if n * k * d < MIN_MEASURED_WORK:
        return Choice(default, "too small to time (N K D < 2^28): the deterministic rule")
    return _measured.get((*shape_class(device, n, k, d), tuple(kernels)))


def _measured_choice(
    z: Tensor,
    codebook: Tensor,
    code_sq: Tensor,
    run: Callable[[str, Tensor, Tensor, Tensor], Tensor],
    kernels: list[str],
    default: str,
    mode: str,
) -> Choice:
    (n, d), k = z.shape, codebook.shape[0]
    key = (*shape_class(z.device, n, k, d), tuple(kernels))
    with _lock:
        if key in _measured:
            return _measured[key]
        stored = _read_persisted(key) if mode == "persist" else None
        if stored is not None:
            _measured[key] = stored
            return stored
        rows, codes = min(n, _SAMPLE_ROWS), min(k, _SAMPLE_CODES)
        zs, cs, sqs = z[:rows], codebook[:codes], code_sq[:codes]
        best = {name: math.inf for name in kernels}
        try:
            for name in kernels:  # warm-up: builds, first-touch of buffers
                run(name, zs, cs, sqs)
            for _ in range(_ROUNDS):  # alternating, so that a slow spell of a shared machine hits every kernel
                for name in kernels:
                    start = time.perf_counter()
                    run(name, zs, cs, sqs)
                    if z.device.type == "cuda":
                        torch.cuda.synchronize(z.device)
                    best[name] = min(best[name], time.perf_counter() - start)
        except (RuntimeError, MemoryError) as err:  # a kernel failed: keep the deterministic rule
            result = Choice(default, f"measurement failed ({err}): the deterministic rule")
            _measured[key] = result
            return result
        fastest = min(kernels, key=lambda name: best[name])  # ties: the earlier (preferred) kernel
        flops = 2 * rows * codes * d
        figures = ", ".join(f"{name} {flops / best[name] / 1e9:.0f} GFLOP/s" for name in kernels)
        result = Choice(
            fastest,
            f"measured on {rows} x {codes} x {d} (best of {_ROUNDS}, alternating): {figures}",
            seconds=dict(best),
            sample=(rows, codes, d),
        )
        _measured[key] = result
        if mode == "persist":
            _write_persisted(key, result)
        return result


def _persist_path() -> Path:
    return fused.cache_dir() / _PERSIST_FILE


def _persist_key(key: tuple) -> str:
    return json.dumps([fused.cpu_model(), *key])


def _read_persisted(key: tuple) -> Choice | None:
    try:
        entry = json.loads(_persist_path().read_text()).get(_persist_key(key))
    except (OSError, ValueError):
        return None
    if not entry or entry.get("kernel") not in key[-1]:
        return None
    return Choice(
        entry["kernel"],
        f"{entry['reason']} (stored in {_persist_path()})",
        seconds=dict(entry.get("seconds", {})),
        sample=tuple(entry["sample"]) if entry.get("sample") else None,
    )


def _write_persisted(key: tuple, result: Choice) -> None:
    path = _persist_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[_persist_key(key)] = {
            "kernel": result.kernel,
            "reason": result.reason,
            "seconds": result.seconds,
            "sample": list(result.sample) if result.sample else None,
        }
        with atomic_path(path) as partial:
            Path(partial).write_text(json.dumps(table, indent=1))
    except OSError:
        pass  # persisting is an optimisation; the process keeps its own measurement


def note_choice(choice: Choice) -> None:
    """Record ``choice`` as this thread's latest (:func:`last_choice`), for a search that settled it itself."""
    _LAST.choice = choice


def note_non_finite() -> None:
    """Record that a search went to the blocked search for non-finite or overflowing inputs (after checking
    ``FVQ_SEARCH_KERNEL``)."""
    kernel_choice()
    _LAST.choice = Choice(
        "blocked", "non-finite or overflowing distances: the blocked search (torch.argmin's NaN rule)"
    )


def clear_measurements() -> None:
    """Forget this process's measured choices (for tests and benchmarks)."""
    with _lock:
        _measured.clear()
