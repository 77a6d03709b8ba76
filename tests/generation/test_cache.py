"""The static KV cache: incremental logits equal the teacher-forced forward at every position."""

from __future__ import annotations

import pytest
import torch

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _incremental(model, indices, classes, drop_classes=None):
    """Logits of every position from prefill + one decode step per token: (B, T, V)."""
    steps = [model.prefill(classes, drop_classes=drop_classes)]
    for t in range(1, indices.shape[1]):
        steps.append(model.decode_step(indices[:, t - 1], t))
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("class_position_rope", ["identity", "llamagen"])
def test_cached_logits_equal_the_full_forward_at_every_position(make_model, class_position_rope):
    model = make_model(seed=1, class_position_rope=class_position_rope)
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 32, (4, 12), generator=g)
    classes = torch.tensor([0, 3, 3, 4])
    model.setup_cache(4)
    with torch.no_grad():
        full = model(indices, classes).logits  # (4, 12, 32)
        cached = _incremental(model, indices, classes)
    torch.testing.assert_close(cached, full, **TOL)


def test_cached_logits_of_the_cfg_doubled_batch(make_model):
    model = make_model(seed=2)
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 32, (3, 12), generator=g)
    classes = torch.tensor([1, 2, 4])
    doubled_indices, doubled_classes = torch.cat([indices, indices]), torch.cat([classes, classes])
    drop = torch.tensor([False] * 3 + [True] * 3)
    model.setup_cache(8)  # larger than needed: the first rows serve
    with torch.no_grad():
        full = model(doubled_indices, doubled_classes, drop_classes=drop).logits
        cached = _incremental(model, doubled_indices, doubled_classes, drop)
        null_only = model(indices, classes, drop_classes=torch.ones(3, dtype=torch.bool)).logits
    torch.testing.assert_close(cached, full, **TOL)
    torch.testing.assert_close(full[3:], null_only, rtol=0, atol=0)  # unconditional rows ignore the label
    assert not torch.allclose(full[:3], full[3:])


def test_prefill_with_a_prefix_and_prefix_logits(make_model):
    model = make_model(seed=3)
    indices = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([0, 1])
    model.setup_cache(2)
    with torch.no_grad():
        full = model(indices, classes).logits
        torch.testing.assert_close(model.prefix_logits(classes, indices[:, :5]), full[:, :6], **TOL)
        torch.testing.assert_close(model.prefix_logits(classes, indices[:, :0]), full[:, :1], **TOL)
        torch.testing.assert_close(model.prefill(classes, indices[:, :5]), full[:, 5], **TOL)
        for t in range(6, 12):
            torch.testing.assert_close(model.decode_step(indices[:, t - 1], torch.tensor([t])), full[:, t], **TOL)


def test_cache_lifecycle_and_errors(make_model):
    model = make_model()
    classes = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="no KV cache for a batch of 3"):
        model.prefill(classes)
    model.setup_cache(2)
    with pytest.raises(RuntimeError, match="no KV cache for a batch of 3.*current cache: 2 rows"):
        model.prefill(classes)
    model.ensure_cache(3)
    assert model.cache_batch_size == 3
    cache = model.blocks[0].attention.kv_cache
    model.ensure_cache(2)  # fits: kept
    assert model.blocks[0].attention.kv_cache is cache
    assert cache.keys.shape == (3, 4, 12, 16) and cache.keys.dtype == torch.float32
    assert not any("kv_cache" in k for k in model.state_dict())
    logits = model.prefill(classes)
    assert logits.shape == (3, 32)
    assert cache.keys[:, :, 0].abs().sum() > 0
    model.reset_cache()
    assert cache.keys.abs().sum() == 0
    with pytest.raises(ValueError, match="input_pos must be in \\[1, 12\\)"):
        model.decode_step(torch.tensor([1, 2, 3]), 12)
    with pytest.raises(ValueError, match="input_pos must be in \\[1, 12\\)"):
        model.decode_step(torch.tensor([1, 2, 3]), 0)
    with pytest.raises(ValueError, match="tokens must have shape \\(B,\\)"):
        model.decode_step(torch.tensor([[1, 2, 3]]), 1)
    with pytest.raises(ValueError, match="token ids must be in \\[0, 32\\)"):
        model.decode_step(torch.tensor([1, 2, 99]), 1)
    with pytest.raises(ValueError, match="class ids must be in"):
        model.prefill(torch.tensor([0, 9, 1]))
    model.train()
    with pytest.raises(RuntimeError, match="call model.eval\\(\\) first"):
        model.prefill(classes)
    model.eval().clear_cache()
    assert model.cache_batch_size == 0 and model.blocks[0].attention.kv_cache is None


def test_cache_in_another_dtype(make_model):
    model = make_model(seed=4)
    indices = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([0, 4])
    model.setup_cache(2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_incremental(model, indices, classes), model(indices, classes).logits, **TOL)
