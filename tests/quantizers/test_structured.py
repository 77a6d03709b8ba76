"""Known-answer tests of the structured-codebook quantizers: residual, grouped, VAR multi-scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fvq.quantizers.fsq import FiniteScalarQuantizer
from fvq.quantizers.grouped import GroupedQuantizer, group_dim
from fvq.quantizers.multiscale import MultiScaleResidualQuantizer, check_scales
from fvq.quantizers.projectors import LinearProjector
from fvq.quantizers.residual import ResidualQuantizer
from fvq.quantizers.vq import VectorQuantizer
from fvq.quantizers.vq_bridge import VQBridge


# ---------------------------------------------------------------------------------------------------------------------
# residual
def _data_initialised_rvq(z: torch.Tensor, depths: int, k: int) -> ResidualQuantizer:
    """Per-depth codebooks drawn from that depth's residuals (k-means-style data init)."""
    layers, residual = [], z
    gen = torch.Generator().manual_seed(0)
    for _ in range(depths):
        vq = VectorQuantizer(k, z.shape[1])
        with torch.no_grad():
            vq.codebook.copy_(residual[torch.randperm(residual.shape[0], generator=gen)[:k]])
        residual = residual - vq.decode(vq.encode(residual))
        layers.append(vq)
    return ResidualQuantizer(layers).eval()


def test_residual_error_falls_with_depth_and_prefix_decoding():
    torch.manual_seed(0)
    z = torch.randn(2048, 4)
    q = _data_initialised_rvq(z, depths=4, k=64)
    out = q(z)
    errors = [float(out.metrics[f"depth{d}/residual"]) for d in range(4)]
    assert all(b < 0.8 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] < float(z.square().mean())
    with torch.no_grad():
        prefix_errors = [float((q.decode(out.indices[:, :n]) - z).square().mean()) for n in range(1, 5)]
    torch.testing.assert_close(torch.tensor(prefix_errors), torch.tensor(errors))
    assert torch.equal(q.decode(out.indices), out.quantized)


def test_residual_losses_are_means_over_depths():
    torch.manual_seed(0)
    layers = [VectorQuantizer(16, 4, init="normal", init_scale=1.0) for _ in range(3)]
    q = ResidualQuantizer(layers).eval()
    z = torch.randn(32, 4)
    out = q(z)
    residual, per_depth = z, []
    for layer in layers:
        o = layer(residual)
        per_depth.append(o)
        residual = residual - o.quantized.detach()
    torch.testing.assert_close(out.loss, torch.stack([o.loss for o in per_depth]).mean())
    for name in ("codebook", "commitment"):
        torch.testing.assert_close(out.losses[name], torch.stack([o.losses[name] for o in per_depth]).mean())
    assert torch.equal(out.indices, torch.stack([o.indices for o in per_depth], dim=-1))


def test_residual_shared_codebook_is_one_module_and_composes_with_vq_bridge():
    vq = VectorQuantizer(32, 8, projector=VQBridge(32, 8, group_size=4, hidden_dim=16, num_heads=2))
    q = ResidualQuantizer(vq, num_quantizers=4)
    assert q.quantizer_at(0) is q.quantizer_at(3) is vq
    assert sum(p.numel() for p in q.parameters()) == sum(p.numel() for p in vq.parameters())
    assert q.codes_per_position == 4 and q.codebook_size == 32


def test_residual_quantizer_dropout_in_training_only():
    torch.manual_seed(0)
    q = ResidualQuantizer(VectorQuantizer(16, 4), num_quantizers=4, quantizer_dropout=1.0)
    z = torch.randn(8, 4)
    depths_seen = set()
    for _ in range(30):
        idx = q.train()(z).indices
        active = int((idx[0] >= 0).sum())
        assert (idx[:, :active] >= 0).all() and (idx[:, active:] == -1).all()
        depths_seen.add(active)
    assert depths_seen == {1, 2, 3, 4}
    assert (q.eval()(z).indices >= 0).all()


def test_residual_rejects_mismatched_quantizers():
    with pytest.raises(ValueError, match="codebook_dim"):
        ResidualQuantizer([VectorQuantizer(8, 4), VectorQuantizer(8, 5)])
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualQuantizer(VectorQuantizer(8, 4))
    with pytest.raises(ValueError, match="depths"):
        ResidualQuantizer(VectorQuantizer(8, 4), num_quantizers=2).decode(torch.zeros(3, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# grouped
def test_grouped_equals_independent_quantizers_per_channel_group():
    torch.manual_seed(0)
    subs = [VectorQuantizer(16, 3, init="normal", init_scale=1.0) for _ in range(2)]
    q = GroupedQuantizer(subs).eval()
    z = torch.randn(2, 6, 3, 3)
    out = q(z)
    assert out.indices.shape == (2, 3, 3, 2)
    for g, sub in enumerate(subs):
        part = z[:, 3 * g : 3 * g + 3]
        assert torch.equal(out.indices[..., g], sub.encode(part))
        assert torch.equal(out.quantized[:, 3 * g : 3 * g + 3], sub(part).quantized)


def test_grouped_fsq_vocabulary_is_the_product():
    q = GroupedQuantizer(FiniteScalarQuantizer([3, 3]), num_groups=3)
    assert q.codebook_dim == 6 and q.codebook_size == 9 and q.codes_per_position == 3


def test_group_dim_must_divide():
    assert group_dim(12, 4) == 3
    with pytest.raises(ValueError, match="divide"):
        group_dim(10, 3)
    with pytest.raises(ValueError):
        group_dim(8, 0)


# ---------------------------------------------------------------------------------------------------------------------
# multi-scale (VAR)
@pytest.mark.parametrize("scales", [(1, 2, 2), (3, 2), (), (0, 1), (1, 2.5)])
def test_multiscale_rejects_bad_scales(scales):
    with pytest.raises(ValueError, match="scales"):
        check_scales(scales)
    with pytest.raises(ValueError, match="scales"):
        MultiScaleResidualQuantizer(VectorQuantizer(8, 4), scales=scales)


def test_multiscale_last_scale_must_match_the_map():
    q = MultiScaleResidualQuantizer(VectorQuantizer(8, 4), scales=(1, 2, 4))
    with pytest.raises(ValueError, match="last scale"):
        q(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError):
        q(torch.randn(16, 4))


def test_multiscale_var_defaults_and_phi_schedule():
    q = MultiScaleResidualQuantizer(VectorQuantizer(16, 4))
    assert q.scales == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and q.num_tokens == 680
    assert len(q.phis) == 4 and q.quant_resi == 0.5
    schedule = q._phi_of_scale
    assert schedule[0] == 0 and schedule[-1] == 3 and set(schedule) == {0, 1, 2, 3}
    assert all(b >= a for a, b in zip(schedule, schedule[1:]))
    per_scale = MultiScaleResidualQuantizer(VectorQuantizer(16, 4), num_phi=10)
    assert per_scale._phi_of_scale == list(range(10))


def test_multiscale_without_phi_is_area_down_bicubic_up_residual():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 3, init="normal", init_scale=1.0)
    q = MultiScaleResidualQuantizer(vq, scales=(1, 2, 4), quant_resi=0.0).eval()
    z = torch.randn(2, 3, 4, 4)
    out = q(z)
    rest, f_hat, expected = z.clone(), torch.zeros_like(z), []
    for s in (1, 2, 4):
        r = F.interpolate(rest, size=(s, s), mode="area")
        idx = vq.encode(r)  # (B, s, s)
        h = vq.decode(idx)
        h = F.interpolate(h, size=(4, 4), mode="bicubic") if s != 4 else h
        f_hat, rest = f_hat + h, rest - h
        expected.append(idx.reshape(2, -1))
    assert torch.equal(out.indices, torch.cat(expected, dim=1))
    torch.testing.assert_close(out.quantized, f_hat)


def test_multiscale_index_helpers_use_the_mapped_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, init="normal", init_scale=1.0, projector=LinearProjector(4))
    q = MultiScaleResidualQuantizer(vq, scales=(1, 2, 3, 4)).eval()
    z = torch.randn(2, 4, 4, 4)
    indices = q.encode(z)
    per_scale = q.split_indices(indices)
    assert [tuple(t.shape) for t in per_scale] == [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 4, 4)]
    assert torch.equal(q.merge_indices(per_scale), indices)
    with torch.no_grad():
        inputs = q.indices_to_next_scale_inputs(indices)
        assert inputs.shape == (2, 4 + 9 + 16, 4)
        # step by step, as a sampler would: the final reconstruction equals decode (both from f(C), not C)
        f_hat = torch.zeros(2, 4, 4, 4)
        for k in range(4):
            f_hat, nxt = q.next_scale_input(k, f_hat, per_scale[k])
            if k < 3:
                s = q.scales[k + 1]
                torch.testing.assert_close(nxt, F.interpolate(f_hat, size=(s, s), mode="area"))
        assert torch.equal(f_hat, q.decode(indices))
        assert torch.equal(f_hat, q(z).quantized)


def test_multiscale_codebooks_beyond_65536_codes():
    torch.manual_seed(0)
    k, d = 70_000, 4
    vq = VectorQuantizer(k, d)
    with torch.no_grad():
        vq.codebook.fill_(1e3)
        vq.codebook[66_000:] = torch.randn(k - 66_000, d)
    q = MultiScaleResidualQuantizer(vq, scales=(1, 2)).eval()
    z = torch.randn(2, d, 2, 2)
    out = q(z)
    assert out.indices.min() >= 66_000 and out.indices.max() < k
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert q.indices_to_next_scale_inputs(out.indices).shape == (2, 4, d)


def test_multiscale_requires_a_vector_quantizer():
    with pytest.raises(TypeError, match="VectorQuantizer"):
        MultiScaleResidualQuantizer(FiniteScalarQuantizer([3, 3]), scales=(1, 2))
