"""GAN objectives, start step and VQGAN's adaptive weight, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fvq.losses.adversarial import adaptive_weight, adopt_weight, discriminator_loss, generator_loss


def test_hinge_values() -> None:
    zeros = torch.zeros(2, 1, 3, 3)
    assert discriminator_loss(zeros, zeros, "hinge").item() == pytest.approx(1.0)
    # confidently right on both sides: no loss
    assert discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -3.0), "hinge").item() == 0.0
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([0.0, -0.5])
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert generator_loss(fake, "hinge").item() == pytest.approx(0.25)


def test_cross_entropy_losses() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    bce = 0.5 * (
        F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    )
    for kind in ("non_saturating", "vanilla", "non-saturating"):
        assert torch.allclose(discriminator_loss(real, fake, kind), bce)
    assert discriminator_loss(torch.zeros(3), torch.zeros(3), "vanilla").item() == pytest.approx(math.log(2))
    ns = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))  # -log D(G(z))
    assert torch.allclose(generator_loss(fake, "non_saturating"), ns)
    minimax = torch.log1p(-torch.sigmoid(fake)).mean()  # log(1 - D(G(z)))
    assert torch.allclose(generator_loss(fake, "vanilla"), minimax, atol=1e-6)


def test_low_precision_logits_give_float32() -> None:
    x = torch.randn(8).bfloat16()
    assert discriminator_loss(x, x, "hinge").dtype == torch.float32
    assert generator_loss(x, "non_saturating").dtype == torch.float32


def test_unknown_loss() -> None:
    with pytest.raises(ValueError, match="gan_loss must be one of"):
        generator_loss(torch.zeros(2), "wasserstein")


def test_adopt_weight() -> None:
    assert adopt_weight(0.5, 19_999, 20_000) == 0.0
    assert adopt_weight(0.5, 20_000, 20_000) == 0.5


def test_adaptive_weight_is_grad_norm_ratio() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)  # stands in for the decoder's last layer
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    out = x @ w.T  # (5, 3)
    nll = ((out - y) ** 2).mean()
    gan = -out.mean()
    # closed-form gradients w.r.t. w
    g_nll = 2.0 / out.numel() * (out - y).detach().T @ x
    g_gan = -torch.ones(3, 5) / out.numel() @ x
    expected = g_nll.norm() / (g_gan.norm() + 1e-4)
    got = adaptive_weight(nll, gan, w)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert not got.requires_grad
    # the graph stays usable for the real backward
    (nll + got * gan).backward()
    assert w.grad is not None
    # clamp
    out = x @ w.T
    tiny = adaptive_weight(((out - y) ** 2).mean(), -1e-12 * out.mean(), w, max_weight=10.0, eps=0.0)
    assert tiny.item() == 10.0


def test_adaptive_weight_needs_a_differentiable_layer() -> None:
    with pytest.raises(ValueError, match="last_layer"):
        adaptive_weight(torch.zeros(()), torch.zeros(()), torch.zeros(3))
