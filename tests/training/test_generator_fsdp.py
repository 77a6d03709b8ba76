"""Generator training sharded with FSDP2 on two gloo processes (``sharding=fsdp``): the same weights as one process
up to float rounding, a full-state checkpoint in one process's (and DDP's) layout, the export."""

from __future__ import annotations

import json

import torch
from training.test_generator_data import random_store, tiny_overrides
from training.test_generator_ddp import torchrun

from fvq.cli import main
from fvq.generation import GPT
from fvq.runs import latest_checkpoint, load_checkpoint


def final_state(run):
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))


def fsdp_args(train, val) -> list[str]:
    """Two micro-batches per step, EMA, clipping below the gradient norms (the sharded norm clips), no dropout (so
    one process computes the same steps)."""
    return [
        *tiny_overrides(train, val, ema=0.9, max_steps=5, grad_accum_steps=2, sharding="fsdp", **{"optim.lr": 0.1}),
        "optim.grad_clip=0.2",
        *[f"model.{k}_dropout_prob=0" for k in ("token", "resid", "ffn", "class")],
    ]


def test_fsdp_matches_one_process_in_the_same_checkpoint_layout(tmp_path):
    train = random_store(tmp_path / "train", 32, views=2)
    val = random_store(tmp_path / "val", 13, seed=1)
    args = fsdp_args(train, val)
    sharded = tmp_path / "fsdp"
    torchrun("train", "gpt_tiny_c2i", "--out", str(sharded), *args)

    torch.set_num_threads(1)
    single = tmp_path / "single"
    assert main(["train", "gpt_tiny_c2i", "--out", str(single), *[a for a in args if a != "sharding=fsdp"]]) == 0
    a, c = final_state(sharded), final_state(single)
    assert a["world_size"] == 2 and a["step"] == c["step"] == 5
    assert a.keys() == c.keys()
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in c["model"].items()}
    optim_a, optim_c = a["optim_gpt"], c["optim_gpt"]
    assert [g["params"] for g in optim_a["param_groups"]] == [g["params"] for g in optim_c["param_groups"]]
    assert [sorted(g) for g in optim_a["param_groups"]] == [sorted(g) for g in optim_c["param_groups"]]
    assert {i: {n: v.shape for n, v in s.items()} for i, s in optim_a["state"].items()} == {
        i: {n: v.shape for n, v in s.items()} for i, s in optim_c["state"].items()
    }
    log = [json.loads(line) for line in (single / "log.jsonl").read_text().splitlines()]
    assert max(r["train/grad_norm"] for r in log if "train/grad_norm" in r) > 0.2  # clipping was active
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], c["model"][key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(a["ema"][key], c["ema"][key], rtol=1e-4, atol=1e-5, msg=key)
    for i, state in optim_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, optim_c["state"][i][name], rtol=1e-3, atol=1e-7, msg=f"{i} {name}")

    exported = GPT.from_pretrained(sharded / "model")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, a["ema"][name]), name
    metrics = json.loads((sharded / "metrics.json").read_text())
    assert metrics["val/sequences"] == 12 and "val/replicas_in_sync" not in metrics
    assert (
        abs(metrics["val/bits_per_token"] - json.loads((single / "metrics.json").read_text())["val/bits_per_token"])
        < 1e-4
    )
