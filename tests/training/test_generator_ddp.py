"""Generator training on two gloo processes with DDP (``torchrun --nproc_per_node 2 -m fvq train``): replicas stay
identical, held-out figures are reduced over both ranks, and the result matches one process on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from training.test_generator_data import T, random_store, tiny_overrides

from fvq.cli import main
from fvq.runs import latest_checkpoint, load_checkpoint


def torchrun(*args: str, timeout: int = 240) -> None:
    """``python -m torch.distributed.run --nproc_per_node 2 --standalone -m fvq ARGS`` on one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "fvq", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    train = random_store(tmp_path / "train", 32, views=2)
    val = random_store(tmp_path / "val", 13, seed=1)  # odd: the ranks validate 7 and 6 sequences
    args = tiny_overrides(train, val, ema=0.9, max_steps=4, val_every=2, checkpoint_every=2, val_samples="null")
    run = tmp_path / "ddp"
    torchrun("train", "gpt_tiny_c2i", "--out", str(run), *args)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/replicas_in_sync"] == 1.0
    assert metrics["val/tokens"] == 13 * T and metrics["val/sequences"] == 13
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert state["world_size"] == 2 and state["step"] == 4
    assert (run / "model" / "model.safetensors").is_file()

    # one process with the same global batch sees the same samples per step: the same weights up to float rounding
    # (the two ranks' gradients are averaged instead of one batch's); dropout differs by rank, so switch it off
    torch.set_num_threads(1)
    no_dropout = [f"model.{k}_dropout_prob=0" for k in ("token", "resid", "ffn", "class")]
    ddp, single = tmp_path / "ddp0", tmp_path / "single"
    torchrun("train", "gpt_tiny_c2i", "--out", str(ddp), *args, *no_dropout)
    assert main(["train", "gpt_tiny_c2i", "--out", str(single), *args, *no_dropout]) == 0
    a = load_checkpoint(latest_checkpoint(ddp / "checkpoints"))["model"]
    b = load_checkpoint(latest_checkpoint(single / "checkpoints"))["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    m_ddp = json.loads((ddp / "metrics.json").read_text())
    m_single = json.loads((single / "metrics.json").read_text())
    assert m_ddp["val/bits_per_token"] == pytest.approx(m_single["val/bits_per_token"], abs=1e-4)
    assert m_ddp["val/class_unigram_bits"] == pytest.approx(m_single["val/class_unigram_bits"], abs=1e-12)
