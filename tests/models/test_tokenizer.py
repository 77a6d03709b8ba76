"""Tokenizer: shapes, encode/decode inverse, gradients, save/load, export, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fvq
from fvq.models.presets import build_autoencoder
from fvq.models.tokenizer import Tokenizer, TokenizerOutput
from fvq.quantizers import VectorQuantizer

BRIDGE = {"type": "vq_bridge", "group_size": 4, "hidden_dim": 32, "num_heads": 2, "expand_init": "xavier"}


def _config(preset: str = "tiny_f4", bridge: bool = False, size: int = 64, dim: int = 16) -> dict:
    quantizer = {"type": "vq", "codebook_size": size, "codebook_dim": dim}
    if bridge:
        quantizer["projector"] = dict(BRIDGE)
    return {"model": {"preset": preset}, "quantizer": quantizer}


def _images(b: int = 2, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize(("preset", "factor"), [("tiny_f4", 4), ("tiny_f8", 8)])
def test_forward_shapes(preset, factor):
    torch.manual_seed(0)
    tok = Tokenizer.from_config(_config(preset))
    x = _images(2, 16, 24)
    out = tok(x)
    assert isinstance(out, TokenizerOutput)
    assert out.reconstruction.shape == x.shape
    assert out.quantizer.quantized.shape == (2, 16, 16 // factor, 24 // factor)
    assert out.indices.shape == (2, 16 // factor, 24 // factor) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 64
    assert torch.isfinite(out.quantizer.loss) and out.quantizer.loss.ndim == 0
    assert tok.downsample_factor == factor and tok.latent_shape(16, 24) == (16 // factor, 24 // factor)
    assert tok.last_layer is tok.decoder.conv_out.weight


def test_decode_of_encode_equals_forward_in_eval():
    torch.manual_seed(0)
    tok = Tokenizer.from_config(_config(bridge=True)).eval()
    x = _images()
    with torch.no_grad():
        out = tok(x)
        indices = tok.encode(x)
        assert torch.equal(indices, out.indices)
        assert torch.equal(tok.decode(indices), out.reconstruction)
        latents = tok.encode_latents(x)
        assert torch.equal(tok.decode_latents(tok.quantizer.decode(tok.quantizer.encode(latents))), out.reconstruction)


def test_multiscale_tokens_decode_through_the_tokenizer():
    """The multi-scale quantizer's indices are one flat sequence per image, (B, L): decode takes them as they are."""
    torch.manual_seed(0)
    quantizer = {
        "type": "multiscale",
        "scales": [1, 2, 4],
        "quantizer": {"type": "vq", "codebook_size": 64, "codebook_dim": 16},
    }
    tok = Tokenizer.from_config({"model": {"preset": "tiny_f4"}, "quantizer": quantizer}).eval()
    assert tok.quantizer.index_shape == "(B, L)"
    x = _images()  # 16 px -> 4 x 4 latents: 1 + 4 + 16 tokens
    with torch.no_grad():
        out = tok(x)
        indices = tok.encode(x)
        assert indices.shape == (2, 21)
        assert torch.equal(tok.decode(indices), out.reconstruction)
    with pytest.raises(ValueError, match="axes \\(B, L\\)"):
        tok.decode(indices.reshape(2, 3, 7))


@pytest.mark.parametrize(
    "quantizer",
    [
        {
            "type": "residual",
            "num_quantizers": 2,
            "shared_codebook": True,
            "quantizer": {"type": "vq", "codebook_size": 64, "codebook_dim": 16, "projector": BRIDGE},
        },
        {"type": "grouped", "num_groups": 2, "codebook_dim": 16, "quantizer": {"type": "vq", "codebook_size": 32}},
        {"type": "fsq", "levels": [8, 5, 5]},
    ],
    ids=["residual_bridge", "grouped", "fsq"],
)
def test_other_quantizers_round_trip_and_export(quantizer):
    torch.manual_seed(0)
    tok = Tokenizer.from_config({"model": {"preset": "tiny_f4"}, "quantizer": quantizer}).eval()
    x = _images()
    with torch.no_grad():
        out = tok(x)
        indices = tok.encode(x)
        assert indices.shape[:3] == (2, 4, 4) and torch.equal(indices, out.indices)
        assert torch.equal(tok.decode(indices), out.reconstruction)
        exported = tok.export()
        assert "projector" not in json.dumps(exported.config["quantizer"])
        assert torch.equal(exported.encode(x), indices)
        torch.testing.assert_close(exported.decode(indices), out.reconstruction, rtol=0, atol=1e-6)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    tok = Tokenizer.from_config(_config(bridge=True))
    out = tok(_images())
    (out.reconstruction.square().mean() + out.quantizer.loss).backward()
    for name, p in tok.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    for name in ("encoder", "quant_conv", "quantizer", "post_quant_conv", "decoder"):
        grads = [p.grad.abs().sum() for p in getattr(tok, name).parameters()]
        assert sum(grads) > 0, f"{name} received only zero gradients"
    assert tok.quantizer.codebook.grad.abs().sum() > 0 and tok.quantizer.projector.expand.weight.grad.abs().sum() > 0


def test_built_from_modules():
    torch.manual_seed(0)
    encoder, decoder = build_autoencoder({"preset": "tiny_f4"})
    tok = Tokenizer(encoder, VectorQuantizer(32, 8), decoder)
    assert tuple(tok.quant_conv.weight.shape) == (8, 64, 1, 1) and tuple(tok.post_quant_conv.weight.shape) == (
        64,
        8,
        1,
        1,
    )
    assert tok(_images()).reconstruction.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="no config"):
        tok.save_pretrained("unused")
    with pytest.raises(TypeError, match="Quantizer"):
        Tokenizer(encoder, torch.nn.Identity(), decoder)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_config(_config(bridge=True)).eval()
    path = tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # no temporary files left
    config = json.loads((path / "config.json").read_text())
    assert config["fvq_version"] == fvq.__version__ and config["format_version"] == 1
    assert config["model"]["ch_mult"] == [1, 2, 2] and config["quantizer"]["projector"]["type"] == "vq_bridge"
    loaded = Tokenizer.from_pretrained(path)
    assert not loaded.training and loaded.config == tok.config
    for (k1, v1), (k2, v2) in zip(tok.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = _images()
    with torch.no_grad():
        a, b = tok(x), loaded(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.reconstruction, b.reconstruction)


def test_export_folds_the_bridge(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_config(_config(bridge=True, size=256, dim=16)).eval()
    exported = tok.export()
    assert exported.quantizer.projector is None and tok.quantizer.projector is not None
    assert "projector" not in exported.config["quantizer"]
    assert exported.config["exported_from"]["quantizer"] == tok.config["quantizer"]
    x = _images(seed=1)
    with torch.no_grad():
        a, b = tok(x), exported(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.reconstruction, a.reconstruction, rtol=0, atol=1e-6)
    full = tok.save_pretrained(tmp_path / "full")
    small = exported.save_pretrained(tmp_path / "exported")
    size_full = (full / "model.safetensors").stat().st_size
    size_small = (small / "model.safetensors").stat().st_size
    bridge_bytes = 4 * sum(p.numel() for p in tok.quantizer.projector.parameters())
    assert size_small <= size_full - bridge_bytes
    keys = load_file(str(small / "model.safetensors")).keys()
    assert not any("projector" in k for k in keys) and "quantizer.codebook" in keys
    reloaded = Tokenizer.from_pretrained(small)
    with torch.no_grad():
        c = reloaded(x)
    assert torch.equal(c.indices, a.indices) and torch.equal(c.reconstruction, b.reconstruction)


def test_top_level_export():
    assert fvq.Tokenizer is Tokenizer and fvq.TokenizerOutput is TokenizerOutput
    with pytest.raises(AttributeError):
        fvq.NoSuchThing  # noqa: B018


def test_clear_errors(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_config(_config("tiny_f8"))
    with pytest.raises(ValueError, match="3 channels on axis 1.*got 1"):
        tok(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 8; got 30x32"):
        tok(torch.zeros(1, 3, 30, 32))
    bad = torch.zeros(1, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite"):
        tok.encode(bad)
    with pytest.raises(ValueError, match="shape \\(B, C, H, W\\)"):
        tok(torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        tok(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="axes \\(B, h, w\\)"):
        tok.decode(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="must lie in"):
        tok.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="latents must have shape \\(B, 16, h, w\\)"):
        tok.decode_latents(torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="unknown tokenizer config keys \\['quantiser'\\]"):
        Tokenizer.from_config({**_config(), "quantiser": {}})
    with pytest.raises(ValueError, match="missing \\['quantizer'\\]"):
        Tokenizer.from_config({"model": {"preset": "tiny_f4"}})
    with pytest.raises(FileNotFoundError, match="config.json"):
        Tokenizer.from_pretrained(tmp_path / "nothing")
    path = Tokenizer.from_config(_config()).save_pretrained(tmp_path / "future")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        Tokenizer.from_pretrained(path)


def test_export_folds_training_only_quantizer_options(tmp_path):
    config = {
        "model": {"preset": "tiny_f4"},
        "quantizer": {
            "type": "vq",
            "codebook_size": 32,
            "codebook_dim": 16,
            "codebook_update": "ema",
            "kmeans_init": True,
            "restart_strategy": "random",
        },
    }
    tokenizer = Tokenizer.from_config(config)
    tokenizer(torch.rand(2, 3, 16, 16) * 2 - 1)  # k-means init and one EMA step
    tokenizer.eval()
    exported = tokenizer.export()
    assert exported.config["quantizer"] == {"type": "vq", "codebook_size": 32, "codebook_dim": 16}
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(exported.encode(images), tokenizer.encode(images))
    exported.save_pretrained(tmp_path)
    reloaded = Tokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(images).reconstruction, tokenizer(images).reconstruction)
