"""Importing LlamaGen-layout VQGAN checkpoints, checked against an independent re-statement of LlamaGen's forward."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from fvq.models import Tokenizer
from fvq.models.convert import import_llamagen_checkpoint, llamagen_model_config, load_llamagen_state_dict
from fvq.models.presets import build_autoencoder, preset_name, resolve_model_config

GROUPS = 8
# tiny, but with everything VQ-16 has: 2 encoder / 3 decoder res blocks, attention at the last level and in the middle
MODEL = {"preset": "tiny_f4", "num_res_blocks": 2, "decoder_num_res_blocks": None, "attn_levels": None}


# ---------------------------------------------------------------------------------------------------------------------
# LlamaGen's VQModel forward, written from its vq_model.py directly on the state dict (no fvq modules involved)
def _gn(s, p, x):
    return F.group_norm(x, GROUPS, s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-6)


def _conv(s, p, x, stride=1, padding=None):
    w = s[f"{p}.weight"]
    return F.conv2d(x, w, s[f"{p}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(s, p, x):
    h = _conv(s, f"{p}.conv1", _swish(_gn(s, f"{p}.norm1", x)))
    h = _conv(s, f"{p}.conv2", _swish(_gn(s, f"{p}.norm2", h)))
    if f"{p}.nin_shortcut.weight" in s:
        x = _conv(s, f"{p}.nin_shortcut", x)
    return x + h


def _attn(s, p, x):
    h = _gn(s, f"{p}.norm", x)
    q, k, v = (_conv(s, f"{p}.{n}", h) for n in "qkv")
    b, c, hh, ww = q.shape
    w_ = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c**-0.5
    w_ = F.softmax(w_, dim=2)
    h = torch.bmm(v.reshape(b, c, hh * ww), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(s, f"{p}.proj_out", h)


def _n(s, prefix):
    return len({k[len(prefix) :].split(".")[0] for k in s if k.startswith(prefix)})


def _stage(s, p, i, h):
    for j in range(_n(s, f"{p}.conv_blocks.{i}.res.")):
        h = _res(s, f"{p}.conv_blocks.{i}.res.{j}", h)
        if f"{p}.conv_blocks.{i}.attn.{j}.q.weight" in s:
            h = _attn(s, f"{p}.conv_blocks.{i}.attn.{j}", h)
    return h


def _mid(s, p, h):
    return _res(s, f"{p}.mid.2", _attn(s, f"{p}.mid.1", _res(s, f"{p}.mid.0", h)))


def llamagen_reference(s, x, l2_norm):
    levels = _n(s, "encoder.conv_blocks.")
    h = _conv(s, "encoder.conv_in", x)
    for i in range(levels):
        h = _stage(s, "encoder", i, h)
        if i != levels - 1:
            h = _conv(s, f"encoder.conv_blocks.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _conv(s, "encoder.conv_out", _swish(_gn(s, "encoder.norm_out", _mid(s, "encoder", h))))
    z = torch.einsum("bchw->bhwc", _conv(s, "quant_conv", h))
    emb = s["quantize.embedding.weight"]
    if l2_norm:
        z, emb = F.normalize(z, dim=-1), F.normalize(emb, dim=-1)
    flat = z.reshape(-1, z.shape[-1])
    d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
    idx = d.argmin(1)
    zq = torch.einsum("bhwc->bchw", emb[idx].view(z.shape))
    h = _mid(s, "decoder", _conv(s, "decoder.conv_in", _conv(s, "post_quant_conv", zq)))
    for i in range(levels):
        h = _stage(s, "decoder", i, h)
        if i != levels - 1:
            h = _conv(s, f"decoder.conv_blocks.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    h = _conv(s, "decoder.conv_out", _swish(_gn(s, "decoder.norm_out", h)))
    return h, idx.view(z.shape[:3])


# ---------------------------------------------------------------------------------------------------------------------
def _llamagen_state(codebook_size=64, codebook_dim=8, seed=0):
    """A LlamaGen-layout generator state dict with random (non-default) weights."""
    torch.manual_seed(seed)
    encoder, decoder = build_autoencoder(MODEL)
    z = encoder.z_channels
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    state.update(
        {
            "quant_conv.weight": torch.randn(codebook_dim, z, 1, 1) * 0.1,
            "quant_conv.bias": torch.randn(codebook_dim) * 0.1,
            "post_quant_conv.weight": torch.randn(z, codebook_dim, 1, 1) * 0.1,
            "post_quant_conv.bias": torch.randn(z) * 0.1,
            "quantize.embedding.weight": torch.randn(codebook_size, codebook_dim),
            "quantize.codebook_used": torch.zeros(65536),
        }
    )
    for k, v in state.items():  # GroupNorm affine parameters away from (1, 0) so that mistakes show
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight")):
            state[k] = 1 + 0.1 * torch.randn_like(v)
        elif k.endswith(("norm1.bias", "norm2.bias", "norm.bias", "norm_out.bias")):
            state[k] = 0.1 * torch.randn_like(v)
    return state


def _images(seed=0):
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(("l2_norm", "dim"), [(True, 8), (False, 32)], ids=["llamagen", "fvq"])
def test_import_matches_llamagen_forward(tmp_path, l2_norm, dim):
    state = _llamagen_state(codebook_dim=dim)
    checkpoint = {
        "model": {f"module.{k}": v for k, v in state.items()},  # DDP prefix, as some training scripts save
        "optimizer": {"state": {}, "param_groups": []},
        "steps": 100,
        "args": argparse.Namespace(codebook_l2_norm=l2_norm, codebook_size=64),
    }
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    tok = import_llamagen_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out", norm_groups=GROUPS)
    assert tok.quantizer.distance == ("cosine" if l2_norm else "l2")
    assert tok.config["imported_from"]["state_dict_key"] == "model"
    assert "codebook_l2_norm" in tok.config["imported_from"]["distance_chosen_by"]
    x = _images()
    with torch.no_grad():
        expected, expected_idx = llamagen_reference(state, x, l2_norm)
        out = tok(x)
        reloaded = Tokenizer.from_pretrained(tmp_path / "out")
        again = reloaded(x)
    assert torch.equal(out.indices, expected_idx)
    assert len(expected_idx.unique()) > 1  # a meaningful comparison: several codes in play
    torch.testing.assert_close(out.reconstruction, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(again.indices, out.indices) and torch.equal(again.reconstruction, out.reconstruction)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantizer"]["distance"] == tok.quantizer.distance and config["imported_from"]["format"]


def test_auto_distance_without_args_uses_codebook_dim(tmp_path):
    for dim, distance in ((8, "cosine"), (64, "l2")):
        torch.save({"model": _llamagen_state(codebook_dim=dim)}, tmp_path / f"{dim}.pt")
        tok = import_llamagen_checkpoint(tmp_path / f"{dim}.pt", None, norm_groups=GROUPS)
        assert tok.quantizer.distance == distance
    tok = import_llamagen_checkpoint(tmp_path / "64.pt", None, source="llamagen", norm_groups=GROUPS)
    assert tok.quantizer.distance == "cosine"


def test_state_dict_selection(tmp_path):
    state = _llamagen_state()
    ema = {k: v + 1.0 if k == "quantize.embedding.weight" else v for k, v in state.items()}
    torch.save({"model": state, "ema": ema}, tmp_path / "both.pt")
    loaded, key, _ = load_llamagen_state_dict(tmp_path / "both.pt")
    assert key == "ema" and torch.equal(loaded["quantize.embedding.weight"], ema["quantize.embedding.weight"])
    loaded, key, _ = load_llamagen_state_dict(tmp_path / "both.pt", "model")
    assert key == "model" and torch.equal(loaded["quantize.embedding.weight"], state["quantize.embedding.weight"])
    torch.save(state, tmp_path / "bare.pt")
    assert load_llamagen_state_dict(tmp_path / "bare.pt")[1] is None
    with pytest.raises(ValueError, match="no entry 'generator'"):
        load_llamagen_state_dict(tmp_path / "both.pt", "generator")
    torch.save({"weights": state}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="neither a state dict nor"):
        load_llamagen_state_dict(tmp_path / "odd.pt")


def test_bridge_checkpoint_is_refused_with_advice(tmp_path):
    state = _llamagen_state()
    state["quantize.qbridge.x_embedder.proj.weight"] = torch.zeros(4, 8, 2, 2)
    torch.save({"model": state}, tmp_path / "fvq_train.pt")
    with pytest.raises(ValueError, match="convert_fullvq2vq"):
        import_llamagen_checkpoint(tmp_path / "fvq_train.pt", None, norm_groups=GROUPS)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": _llamagen_state(), "extra": torch.nn.Linear(1, 1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_llamagen_state_dict(tmp_path / "pickled.pt")


@pytest.mark.parametrize("preset", ["vq16", "vq8"])
def test_architecture_read_from_shapes(preset):
    with torch.device("meta"):
        encoder, decoder = build_autoencoder({"preset": preset})
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    config = llamagen_model_config(state)
    assert config == resolve_model_config({"preset": preset}) and preset_name(config) == preset
