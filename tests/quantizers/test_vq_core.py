import pytest
import torch

from fvq.quantizers import LinearProjector, MLPProjector, VectorQuantizer, VQBridge


def _step(q, z):
    out = q(z)
    (out.loss + out.quantized.square().mean()).backward()
    return out


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_forward_shapes_and_losses(distance):
    torch.manual_seed(0)
    q = VectorQuantizer(64, 8, distance=distance, init="normal", init_scale=1.0)
    z = torch.randn(2, 8, 4, 5)
    out = q(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (2, 4, 5) and out.indices.dtype == torch.long
    assert set(out.losses) == {"codebook", "commitment"}
    expected = out.losses["codebook"] + 0.25 * out.losses["commitment"]
    torch.testing.assert_close(out.loss, expected)
    flat = out.quantized.permute(0, 2, 3, 1).reshape(-1, 8)
    codes = q.codebook_vectors()
    torch.testing.assert_close(flat, codes[out.indices.reshape(-1)])


def test_indices_are_nearest_codes():
    torch.manual_seed(1)
    q = VectorQuantizer(50, 6, init="normal", init_scale=1.0)
    z = torch.randn(40, 6)
    brute = torch.cdist(z, q.codebook.detach()).argmin(dim=1)
    assert torch.equal(q.encode(z), brute)


def test_straight_through_gradient_is_identity():
    torch.manual_seed(2)
    q = VectorQuantizer(16, 4, init="normal", init_scale=1.0)
    z = torch.randn(10, 4, requires_grad=True)
    out = q(z)
    weights = torch.randn(10, 4)
    (out.quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)


def test_codebook_gets_gradient_only_from_codebook_term():
    torch.manual_seed(3)
    q = VectorQuantizer(16, 4, init="normal", init_scale=1.0)
    z = torch.randn(10, 4)
    out = q(z)
    out.loss.backward()
    used = torch.unique(out.indices)
    grad_rows = q.codebook.grad.abs().sum(dim=1) > 0
    assert torch.equal(torch.nonzero(grad_rows).flatten(), used)


@pytest.mark.parametrize(
    "projector",
    [
        lambda: LinearProjector(8),
        lambda: MLPProjector(8, depth=3),
        lambda: VQBridge(64, 8, group_size=4, hidden_dim=16, num_heads=2, expand_init="xavier"),
        lambda: VQBridge(64, 8, group_size=8, hidden_dim=16, num_heads=2, block="dit", expand_init="xavier"),
    ],
)
def test_decode_encode_equals_forward_and_export(projector):
    torch.manual_seed(4)
    q = VectorQuantizer(64, 8, projector=projector()).eval()
    z = torch.randn(3, 8, 4, 4) * 0.05
    with torch.no_grad():
        out = q(z)
        assert torch.equal(q.decode(q.encode(z)), out.quantized)
        plain = q.export()
        assert plain.projector is None
        assert torch.equal(plain.encode(z), out.indices)
        assert torch.equal(plain(z).quantized, out.quantized)
    assert sum(p.numel() for p in plain.parameters()) == 64 * 8


def test_projector_gradients_reach_raw_codebook_and_every_parameter():
    torch.manual_seed(5)
    bridge = VQBridge(64, 8, group_size=4, hidden_dim=16, num_heads=2, expand_init="xavier")
    q = VectorQuantizer(64, 8, projector=bridge)
    _step(q, torch.randn(32, 8))
    assert q.codebook.grad is not None and (q.codebook.grad.abs().sum(dim=1) > 0).all()
    for name, p in q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_published_zero_init_bridge_maps_every_code_to_zero_then_separates():
    torch.manual_seed(6)
    bridge = VQBridge(64, 8, group_size=4, hidden_dim=16, num_heads=2)
    q = VectorQuantizer(64, 8, projector=bridge)
    assert torch.count_nonzero(q.codebook_vectors()) == 0
    z = torch.randn(32, 8)
    assert (q.encode(z) == 0).all()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        _step(q, z)
        opt.step()
    assert torch.unique(q.codebook_vectors().detach(), dim=0).shape[0] > 1


def test_fp32_search_under_bf16_autocast():
    torch.manual_seed(7)
    q = VectorQuantizer(128, 16, init="normal", init_scale=1.0)
    z = torch.randn(64, 16)
    expected = q.encode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q(z).indices
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "z, message",
    [
        (torch.randn(2, 3, 4), "rank 3"),
        (torch.randn(2, 5, 4, 4), "must have 8 channels on axis 1, got 5"),
        (torch.full((4, 8), float("nan")), "non-finite"),
    ],
)
def test_bad_input_errors(z, message):
    q = VectorQuantizer(16, 8)
    with pytest.raises(ValueError, match=message):
        q(z)


def test_decode_rejects_out_of_range_indices():
    q = VectorQuantizer(16, 8)
    with pytest.raises(ValueError, match=r"\[0, 15\].*got values in \[0, 16\]"):
        q.decode(torch.tensor([0, 16]))
    with pytest.raises(TypeError, match="integer"):
        q.decode(torch.tensor([0.0]))


def test_constructor_errors():
    with pytest.raises(ValueError, match="distance"):
        VectorQuantizer(16, 8, distance="manhattan")
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantizer(0, 8)
