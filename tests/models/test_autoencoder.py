"""Encoder / Decoder: LlamaGen VQ-16 / VQ-8 layout, parameter counts, shapes, presets."""

from __future__ import annotations

import pytest
import torch

from fvq.models.autoencoder import Decoder, Encoder
from fvq.models.layers import AttnBlock, group_norm
from fvq.models.presets import available_presets, build_autoencoder, preset_name, resolve_model_config
from fvq.quantizers import VQBridge


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_autoencoder(preset: str) -> tuple[Encoder, Decoder]:
    with torch.device("meta"):
        return build_autoencoder({"preset": preset})


def test_vq16_matches_llamagen_layout_and_size():
    encoder, decoder = _meta_autoencoder("vq16")
    assert encoder.downsample_factor == 16 and decoder.upsample_factor == 16
    enc_keys, dec_keys = set(encoder.state_dict()), set(decoder.state_dict())
    # attention after each of the 2 (encoder) / 3 (decoder) residual blocks at the lowest level only
    assert {f"conv_blocks.4.attn.{j}.q.weight" for j in range(2)} <= enc_keys
    assert "conv_blocks.4.attn.2.q.weight" not in enc_keys
    assert not any(k.startswith(f"conv_blocks.{i}.attn.") for k in enc_keys for i in range(4))
    assert {f"conv_blocks.0.attn.{j}.proj_out.weight" for j in range(3)} <= dec_keys  # decoder block 0 = lowest level
    assert not any(k.startswith(f"conv_blocks.{i}.attn.") for k in dec_keys for i in range(1, 5))
    # res/attn/res middle, four resamplers, shortcut only where the width changes
    assert {
        "mid.0.conv1.weight",
        "mid.1.k.weight",
        "mid.2.conv2.weight",
        "norm_out.weight",
        "conv_out.weight",
    } <= enc_keys
    assert {f"conv_blocks.{i}.downsample.conv.weight" for i in range(4)} <= enc_keys
    assert "conv_blocks.4.downsample.conv.weight" not in enc_keys
    assert {f"conv_blocks.{i}.upsample.conv.weight" for i in range(4)} <= dec_keys
    assert "conv_blocks.4.upsample.conv.weight" not in dec_keys
    assert (
        "conv_blocks.2.res.0.nin_shortcut.weight" in enc_keys
        and "conv_blocks.1.res.0.nin_shortcut.weight" not in enc_keys
    )
    assert len(encoder.conv_blocks[0].res) == 2 and len(decoder.conv_blocks[0].res) == 3
    assert tuple(encoder.conv_out.weight.shape) == (256, 512, 3, 3)
    assert tuple(decoder.conv_in.weight.shape) == (512, 256, 3, 3)
    # sizes: ~72 M in the autoencoder; ~79 M with 1x1 convs, a 16k x 256 codebook and its VQBridge (paper: 79 M)
    autoencoder = _count(encoder) + _count(decoder)
    assert 70e6 < autoencoder < 74e6
    with torch.device("meta"):
        bridge = VQBridge(16384, 256)
    convs = 2 * (256 * 256 + 256)
    total = autoencoder + convs + 16384 * 256 + _count(bridge)
    assert 78e6 < total < 80.5e6


def test_vq8_has_four_levels():
    encoder, decoder = _meta_autoencoder("vq8")
    assert encoder.downsample_factor == 8 and len(encoder.conv_blocks) == 4
    assert "conv_blocks.3.attn.1.q.weight" in encoder.state_dict()
    assert 68e6 < _count(encoder) + _count(decoder) < 72e6


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_builds_and_names_itself(preset):
    encoder, decoder = _meta_autoencoder(preset)
    factor = encoder.downsample_factor
    assert factor == decoder.upsample_factor == 2 ** (len(resolve_model_config({"preset": preset})["ch_mult"]) - 1)
    assert preset_name(resolve_model_config({"preset": preset})) == preset


@pytest.mark.parametrize(("preset", "factor"), [("tiny_f4", 4), ("tiny_f8", 8)])
def test_tiny_shapes(preset, factor):
    torch.manual_seed(0)
    encoder, decoder = build_autoencoder({"preset": preset})
    x = torch.randn(2, 3, 32, 32)
    z = encoder(x)
    assert z.shape == (2, encoder.z_channels, 32 // factor, 32 // factor)
    y = decoder(z)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # non-square inputs work too
    assert encoder(torch.randn(1, 3, 32, 64)).shape[-2:] == (32 // factor, 64 // factor)


def test_vq16_forward_on_a_small_input():
    torch.manual_seed(0)
    encoder, decoder = build_autoencoder({"preset": "vq16"})
    with torch.no_grad():
        z = encoder(torch.randn(1, 3, 32, 32))
        assert z.shape == (1, 256, 2, 2)
        assert decoder(z).shape == (1, 3, 32, 32)


def test_attention_is_single_head_softmax_over_positions():
    torch.manual_seed(0)
    block = AttnBlock(16, num_groups=4)
    x = torch.randn(2, 16, 3, 5)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, HW)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 16**0.5, dim=-1)  # (B, HW, HW)
    expected = x + block.proj_out(torch.einsum("bij,bcj->bci", weights, v).reshape(2, 16, 3, 5))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    encoder, _ = build_autoencoder({"preset": "tiny_f4"})
    down = encoder.conv_blocks[0].downsample
    x = torch.randn(1, down.conv.in_channels, 8, 8)
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2
    )
    torch.testing.assert_close(down(x), expected)
    assert down(x).shape[-2:] == (4, 4)


def test_group_norm_and_config_errors():
    with pytest.raises(ValueError, match="48 channels cannot be split into 32 groups"):
        group_norm(48, 32)
    with pytest.raises(ValueError, match="norm_groups"):
        build_autoencoder({"preset": "tiny_f4", "norm_groups": 5})
    with pytest.raises(ValueError, match="unknown model preset 'vq32'"):
        resolve_model_config({"preset": "vq32"})
    with pytest.raises(ValueError, match="unknown model config keys \\['chmult'\\]"):
        resolve_model_config({"chmult": [1, 2]})
    with pytest.raises(ValueError, match="attn_levels"):
        Encoder(ch=32, ch_mult=(1, 2), attn_levels=[2], norm_groups=8)
    with pytest.raises(ValueError, match="num_res_blocks"):
        Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=0, norm_groups=8)


def test_resolved_config_is_explicit_and_overridable():
    cfg = resolve_model_config({"preset": "vq16"})
    assert cfg["decoder_num_res_blocks"] == 3 and cfg["attn_levels"] == [4] and cfg["norm_groups"] == 32
    cfg = resolve_model_config({"preset": "tiny_f4", "z_channels": 32})
    assert cfg["z_channels"] == 32 and cfg["ch"] == 32
    assert resolve_model_config(cfg) == cfg
    assert preset_name(cfg) is None
