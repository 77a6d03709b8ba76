"""PatchGAN discriminator: layout, reference initialisation, shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fvq.losses.discriminator import PatchGANDiscriminator


def test_reference_layout_and_parameter_count() -> None:
    d = PatchGANDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2),
        (64, 128, 2),
        (128, 256, 2),
        (256, 512, 1),
        (512, 1, 1),
    ]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    # convs followed by BatchNorm carry no bias; first and last do
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    assert all(m.negative_slope == 0.2 for m in d.modules() if isinstance(m, nn.LeakyReLU))
    # 3*64*16+64 + 64*128*16 + 128*256*16 + 256*512*16 + 512*16+1 convs, 2*(128+256+512) BN affine
    expected = (3 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + (512 * 16 + 1) + 2 * 896
    assert sum(p.numel() for p in d.parameters()) == expected == 2_765_633


def test_reference_initialisation() -> None:
    torch.manual_seed(0)
    d = PatchGANDiscriminator()
    big = d.main[8].weight  # 256 -> 512 conv, 2.1 M weights
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 5e-4
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    weights = torch.cat([b.weight.detach() for b in bns])
    assert abs(weights.mean().item() - 1.0) < 5e-3 and abs(weights.std().item() - 0.02) < 3e-3
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in bns)


def test_output_shape_and_gradients() -> None:
    d = PatchGANDiscriminator()
    assert d.output_size(256) == 30  # pix2pix's 30x30 patch map on 256 px images
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    logits = d(x)
    assert logits.shape == (2, 1, d.output_size(64), d.output_size(64)) == (2, 1, 6, 6)
    logits.mean().backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_other_norms(norm: str) -> None:
    d = PatchGANDiscriminator(norm=norm, base_channels=8, num_layers=2)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    assert all((c.bias is not None) == (norm == "none") for c in convs[1:-1])
    out = d(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1, d.output_size(32), d.output_size(32))


def test_bad_inputs() -> None:
    d = PatchGANDiscriminator(base_channels=8)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        d(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        d(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="norm must be"):
        PatchGANDiscriminator(norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_layers"):
        PatchGANDiscriminator(num_layers=0)
