import pytest
import torch

from fvq.quantizers import VQBridge, bridge_cost, default_group_size


@pytest.mark.parametrize(
    "codebook_size, group_size, expected_params",
    [(16_384, 16, 3_153_664), (65_536, 64, 9_457_408), (262_144, 64, 9_457_408)],
)
def test_parameter_counts_match_published(codebook_size, group_size, expected_params):
    # published: 3.15 M (K=16k, 16 per group), 9.46 M (K=65k and 262k, 64 per group)
    assert bridge_cost(codebook_size, 256, group_size).params == expected_params


def test_module_parameter_count_matches_analytic():
    bridge = VQBridge(1024, 32, group_size=16, hidden_dim=64, num_heads=4)
    assert bridge.cost().params == sum(p.numel() for p in bridge.parameters())
    assert bridge.cost().params == bridge_cost(1024, 32, 16, hidden_dim=64).params


@pytest.mark.parametrize("codebook_size, group_size, paper_gmacs", [(16_384, 16, 4.30), (262_144, 64, 55.89)])
def test_macs_match_paper_table_10(codebook_size, group_size, paper_gmacs):
    gmacs = bridge_cost(codebook_size, 256, group_size).macs / 1e9
    assert abs(gmacs - paper_gmacs) / paper_gmacs < 0.01


def test_default_group_sizes_follow_the_ablation_and_published_configs():
    # paper: 4 per group best at K = 4k, 16 at 16k, x4 per x4 in K; published: 64 at 65k and at 262k
    assert default_group_size(4096) == 4
    assert default_group_size(16_384) == 16
    assert default_group_size(65_536) == 64
    assert default_group_size(262_144) == 64
    assert default_group_size(1024) == 1 and default_group_size(64) == 1
    assert default_group_size(12_000) == 8  # largest power of two <= K / 1,024 dividing K
    assert VQBridge(8192, 8, hidden_dim=16).group_size == 8


@pytest.mark.parametrize("block", ["vit", "dit"])
@pytest.mark.parametrize("compress_norm", [False, True])
def test_shapes_and_gradients(block, compress_norm):
    torch.manual_seed(0)
    bridge = VQBridge(
        256,
        8,
        group_size=16,
        hidden_dim=32,
        num_heads=4,
        block=block,
        compress_norm=compress_norm,
        expand_init="xavier",
    )
    codebook = torch.randn(256, 8, requires_grad=True)
    out = bridge(codebook)
    assert out.shape == (256, 8)
    out.square().sum().backward()
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0
    for name, p in bridge.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_grouping_is_consecutive_codes():
    # a bridge with no blocks and identity-like maps: codes of one group only influence their own group
    bridge = VQBridge(64, 4, group_size=8, hidden_dim=32, depth=0, expand_init="xavier")
    codebook = torch.randn(64, 4)
    base = bridge(codebook).detach()
    changed = codebook.clone()
    changed[3] += 1.0  # code 3 lies in group 0 (codes 0..7)
    diff = (bridge(changed).detach() - base).abs().sum(dim=1)
    assert diff[:8].sum() > 0 and diff[8:].sum() == 0


def test_zero_init_outputs_zero():
    bridge = VQBridge(128, 8, group_size=16, hidden_dim=16, num_heads=2)
    assert torch.count_nonzero(bridge(torch.randn(128, 8))) == 0


def test_bad_group_size_and_shapes():
    with pytest.raises(ValueError, match="1000 codes cannot be split into groups of 16"):
        VQBridge(1000, 8, group_size=16)
    bridge = VQBridge(64, 8, group_size=8, hidden_dim=16, num_heads=2)
    with pytest.raises(ValueError, match=r"\(K, 8\)"):
        bridge(torch.randn(64, 7))
    with pytest.raises(ValueError, match="built for 64 codes, got 32"):
        bridge(torch.randn(32, 8))
    with pytest.raises(ValueError, match="block"):
        VQBridge(64, 8, group_size=8, block="mamba")


def test_small_random_expansion_makes_every_code_distinct_and_near_zero():
    torch.manual_seed(0)
    codebook = torch.rand(256, 16) * 2 - 1
    zero = VQBridge(256, 16, group_size=16, hidden_dim=32, num_heads=4)
    small = VQBridge(256, 16, group_size=16, hidden_dim=32, num_heads=4, expand_init="xavier", expand_gain=0.01)
    full = VQBridge(256, 16, group_size=16, hidden_dim=32, num_heads=4, expand_init="xavier")
    with torch.no_grad():
        assert torch.unique(zero(codebook), dim=0).shape[0] == 1  # published init: every code identical at step 0
        small_codes, full_codes = small(codebook), full(codebook)
    assert torch.unique(small_codes, dim=0).shape[0] == 256
    ratio = small_codes.norm(dim=1).mean() / full_codes.norm(dim=1).mean()
    assert 0.005 < ratio < 0.02  # the gain scales the mapped codes
    with pytest.raises(ValueError, match="expand_gain"):
        VQBridge(256, 16, group_size=16, expand_gain=0.0)
