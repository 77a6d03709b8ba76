"""FSDP2 generator training interrupted and resumed on two gloo processes is bit-identical to an uninterrupted run
(weights, AdamW states, EMA): checkpoints gather the full state on rank 0 and resuming scatters it back."""

from __future__ import annotations

import torch
from training.test_generator_data import random_store
from training.test_generator_ddp import torchrun
from training.test_generator_fsdp import final_state, fsdp_args


def test_fsdp_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    train = random_store(tmp_path / "train", 32, views=2)
    val = random_store(tmp_path / "val", 13, seed=1)
    args = [*fsdp_args(train, val), "model.class_dropout_prob=0.1"]  # rank- and step-seeded class dropout
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    torchrun("train", "gpt_tiny_c2i", "--out", str(straight), *args)
    torchrun("train", "gpt_tiny_c2i", "--out", str(interrupted), "--stop-after", "2", *args)
    assert final_state(interrupted)["step"] == 2
    torchrun("train", "gpt_tiny_c2i", "--out", str(interrupted), "--resume", *args)

    a, b = final_state(straight), final_state(interrupted)
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    for i, state in a["optim_gpt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optim_gpt"]["state"][i][name]), (i, name)
