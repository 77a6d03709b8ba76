"""Sampling: guidance arithmetic and schedules, filtering, the draw, reproducibility across batch shapes, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fvq.generation import generate, guidance_scale, tokens_to_grid
from fvq.generation.sampling import apply_guidance, filter_logits, gumbel_noise, sample_from_logits


# ---------------------------------------------------------------------------------------------------------------------
# guidance
def test_guidance_schedules():
    assert [guidance_scale(t, 4, scale=3.0) for t in range(4)] == [3.0] * 4
    assert [guidance_scale(t, 4, scale=3.0, schedule="linear") for t in range(4)] == [1.0, 1.5, 2.0, 2.5]
    interval = [guidance_scale(t, 10, scale=2.0, schedule="interval", interval=(0.2, 0.5)) for t in range(10)]
    assert interval == [1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="cfg schedule must be one of"):
        guidance_scale(0, 4, scale=2.0, schedule="cosine")


def test_guidance_arithmetic():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 7, generator=g)
    assert apply_guidance(cond, uncond, 1.0) is cond
    torch.testing.assert_close(apply_guidance(cond, uncond, 0.0), uncond, rtol=0, atol=0)
    torch.testing.assert_close(apply_guidance(cond, uncond, 2.5), uncond + 2.5 * (cond - uncond))


def _greedy_reference(model, classes, scale):
    """Greedy decoding by full recomputation, guidance written out: u + s (c - u)."""
    batch, length = classes.shape[0], model.seq_len
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    for _ in range(length):
        cond = model.prefix_logits(classes, tokens)[:, -1]
        uncond = model.prefix_logits(classes, tokens, drop_classes=torch.ones(batch, dtype=torch.bool))[:, -1]
        logits = cond if scale == 1 else uncond if scale == 0 else uncond + scale * (cond - uncond)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("scale", [1.0, 0.0, 2.5])
@pytest.mark.parametrize("use_cache", [True, False])
def test_cfg_in_generate_matches_the_written_out_formula(make_model, scale, use_cache):
    model = make_model(seed=11)
    classes = torch.tensor([0, 2, 4])
    with torch.no_grad():
        expected = _greedy_reference(model, classes, scale)
    tokens = generate(model, classes, cfg_scale=scale, temperature=0, use_cache=use_cache)
    assert torch.equal(tokens, expected)


def test_cfg_without_a_null_class_is_an_error(make_model):
    model = make_model(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="needs the null class.*class_dropout_prob = 0"):
        generate(model, [0, 1], cfg_scale=1.5)
    with pytest.raises(ValueError, match="needs the null class"):
        generate(model, [0, 1], cfg_scale=2.0, cfg_schedule="interval", cfg_interval=(0.5, 1.0))
    assert generate(model, [0, 1], cfg_scale=1.0, seed=0).shape == (2, 12)  # no guidance: fine


# ---------------------------------------------------------------------------------------------------------------------
# filtering and drawing
def test_top_k_and_top_p_sets():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    original = logits.clone()
    kept = lambda out: (out > float("-inf")).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [[False, True, False, True, False], [True] * 5]  # ties kept
    # top-p: keep until the cumulative probability exceeds p, that token included
    assert kept(filter_logits(logits[:1], top_p=0.5)) == [[False, True, False, True, False]]
    assert kept(filter_logits(logits[:1], top_p=0.75)) == [[False, True, False, True, True]]
    assert kept(filter_logits(logits[:1], top_p=1e-6)) == [[False, True, False, False, False]]  # one always kept
    assert kept(filter_logits(logits[:1], top_k=3, top_p=0.5)) == [[False, True, False, True, False]]
    assert torch.equal(logits, original)  # never modified in place
    assert filter_logits(logits, top_k=0, top_p=1.0) is logits
    assert filter_logits(logits, top_k=99).equal(logits)


def test_greedy_is_argmax_and_does_not_touch_the_input():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 3.5]])
    original = logits.clone()
    assert sample_from_logits(logits, None, temperature=0, top_k=1).tolist() == [1, 2]
    noise = gumbel_noise(0, torch.arange(2), 0, 3)
    sample_from_logits(logits, noise, temperature=0.5, top_k=2, top_p=0.9)
    assert torch.equal(logits, original)
    with pytest.raises(ValueError, match="needs noise"):
        sample_from_logits(logits, None, temperature=1.0)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (0.8, 5, 0.9)],
)
def test_draw_frequencies_match_the_renormalised_distribution(temperature, top_k, top_p):
    draws, vocab = 20000, 7
    logits = torch.tensor([1.2, -0.3, 0.4, 2.0, -1.5, 0.9, 0.0])
    scaled = logits / temperature
    probs = scaled.softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.ones(vocab, dtype=torch.bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1:  # on the distribution left by top-k
        left = torch.where(keep, probs, torch.zeros(())) / probs[keep].sum()
        mass_before = torch.cumsum(left[order], 0) - left[order]
        keep[order[mass_before > top_p]] = False
    expected = torch.where(keep, probs, torch.zeros(())) / probs[keep].sum()
    noise = gumbel_noise(1234, torch.arange(draws), 5, vocab)
    tokens = sample_from_logits(logits.expand(draws, vocab), noise, temperature=temperature, top_k=top_k, top_p=top_p)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~keep].sum() == 0
    e = expected.double()[keep] * draws
    chi2 = (((counts[keep] - e) ** 2) / e).sum().item()
    assert chi2 < 25.0, (chi2, counts.tolist(), (expected * draws).tolist())  # df <= 6: p < 3e-4 by chance


def test_gumbel_noise_is_a_pure_function_of_seed_index_position_token():
    indices = torch.arange(10, 18)
    noise = gumbel_noise(7, indices, 3, 50)
    assert noise.shape == (8, 50) and noise.dtype == torch.float32 and torch.isfinite(noise).all()
    torch.testing.assert_close(gumbel_noise(7, indices[5:6], 3, 50), noise[5:6], rtol=0, atol=0)
    torch.testing.assert_close(gumbel_noise(7, indices.flip(0), 3, 50), noise.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(gumbel_noise(7, indices, 3, 20), noise[:, :20], rtol=0, atol=0)
    for other in (
        gumbel_noise(8, indices, 3, 50),
        gumbel_noise(7, indices, 4, 50),
        gumbel_noise(7, indices + 1, 3, 50),
    ):
        assert (other != noise).float().mean() > 0.99
    big = gumbel_noise(-5, torch.arange(2000) + 2**40, 0, 64).double()
    assert abs(big.mean().item() - 0.5772) < 0.02 and abs(big.var().item() - math.pi**2 / 6) < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# reproducibility
@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1.0},
        {"temperature": 0.9, "top_k": 10, "top_p": 0.95, "cfg_scale": 2.0},
        {"temperature": 1.0, "cfg_scale": 1.5, "cfg_schedule": "linear"},
    ],
)
def test_tokens_do_not_depend_on_batch_size_or_split(make_model, options):
    model = make_model(seed=21)
    classes = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    whole = generate(model, classes, seed=99, **options)
    assert whole.shape == (8, 12) and whole.dtype == torch.int64
    assert len({tuple(row) for row in whole.tolist()}) == 8  # distinct samples
    ones = torch.cat([generate(model, classes[i : i + 1], seed=99, sample_offset=i, **options) for i in range(8)])
    threes = torch.cat(
        [generate(model, classes[i : i + 3], seed=99, sample_offset=i, **options) for i in range(0, 8, 3)]
    )
    halves = torch.cat(
        [
            generate(model, classes[:4], seed=99, **options),
            generate(model, classes[4:], seed=99, sample_offset=4, **options),
        ]
    )
    for other in (ones, threes, halves):
        assert torch.equal(other, whole)
    assert torch.equal(generate(model, classes, seed=99, use_cache=False, **options), whole)
    assert not torch.equal(generate(model, classes, seed=100, **options), whole)


def test_generate_leaves_the_model_and_inputs_as_they_were(make_model):
    model = make_model(seed=5, dropout=True).train()
    classes = torch.tensor([3, 1])
    tokens = generate(model, classes, seed=0, cfg_scale=2.0)
    assert model.training and torch.equal(classes, torch.tensor([3, 1]))
    assert model.cache_batch_size == 4  # kept for the next call
    assert torch.equal(generate(model, classes, seed=0, cfg_scale=2.0), tokens)  # eval mode during sampling
    grid = tokens_to_grid(tokens, model.config.grid)
    assert grid.shape == (2, 3, 4) and torch.equal(grid[1, 2], tokens[1, 8:])


def test_sampling_under_inference_mode_leaves_the_model_usable_outside_it(make_model):
    model = make_model(seed=6)
    with torch.inference_mode():
        first = generate(model, [0, 1], cfg_scale=2.0, seed=4)
    assert torch.equal(generate(model, [0, 1], cfg_scale=2.0, seed=4), first)  # reuses the cache made in there
    model.train()(torch.zeros(2, 12, dtype=torch.long), torch.tensor([0, 1])).loss.backward()  # rotary table too


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cfg_schedule": "cosine"}, "cfg_schedule must be one of"),
        ({"cfg_interval": (0.6, 0.2)}, "cfg_interval must be"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        ({"sample_offset": -2}, "sample_offset must be"),
        ({"cfg_scale": float("nan")}, "cfg_scale must be a finite number"),
    ],
)
def test_bad_options(make_model, options, message):
    with pytest.raises(ValueError, match=message):
        generate(make_model(), [0], **options)


def test_bad_classes(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="class ids must be in \\[0, 5\\)"):
        generate(model, [0, 5])
    with pytest.raises(ValueError, match="classes must have shape"):
        generate(model, [[0, 1]])
    with pytest.raises(ValueError, match="classes is empty"):
        generate(model, torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="model must be an fvq GPT"):
        generate(torch.nn.Linear(2, 2), [0])
