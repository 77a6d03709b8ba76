"""Training through the real ``fvq train`` entry point: a few steps, interruption + resume, two gloo processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tiny_runs import TINY_TOKENIZER

from fvq.cli import main
from fvq.runs import latest_checkpoint, load_checkpoint

TINY = [
    *TINY_TOKENIZER,
    "data.samples_per_epoch=24",
    "data.val_samples=16",
    "global_batch_size=8",
    "max_steps=5",
    "val_every=2",
    "checkpoint_every=2",
    "log_every=1",
    "val_batch_size=8",
    "val_psnr_images=5",
    "tensorboard=false",
    "loss.adversarial_weight=0.5",
    "loss.adversarial_start=2",
    "loss.discriminator.base_channels=8",
    "loss.discriminator.num_layers=2",
]


def _final_state(run: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))


def test_train_then_resume_matches_uninterrupted(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", "tiny_fvq", "--out", str(straight), *TINY]) == 0
    assert main(["train", "tiny_fvq", "--out", str(interrupted), "--stop-after", "3", *TINY]) == 0
    assert _final_state(interrupted)["step"] == 3
    assert main(["train", "tiny_fvq", "--out", str(interrupted), "--resume", *TINY]) == 0

    a, b = _final_state(straight), _final_state(interrupted)
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["loss"]:  # the discriminator, trained from step 2 on
        assert torch.equal(a["loss"][key], b["loss"][key]), key

    metrics = json.loads((straight / "metrics.json").read_text())
    for key in ("val/usage", "val/perplexity", "val/psnr"):
        assert key in metrics
    assert 0 < metrics["val/usage"] <= 1
    assert metrics["val/tokens"] == 16 * 4 * 4  # every held-out crop counted once: 16 crops of 4 x 4 tokens
    assert metrics["val/images"] == 16 and metrics["val/psnr_images"] == 5  # usage on all, PSNR on the first 5
    assert (straight / "reconstructions.png").is_file()
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in log)
    # keep_checkpoints (3) bounds what is left on disk; no temporary files remain
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == ["step_00000002.pt", "step_00000004.pt", "step_00000005.pt"]


def test_resume_refuses_a_different_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny_fvq", "--out", str(run), "--stop-after", "1", *TINY]) == 0
    assert main(["train", "tiny_fvq", "--out", str(run), "--resume", *TINY, "optim.lr=1e-3"]) == 2
    assert "differs from the checkpoint" in capsys.readouterr().err


def test_a_second_run_into_the_same_folder_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny_fvq", "--out", str(run), "--stop-after", "1", *TINY]) == 0
    assert main(["train", "tiny_fvq", "--out", str(run), "--stop-after", "1", *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "tiny_fvq", "--out", str(run), "--stop-after", "1", "--overwrite", *TINY]) == 0
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # the old run's log is gone


def test_bad_override_and_unknown_key(tmp_path, capsys):
    assert main(["train", "tiny_fvq", "--out", str(tmp_path), "optim.learning_rate=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_two_process_gloo_training(tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "fvq",
        "train",
        "tiny_fvq",
        "--out",
        str(run),
        *TINY,
        "max_steps=3",
        "val_every=3",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/replicas_in_sync"] == 1.0  # codebooks and all weights identical on both ranks
    assert metrics["val/tokens"] == 16 * 4 * 4  # usage gathered over both ranks' halves of the held-out set
    assert metrics["val/psnr_images"] == 5  # held-out images 0-4, split over the ranks (0, 2, 4 and 1, 3)
    assert _final_state(run)["world_size"] == 2
