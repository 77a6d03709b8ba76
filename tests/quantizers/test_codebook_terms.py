"""Variance hinge, repulsion and contrastive codebook terms: what each promises, and their config wiring."""

import math

import pytest
import torch
import torch.nn.functional as F

from fvq.quantizers import build_quantizer
from fvq.quantizers.objectives import (
    codebook_repulsion_loss,
    codebook_variance_hinge_loss,
    contrastive_codebook_loss,
)

VQ = {"type": "vq", "codebook_size": 32, "codebook_dim": 8, "init": "normal", "init_scale": 0.1}


# ---- variance hinge ----------------------------------------------------------------------------------------------
def test_variance_hinge_is_zero_at_or_above_the_target_and_the_gap_below():
    torch.manual_seed(0)
    codes = torch.randn(4096, 16)
    codes = (codes - codes.mean(0)) / codes.std(0, unbiased=False)  # per-dimension variance exactly 1
    assert codebook_variance_hinge_loss(codes, target_variance=1.0) == 0
    assert codebook_variance_hinge_loss(2.0 * codes, target_variance=1.0) == 0
    torch.testing.assert_close(codebook_variance_hinge_loss(0.5 * codes, 1.0), torch.tensor(0.75))  # 1 - 0.25
    # only the total spread counts: all variance in one dimension satisfies it too
    one_dim = torch.zeros(4096, 16)
    one_dim[:, 0] = codes[:, 0] * 4.0  # variance 16 in one of 16 dims: mean 1
    torch.testing.assert_close(codebook_variance_hinge_loss(one_dim, 1.0), torch.tensor(0.0))


def test_variance_hinge_gradient_spreads_collapsed_codes():
    codes = (torch.randn(64, 8) * 0.01).requires_grad_()
    loss = codebook_variance_hinge_loss(codes, 1.0)
    loss.backward()
    with torch.no_grad():
        stepped = codes - 10.0 * codes.grad
    assert codebook_variance_hinge_loss(stepped, 1.0) < loss


# ---- repulsion ---------------------------------------------------------------------------------------------------
def test_repulsion_decreases_as_codes_spread():
    torch.manual_seed(0)
    codes = torch.randn(64, 8)
    values = [float(codebook_repulsion_loss(s * codes, temperature=1.0)) for s in (0.0, 0.1, 0.5, 1.0, 3.0)]
    assert values[0] == pytest.approx(1.0)  # every pair coincides: exp(0)
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 1e-3


def test_repulsion_matches_the_survey_formula_and_subsamples_large_codebooks():
    torch.manual_seed(0)
    codes = torch.randn(10, 3)
    sq = torch.cdist(codes, codes).square()
    mask = ~torch.eye(10, dtype=torch.bool)
    expected = torch.exp(-sq / 2.0)[mask].mean()
    torch.testing.assert_close(codebook_repulsion_loss(codes, temperature=2.0, max_codes=None), expected)
    big = torch.randn(3000, 4)
    assert 0 < codebook_repulsion_loss(big, max_codes=256) < 1


# ---- contrastive -------------------------------------------------------------------------------------------------
def test_contrastive_is_the_infonce_of_the_assigned_code_and_chunks_exactly():
    torch.manual_seed(0)
    z, codes = torch.randn(50, 8), torch.randn(16, 8)
    idx = torch.randint(16, (50,))
    expected = F.cross_entropy(z @ codes.t() / 0.5, idx)
    torch.testing.assert_close(contrastive_codebook_loss(z, codes, idx, 0.5), expected)
    z.requires_grad_()
    chunked = contrastive_codebook_loss(z, codes, idx, 0.5, max_chunk_bytes=16 * 4 * 7)  # 7 rows per chunk
    torch.testing.assert_close(chunked, expected.detach())
    chunked.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_contrastive_falls_as_codes_separate_around_their_inputs():
    # inputs sit on their own codes; the loss is lower the farther apart the codes stand
    directions = torch.eye(8)
    idx = torch.arange(8)
    crowded = 0.1 * directions  # all codes near one point: logits 1 for the own code, 0 for the 7 others
    spread = contrastive_codebook_loss(directions, directions, idx, 0.1)
    close = contrastive_codebook_loss(directions, crowded, idx, 0.1)
    torch.testing.assert_close(close, torch.tensor(math.log(1 + 7 / math.e)))
    assert spread < 1e-3 < close


# ---- config wiring -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keys, term",
    [
        ({"variance_hinge_weight": 0.5, "variance_hinge_target": 1.0}, "codebook_variance_hinge"),
        ({"repulsion_weight": 0.5, "repulsion_temperature": 0.1}, "repulsion"),
        ({"contrastive_weight": 0.5, "contrastive_temperature": 0.2}, "contrastive"),
    ],
)
def test_each_term_is_selected_by_its_weight_and_trains_the_codebook(keys, term):
    torch.manual_seed(0)
    q = build_quantizer({**VQ, **keys})
    assert term not in build_quantizer(VQ)(torch.randn(4, 8)).losses
    out = q(torch.randn(64, 8))
    assert term in out.losses and torch.isfinite(out.losses[term])
    weighted = sum(w * out.losses[n] for n, w in q._loss_weights().items() if n in out.losses)
    torch.testing.assert_close(out.loss, weighted)
    (grad,) = torch.autograd.grad(out.losses[term], q.codebook)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"repulsion_weight": -1.0}, "repulsion_weight must be >= 0"),
        ({"repulsion_weight": 1.0, "repulsion_temperature": 0.0}, "repulsion_temperature must be > 0"),
        ({"contrastive_weight": 1.0, "contrastive_temperature": -1.0}, "contrastive_temperature must be > 0"),
        ({"variance_hinge_weight": 1.0, "codebook_update": "ema"}, "variance_hinge_weight > 0 shape the codebook"),
        ({"repulsion_weight": 1.0, "freeze_codebook": True}, "leaves nothing to train"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(keys, match):
    with pytest.raises(ValueError, match=match):
        build_quantizer({**VQ, **keys})
