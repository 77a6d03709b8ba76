"""Residual quantizer codebook loss: the cumulative form (RQ-VAE, FVQ authors) and the per-depth form."""

import pytest
import torch
import torch.nn.functional as F

from fvq.quantizers import build_quantizer
from fvq.quantizers.residual import ResidualQuantizer
from fvq.quantizers.vq import VectorQuantizer


def _rq(codebook_loss: str, shared: bool = False, **extra) -> ResidualQuantizer:
    torch.manual_seed(0)
    inner = {"type": "vq", "codebook_size": 16, "codebook_dim": 4, "init": "normal", "init_scale": 1.0, **extra}
    config = {"type": "residual", "num_quantizers": 3, "shared_codebook": shared, "quantizer": inner}
    return build_quantizer({**config, "codebook_loss": codebook_loss})


def _depth0_own_gradient(rq: ResidualQuantizer, z: torch.Tensor, indices: torch.Tensor, depths: int) -> torch.Tensor:
    """Gradient on depth 0's codebook of depth 0's own term, ||q_0 - sg z||^2 / depths."""
    q0 = rq.quantizer_at(0).decode(indices[..., 0])
    (own,) = torch.autograd.grad(F.mse_loss(q0, z.detach()) / depths, rq.quantizer_at(0).codebook)
    return own


def test_default_is_cumulative_and_bad_names_are_refused():
    assert _rq("cumulative").codebook_loss == "cumulative"
    default = build_quantizer(
        {"type": "residual", "num_quantizers": 2, "quantizer": {"type": "vq", "codebook_size": 8, "codebook_dim": 4}}
    )
    assert default.codebook_loss == "cumulative"
    with pytest.raises(ValueError, match="codebook_loss must be one of"):
        _rq("per-depth")


def test_cumulative_value_is_the_mean_over_depths_of_the_partial_sums_error():
    rq = _rq("cumulative")
    z = torch.randn(64, 4)
    out = rq(z)
    partials = [rq.decode(out.indices[..., : d + 1]) for d in range(3)]
    expected = torch.stack([F.mse_loss(p, z) for p in partials]).mean()
    torch.testing.assert_close(out.losses["codebook"], expected)
    # the commitment term is the same in both forms: ||z - sg Q_d||^2 averaged over depths
    torch.testing.assert_close(out.losses["commitment"], expected)
    per_depth = _rq("per_depth")(z)
    torch.testing.assert_close(per_depth.losses["commitment"], out.losses["commitment"])
    assert torch.equal(per_depth.indices, out.indices)


@pytest.mark.parametrize("codebook_loss", ["cumulative", "per_depth"])
def test_later_depths_send_gradient_to_earlier_codes_only_in_the_cumulative_form(codebook_loss):
    rq = _rq(codebook_loss, commitment_weight=0.0)
    z = torch.randn(64, 4)
    out = rq(z)
    (grad,) = torch.autograd.grad(out.loss, rq.quantizer_at(0).codebook)
    own = _depth0_own_gradient(rq, z, out.indices, depths=3)
    later = grad - own  # what depths 1 and 2 sent to depth 0's codes
    if codebook_loss == "per_depth":
        torch.testing.assert_close(grad, own)
        assert later.abs().max() == 0
    else:
        assert later.abs().max() > 1e-3


def test_the_last_depths_codes_get_the_same_gradient_in_both_forms():
    z = torch.randn(64, 4)
    grads = []
    for form in ("cumulative", "per_depth"):
        rq = _rq(form, commitment_weight=0.0)
        grads.append(torch.autograd.grad(rq(z).loss, rq.quantizer_at(2).codebook)[0])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().max() > 0


def test_cumulative_gradient_reaches_a_shared_codebook_through_a_projector():
    torch.manual_seed(0)
    config = {
        "type": "residual",
        "num_quantizers": 4,
        "quantizer": {"type": "vq", "codebook_size": 16, "codebook_dim": 4, "projector": "linear", "init_scale": 1.0},
    }
    rq = build_quantizer(config)
    z = torch.randn(2, 4, 3, 3)
    out = rq(z)
    out.loss.backward()
    inner = rq.quantizer_at(0)
    assert inner.codebook.grad.abs().sum() > 0 and inner.projector.linear.weight.grad.abs().sum() > 0
    assert out.indices.shape == (2, 3, 3, 4)


def test_dropout_export_and_exact_encode_decode_still_hold():
    rq = _rq("cumulative", shared=True)
    rq.quantizer_dropout = 1.0
    rq.set_step(3)
    out = rq(torch.randn(32, 4))
    run = int((out.indices[0] >= 0).sum())
    assert torch.isfinite(out.loss) and (out.indices[:, run:] == -1).all()
    rq.eval()
    z = torch.randn(2, 4, 3, 3)
    plain = rq.export()
    assert plain.codebook_loss == "cumulative"
    with torch.no_grad():
        ref = rq(z)
        assert torch.equal(rq.decode(rq.encode(z)), ref.quantized)
        assert torch.equal(plain.encode(z), ref.indices)


def test_ema_depths_have_no_codebook_term_to_replace():
    torch.manual_seed(0)
    inner = VectorQuantizer(16, 4, codebook_update="ema")
    rq = ResidualQuantizer(inner, num_quantizers=2, codebook_loss="cumulative")
    out = rq(torch.randn(32, 4))
    assert "codebook" not in out.losses and torch.isfinite(out.loss)
