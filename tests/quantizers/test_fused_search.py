"""The fused nearest-code kernels (AVX2; AVX-512, skipped without AVX-512F): tile, chunk and thread edges, exact ties,
strides, fallbacks, the build cache."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from search_kernels import use_search_kernel

from fvq.quantizers import nearest_codes
from fvq.quantizers.search import blocked, dispatch, reference
from fvq.quantizers.search import fused as fused_search


@pytest.fixture(autouse=True, params=["avx2", "avx512"])
def fused(request, monkeypatch):
    """Each fused kernel through ``FVQ_SEARCH_KERNEL`` (the AVX-512 one skips on CPUs without AVX-512F)."""
    use_search_kernel(monkeypatch, request.param)
    return request.param


def _brute_force(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    dist = (z.double()[:, None, :] - codebook.double()[None, :, :]).square().sum(-1)  # (N, K)
    return dist.argmin(dim=1)


def _integer_data(n, k, d, seed, high=3):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(-high, high + 1, (n, d), generator=gen).float(),
        torch.randint(-high, high + 1, (k, d), generator=gen).float(),
    )


# N off the 6- and 12-row tiles and the 4,096-row chunks of a thread, K off the 16- and 32-code tiles and the
# 256-code chunks
@pytest.mark.parametrize(
    "n,k,d",
    [(1, 1, 1), (5, 15, 3), (7, 17, 4), (13, 255, 5), (61, 257, 8), (25, 31, 3), (4099, 300, 2), (8200, 33, 3)],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_exact_on_integer_data_at_every_edge(n, k, d, threads):
    z, codebook = _integer_data(n, k, d, seed=n * k + d)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = nearest_codes(z, codebook)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, _brute_force(z, codebook))


def test_ties_go_to_the_lowest_index_across_lanes_tiles_and_chunks():
    d = 4
    codebook = torch.full((700, d), 40.0)
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for first in (699, 600, 300, 256, 255, 33, 32, 31, 17, 16, 15, 8, 7, 1, 0):  # ever lower copies of one code
        codebook[first] = target
        assert nearest_codes(target.expand(9, d).clone(), codebook).tolist() == [first] * 9


def test_identical_codes_tie_exactly_on_continuous_data():
    # Identical codes at positions that a blocked sgemm would round differently (other tiles, lanes and chunks)
    gen = torch.Generator().manual_seed(1)
    codebook = torch.randn(1000, 256, generator=gen)
    for j in (17, 255, 256, 513, 999):
        codebook[j] = codebook[3]
    z = codebook[3] + 1e-3 * torch.randn(50, 256, generator=gen)
    assert nearest_codes(z, codebook).tolist() == [3] * 50


def test_continuous_data_matches_the_fixed_order_reference(fused):
    # the kernels' distances are the fixed-order FMA chain of fvq.quantizers.search.reference, bit for bit
    gen = torch.Generator().manual_seed(8)
    z, codebook = torch.randn(150, 48, generator=gen), torch.randn(333, 48, generator=gen)
    sq = blocked._squared_norms(codebook)
    expected = reference.reference_argmin(z, codebook, sq)
    assert torch.equal(fused_search.nearest_codes_fused(z, codebook, sq, kernel=fused), expected)
    near = codebook[torch.arange(150) % 333] + 1e-4 * torch.randn(150, 48, generator=gen)  # near-ties to a code
    assert torch.equal(nearest_codes(near, codebook), reference.reference_argmin(near, codebook, sq))


def test_continuous_data_agrees_with_the_blocked_search(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    z, codebook = torch.randn(3000, 64, generator=gen), torch.randn(5000, 64, generator=gen)
    fused = nearest_codes(z, codebook)
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", "blocked")
    blocked = nearest_codes(z, codebook)
    z64, c64 = z.double(), codebook.double()
    dist = z64.square().sum(1, keepdim=True) - 2 * z64 @ c64.t() + c64.square().sum(1)  # (N, K), fp64
    best = dist.min(dim=1).values
    for found in (fused, blocked):  # both within fp32 rounding of the true minimum
        assert torch.all(dist.gather(1, found[:, None]).squeeze(1) - best <= 1e-4 * (1 + best))
    assert (fused == blocked).float().mean() > 0.999


def test_strided_and_low_precision_inputs():
    z, codebook = _integer_data(90, 120, 6, seed=5)
    wide_z = torch.zeros(90, 10)
    wide_z[:, 2:8] = z
    wide_codes = torch.zeros(120, 9)
    wide_codes[:, 1:7] = codebook
    expected = _brute_force(z, codebook)
    assert torch.equal(nearest_codes(wide_z[:, 2:8], wide_codes[:, 1:7]), expected)  # row strides 10 and 9
    assert torch.equal(nearest_codes(z.t().contiguous().t(), codebook), expected)  # column-major queries
    assert torch.equal(nearest_codes(z.bfloat16(), codebook.half()), expected)


def test_non_finite_or_overflowing_inputs_take_the_blocked_search():
    gen = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(5, 4, generator=gen), torch.randn(40, 4, generator=gen)
    with_nan = codebook.clone()
    with_nan[7, 1] = float("nan")
    assert nearest_codes(z, with_nan).tolist() == [7] * 5  # torch.argmin's rule: the first NaN
    assert not fused_search.distances_are_finite(z, blocked._squared_norms(with_nan))
    huge = codebook * 1e18  # finite, but ||c||^2 overflows fp32
    assert not fused_search.distances_are_finite(z, blocked._squared_norms(huge))
    assert fused_search.distances_are_finite(z, blocked._squared_norms(codebook))
    assert torch.equal(nearest_codes(z * 1e17, codebook * 1e17), _brute_force(z, codebook))  # large, still safe


def test_kernel_choice_is_checked(monkeypatch):
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", "fast")
    with pytest.raises(
        ValueError, match=r"FVQ_SEARCH_KERNEL must be one of auto, fused, avx2, avx512, blocked, coarse; got 'fast'"
    ):
        nearest_codes(torch.randn(2, 3), torch.randn(4, 3))


def test_forced_fused_kernel_refuses_other_devices(fused):
    with pytest.raises(fused_search.FusedKernelUnavailable, match="CPU only, not meta"):
        dispatch.forced(torch.device("meta"), fused)


def test_build_is_cached_and_atomic(tmp_path, fused):
    first = fused_search.build(tmp_path, kernel=fused)
    stamp = first.stat().st_mtime_ns
    assert fused_search.build(tmp_path, kernel=fused) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left


def test_failed_build_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(fused_search.FusedKernelUnavailable, match="could not build"):
        fused_search.build(tmp_path)
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no space left' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(fused_search.FusedKernelUnavailable, match="no space left"):
        fused_search.build(tmp_path)
    assert list(tmp_path.glob("*.so")) == []


def test_failed_build_leaves_no_temporary_file(tmp_path, monkeypatch):
    broken = tmp_path / "cc"
    broken.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho partial > "$2"\nexit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    target_dir = tmp_path / "cache"
    with pytest.raises(fused_search.FusedKernelUnavailable, match="failed to build"):
        fused_search.build(target_dir)
    assert list(target_dir.iterdir()) == []  # the half-written output was removed, nothing renamed into place


def test_unavailable_kernel_falls_back_in_auto_and_fails_when_forced(tmp_path, monkeypatch, fused):
    monkeypatch.setattr(fused_search, "_libraries", {})
    monkeypatch.setattr(fused_search, "_failures", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv("FVQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    z, codebook = _integer_data(30, 50, 3, seed=6)
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", "auto")
    if fused == "avx2":
        with pytest.warns(UserWarning, match="fused nearest-code kernel is unavailable, using the blocked search"):
            assert torch.equal(nearest_codes(z, codebook), _brute_force(z, codebook))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is reported once a process (never for unverified kernels)
        assert torch.equal(nearest_codes(z, codebook), _brute_force(z, codebook))
    assert dispatch.last_choice().kernel == "blocked"
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", fused)
    with pytest.raises(fused_search.FusedKernelUnavailable, match=f"FVQ_SEARCH_KERNEL={fused}.*could not build"):
        nearest_codes(z, codebook)


def test_scratch_memory_is_small(fused):
    # the kernel holds no distance block: a few MiB of packed queries and codes per thread, whatever K is
    code = (
        "import torch; from fvq.bench import search as b; from fvq.quantizers import nearest_codes; "
        "z = torch.randn(8192, 256); c = torch.randn(65536, 256); m = b.PeakMemory(torch.device('cpu')); "
        "m.start(); nearest_codes(z, c); print(m.stop())"
    )
    env = dict(os.environ, FVQ_SEARCH_KERNEL=fused)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 48 * 2**20


def test_direct_calls_check_shapes_and_out(fused):
    z, codebook = _integer_data(10, 20, 3, seed=7)
    sq = blocked._squared_norms(codebook)
    with pytest.raises(ValueError, match=r"expects z \(N, D\), codebook \(K, D\).*\(10, 3\), \(20, 4\)"):
        fused_search.nearest_codes_fused(z, torch.zeros(20, 4), sq)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(10,\) int64 CPU tensor, got \(9,\)"):
        fused_search.nearest_codes_fused(z, codebook, sq, out=torch.empty(9, dtype=torch.long))
    out = torch.empty(10, dtype=torch.long)
    assert fused_search.nearest_codes_fused(z, codebook, sq, out=out, kernel=fused) is out
    assert torch.equal(out, _brute_force(z, codebook))
