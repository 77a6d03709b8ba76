"""Tiny generator models for the generation tests (CPU, fp32, milliseconds per forward)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fvq.generation import GPT, GPTConfig

NO_DROPOUT = {
    "token_dropout_prob": 0.0,
    "resid_dropout_prob": 0.0,
    "ffn_dropout_prob": 0.0,
    "attn_dropout_prob": 0.0,
}


def tiny_config(**overrides) -> GPTConfig:
    """2 layers, 4 heads of dim 16 (4 rotary frequencies per axis), a rectangular 3 x 4 grid, 32 codes, 5 classes."""
    base = {"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 32, "grid": (3, 4), "num_classes": 5}
    return GPTConfig(**{**base, **overrides})


def randomize(model: GPT, seed: int) -> GPT:
    """Random weights everywhere (head and norms included): activations of order 1, logits far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("embedding.weight"):
                p.copy_(noise)
            else:  # linear weights (out, in)
                p.copy_(noise * (2.0 if name == "head.weight" else 1.0) / p.shape[1] ** 0.5)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads' barriers cost 10-20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_config() -> Callable[..., GPTConfig]:
    """``make_config(**overrides)``: the tiny config (dropouts as GPTConfig's defaults)."""
    return tiny_config


@pytest.fixture
def make_model() -> Callable[..., GPT]:
    """``make_model(seed=0, dropout=False, **config_overrides)``: a randomised tiny GPT in eval mode."""

    def make(seed: int = 0, dropout: bool = False, **overrides) -> GPT:
        config = tiny_config(**({} if dropout else NO_DROPOUT), **overrides)
        torch.manual_seed(seed)
        return randomize(GPT(config), seed).eval()

    return make
