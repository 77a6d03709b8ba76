"""The generator-training benchmark: its FLOP count against the presets' parameters, and one tiny timed case."""

from __future__ import annotations

import pytest
import torch

from fvq.bench.generator import measure_training, training_flops_per_token
from fvq.generation import GPT, gpt_config


@pytest.mark.parametrize("preset", ["gpt_tiny", "gpt_b", "gpt_l"])
def test_flops_count_the_parameters_outside_the_embeddings(preset):
    config = gpt_config(preset, vocab_size=16_384, grid=(16, 16), num_classes=1000)
    with torch.device("meta"):
        model = GPT(config)
    outside = sum(p.numel() for name, p in model.named_parameters() if "embedding" not in name)
    flops = training_flops_per_token(config)
    assert flops["non_embedding_params"] == outside
    attention = 4 * config.n_layer * config.dim * 256
    assert flops["forward"] == 2 * outside + attention and flops["training"] == 3 * flops["forward"]


def test_gpt_b_forward_flops_match_the_published_figure():
    config = gpt_config("gpt_b", vocab_size=16_384, grid=(16, 16), num_classes=1000)
    assert training_flops_per_token(config)["forward"] / 1e9 == pytest.approx(0.20, abs=0.01)


def test_a_tiny_case_runs(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = measure_training(
            "gpt_tiny", 4, vocab_size=64, grid=(4, 4), num_classes=3, steps=1, warmup=1, device=torch.device("cpu")
        )
    finally:
        torch.set_num_threads(threads)
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 2 and result["seq_len"] == 16
    assert result["params"] > result["non_embedding_params"]
