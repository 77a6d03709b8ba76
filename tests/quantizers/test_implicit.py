"""Known-answer tests of the implicit-codebook quantizers: FSQ, LFQ, BSQ."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fvq.quantizers.bsq import BinarySphericalQuantizer
from fvq.quantizers.fsq import FiniteScalarQuantizer
from fvq.quantizers.implicit import binary_entropy_terms, bits_to_ids, entropy_groups, ids_to_bits
from fvq.quantizers.lfq import LookupFreeQuantizer


# ---------------------------------------------------------------------------------------------------------------------
# FSQ
def test_fsq_known_ids_and_values_odd_and_even_levels():
    q = FiniteScalarQuantizer([3, 4]).eval()  # channel 0: 3 levels (least significant), channel 1: 4 levels
    z = torch.tensor([[10.0, -10.0], [-10.0, 10.0], [0.0, 0.0]])
    out = q(z)
    # digits: (2, 0) -> 2; (0, 3) -> 0 + 3 * 3 = 9; (1, 2) -> 1 + 2 * 3 = 7
    assert out.indices.tolist() == [2, 9, 7]
    expected = torch.tensor([[1.0, -1.0], [-1.0, 0.5], [0.0, 0.0]])  # L=3: {-1, 0, 1}; L=4: {-1, -.5, 0, .5}
    assert torch.equal(out.quantized, expected)
    assert q.codebook_size == 12
    assert torch.equal(q.decode(torch.tensor([2, 9, 7])), expected)


def test_fsq_every_code_is_reachable_and_ids_are_a_bijection():
    levels = [2, 3, 4, 5]
    q = FiniteScalarQuantizer(levels).eval()
    grid = torch.linspace(-4, 4, 21)
    z = torch.cartesian_prod(*[grid] * len(levels))  # (21^4, 4)
    ids = q.encode(z)
    assert set(ids.tolist()) == set(range(math.prod(levels)))
    codes = q.indices_to_codes(torch.arange(q.codebook_size))  # (K, 4)
    assert torch.unique(codes, dim=0).shape[0] == q.codebook_size
    for j, level in enumerate(levels):  # each channel takes exactly L_j distinct values in [-1, 1]
        values = torch.unique(codes[:, j])
        assert values.numel() == level and values.min() >= -1 and values.max() <= 1


def test_fsq_rounding_uses_straight_through_gradient():
    q = FiniteScalarQuantizer([5, 5])
    z = torch.zeros(3, 2, requires_grad=True)
    q(z).quantized.sum().backward()
    # d/dz [tanh(z) * h / floor(L/2)] at 0 for L = 5: h = 2 * 1.001, floor(L/2) = 2 -> 1.001
    torch.testing.assert_close(z.grad, torch.full((3, 2), 1.001))


@pytest.mark.parametrize("levels", [[1, 3], [2.5, 3], [], [True, 4], "85", [8, -2]])
def test_fsq_rejects_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        FiniteScalarQuantizer(levels)


def test_fsq_projection_when_dims_differ():
    q = FiniteScalarQuantizer([8, 5, 5, 5], codebook_dim=16)
    assert q.codebook_size == 1000 and q.codebook_dim == 16
    assert sum(p.numel() for p in q.parameters()) == (16 * 4 + 4) + (4 * 16 + 16)
    assert sum(p.numel() for p in FiniteScalarQuantizer([8, 5, 5, 5]).parameters()) == 0


# ---------------------------------------------------------------------------------------------------------------------
# bit packing and the factorised entropy
def test_bit_packing_is_little_endian_and_inverse():
    bits = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]]).bool()
    assert bits_to_ids(bits).tolist() == [5, 2, 7]
    ids = torch.arange(2**10)
    assert torch.equal(bits_to_ids(ids_to_bits(ids, 10)), ids)


def _brute_force_entropies(v: torch.Tensor, scale: float, temperature: float):
    """Full softmax over all 2^L codes: p(c | v) = softmax(2 v.c / tau), c in {-scale, +scale}^L."""
    num_bits = v.shape[1]
    codes = torch.tensor(list(itertools.product([0, 1], repeat=num_bits)), dtype=torch.float64)
    codes = codes.flip(1)  # any order works for entropies
    c = (codes * 2 - 1) * scale  # (2^L, L)
    p = torch.softmax(2 * v.double() @ c.t() / temperature, dim=1)  # (N, 2^L)
    per_sample = -(p * p.log()).sum(1).mean()
    avg = p.mean(0)
    return per_sample, -(avg * avg.log()).sum()


def test_factorised_entropy_matches_full_softmax():
    torch.manual_seed(0)
    v = torch.randn(64, 5)
    h_s, h_c = binary_entropy_terms(4.0 * v / 2.0, [5])  # scale 1, temperature 2
    ref_s, ref_c = _brute_force_entropies(v, 1.0, 2.0)
    torch.testing.assert_close(h_s.double(), ref_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_c.double(), ref_c, rtol=1e-5, atol=1e-5)
    # smaller groups: an upper bound on the joint codebook entropy (sum of marginal entropies)
    _, h_c_split = binary_entropy_terms(4.0 * v / 2.0, [2, 3])
    _, h_c_bits = binary_entropy_terms(4.0 * v / 2.0, [1] * 5)
    assert h_c - 1e-5 <= h_c_split <= h_c_bits + 1e-5


def test_entropy_groups_defaults():
    assert entropy_groups(10, None) == [10]
    assert entropy_groups(18, None) == [9, 9]
    assert entropy_groups(20, None) == [7, 7, 6]
    assert entropy_groups(5, 1) == [1] * 5
    with pytest.raises(ValueError):
        entropy_groups(5, 0)


# ---------------------------------------------------------------------------------------------------------------------
# LFQ
def test_lfq_known_ids_values_and_zero_convention():
    q = LookupFreeQuantizer(3).eval()
    z = torch.tensor([[1.0, -1.0, 2.0], [0.0, 0.5, -3.0], [1.0, 1.0, 1.0]])
    out = q(z)
    assert out.indices.tolist() == [5, 2, 7]
    assert torch.equal(out.quantized, torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]]))
    assert q.codebook_size == 8


def test_lfq_entropy_loss_matches_definition():
    torch.manual_seed(0)
    q = LookupFreeQuantizer(4, temperature=0.5, diversity_weight=0.7, entropy_weight=0.3, commitment_weight=0.2)
    z = torch.randn(32, 4)
    out = q(z)
    ref_s, ref_c = _brute_force_entropies(z, 1.0, 0.5)
    torch.testing.assert_close(out.losses["entropy"].double(), ref_s - 0.7 * ref_c, rtol=1e-5, atol=1e-5)
    commit = (z - z.sign()).square().mean()
    torch.testing.assert_close(out.losses["commitment"], commit)
    torch.testing.assert_close(out.loss, 0.2 * commit + 0.3 * out.losses["entropy"])


def test_lfq_entropy_skipped_with_zero_weight():
    out = LookupFreeQuantizer(4, entropy_weight=0.0)(torch.randn(8, 4))
    assert set(out.losses) == {"commitment"}


def test_lfq_18_bits_stays_cheap_and_exact_ids():
    torch.manual_seed(0)
    q = LookupFreeQuantizer(32, num_bits=18).eval()
    assert q.codebook_size == 2**18 and q.entropy_group_sizes == [9, 9]
    z = torch.randn(4, 32, 4, 4)
    out = q(z)
    assert torch.isfinite(out.loss)
    assert torch.equal(q.decode(out.indices), out.quantized)
    top = torch.full((1, 18), 5.0)
    lfq = LookupFreeQuantizer(18).eval()
    assert lfq.encode(top).item() == 2**18 - 1 and lfq.encode(-top).item() == 0


# ---------------------------------------------------------------------------------------------------------------------
# BSQ
def _identity_bsq(num_bits: int, **kwargs) -> BinarySphericalQuantizer:
    q = BinarySphericalQuantizer(num_bits, num_bits, **kwargs)
    with torch.no_grad():
        for lin in (q.project_in, q.project_out):
            lin.weight.copy_(torch.eye(num_bits))
            lin.bias.zero_()
    return q.eval()


def test_bsq_known_ids_values_and_commitment():
    q = _identity_bsq(3)
    z = torch.tensor([[3.0, -4.0, 0.0]])  # u = (0.6, -0.8, 0)
    out = q(z)
    assert out.indices.tolist() == [1]
    s = 1 / math.sqrt(3)
    torch.testing.assert_close(out.quantized, torch.tensor([[s, -s, -s]]))
    u = torch.tensor([[0.6, -0.8, 0.0]])
    torch.testing.assert_close(out.losses["commitment"], (u - torch.tensor([[s, -s, -s]])).square().sum())
    assert float(out.quantized.detach().norm()) == pytest.approx(1.0)


def test_bsq_entropy_matches_full_softmax_on_the_sphere():
    torch.manual_seed(0)
    q = _identity_bsq(4, temperature=0.25, diversity_weight=1.0)
    z = torch.randn(40, 4)
    out = q(z)
    u = torch.nn.functional.normalize(z, dim=1)
    ref_s, ref_c = _brute_force_entropies(u, 1 / math.sqrt(4), 0.25)
    torch.testing.assert_close(out.metrics["per_sample_entropy"].double(), ref_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["codebook_entropy"].double(), ref_c, rtol=1e-5, atol=1e-5)


def test_bsq_implicit_codebook_is_the_hypercube_corners_on_the_sphere():
    q = _identity_bsq(4)
    codes = q.decode(torch.arange(16)).detach()  # (16, 4)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(16))
    assert torch.unique(codes, dim=0).shape[0] == 16
    assert torch.equal(q.encode(codes), torch.arange(16))
