"""The token layout the generator reads: taken from a tokenizer, multi-code and multi-scale tokenizers refused."""

from __future__ import annotations

import pytest
import torch

from fvq.generation import TokenLayout, build_gpt, check_token_layout, generate, grid_to_tokens, tokens_to_grid
from fvq.models import Tokenizer


def _tokenizer(quantizer: dict) -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer.from_config({"model": {"preset": "tiny_f4"}, "quantizer": quantizer}).eval()


def test_layout_from_a_tokenizer_builds_the_generator_and_its_tokens_decode():
    tokenizer = _tokenizer({"type": "vq", "codebook_size": 64, "codebook_dim": 16})
    layout = TokenLayout.from_tokenizer(tokenizer, (16, 24))
    assert layout == TokenLayout(vocab_size=64, grid=(4, 6)) and layout.seq_len == 24
    assert TokenLayout.from_tokenizer(tokenizer, 16).grid == (4, 4)
    model = build_gpt("gpt_tiny", vocab_size=layout.vocab_size, grid=layout.grid, num_classes=3).eval()
    # encode -> flatten -> teacher-forced loss, and generate -> grid -> decode
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    indices = grid_to_tokens(tokenizer.encode(images))
    assert indices.shape == (2, 24)
    assert torch.isfinite(model(indices, torch.tensor([0, 2])).loss)
    tokens = generate(model, [1, 2], seed=0)
    with torch.no_grad():
        decoded = tokenizer.decode(tokens_to_grid(tokens, layout.grid))
    assert decoded.shape == (2, 3, 16, 24)
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        TokenLayout.from_tokenizer(tokenizer, 18)


@pytest.mark.parametrize(
    ("quantizer", "message"),
    [
        (
            {
                "type": "residual",
                "num_quantizers": 2,
                "quantizer": {"type": "vq", "codebook_size": 32, "codebook_dim": 16},
            },
            "emits 2 codes per position.*supports single-code grids",
        ),
        (
            {"type": "grouped", "num_groups": 2, "codebook_dim": 16, "quantizer": {"type": "vq", "codebook_size": 32}},
            "emits 2 codes per position",
        ),
        (
            {
                "type": "multiscale",
                "scales": [1, 2, 4],
                "quantizer": {"type": "vq", "codebook_size": 32, "codebook_dim": 16},
            },
            "multi-scale sequence.*supports single-code grids",
        ),
    ],
    ids=["residual", "grouped", "multiscale"],
)
def test_multi_code_tokenizers_are_refused(quantizer, message):
    with pytest.raises(ValueError, match=message):
        TokenLayout.from_tokenizer(_tokenizer(quantizer), 16)


def test_check_token_layout_and_reshaping():
    check_token_layout(1)
    with pytest.raises(ValueError, match="the token file emits 4 codes per position"):
        check_token_layout(4, what="the token file")
    with pytest.raises(ValueError, match="positive int"):
        check_token_layout(0)
    tokens = torch.arange(24).reshape(2, 12)
    grid = tokens_to_grid(tokens, (3, 4))
    assert grid[1, 2, 3] == 23 and torch.equal(grid_to_tokens(grid), tokens)
    with pytest.raises(ValueError, match="tokens must have shape \\(B, 15\\) for a 3x5 grid, got \\(2, 12\\)"):
        tokens_to_grid(tokens, (3, 5))
    with pytest.raises(ValueError, match="several codes per position are not supported"):
        grid_to_tokens(torch.zeros(2, 3, 4, 2, dtype=torch.long))
