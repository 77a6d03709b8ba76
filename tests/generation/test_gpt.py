"""The GPT: config, presets, initialisation, training forward, rotary embedding, save/load, input errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fvq.generation import GPT, PRESETS, GPTConfig, GPTOutput, build_gpt, gpt_config, preset_name
from fvq.generation.gpt import apply_rope, rope_table


# ---------------------------------------------------------------------------------------------------------------------
# config and presets
def test_config_round_trip_and_derived_sizes(make_config):
    config = make_config(class_position_rope="llamagen", activation_checkpointing=True)
    data = config.to_dict()
    assert data["grid"] == [3, 4]
    json.dumps(data)  # plain data
    assert GPTConfig.from_dict(json.loads(json.dumps(data))) == config
    assert (config.seq_len, config.head_dim, config.null_class) == (12, 16, 5)
    assert GPTConfig(dim=768, n_layer=1, n_head=12, vocab_size=8, grid=(1, 1)).ffn_hidden_dim == 2048
    assert GPTConfig(dim=1280, n_layer=1, n_head=20, vocab_size=8, grid=(1, 1)).ffn_hidden_dim == 3584


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dim": 66}, "divisible by n_head"),
        ({"dim": 72, "n_head": 12}, "multiple of 4"),
        ({"grid": (3,)}, "grid must be two positive ints"),
        ({"grid": (0, 4)}, "grid must be two positive ints"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"class_dropout_prob": 1.0}, "probability in"),
        ({"class_position_rope": "zero"}, "class_position_rope must be one of"),
        ({"rope_base": 1.0}, "rope_base > 1"),
    ],
)
def test_config_errors(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_config_from_dict_errors(make_config):
    data = make_config().to_dict()
    with pytest.raises(ValueError, match="unknown GPT config keys \\['depth'\\]"):
        GPTConfig.from_dict({**data, "depth": 3})
    del data["vocab_size"]
    with pytest.raises(ValueError, match="missing \\['vocab_size'\\]"):
        GPTConfig.from_dict(data)


@pytest.mark.parametrize(
    ("preset", "count"),
    [("gpt_b", 110_888_448), ("gpt_l", 342_910_976), ("gpt_xl", 774_699_520), ("GPT-XXL", 1_410_972_672)],
)
def test_preset_parameter_counts_on_meta(preset, count):
    model = build_gpt(preset, vocab_size=16384, grid=(16, 16), num_classes=1000, device="meta")
    assert model.num_parameters() == count
    assert model.class_embedding.weight.shape[0] == 1001
    assert model.config.head_dim == 64
    assert preset_name(model.config) == preset.lower().replace("-", "_")


def test_presets_take_layout_from_the_caller_and_refuse_shape_overrides():
    assert set(PRESETS) >= {"gpt_tiny", "gpt_small", "gpt_b", "gpt_l", "gpt_xl", "gpt_xxl"}
    config = gpt_config("gpt_tiny", vocab_size=77, grid=(2, 5), num_classes=3, class_dropout_prob=0.0)
    assert (config.vocab_size, config.grid, config.num_classes, config.has_null_class) == (77, (2, 5), 3, False)
    with pytest.raises(ValueError, match="set by preset"):
        gpt_config("gpt_tiny", vocab_size=8, grid=(2, 2), dim=256)
    with pytest.raises(ValueError, match="unknown GPT preset 'gpt_huge'"):
        gpt_config("gpt_huge", vocab_size=8, grid=(2, 2))


def test_no_null_class_without_class_dropout(make_model):
    model = make_model(class_dropout_prob=0.0)
    assert model.class_embedding.weight.shape[0] == 5 and model.config.null_class is None


# ---------------------------------------------------------------------------------------------------------------------
# initialisation and the training forward
def test_initial_loss_is_ln_vocab_and_init_statistics():
    torch.manual_seed(0)
    model = build_gpt("gpt_tiny", vocab_size=512, grid=(4, 4), num_classes=10)
    indices = torch.randint(0, 512, (3, 16))
    out = model(indices, torch.tensor([0, 4, 9]))
    assert isinstance(out, GPTOutput) and out.logits.shape == (3, 16, 512) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.loss, torch.tensor(math.log(512)), rtol=0, atol=1e-6)
    assert torch.count_nonzero(model.head.weight) == 0
    std = model.token_embedding.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert abs(model.blocks[0].attention.qkv.weight.std().item() - 0.02) < 0.002
    assert all(torch.all(block.ffn_norm.weight == 1) for block in model.blocks)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_every_parameter_gets_a_gradient(make_model):
    model = make_model(dropout=True).train()
    out = model(torch.randint(0, 32, (2, 12)), torch.tensor([1, 3]))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "class_embedding.weight":
            assert p.grad.abs().sum() > 0, name


def test_loss_is_cross_entropy_of_all_tokens_with_class_first(make_model):
    model = make_model()
    indices = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([2, 4])
    out = model(indices, classes)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 32), indices.reshape(-1))
    torch.testing.assert_close(out.loss, ce)
    # logits at position 0 see only the class
    other = indices.clone()
    other[:, 0] = (other[:, 0] + 1) % 32
    torch.testing.assert_close(model(other, classes).logits[:, 0], out.logits[:, 0], rtol=0, atol=0)
    assert not torch.allclose(model(indices, torch.tensor([3, 4])).logits[0, 0], out.logits[0, 0])


def test_causality(make_model):
    model = make_model(seed=3)
    indices = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([0, 1])
    base = model(indices, classes).logits
    for j in (0, 5, 11):
        changed = indices.clone()
        changed[:, j] = (changed[:, j] + 7) % 32
        logits = model(changed, classes).logits
        torch.testing.assert_close(logits[:, : j + 1], base[:, : j + 1], rtol=0, atol=0)  # token j feeds j + 1 on
        if j < 11:
            assert not torch.allclose(logits[:, j + 1], base[:, j + 1])


def test_class_dropout_rate_and_generator(make_model):
    model = make_model(dropout=True, dim=16, n_layer=1).train()
    seen = []
    model.class_embedding.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    batch = 4000
    classes = torch.full((batch,), 2)
    indices = torch.zeros(batch, 12, dtype=torch.long)
    with torch.no_grad():
        model(indices, classes, generator=torch.Generator().manual_seed(0))
        model(indices, classes, generator=torch.Generator().manual_seed(0))
        model(indices[:400], classes[:400], drop_classes=torch.arange(400) < 10)
        model.eval()(indices[:400], classes[:400], drop_classes=torch.arange(400) < 10)
    first, again, forced, evaluated = seen
    assert set(first.unique().tolist()) == {2, 5}  # the label or the null class (row num_classes)
    rate = (first == 5).float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / batch), rate
    assert torch.equal(again, first)  # the generator decides
    assert (forced[:10] == 5).all() and 0.03 < (forced[10:] == 5).float().mean() < 0.2
    assert (evaluated[:10] == 5).all() and (evaluated[10:] == 2).all()  # eval mode: no class dropout


def test_activation_checkpointing_gives_the_same_loss_and_gradients(make_model):
    indices = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([1, 2])
    grads = []
    for flag in (False, True):
        model = make_model(seed=5, activation_checkpointing=flag).train()
        model(indices, classes).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# 2D rotary embedding
def test_rope_table_layout():
    table = rope_table((3, 4), head_dim=16, base=10000.0)
    assert table.shape == (13, 8, 2) and table.dtype == torch.float32
    freqs = 10000.0 ** (-4 * torch.arange(4).double() / 16)  # 10000 ** (-4 i / head_dim)
    for t in range(12):
        row, col = divmod(t, 4)
        angles = torch.cat([row * freqs, col * freqs])
        torch.testing.assert_close(table[1 + t, :, 0].double(), torch.cos(angles), rtol=0, atol=1e-6)
        torch.testing.assert_close(table[1 + t, :, 1].double(), torch.sin(angles), rtol=0, atol=1e-6)
    assert torch.equal(table[0], torch.tensor([[1.0, 0.0]] * 8))
    assert torch.equal(rope_table((3, 4), 16, class_position="llamagen")[0], torch.zeros(8, 2))


def test_rope_preserves_norms_and_scores_depend_only_on_the_2d_offset():
    h, w, head_dim = 5, 6, 16
    table = rope_table((h, w), head_dim)[1:].double()  # (T, 8, 2)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)

    def at(x, row, col):  # x rotated to grid position (row, col)
        return apply_rope(x.view(1, 1, 1, head_dim), table[row * w + col][None]).view(head_dim)

    torch.testing.assert_close(at(q, 3, 4).norm(), q.norm())
    for (r1, c1), (r2, c2), (dr, dc) in [((0, 0), (2, 3), (1, 2)), ((4, 5), (1, 0), (-1, 0)), ((2, 2), (2, 2), (2, 3))]:
        score = at(q, r1, c1) @ at(k, r2, c2)
        shifted = at(q, r1 + dr, c1 + dc) @ at(k, r2 + dr, c2 + dc)
        torch.testing.assert_close(shifted, score)
    # the first quarter of the pairs turns with the row only, the second with the column only
    moved_col = at(q, 1, 5) - at(q, 1, 0)
    assert moved_col[: head_dim // 2].abs().max() < 1e-12 and moved_col[head_dim // 2 :].abs().max() > 1e-3
    moved_row = at(q, 4, 2) - at(q, 0, 2)
    assert moved_row[head_dim // 2 :].abs().max() < 1e-12 and moved_row[: head_dim // 2].abs().max() > 1e-3


def test_rope_table_survives_casting_the_model(make_model):
    model = make_model().to(torch.bfloat16)
    indices = torch.randint(0, 32, (1, 12))
    model(indices, torch.tensor([0]))
    assert model._rope(torch.device("cpu")).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# save / load
def test_save_and_load_give_identical_logits(make_model, tmp_path):
    model = make_model(seed=7, class_position_rope="llamagen")
    model.provenance = {"format": "test"}
    model.setup_cache(2)  # the cache is never saved
    model.save_pretrained(tmp_path / "gpt")
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert config["type"] == "gpt" and config["gpt"]["class_position_rope"] == "llamagen"
    assert config["imported_from"] == {"format": "test"} and config["preset"] is None
    loaded = GPT.from_pretrained(tmp_path / "gpt")
    assert not loaded.training and loaded.config == model.config and loaded.provenance == {"format": "test"}
    indices = torch.randint(0, 32, (3, 12))
    classes = torch.tensor([0, 2, 4])
    torch.testing.assert_close(loaded(indices, classes).logits, model(indices, classes).logits, rtol=0, atol=0)
    assert all(p.requires_grad for p in loaded.parameters())
    half = GPT.from_pretrained(tmp_path / "gpt", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_load_refuses_another_architecture(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "a")
    make_model(n_layer=3).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ValueError, match="another architecture.*unexpected keys \\['blocks.2"):
        GPT.from_pretrained(tmp_path / "b")
    make_model(vocab_size=40).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ValueError, match="shape mismatches .*token_embedding.weight: \\(40, 64\\) vs \\(32, 64\\)"):
        GPT.from_pretrained(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model": {"preset": "tiny_f4"}}))
    (tmp_path / "d" / "model.safetensors").write_bytes((tmp_path / "a" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not describe a generator"):
        GPT.from_pretrained(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        GPT.from_pretrained(tmp_path / "missing")
    model = make_model()
    state = model.state_dict()
    state.pop("norm.weight")
    with pytest.raises(ValueError, match="missing keys \\['norm.weight'\\]"):
        model.check_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# input errors
def test_bad_inputs(make_model):
    model = make_model()
    good = torch.zeros(2, 12, dtype=torch.long)
    classes = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="token ids must be in \\[0, 32\\).*\\[32\\]"):
        model(good.index_fill(1, torch.tensor([3]), 32), classes)
    with pytest.raises(ValueError, match="token ids must be in"):
        model(good - 1, classes)
    with pytest.raises(ValueError, match="class ids must be in \\[0, 5\\), got \\[5\\].*drop_classes"):
        model(good, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="indices must have shape \\(B, 12\\).*3x4 grid.*got \\(2, 11\\)"):
        model(good[:, :-1], classes)
    with pytest.raises(ValueError, match="classes must have shape \\(2,\\)"):
        model(good, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(good.float(), classes)
    with pytest.raises(TypeError, match="integer class ids"):
        model(good, classes.float())
    with pytest.raises(ValueError, match="drop_classes must be a bool tensor"):
        model(good, classes, drop_classes=torch.tensor([0, 1]))
    no_null = make_model(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="needs the null class"):
        no_null(good, classes, drop_classes=torch.tensor([True, False]))
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT({"dim": 64})
