"""Exact nearest-code search: equality with brute force, ties, block boundaries, dtypes, memory bound, errors."""

import threading

import pytest
import torch
from search_kernels import use_search_kernel

from fvq.quantizers import nearest_codes
from fvq.quantizers.search import blocked
from fvq.quantizers.search.blocked import _ARGMIN_GROUP, _CPU_BLOCK_CODES, _search_block_shape


def _brute_force(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin over the full (N, K) matrix of ||z - c||^2 in fp64; torch's argmin returns the first minimum."""
    dist = (z.double()[:, None, :] - codebook.double()[None, :, :]).square().sum(-1)  # (N, K)
    return dist.argmin(dim=1)


def _integer_data(n: int, k: int, d: int, seed: int, high: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integer values: every distance is exact in fp32, so any correct search must match, ties included."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(-high, high + 1, (n, d), generator=gen).float()
    codebook = torch.randint(-high, high + 1, (k, d), generator=gen).float()
    return z, codebook


@pytest.fixture(params=[_CPU_BLOCK_CODES, 4 * _ARGMIN_GROUP, 5 * _ARGMIN_GROUP], ids=["1panel", "8panels", "6panels"])
def panel_codes(request, monkeypatch):
    """The blocked search with matmul panels of the whole block (a 2 MiB L2), eight panels a block (a 256 KiB L2),
    or a width that does not divide the block (the block shrinks to six panels)."""
    use_search_kernel(monkeypatch, "blocked")
    monkeypatch.setattr(blocked, "_CPU_PANEL_CODES", request.param)
    return request.param


@pytest.fixture(params=["fused", "avx512", "blocked", "coarse"])
def kernel(request, monkeypatch):
    """The fused AVX2 kernel, the fused AVX-512 kernel (skipped without AVX-512F), the blocked sgemm search (panels as
    this machine's L2 gives them), or the bf16 coarse pass + exact re-rank."""
    use_search_kernel(monkeypatch, request.param)
    return request.param


@pytest.fixture(params=["fused", "avx512", "blocked-1panel", "blocked-8panels", "blocked-6panels", "coarse"])
def search_path(request, monkeypatch):
    """Every kernel, the blocked one with each panel layout of :func:`panel_codes`."""
    kernel, _, layout = request.param.partition("-")
    use_search_kernel(monkeypatch, kernel)
    panels = {"1panel": _CPU_BLOCK_CODES, "8panels": 4 * _ARGMIN_GROUP, "6panels": 5 * _ARGMIN_GROUP}
    if layout:
        monkeypatch.setattr(blocked, "_CPU_PANEL_CODES", panels[layout])
    return request.param


# (N, K, D, max_chunk_bytes): K and N off every block size, bounds below one row (4 bytes = a single distance),
# several code blocks (K > _CPU_BLOCK_CODES) with a tail that is not a whole number of argmin groups.
SHAPES = [
    (1, 1, 1, 4),
    (7, 1, 3, 64 * 2**20),
    (33, 5, 4, 4),
    (50, 37, 5, 64),
    (129, 300, 3, 4 * 7),
    (200, 1000, 6, 4 * 999),
    (65, 2 * _CPU_BLOCK_CODES + 3 * _ARGMIN_GROUP + 17, 4, 64 * 2**20),
    (40, 2 * _CPU_BLOCK_CODES + 1, 3, 4 * (_ARGMIN_GROUP * 3 + 5)),
    (300, 257, 8, 4 * 257 * 3 + 8),
]


@pytest.mark.parametrize("n,k,d,max_chunk_bytes", SHAPES)
def test_matches_brute_force_exactly(n, k, d, max_chunk_bytes, search_path):
    z, codebook = _integer_data(n, k, d, seed=n + k + d)
    indices = nearest_codes(z, codebook, max_chunk_bytes)
    assert indices.shape == (n,) and indices.dtype == torch.int64
    assert torch.equal(indices, _brute_force(z, codebook))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_continuous_data_finds_a_nearest_code(seed, search_path):
    gen = torch.Generator().manual_seed(seed)
    n, k, d = 300, 2 * _CPU_BLOCK_CODES + 77, 16
    z = torch.randn(n, d, generator=gen)
    codebook = torch.randn(k, d, generator=gen)
    indices = nearest_codes(z, codebook, max_chunk_bytes=4 * 100 * 1000)
    dist = (z.double()[:, None] - codebook.double()[None]).square().sum(-1)  # (N, K)
    best = dist.min(dim=1).values
    chosen = dist.gather(1, indices[:, None]).squeeze(1)
    # fp32 distances may only reorder codes whose true distances differ by less than fp32 rounding
    assert torch.all(chosen - best <= 1e-4 * (1 + best))
    assert (indices == dist.argmin(dim=1)).float().mean() > 0.99


def test_duplicate_codes_go_to_the_lowest_index(search_path):
    gen = torch.Generator().manual_seed(3)
    k, d = 3 * _CPU_BLOCK_CODES + 50, 4
    codebook = torch.randn(k, d, generator=gen) + 10.0  # far from the duplicates below
    target = torch.tensor([0.5, -1.0, 2.0, 0.25])
    positions = [5, _ARGMIN_GROUP - 1, _ARGMIN_GROUP, _CPU_BLOCK_CODES, 2 * _CPU_BLOCK_CODES + 3, k - 1]
    codebook[positions] = target
    z = target.expand(4, d).clone()
    for bound in (4, 4 * 3, 4 * _ARGMIN_GROUP, 4 * (_CPU_BLOCK_CODES + 1), 64 * 2**20):
        assert nearest_codes(z, codebook, bound).tolist() == [5] * 4
    codebook[5] = 10.0  # the next duplicate is first now, and sits on a block boundary for some bounds
    for bound in (4, 4 * 3, 4 * _ARGMIN_GROUP, 64 * 2**20):
        assert nearest_codes(z, codebook, bound).tolist() == [_ARGMIN_GROUP - 1] * 4


@pytest.mark.parametrize("d", [3, 16, 256])
def test_identical_codebook_gives_index_zero(d, kernel):
    z = torch.randn(20, d, generator=torch.Generator().manual_seed(d))
    codebook = torch.full((3 * _ARGMIN_GROUP + 1, d), 0.3)
    for bound in (4, 4 * 20, 4 * 1000, 64 * 2**20):  # blocks of several widths: BLAS rounds them differently
        assert torch.equal(nearest_codes(z, codebook, bound), torch.zeros(20, dtype=torch.long))


def test_duplicates_among_many_equal_norms(search_path):
    # unit-norm codes (the cosine case) share their norm bit for bit far more often than random codes
    gen = torch.Generator().manual_seed(8)
    base = torch.eye(6)[torch.randint(0, 6, (500,), generator=gen)] * torch.where(
        torch.rand(500, 1, generator=gen) < 0.5, -1.0, 1.0
    )  # (500, 6): +-e_i, so many exact duplicates and many distinct codes with the same norm
    base[0] = -0.0 * base[0]  # -0.0 and +0.0 are the same value
    z = torch.randn(300, 6, generator=gen)
    assert torch.equal(nearest_codes(z, base, 4 * 7), _brute_force(z, base))
    lowest = {}
    for i, row in enumerate(base.tolist()):
        lowest.setdefault(tuple(row), i)
    found = nearest_codes(z, base)
    assert all(lowest[tuple(base[i].tolist())] == i for i in found.tolist())


def test_duplicate_detection_survives_hash_collisions(monkeypatch):
    use_search_kernel(monkeypatch, "blocked")
    from fvq.quantizers.search import blocked

    monkeypatch.setattr(blocked, "_bit_hash", lambda codebook, rows: torch.zeros(rows.numel(), dtype=torch.long))
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.0, -1.0]])
    z = torch.tensor([[2.0, 0.1], [0.1, 2.0], [-2.0, 0.1], [0.1, -2.0]])
    assert nearest_codes(z, codebook, 4).tolist() == [0, 1, 4, 5]


def _lowest_by_value(codebook: torch.Tensor) -> list[int]:
    lowest: dict[tuple, int] = {}
    return [lowest.setdefault(tuple((row + 0.0).tolist()), i) for i, row in enumerate(codebook)]


def test_accelerator_duplicate_table_matches_the_cpu_one_without_host_reads():
    from fvq.training.host_syncs import count_host_syncs

    gen = torch.Generator().manual_seed(11)
    base = torch.eye(6)[torch.randint(0, 6, (700,), generator=gen)] * torch.where(
        torch.rand(700, 1, generator=gen) < 0.5, -1.0, 1.0
    )  # (700, 6): many duplicates, many distinct codes sharing a norm
    base[3] = -0.0 * base[3]
    codebook = torch.cat([base, torch.randn(300, 6, generator=gen)])[torch.randperm(1000, generator=gen)]
    code_sq = blocked._squared_norms(codebook)
    with count_host_syncs() as reads:
        table = blocked._lowest_duplicates_without_host_reads(codebook, code_sq)
    assert sum(reads.values()) == 0
    assert table.tolist() == _lowest_by_value(codebook)
    assert torch.equal(table, blocked._lowest_duplicates(codebook, code_sq))
    distinct = torch.randn(50, 6, generator=gen)  # no duplicates: every code is its own lowest
    assert blocked._lowest_duplicates_without_host_reads(distinct, blocked._squared_norms(distinct)).tolist() == list(
        range(50)
    )


def test_accelerator_duplicate_table_settles_colliding_keys_in_rounds(monkeypatch):
    # every code hashes to 0 and all have norm 1: one key; its distinct values settle one per round
    monkeypatch.setattr(blocked, "_bit_hash", lambda codebook, rows: torch.zeros(rows.numel(), dtype=torch.long))
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    table = blocked._lowest_duplicates_without_host_reads(codebook, blocked._squared_norms(codebook))
    assert table.tolist() == [0, 1, 0, 1, 1, 0]
    # the documented limit: a third distinct value in one key stays open after two rounds and maps to itself
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert blocked._DEVICE_DUPLICATE_ROUNDS == 2
    table = blocked._lowest_duplicates_without_host_reads(three, blocked._squared_norms(three))
    assert table.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("bound", [4, 4 * 5, 4 * _ARGMIN_GROUP, 4 * _CPU_BLOCK_CODES, 64 * 2**20])
def test_block_boundaries(bound, search_path):
    k, d = 2 * _CPU_BLOCK_CODES + _ARGMIN_GROUP + 3, 3
    rows, codes, _ = _search_block_shape(1, k, bound, torch.device("cpu"))
    edges = {0, 1, codes - 1, codes, codes + 1, _ARGMIN_GROUP - 1, _ARGMIN_GROUP, k - codes, k - 2, k - 1}
    edges = sorted(e for e in edges if 0 <= e < k)
    codebook = torch.full((k, d), 50.0)  # far from every query below; all values exact in fp32
    targets = torch.arange(len(edges), dtype=torch.float32)[:, None] * torch.tensor([1.0, -2.0, 3.0])  # (E, 3)
    codebook[edges] = targets
    assert nearest_codes(targets, codebook, bound).tolist() == edges
    # a query halfway between the codes at two edges is an exact tie: the lower index wins
    codebook[edges] = 0.0
    codebook[edges[1:]] = 2.0
    z = torch.ones(1, d)
    assert nearest_codes(z, codebook, bound).tolist() == [edges[0]]
    codebook[edges[0]] = 50.0
    assert nearest_codes(z, codebook, bound).tolist() == [edges[1]]


@pytest.mark.parametrize("bound", [4 * 100, 64 * 2**20])
def test_nan_distances_follow_torch_argmin(bound, search_path):
    """A NaN distance wins, the first one in index order, as torch.argmin over the full matrix has it."""
    gen = torch.Generator().manual_seed(8)
    k = 3 * _CPU_BLOCK_CODES + _ARGMIN_GROUP + 6  # several code blocks and a tail
    z, codebook = torch.randn(5, 4, generator=gen), torch.randn(k, 4, generator=gen)
    for first in (3, _CPU_BLOCK_CODES + 5, 2 * _CPU_BLOCK_CODES + _ARGMIN_GROUP, k - 2):
        with_nan = codebook.clone()
        with_nan[first, 1] = float("nan")
        with_nan[k - 1, 0] = float("nan")  # a later NaN never replaces the first
        assert nearest_codes(z, with_nan, bound).tolist() == [first] * 5
    expected = nearest_codes(z, codebook, bound)  # (N,)
    z[1, 2] = float("nan")  # every distance of row 1 is NaN: index 0, the other rows unchanged
    expected[1] = 0
    assert torch.equal(nearest_codes(z, codebook, bound), expected)


@pytest.mark.parametrize("n,k,bound", [(1, 1, 4), (5000, 9000, 4), (10_000, 10, 4 * 64), (3, 10**6, 4 * 999)])
def test_block_shape_respects_the_bound(n, k, bound, panel_codes):
    rows, codes, panel = _search_block_shape(n, k, bound, torch.device("cpu"))
    assert 1 <= rows <= n and 1 <= panel <= codes <= k
    assert 4 * rows * codes <= bound
    assert codes == k or codes % panel == 0  # every block but the last is whole panels


def test_no_allocation_exceeds_the_bound(monkeypatch):
    use_search_kernel(monkeypatch, "blocked")  # the fused kernel holds no distance block at all
    z, codebook = _integer_data(700, 600, 2, seed=4)
    bound = 4 * 50 * 128
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        indices = nearest_codes(z, codebook, bound)
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes, "the profiler recorded no allocation"
    full_matrix = 4 * 700 * 600
    assert max(sizes) <= bound < full_matrix
    assert torch.equal(indices, _brute_force(z, codebook))


def test_scratch_is_kept_for_the_same_shape_and_replaced_for_another(monkeypatch):
    use_search_kernel(monkeypatch, "blocked")
    bound = 4 * 64 * 300
    z, codebook = _integer_data(90, 700, 5, seed=9)
    assert torch.equal(nearest_codes(z, codebook, bound), _brute_force(z, codebook))
    block = blocked._SCRATCH.buffers[2]
    z2, codebook2 = _integer_data(90, 700, 5, seed=10)  # same shapes, other values: the kept buffers are reused
    assert torch.equal(nearest_codes(z2, codebook2, bound), _brute_force(z2, codebook2))
    assert blocked._SCRATCH.buffers[2].data_ptr() == block.data_ptr()
    with torch.inference_mode():  # kept buffers serve calls in and out of inference mode alike
        assert torch.equal(nearest_codes(z, codebook, bound), _brute_force(z, codebook))
    assert torch.equal(nearest_codes(z2, codebook2, bound), _brute_force(z2, codebook2))
    z3, codebook3 = _integer_data(40, 300, 3, seed=11)  # another shape replaces them, made in inference mode here
    with torch.inference_mode():
        assert torch.equal(nearest_codes(z3, codebook3, bound), _brute_force(z3, codebook3))
    assert torch.equal(nearest_codes(z3, codebook3, bound), _brute_force(z3, codebook3))
    assert blocked._SCRATCH.buffers[0].shape == (40, 3 + 1)  # (queries of the sweep, D + 1)


def test_threads_search_at_the_same_time(kernel):
    data = [_integer_data(300, 2 * _CPU_BLOCK_CODES + 9, 6, seed=20 + t) for t in range(4)]
    results: dict[int, torch.Tensor] = {}

    def work(t: int) -> None:
        for _ in range(3):
            results[t] = nearest_codes(*data[t], 4 * 128 * 1024)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t, (z, codebook) in enumerate(data):
        assert torch.equal(results[t], _brute_force(z, codebook))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_searched_in_fp32(dtype, kernel):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(200, 32, generator=gen).to(dtype)
    codebook = torch.randn(600, 32, generator=gen).to(dtype)
    indices = nearest_codes(z, codebook, max_chunk_bytes=4 * 40 * 300)
    assert indices.dtype == torch.int64
    assert torch.equal(indices, nearest_codes(z.float(), codebook.float()))
    z_int, codebook_int = _integer_data(100, 300, 8, seed=7)  # exact in bf16 and fp16 as well
    assert torch.equal(
        nearest_codes(z_int.to(dtype), codebook_int.to(dtype), 4 * 50), _brute_force(z_int, codebook_int)
    )


def test_autocast_does_not_lower_the_precision(kernel):
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(200, 32, generator=gen) + 3.0  # a common offset: large dot products, small differences
    codebook = torch.randn(600, 32, generator=gen) + 3.0
    expected = nearest_codes(z, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dots = torch.mm(z, codebook.t())  # (N, K), bf16 under autocast
        got = nearest_codes(z, codebook, max_chunk_bytes=4 * 40 * 300)
    assert dots.dtype == torch.bfloat16
    dist = codebook.square().sum(1) - 2 * dots.float()  # (N, K)
    assert not torch.equal(dist.argmin(dim=1), expected)  # bf16 distances would pick other codes for some rows
    assert torch.equal(got, expected)


def test_gradients_and_empty_queries(kernel):
    z = torch.randn(6, 4, requires_grad=True)
    codebook = torch.randn(9, 4, requires_grad=True)
    indices = nearest_codes(z, codebook)
    assert not indices.requires_grad
    assert torch.equal(indices, _brute_force(z.detach(), codebook.detach()))
    empty = nearest_codes(torch.empty(0, 4), codebook)
    assert empty.shape == (0,) and empty.dtype == torch.int64


@pytest.mark.parametrize(
    "z,codebook,bound,error,pattern",
    [
        (torch.randn(4), torch.randn(3, 4), 1024, ValueError, r"z of shape \(N, D\), got 1 dims: \(4,\)"),
        (torch.randn(2, 3, 4), torch.randn(3, 4), 1024, ValueError, r"z of shape \(N, D\), got 3 dims"),
        (torch.randn(2, 4), torch.randn(2, 3, 4), 1024, ValueError, r"codebook of shape \(K, D\), got 3 dims"),
        (torch.randn(2, 4), torch.randn(3, 5), 1024, ValueError, r"same D; got D = 4 .* D = 5"),
        (torch.randn(2, 4), torch.randn(0, 4), 1024, ValueError, r"K >= 1 codes, got an empty codebook \(0, 4\)"),
        (torch.randn(2, 4), torch.randn(3, 4), 3, ValueError, r"max_chunk_bytes must be an int >= 4.*got 3"),
        (torch.randn(2, 4), torch.randn(3, 4), 2.5, ValueError, r"max_chunk_bytes must be an int >= 4.*got 2.5"),
        (torch.ones(2, 4, dtype=torch.long), torch.randn(3, 4), 1024, TypeError, r"floating-point z, got .*int64"),
        ([[1.0]], torch.randn(3, 1), 1024, TypeError, r"z to be a torch.Tensor, got list"),
    ],
)
def test_bad_inputs_name_expected_and_actual(z, codebook, bound, error, pattern):
    with pytest.raises(error, match=pattern):
        nearest_codes(z, codebook, bound)


def test_panel_width_follows_the_l2_size():
    assert blocked._panel_codes(2 * 2**20) == _CPU_BLOCK_CODES  # one panel a block
    assert blocked._panel_codes(512 * 2**10) == 512  # four panels
    assert blocked._panel_codes(1280 * 2**10) == 1280
    assert blocked._panel_codes(1000 * 2**10) == 960  # whole argmin groups
    assert blocked._panel_codes(32 * 2**10) == 4 * _ARGMIN_GROUP  # never narrower than four groups
    assert blocked._panel_codes(64 * 2**20) == _CPU_BLOCK_CODES  # never wider than a block


def test_l2_size_is_read_from_sysfs(tmp_path, monkeypatch):
    caches = [("1", "Data", "48K"), ("1", "Instruction", "32K"), ("2", "Unified", "1M")]
    for i, (level, kind, size) in enumerate(caches):
        folder = tmp_path / f"index{i}"
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(value + "\n")
    monkeypatch.setattr(blocked, "Path", lambda _: tmp_path)
    assert blocked._l2_bytes() == 2**20
    (tmp_path / "index2" / "size").write_text("2048K\n")
    assert blocked._l2_bytes() == 2 * 2**20
    monkeypatch.setattr(blocked, "Path", lambda _: tmp_path / "missing")
    assert blocked._l2_bytes() == blocked._DEFAULT_L2_BYTES
