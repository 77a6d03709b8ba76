"""Importing LlamaGen c2i GPT checkpoints, checked against a plain re-statement of LlamaGen's forward."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from fvq.generation import GPT, generate, import_llamagen_gpt
from fvq.generation.llamagen import (
    convert_llamagen_gpt_state_dict,
    gpt_from_llamagen_state_dict,
    llamagen_gpt_config,
    load_llamagen_gpt_state_dict,
)

DIM, LAYERS, HEADS, VOCAB, CLASSES, SIDE = 128, 4, 4, 48, 6, 3  # gpt_tiny's shape: 4 layers, 4 heads, width 128
HIDDEN = 512  # find_multiple(int(2 * 4 * 128 / 3), 256)


def llamagen_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with LlamaGen's key names and shapes (class rows = classes + the null class)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    state = {
        "cls_embedding.embedding_table.weight": rand(CLASSES + 1, DIM, scale=1.0),
        "tok_embeddings.weight": rand(VOCAB, DIM, scale=1.0),
        "norm.weight": 1 + 0.1 * rand(DIM, scale=1.0),
        "output.weight": rand(VOCAB, DIM),
    }
    for i in range(LAYERS):
        p = f"layers.{i}"
        state[f"{p}.attention.wqkv.weight"] = rand(3 * DIM, DIM)
        state[f"{p}.attention.wo.weight"] = rand(DIM, DIM)
        state[f"{p}.feed_forward.w1.weight"] = rand(HIDDEN, DIM)
        state[f"{p}.feed_forward.w3.weight"] = rand(HIDDEN, DIM)
        state[f"{p}.feed_forward.w2.weight"] = rand(DIM, HIDDEN)
        state[f"{p}.attention_norm.weight"] = 1 + 0.1 * rand(DIM, scale=1.0)
        state[f"{p}.ffn_norm.weight"] = 1 + 0.1 * rand(DIM, scale=1.0)
    return state


# ---------------------------------------------------------------------------------------------------------------------
# LlamaGen's forward (autoregressive/models/gpt.py, c2i, eval mode), written directly on the state dict
def reference_rotations(side: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Complex unit rotations (1 + side^2, head_dim / 2): 0 at the class position, then for raster position
    (row, col): pair j < head_dim/4 turns by row * base^(-2j / (head_dim/2)), pair head_dim/4 + j by col * (same)."""
    quarter = head_dim // 4
    freqs = [base ** (-(2 * j) / (head_dim // 2)) for j in range(quarter)]
    rows = [torch.zeros(head_dim // 2, dtype=torch.complex128)]
    for row in range(side):
        for col in range(side):
            angles = torch.tensor([row * f for f in freqs] + [col * f for f in freqs], dtype=torch.float64)
            rows.append(torch.polar(torch.ones_like(angles), angles))
    return torch.stack(rows)


def reference_logits(state: dict[str, torch.Tensor], indices: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, T, V) in float64: input [class] + indices[:, :-1]."""
    s = {k: v.double() for k, v in state.items()}
    batch, length = indices.shape
    head_dim = DIM // HEADS

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rotate(x, rot):  # x (B, S, H, hd): adjacent pairs as complex numbers times the rotation
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], head_dim // 2, 2).contiguous())
        return torch.view_as_real(pairs * rot[None, :, None, :]).flatten(-2)

    x = torch.cat(
        [s["cls_embedding.embedding_table.weight"][classes][:, None], s["tok_embeddings.weight"][indices[:, :-1]]], 1
    )
    rot = reference_rotations(SIDE, head_dim)[:length]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    for i in range(LAYERS):
        p = f"layers.{i}"
        h = rms(x, s[f"{p}.attention_norm.weight"])
        q, k, v = (h @ s[f"{p}.attention.wqkv.weight"].T).split(DIM, dim=-1)
        q, k, v = (t.reshape(batch, length, HEADS, head_dim) for t in (q, k, v))
        q, k = rotate(q, rot), rotate(k, rot)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attended = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, DIM)
        x = x + attended @ s[f"{p}.attention.wo.weight"].T
        h = rms(x, s[f"{p}.ffn_norm.weight"])
        gated = F.silu(h @ s[f"{p}.feed_forward.w1.weight"].T) * (h @ s[f"{p}.feed_forward.w3.weight"].T)
        x = x + gated @ s[f"{p}.feed_forward.w2.weight"].T
    return rms(x, s["norm.weight"]) @ s["output.weight"].T


def llamagen_freqs_cis(side: int, head_dim: int) -> torch.Tensor:
    """The (1 + side^2, head_dim / 2, 2) cos/sin table some LlamaGen checkpoints carry."""
    rot = reference_rotations(side, head_dim)
    return torch.stack([rot.real, rot.imag], dim=-1).float()


# ---------------------------------------------------------------------------------------------------------------------
def test_imported_model_matches_llamagens_forward():
    state = llamagen_state()
    model = gpt_from_llamagen_state_dict(state, grid=(SIDE, SIDE))
    c = model.config
    assert (c.dim, c.n_layer, c.n_head, c.vocab_size, c.num_classes) == (DIM, LAYERS, HEADS, VOCAB, CLASSES)
    assert c.class_position_rope == "llamagen" and c.has_null_class and c.grid == (SIDE, SIDE)
    assert model.provenance == {"format": "llamagen", "preset": "gpt_tiny"} and not model.training
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, VOCAB, (3, SIDE * SIDE), generator=g)
    classes = torch.tensor([0, 5, 2])
    expected = reference_logits(state, indices, classes)
    with torch.no_grad():
        logits = model(indices, classes).logits
        torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
        # the null class is the last row; the KV cache path agrees too
        null = reference_logits({**state}, indices, torch.full((3,), CLASSES))
        dropped = model(indices, classes, drop_classes=torch.ones(3, dtype=torch.bool)).logits
        torch.testing.assert_close(dropped.double(), null, rtol=1e-4, atol=1e-4)
        model.setup_cache(3)
        steps = [model.prefill(classes)] + [model.decode_step(indices[:, t - 1], t) for t in range(1, SIDE * SIDE)]
        torch.testing.assert_close(torch.stack(steps, 1).double(), expected, rtol=1e-4, atol=1e-4)


def test_the_class_position_convention_matters():
    state = llamagen_state(seed=3)
    indices = torch.randint(0, VOCAB, (2, SIDE * SIDE), generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([1, 4])
    expected = reference_logits(state, indices, classes)
    identity = gpt_from_llamagen_state_dict(state, grid=(SIDE, SIDE), class_position_rope="identity")
    with torch.no_grad():
        logits = identity(indices, classes).logits.double()
    assert (logits - expected).abs().max() > 1e-2  # the class token's zeroed q/k changes every position


def test_import_from_a_file_with_freqs_cis_and_prefixes(tmp_path):
    state = llamagen_state(seed=4)
    wrapped = {f"_orig_mod.{k}": v for k, v in state.items()}
    wrapped["freqs_cis"] = llamagen_freqs_cis(SIDE, DIM // HEADS)
    path = tmp_path / "c2i_tiny.pt"
    torch.save({"model": wrapped, "optimizer": {}, "steps": 5, "args": argparse.Namespace(gpt_model="GPT-B")}, path)
    model = import_llamagen_gpt(path)  # the grid is read from freqs_cis
    assert model.config.grid == (SIDE, SIDE) and model.provenance["file"] == "c2i_tiny.pt"
    torch.save(state, tmp_path / "bare.pt")
    bare = import_llamagen_gpt(tmp_path / "bare.pt", grid=(SIDE, SIDE))
    indices = torch.randint(0, VOCAB, (2, SIDE * SIDE), generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([3, 0])
    with torch.no_grad():
        torch.testing.assert_close(model(indices, classes).logits, bare(indices, classes).logits, rtol=0, atol=0)
    # save, reload: same logits, the convention and the source are kept
    model.save_pretrained(tmp_path / "gpt")
    loaded = GPT.from_pretrained(tmp_path / "gpt")
    assert loaded.config.class_position_rope == "llamagen" and loaded.provenance["format"] == "llamagen"
    with torch.no_grad():
        torch.testing.assert_close(loaded(indices, classes).logits, model(indices, classes).logits, rtol=0, atol=0)
    tokens = generate(loaded, [1, 2], cfg_scale=1.75, seed=0, top_k=20)
    assert tokens.shape == (2, SIDE * SIDE) and int(tokens.max()) < VOCAB


def test_the_config_is_read_from_shapes():
    state = llamagen_state()
    assert llamagen_gpt_config(state, grid=(SIDE, SIDE)).ffn_hidden_dim == HIDDEN
    no_dropout = llamagen_gpt_config(state, grid=(SIDE, SIDE), class_dropout_prob=0.0)
    assert no_dropout.num_classes == CLASSES + 1 and not no_dropout.has_null_class
    # a shape no preset has needs n_head
    shallow = {k: v for k, v in state.items() if not k.startswith("layers.3.")}
    with pytest.raises(ValueError, match="no preset has 3 layers of width 128; pass n_head"):
        llamagen_gpt_config(shallow, grid=(SIDE, SIDE))
    assert llamagen_gpt_config(shallow, grid=(SIDE, SIDE), n_head=2).head_dim == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("layers.2.ffn_norm.weight"), "1 missing keys \\['layers.2.ffn_norm.weight'\\]"),
        (lambda s: s.pop("output.weight"), "1 missing keys \\['output.weight'\\]"),
        (lambda s: s.update({"layers.0.attention.bias": torch.zeros(3)}), "1 unexpected keys.*attention.bias"),
        (lambda s: s.update({"layers.0.attention.wqkv.weight": torch.zeros(2 * DIM, DIM)}), "grouped-query"),
        (lambda s: s.update({"layers.1.feed_forward.w1.weight": torch.zeros(HIDDEN, DIM + 1)}), "another arch"),
        (lambda s: s.update({"layers.0.feed_forward.w1.weight": torch.zeros(384, DIM)}), "ffn_dim_multiplier"),
        (lambda s: s.update({"freqs_cis": llamagen_freqs_cis(SIDE, DIM // HEADS) * 0.5}), "freqs_cis differs"),
        (lambda s: s.update({"freqs_cis": llamagen_freqs_cis(4, DIM // HEADS)}), "freqs_cis has shape"),
    ],
)
def test_bad_state_dicts_are_refused_with_names(change, message):
    state = llamagen_state()
    change(state)
    with pytest.raises(ValueError, match=message):
        gpt_from_llamagen_state_dict(state, grid=(SIDE, SIDE))


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="do not record the token grid: pass grid"):
        llamagen_gpt_config(llamagen_state())
    torch.save({"optimizer": {}, "steps": 3}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="neither a state dict nor any of the entries"):
        load_llamagen_gpt_state_dict(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="has no entry 'ema'"):
        load_llamagen_gpt_state_dict(tmp_path / "x.pt", state_dict_key="ema")
    with pytest.raises(FileNotFoundError):
        load_llamagen_gpt_state_dict(tmp_path / "missing.pt")
    config = llamagen_gpt_config(llamagen_state(), grid=(SIDE, SIDE))
    converted = convert_llamagen_gpt_state_dict(llamagen_state(), config)
    assert set(converted) == set(GPT(config).state_dict())
