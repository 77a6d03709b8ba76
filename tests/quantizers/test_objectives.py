"""Entropy and codebook-geometry objectives of VectorQuantizer, with known answers."""

import math

import pytest
import torch

import fvq.quantizers.vq as vq_module
from fvq.quantizers import VectorQuantizer
from fvq.quantizers.objectives import (
    codebook_covariance_loss,
    codebook_variance_loss,
    orthogonality_loss,
    soft_assignment_entropy,
)


def test_entropy_on_a_hand_example():
    # two codes; z at the midpoint has p = (1/2, 1/2); z far on code 0's side has p ~ (1, 0)
    codes = torch.tensor([[-1.0], [1.0]])
    z = torch.tensor([[0.0], [-100.0]])
    ent = soft_assignment_entropy(z, codes, temperature=1.0)
    torch.testing.assert_close(float(ent.sample_entropy), math.log(2) / 2)  # mean of (log 2, 0)
    avg = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(float(ent.batch_entropy), float(-(avg * avg.log()).sum()))


def test_entropy_matches_dense_formula_when_chunked():
    torch.manual_seed(0)
    z = torch.randn(23, 3, requires_grad=True)
    codes = torch.randn(7, 3, requires_grad=True)
    p = (-(torch.cdist(z, codes) ** 2) / 0.7).softmax(dim=-1)
    sample = -(p * p.log()).sum(dim=1).mean()
    avg = p.mean(dim=0)
    batch = -(avg * avg.log()).sum()
    dense_grad = torch.autograd.grad(sample - batch, (z, codes))
    ent = soft_assignment_entropy(z, codes, 0.7, max_chunk_bytes=16 * 7 * 4)  # chunks of 4 rows
    torch.testing.assert_close(ent.sample_entropy, sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.batch_entropy, batch, atol=1e-5, rtol=1e-5)
    grad = torch.autograd.grad(ent.sample_entropy - ent.batch_entropy, (z, codes))
    for a, b in zip(grad, dense_grad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_entropy_term_in_quantizer_is_weighted_and_skipped_at_zero(monkeypatch):
    torch.manual_seed(1)
    z = torch.randn(12, 4)
    q = VectorQuantizer(8, 4, entropy_weight=0.3, entropy_diversity_weight=2.0, init="normal", init_scale=1.0)
    out = q.train()(z)
    ent = soft_assignment_entropy(z, q.codebook_vectors())
    torch.testing.assert_close(out.losses["entropy"], ent.sample_entropy - 2.0 * ent.batch_entropy)
    expected = out.losses["codebook"] + 0.25 * out.losses["commitment"] + 0.3 * out.losses["entropy"]
    torch.testing.assert_close(out.loss, expected)

    def must_not_run(*args, **kwargs):
        raise AssertionError("entropy computed although its weight is 0")

    for name in ("soft_assignment_entropy", "orthogonality_loss", "codebook_variance_loss", "codebook_covariance_loss"):
        monkeypatch.setattr(vq_module, name, must_not_run)
    out = VectorQuantizer(8, 4).train()(z)
    assert set(out.losses) == {"codebook", "commitment"}


def test_orthogonality_known_values():
    eye = torch.eye(4)
    assert float(orthogonality_loss(eye)) == 0.0
    same = torch.ones(3, 2)
    torch.testing.assert_close(float(orthogonality_loss(same)), 1.0)  # all pairs cosine 1
    # tight frame of 3 unit vectors at 120 degrees in 2D: cos^2 = 1/4 per pair, the minimum (K/D - 1)/(K - 1)
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    frame = torch.stack([angles.cos(), angles.sin()], dim=1)
    torch.testing.assert_close(float(orthogonality_loss(frame)), 0.25)
    torch.testing.assert_close(float(orthogonality_loss(frame)), (3 / 2 - 1) / (3 - 1))
    # subsampling: still a mean over pairs of the subset
    big = torch.randn(5000, 8)
    val = float(orthogonality_loss(big, max_codes=256, generator=torch.Generator().manual_seed(0)))
    assert abs(val - 1 / 8) < 0.02  # E[cos^2] of random directions in 8D is 1/8


def test_vicreg_terms_known_values():
    codes = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])  # var dim0 = 1, dim1 = 0
    torch.testing.assert_close(float(codebook_variance_loss(codes, target_std=1.0, eps=0.0)), 0.5)
    assert float(codebook_covariance_loss(codes)) == 0.0
    corr = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # cov = [[2, 2], [2, 2]]
    torch.testing.assert_close(float(codebook_covariance_loss(corr)), (4 + 4) / 2)


def test_geometry_terms_reach_the_codebook():
    q = VectorQuantizer(16, 4, orthogonality_weight=1.0, variance_weight=1.0, covariance_weight=1.0)
    out = q.train()(torch.randn(10, 4))
    assert {"orthogonality", "codebook_variance", "codebook_covariance"} <= set(out.losses)
    out.loss.backward()
    assert bool((q.codebook.grad.abs().sum(dim=1) > 0).all())  # geometry terms touch every code


def test_negative_weight_is_refused():
    with pytest.raises(ValueError, match="variance_weight"):
        VectorQuantizer(4, 2, variance_weight=-0.1)
