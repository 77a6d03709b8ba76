"""The coarse bf16 pass + exact re-rank, and the fixed-order fp32 reference it re-ranks with: exact fp32 FMA
emulation, the error bound, exactness on random, clustered, near-tie, duplicate and adversarial data, fallbacks."""

import math
import random
import struct
from fractions import Fraction

import pytest
import torch

from fvq.quantizers import nearest_codes
from fvq.quantizers.search import blocked, coarse, dispatch, reference


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _round_to_f32(value: Fraction) -> float:
    """``value`` rounded to the nearest fp32, ties to even, exactly."""
    guess = _f32(float(value))  # within one fp32 step of the answer
    bits = struct.unpack("I", struct.pack("f", guess))[0]
    candidates = []
    for delta in (-1, 0, 1):
        b = bits + delta if guess >= 0 else bits - delta
        candidates.append(struct.unpack("f", struct.pack("I", b & 0xFFFFFFFF))[0])
    return min(
        candidates,
        key=lambda c: (abs(Fraction(c) - value), struct.unpack("I", struct.pack("f", c))[0] & 1),
    )


def test_fma32_is_an_exact_fp32_fma():
    # a * b = 2^-24 - 2^-71 (2^47 - 1 = 10,610,063 x 13,264,529), acc = 1 + 2^-23: the fp64 sum lands on an fp32
    # midpoint and rounds up; the exact result is below it
    a, b = torch.tensor([10_610_063 * 2.0**-40]), torch.tensor([13_264_529 * 2.0**-31])
    acc = torch.tensor([1.0 + 2.0**-23])
    assert (a.double() * b.double() + acc.double()).float().item() == 1.0 + 2.0**-22  # double rounding
    assert reference.fma32(a, b, acc).item() == 1.0 + 2.0**-23
    rng = random.Random(0)
    triples = []
    for _ in range(3000):
        x, y = _f32(rng.uniform(-2, 2)), _f32(rng.uniform(-2, 2) * 2.0 ** rng.randint(-30, 5))
        z = _f32(rng.choice([-1, 1]) * rng.uniform(0.5, 2) * 2.0 ** rng.randint(-40, 10))
        triples.append((x, y, z))
    xs, ys, zs = (torch.tensor(col, dtype=torch.float32) for col in zip(*triples))
    got = reference.fma32(xs, ys, zs).tolist()
    for (x, y, z), g in zip(triples, got):
        assert g == _round_to_f32(Fraction(x) * Fraction(y) + Fraction(z))


@pytest.fixture(params=["bf16-matmul", "bf16-values-in-sgemm"])
def matmul(request, monkeypatch):
    """The coarse pass through torch's bf16 matmul (bf16 output on CPU: the looser bound) or, as on CPUs without
    bf16 units, the bf16 values through fp32 sgemm."""
    native = request.param == "bf16-matmul"
    monkeypatch.setattr(coarse, "native_bf16", lambda device: native)
    return request.param


def _reference(z, codebook):
    return reference.reference_argmin(z, codebook, blocked._squared_norms(codebook))


def _coarse(z, codebook, cap=coarse.DEFAULT_CAP, max_chunk_bytes=64 * 2**20, exact_calls=None):
    sq = blocked._squared_norms(codebook)
    out = torch.empty(z.shape[0], dtype=torch.long)

    def exact(rows):
        if exact_calls is not None:
            exact_calls.append(rows.shape[0])
        return reference.reference_argmin(rows, codebook, sq)

    return coarse.nearest_codes_coarse(z, codebook, sq, max_chunk_bytes, out, exact, cap=cap)


def _coarse_argmin(z, codebook):
    """The bf16 pass's own argmin: what a coarse search without a re-rank would return."""
    sq = blocked._squared_norms(codebook)
    q, _ = coarse._coarse_dot(z.bfloat16(), codebook.bfloat16().t())
    return (sq - 2 * q).argmin(dim=1)


def _data(kind, n, k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    if kind == "clustered":  # codes and queries around a few centres, as in a trained codebook
        centres = 4 * torch.randn(6, d, generator=gen)
        codes = centres[torch.randint(0, 6, (k,), generator=gen)] + 0.05 * torch.randn(k, d, generator=gen)
        z = centres[torch.randint(0, 6, (n,), generator=gen)] + 0.05 * torch.randn(n, d, generator=gen)
        return z, codes
    if kind == "near-ties":  # queries halfway between two codes, to within a few ulps
        codes = torch.randn(k, d, generator=gen)
        i, j = torch.randint(0, k, (n,), generator=gen), torch.randint(0, k, (n,), generator=gen)
        return 0.5 * (codes[i] + codes[j]) + 1e-7 * torch.randn(n, d, generator=gen), codes
    if kind == "duplicates":  # many identical codes at scattered positions
        codes = torch.randn(k // 4, d, generator=gen)
        codes = codes[torch.randint(0, k // 4, (k,), generator=gen)]
        return codes[torch.randint(0, k, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen), codes
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "clustered", "near-ties", "duplicates"])
def test_exact_against_the_full_fp32_argmin(kind, matmul):
    z, codebook = _data(kind, 80, 200, 24, seed=len(kind))
    got = _coarse(z, codebook)
    assert torch.equal(got, _reference(z, codebook))
    stats = coarse.last_stats()
    assert stats.rows == 80 and stats.max_candidates >= 1 and stats.cap == coarse.DEFAULT_CAP
    assert stats.bf16_output == (matmul == "bf16-matmul")


def test_adversarial_codes_where_the_coarse_argmin_is_wrong(matmul):
    # pairs of codes closer together than bf16 can tell apart: the bf16 pass often ranks the wrong one first
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(100, 32, generator=gen)
    codebook = torch.cat([base, base + 2e-3 * torch.randn(100, 32, generator=gen)])  # (200, 32)
    z = codebook[torch.randint(0, 200, (200,), generator=gen)] + 2e-3 * torch.randn(200, 32, generator=gen)
    expected = _reference(z, codebook)
    assert (_coarse_argmin(z, codebook) != expected).sum() >= 10  # the case is adversarial
    assert torch.equal(_coarse(z, codebook), expected)
    assert torch.equal(_coarse(z, codebook, max_chunk_bytes=4 * 200 * 7), expected)  # blocks of 7 rows


def test_coarse_error_stays_within_the_bound(matmul):
    for seed, scale in [(0, 1.0), (1, 1e-3), (2, 1e4)]:
        z, codebook = _data("random", 100, 200, 64, seed)
        z, codebook = z * scale, codebook * scale
        sq = blocked._squared_norms(codebook)
        q, bf16_output = coarse._coarse_dot(z.bfloat16(), codebook.bfloat16().t())
        approx = (sq - 2 * q).double()  # (N, K)
        exact = reference.reference_distances(z, codebook, sq).double()  # (N, K)
        c_max = math.sqrt(float(sq.max()))
        margin = coarse.coarse_margin(z.double().norm(dim=1), c_max, float(sq.max()), 64, bf16_output)  # (N,)
        err = (approx - exact).abs().amax(dim=1)  # (N,)
        assert torch.all(err <= margin / 2)
        assert torch.all(err > margin / 2**12)  # and not absurdly loose


def test_rows_over_the_cap_take_the_exact_path():
    z, codebook = _data("duplicates", 50, 80, 8, seed=4)  # every code has about 4 copies: 4+ candidates a row
    calls = []
    got = _coarse(z, codebook, cap=2, exact_calls=calls)
    assert torch.equal(got, _reference(z, codebook))
    stats = coarse.last_stats()
    assert stats.fallback_rows == sum(calls) > 0 and stats.max_candidates > 2


def test_through_nearest_codes_with_non_finite_inputs(monkeypatch):
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", "coarse")
    z, codebook = _data("random", 20, 50, 8, seed=5)
    assert torch.equal(nearest_codes(z, codebook), _reference(z, codebook))
    assert dispatch.last_choice().kernel == "coarse"
    with_nan = codebook.clone()
    with_nan[9, 2] = float("nan")
    assert nearest_codes(z, with_nan).tolist() == [9] * 20  # the blocked search: torch.argmin's first NaN
    assert dispatch.last_choice().kernel == "blocked"
    huge = z.clone()
    huge[0, 0] = 3e38  # -2 z overflows fp32: no bound can hold
    nearest_codes(huge, codebook)
    assert dispatch.last_choice().kernel == "blocked"


def test_native_and_torch_reranks_agree(monkeypatch):
    # on CPU the re-rank runs in the fused kernels' library; elsewhere in the torch emulation: both are the reference
    from fvq.quantizers.search import fused

    if not fused.available("avx2")[0]:
        pytest.skip("the AVX2 library cannot run here")
    z, codebook = _data("near-ties", 60, 150, 16, seed=9)
    sq = blocked._squared_norms(codebook)
    gen = torch.Generator().manual_seed(10)
    cand = torch.randint(0, 150, (60, 12), generator=gen).sort(dim=1).values  # (60, 12)
    native = fused.rerank(z, codebook, sq, cand, torch.empty(60, dtype=torch.long))
    dist = coarse._rerank(-2.0 * z, cand, codebook.t().contiguous(), sq)  # (60, 12)
    assert torch.equal(native, cand.gather(1, dist.argmin(dim=1, keepdim=True)).squeeze(1))
    expected = _reference(z, codebook)
    assert torch.equal(_coarse(z, codebook), expected)
    monkeypatch.setattr(fused, "available", lambda kernel: (False, "as on a GPU"))
    assert torch.equal(_coarse(z, codebook), expected)
