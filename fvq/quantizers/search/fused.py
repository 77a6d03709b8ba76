"""The fused CPU kernel of the nearest-code search: distances and argmin in one pass, for AVX2 + FMA CPUs.

The blocked search (:mod:`fvq.quantizers.search.blocked`) computes distances block by block with sgemm and reduces
each block while it is in cache. On CPUs whose widest vector unit is AVX2 (AMD Zen, Intel before AVX-512) a kernel of
its own does better: a 6 x 16 register tile of distances is folded into running minima before it ever reaches memory,
so no pass over a distance block is left to make (``kernels/nearest_codes_avx2.c``; docs/benchmarks.md has the
figures).

The C source ships with the package and is compiled on first use with the system C compiler (``$CC``, else ``cc``
or ``gcc``) into a cache folder (``$FVQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/fvq`` or ``~/.cache/fvq``), keyed by the
source, the compiler and its flags; later processes load the cached library. It is called through ``ctypes`` with
the GIL released and runs ``torch.get_num_threads()`` threads of its own.

``FVQ_SEARCH_KERNEL`` picks the kernel: ``auto`` (default: the fused kernel where torch reports AVX2 as the CPU's
widest capability and the kernel builds, the blocked sgemm search elsewhere), ``fused`` (always; an error where it
cannot run) or ``blocked`` (never).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from fvq.weights import atomic_path

SOURCE = Path(__file__).with_name("kernels") / "nearest_codes_avx2.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread")
KERNEL_ENV = "FVQ_SEARCH_KERNEL"
KERNEL_CHOICES = ("auto", "fused", "blocked")
# distances below this bound cannot overflow fp32 (3.4e38) in any order of summation, with room for rounding
_FINITE_BOUND = 1e37


class FusedKernelUnavailable(RuntimeError):
    """The fused kernel cannot run here (no compiler, a failed build, or a CPU without AVX2 + FMA)."""


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


def cache_dir() -> Path:
    """Folder of compiled kernels: ``$FVQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/fvq``, else ``~/.cache/fvq``."""
    if os.environ.get("FVQ_CACHE_DIR"):
        return Path(os.environ["FVQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fvq"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def build(target_dir: Path | None = None) -> Path:
    """Compile the kernel (unless a build of the same source, compiler and flags is cached) and return its path.

    The library is written under a temporary name and renamed into place, so a process never loads a half-written
    file, and processes building at once do not disturb each other.

    Raises:
        FusedKernelUnavailable: without a C compiler, or when the compiler fails (its message is included).
    """
    cc = _compiler()
    if cc is None:
        raise FusedKernelUnavailable("no C compiler found (set $CC, or install gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join((cc, *FLAGS, _compiler_version(cc))).encode()).hexdigest()[:16]
    folder = target_dir or cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / f"fvq-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"nearest_codes_avx2-{key}.so"
    if target.exists():
        return target
    try:
        with atomic_path(target) as partial:
            done = subprocess.run(
                [cc, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                raise FusedKernelUnavailable(f"{cc} failed to build {SOURCE.name}:\n{done.stderr.strip()[-2000:]}")
            os.chmod(partial, 0o755)
    except (OSError, subprocess.SubprocessError) as err:
        raise FusedKernelUnavailable(f"could not build {SOURCE.name} with {cc}: {err}") from err
    return target


def _load() -> ctypes.CDLL:
    """The compiled kernel, built and loaded once per process; raises :class:`FusedKernelUnavailable`."""
    global _library, _failure
    with _lock:
        if _library is not None:
            return _library
        if _failure is not None:
            raise FusedKernelUnavailable(_failure)
        try:
            if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
                raise FusedKernelUnavailable(
                    f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
                )
            library = ctypes.CDLL(str(build()))
        except (FusedKernelUnavailable, OSError) as err:
            _failure = str(err)
            raise FusedKernelUnavailable(_failure) from err
        fn = library.fvq_nearest_codes
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_int, ptr]
        fn.restype = ctypes.c_int
        _library = library
        return library


def kernel_choice() -> str:
    """``$FVQ_SEARCH_KERNEL`` (``auto`` when unset), checked against :data:`KERNEL_CHOICES`."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNEL_CHOICES)}; got {choice!r}")
    return choice


def wanted(device: torch.device) -> bool:
    """Whether the search on ``device`` should use the fused kernel, by ``$FVQ_SEARCH_KERNEL`` and the CPU.

    ``auto`` takes it on CPUs whose widest capability torch reports as AVX2 (on AVX-512 CPUs the blocked search's
    sgemm uses the wider unit) and where it builds; a build failure is reported once as a warning. ``fused`` takes
    it everywhere on CPU and raises where it cannot run.
    """
    choice = kernel_choice()
    if device.type != "cpu":
        if choice == "fused":
            raise FusedKernelUnavailable(f"{KERNEL_ENV}=fused, but the fused kernel runs on CPU only, not {device}")
        return False
    if choice == "blocked" or (choice == "auto" and torch.backends.cpu.get_cpu_capability() != "AVX2"):
        return False
    first_failure = _failure is None and _library is None
    try:
        _load()
    except FusedKernelUnavailable as err:
        if choice == "fused":
            raise FusedKernelUnavailable(f"{KERNEL_ENV}=fused, but the fused kernel cannot run: {err}") from err
        if first_failure:
            warnings.warn(
                f"fvq: the fused nearest-code kernel is unavailable, using the blocked search: {err}", stacklevel=3
            )
        return False
    return True


def distances_are_finite(z: Tensor, code_sq: Tensor) -> bool:
    """True when every fp32 distance ``||c||^2 - 2 z.c`` is finite whatever the order of summation: all inputs are
    finite and ``max ||c||^2 + 2 sqrt(D) max |z| max ||c||`` stays far below the fp32 maximum."""
    if z.numel() == 0:
        return True
    z_max = float(z.detach().abs().amax())
    c_max = float(code_sq.max())
    if not (z_max < float("inf") and c_max < float("inf")):  # also False for NaN
        return False
    return c_max + 2.0 * (z.shape[1] ** 0.5) * z_max * c_max**0.5 < _FINITE_BOUND


def nearest_codes_fused(z: Tensor, codebook: Tensor, code_sq: Tensor, out: Tensor | None = None) -> Tensor:
    """Nearest code of each row of ``z`` (``(N, D)``) among the rows of ``codebook`` (``(K, D)``), ``(N,)`` int64.

    ``code_sq`` is ``||c_k||^2`` in fp32 (``(K,)``). The caller checks :func:`distances_are_finite`; inputs of
    other dtypes are cast to fp32. Ties go to the lowest index, and identical codes always tie exactly (every code's
    dot product is summed in the same order). ``out``, if given, is an ``(N,)`` int64 CPU tensor written in place.

    Raises:
        FusedKernelUnavailable: where the kernel cannot run.
        ValueError: on shapes, devices or an ``out`` that do not fit together, or K of 2**31 or more.
        MemoryError: when the kernel's scratch memory cannot be allocated.
    """
    library = _load()
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1] or code_sq.shape != codebook.shape[:1]:
        raise ValueError(
            "nearest_codes_fused expects z (N, D), codebook (K, D) and code_sq (K,); got "
            f"{tuple(z.shape)}, {tuple(codebook.shape)} and {tuple(code_sq.shape)}"
        )
    (n, d), k = z.shape, codebook.shape[0]
    if not (z.device.type == codebook.device.type == code_sq.device.type == "cpu"):
        raise ValueError(f"the fused kernel runs on CPU tensors; got {z.device}, {codebook.device}, {code_sq.device}")
    if out is None:
        out = torch.empty(n, dtype=torch.long)
    elif out.shape != (n,) or out.dtype != torch.long or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous ({n},) int64 CPU tensor, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if k >= 2**31:
        raise ValueError(f"the fused kernel indexes codes with int32, so K must be below 2**31; got K = {k}")
    z32 = z.detach().float()
    z32 = z32 if z32.stride(1) == 1 else z32.contiguous()
    c32 = codebook.detach().float()
    c32 = c32 if c32.stride(1) == 1 else c32.contiguous()
    sq = code_sq.detach().float().contiguous()
    if n == 0:
        return out
    status = library.fvq_nearest_codes(
        z32.data_ptr(), n, z32.stride(0), c32.data_ptr(), sq.data_ptr(), k, c32.stride(0), d,
        torch.get_num_threads(), out.data_ptr(),
    )  # fmt: skip
    if status == 1:
        raise MemoryError("the fused nearest-code kernel could not allocate its scratch memory")
    if status != 0:
        raise RuntimeError(f"the fused nearest-code kernel failed to start its threads (status {status})")
    return out
