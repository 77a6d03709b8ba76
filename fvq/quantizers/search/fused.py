"""The fused CPU kernels of the nearest-code search: distances and argmin in one pass.

The blocked search (:mod:`fvq.quantizers.search.blocked`) computes distances block by block with sgemm and reduces
each block while it is in cache. The fused kernels do better on CPUs where they have been measured: a register tile
of distances is folded into running minima before it ever reaches memory, so no pass over a distance block is left to
make (docs/benchmarks.md has the figures). There are two, with the same arithmetic (every distance is the augmented
dot product ``[-2 z, 1] . [c, ||c||^2]`` summed in index order from 0, one fused multiply-add per term, so both give
the distances of :func:`fvq.quantizers.search.reference.reference_distances` bit for bit):

* ``avx2`` (``kernels/nearest_codes_avx2.c``): AVX2 + FMA, a 6 x 16 tile of 8-lane vectors;
* ``avx512`` (``kernels/nearest_codes_avx512.c``): AVX-512F, a 12 x 32 tile of 16-lane vectors. Its exactness tests
  have not yet run on an AVX-512 CPU, so it is not in :data:`VERIFIED_KERNELS` and the measured dispatch never picks
  it; ``FVQ_SEARCH_KERNEL=avx512`` forces it (docs/benchmarks.md says how to verify it).

Each C source ships with the package and is compiled on first use with the system C compiler (``$CC``, else ``cc``
or ``gcc``) into its own shared object in a cache folder (``$FVQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/fvq`` or
``~/.cache/fvq``), keyed by the source, the compiler and its flags; later processes load the cached library. Building
does not need the ISA, running does. A kernel is called through ``ctypes`` with the GIL released and runs
``torch.get_num_threads()`` threads of its own. Which kernel a search uses is decided in
:mod:`fvq.quantizers.search.dispatch`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fvq.weights import atomic_path

_KERNEL_DIR = Path(__file__).with_name("kernels")
_COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-pthread")


@dataclass(frozen=True)
class FusedKernel:
    """One fused kernel: its C source, the ISA flags it is compiled with, and the CPU flags it needs to run."""

    name: str
    source: Path
    isa_flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]  # as /proc/cpuinfo spells them

    @property
    def flags(self) -> tuple[str, ...]:
        return (_COMMON_FLAGS[0], *self.isa_flags, *_COMMON_FLAGS[1:])


KERNELS = {
    "avx2": FusedKernel("avx2", _KERNEL_DIR / "nearest_codes_avx2.c", ("-mavx2", "-mfma"), ("avx2", "fma")),
    "avx512": FusedKernel("avx512", _KERNEL_DIR / "nearest_codes_avx512.c", ("-mavx512f", "-mfma"), ("avx512f",)),
}
# Kernels whose exactness tests (tests/quantizers/test_fused_search.py, test_search.py) have passed on a CPU with
# their ISA. Only these take part in the measured choice of ``auto``. ``avx512`` has been compiled (its build is
# tested everywhere) but never run: add it here once ``FVQ_SEARCH_KERNEL=avx512`` passes those tests on an AVX-512
# CPU (docs/benchmarks.md, "Verifying the AVX-512 kernel").
VERIFIED_KERNELS = frozenset({"avx2"})
# kept for callers of the AVX2 kernel's build
SOURCE = KERNELS["avx2"].source
FLAGS = KERNELS["avx2"].flags
# distances below this bound cannot overflow fp32 (3.4e38) in any order of summation, with room for rounding
_FINITE_BOUND = 1e37


class FusedKernelUnavailable(RuntimeError):
    """A fused kernel cannot run here (no compiler, a failed build, or a CPU without its ISA)."""


_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL] = {}
_failures: dict[str, str] = {}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read); read once a process."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``unknown CPU`` where it cannot be read); read once a process."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_supports(kernel: str) -> bool:
    """Whether this CPU has the ISA of ``kernel``: by ``/proc/cpuinfo`` flags, else by torch's CPU capability."""
    flags = cpu_flags()
    if flags:
        return all(f in flags for f in KERNELS[kernel].cpu_flags)
    capability = torch.backends.cpu.get_cpu_capability()
    return capability == "AVX512" if kernel == "avx512" else capability in ("AVX2", "AVX512")


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


def build(target_dir: Path | None = None, kernel: str = "avx2") -> Path:
    """Compile ``kernel`` (unless a build of the same source, compiler and flags is cached) and return its path.

    Compiling needs only the compiler, not a CPU with the kernel's ISA.

    The library is written under a temporary name and renamed into place, so a process never loads a half-written
    file, and processes building at once do not disturb each other.

    Raises:
        FusedKernelUnavailable: without a C compiler, or when the compiler fails (its message is included).
    """
    cc = _compiler()
    if cc is None:
        raise FusedKernelUnavailable("no C compiler found (set $CC, or install gcc)")
    spec = KERNELS[kernel]
    source = spec.source.read_bytes()
    key = hashlib.sha256(source + "\0".join((cc, *spec.flags, _compiler_version(cc))).encode()).hexdigest()[:16]
    folder = target_dir or cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / f"fvq-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{spec.source.stem}-{key}.so"
    if target.exists():
        return target
    try:
        with atomic_path(target) as partial:
            done = subprocess.run(
                [cc, *spec.flags, "-o", str(partial), str(spec.source)], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                raise FusedKernelUnavailable(f"{cc} failed to build {spec.source.name}:\n{done.stderr.strip()[-2000:]}")
            os.chmod(partial, 0o755)
    except (OSError, subprocess.SubprocessError) as err:
        raise FusedKernelUnavailable(f"could not build {spec.source.name} with {cc}: {err}") from err
    return target


def _load(kernel: str = "avx2") -> ctypes.CDLL:
    """The compiled ``kernel``, built and loaded once per process; raises :class:`FusedKernelUnavailable`."""
    with _lock:
        if kernel in _libraries:
            return _libraries[kernel]
        if kernel in _failures:
            raise FusedKernelUnavailable(_failures[kernel])
        try:
            if not cpu_supports(kernel):
                needs = " + ".join(f.upper() for f in KERNELS[kernel].cpu_flags)
                raise FusedKernelUnavailable(f"the {kernel} kernel needs {needs}; this CPU lacks it")
            library = ctypes.CDLL(str(build(kernel=kernel)))
        except (FusedKernelUnavailable, OSError) as err:
            _failures[kernel] = str(err)
            raise FusedKernelUnavailable(_failures[kernel]) from err
        fn = library.fvq_nearest_codes
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_int, ptr]
        fn.restype = ctypes.c_int
        if hasattr(library, "fvq_rerank"):
            library.fvq_rerank.argtypes = [ptr, i64, i64, ptr, ptr, i64, ctypes.c_int, ptr, i64, ptr]
            library.fvq_rerank.restype = None
        _libraries[kernel] = library
        return library


def available(kernel: str) -> tuple[bool, str]:
    """Whether ``kernel`` can run here, and why not (``""`` when it can)."""
    try:
        _load(kernel)
    except FusedKernelUnavailable as err:
        return False, str(err)
    return True, ""


def distances_are_finite(z: Tensor, code_sq: Tensor) -> bool:
    """True when every fp32 distance ``||c||^2 - 2 z.c`` is finite whatever the order of summation: all inputs are
    finite, ``-2 z`` is finite in fp32, and ``max ||c||^2 + 2 sqrt(D) max |z| max ||c||`` stays far below the fp32
    maximum."""
    if z.numel() == 0:
        return True
    z_max = float(z.detach().abs().amax())
    c_max = float(code_sq.max())
    if not (z_max < float("inf") and c_max < float("inf")):  # also False for NaN
        return False
    if 2.0 * z_max > torch.finfo(torch.float32).max:  # the exact scaling -2 z would overflow
        return False
    return c_max + 2.0 * (z.shape[1] ** 0.5) * z_max * c_max**0.5 < _FINITE_BOUND


def nearest_codes_fused(
    z: Tensor, codebook: Tensor, code_sq: Tensor, out: Tensor | None = None, kernel: str = "avx2"
) -> Tensor:
    """Nearest code of each row of ``z`` (``(N, D)``) among the rows of ``codebook`` (``(K, D)``), ``(N,)`` int64.

    ``code_sq`` is ``||c_k||^2`` in fp32 (``(K,)``). The caller checks :func:`distances_are_finite`; inputs of
    other dtypes are cast to fp32. Ties go to the lowest index, and identical codes always tie exactly (every code's
    dot product is summed in the same order). ``out``, if given, is an ``(N,)`` int64 CPU tensor written in place.
    ``kernel`` is ``avx2`` or ``avx512`` (:data:`KERNELS`).

    Raises:
        FusedKernelUnavailable: where the kernel cannot run.
        ValueError: on shapes, devices or an ``out`` that do not fit together, or K of 2**31 or more.
        MemoryError: when the kernel's scratch memory cannot be allocated.
    """
    library = _load(kernel)
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
        raise RuntimeError(f"the fused nearest-code kernel ({kernel}) failed to start its threads (status {status})")
    return out


def rerank(z: Tensor, codebook: Tensor, code_sq: Tensor, cand: Tensor, out: Tensor) -> Tensor:
    """Exact re-rank on CPU by the AVX2 library's ``fvq_rerank``: for each row of ``z`` (``(n, D)``), the code of
    ``cand`` (``(n, C)`` int64, ascending) at the lowest fixed-order fp32 distance, ties to the lowest; into ``out``
    (``(n,)`` int64 CPU, contiguous). Raises :class:`FusedKernelUnavailable` where the library cannot run."""
    library = _load("avx2")
    z32 = z.detach().float().contiguous()
    c32 = codebook.detach().float()
    c32 = c32 if c32.stride(1) == 1 else c32.contiguous()
    sq = code_sq.detach().float().contiguous()
    cand = cand.contiguous()
    if z32.shape[0] != cand.shape[0] or out.shape != (z32.shape[0],) or not out.is_contiguous():
        raise ValueError(
            f"rerank expects z (n, D), cand (n, C) and out (n,); got {tuple(z.shape)}, "
            f"{tuple(cand.shape)} and {tuple(out.shape)}"
        )
    library.fvq_rerank(
        z32.data_ptr(), z32.shape[0], z32.stride(0), c32.data_ptr(), sq.data_ptr(), c32.stride(0), z32.shape[1],
        cand.data_ptr(), cand.shape[1], out.data_ptr(),
    )  # fmt: skip
    return out
