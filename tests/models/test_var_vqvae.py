"""VAR's VQVAE as a model preset: architecture facts, shapes, gradients, and the multi-scale quantizer around it."""

from __future__ import annotations

import pytest
import torch

from fvq.models import Tokenizer
from fvq.models.presets import build_autoencoder, resolve_model_config


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_var_preset_matches_vars_vqvae_layout():
    cfg = resolve_model_config({"preset": "var_vqvae"})
    assert cfg["ch"] == 160 and cfg["ch_mult"] == [1, 1, 2, 2, 4] and cfg["z_channels"] == 32
    assert cfg["num_res_blocks"] == 2 and cfg["decoder_num_res_blocks"] == 3 and cfg["attn_levels"] == [4]
    assert cfg["latent_conv_kernel_size"] == 3
    with torch.device("meta"):
        encoder, decoder = build_autoencoder({"preset": "var_vqvae"})
    assert encoder.downsample_factor == 16
    assert tuple(encoder.latent_conv.weight.shape) == (32, 32, 3, 3)  # VAR's quant_conv
    assert tuple(decoder.latent_conv.weight.shape) == (32, 32, 3, 3)  # VAR's post_quant_conv
    # VAR's Encoder + Decoder + quant_conv + post_quant_conv built from its own code (ch 160, Cvae 32) count
    # 108,780,291 parameters; its attention has one fused qkv conv where fvq has three: the same weights
    assert _count(encoder) + _count(decoder) == 108_780_291


def test_presets_without_latent_conv_keep_their_config_and_state():
    assert "latent_conv_kernel_size" not in resolve_model_config({"preset": "vq16"})
    encoder, decoder = build_autoencoder({"preset": "tiny_f4"})
    assert not any("latent_conv" in k for k in [*encoder.state_dict(), *decoder.state_dict()])
    with pytest.raises(ValueError, match="positive odd int"):
        build_autoencoder({"preset": "tiny_f4", "latent_conv_kernel_size": 2})


def test_var_vqvae_gives_vars_latent_grid_at_256px():
    torch.manual_seed(0)
    encoder, _ = build_autoencoder({"preset": "var_vqvae", "ch": 32, "norm_groups": 8})  # narrow: a CPU test
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 256, 256)).shape == (1, 32, 16, 16)  # 16x16 x Cvae 32


@pytest.mark.parametrize("bridge", [False, True])
def test_tiny_var_tokenizer_with_multiscale_quantizer_trains(bridge):
    torch.manual_seed(0)
    inner = {"type": "vq", "codebook_size": 64, "codebook_dim": 32, "commitment_weight": 0.25}
    if bridge:
        inner["projector"] = {
            "type": "vq_bridge",
            "group_size": 4,
            "hidden_dim": 32,
            "num_heads": 2,
            "expand_init": "xavier",
            "expand_gain": 0.01,
        }
    model = Tokenizer.from_config(
        {
            "model": {"preset": "tiny_var_f4"},
            "quantizer": {"type": "multiscale", "scales": [1, 2, 3, 4, 5, 6, 8], "quantizer": inner},
        }
    )
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, 1 + 4 + 9 + 16 + 25 + 36 + 64)
    loss = (out.reconstruction - x).square().mean() + out.quantizer.loss
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())
    ]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        indices = model.encode(x)  # (B, sum_k s_k^2): the multi-scale token sequence
        decoded = model.decode_latents(model.quantizer.decode(indices))
        torch.testing.assert_close(decoded, model(x).reconstruction)


@pytest.mark.parametrize("name", ["var_msvq_imagenet", "var_msvq_bridge_imagenet"])
def test_var_imagenet_configs_build(name):
    from fvq.training.config import load_config

    config = load_config(name)
    with torch.device("meta"):
        model = Tokenizer.from_config({"model": config.model, "quantizer": config.quantizer})
    assert model.downsample_factor == 16 and model.quantizer.num_tokens == 680
    assert model.encoder.z_channels == 32
