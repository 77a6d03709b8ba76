"""The generator learns: on tokens that depend on the class and the position, a few hundred steps bring the held-out
bits per token far below both baselines that need no model (uniform and class-conditional unigram)."""

from __future__ import annotations

import json

import torch
from training.test_generator_data import structured_store, tiny_overrides

from fvq.cli import main


def test_held_out_bits_fall_below_the_unigram_baselines(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = structured_store(tmp_path / "train", 256, noise=0.1)
        val = structured_store(tmp_path / "val", 64, noise=0.1, seed=1)
        args = tiny_overrides(
            train,
            val,
            max_steps=150,
            val_every=150,
            checkpoint_every=0,
            log_every=50,
            global_batch_size=16,
            val_samples=64,
            val_batch_size=32,
            schedule="llamagen",
            **{"optim.lr": 0.05},  # 0.05 x 16 / 256 = 3.1e-3
        )
        assert main(["train", "gpt_tiny_c2i", "--out", str(tmp_path / "run"), *args]) == 0
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # each class's 16 tokens are all different: about 4 bits of class unigram (plus the noise)
    assert 3.9 < metrics["val/class_unigram_bits"] < metrics["val/unigram_bits"] < metrics["val/uniform_bits"] == 5.0
    # reading the position from the rotary embedding leaves mostly the 10 % noise: about 1 bit
    assert metrics["val/bits_per_token"] < 2.0, metrics
    assert metrics["val/accuracy"] > 0.8, metrics
