"""``fvq bench step``: the per-part profile of a real tokenizer training step and validation."""

from __future__ import annotations

import tempfile

import pytest

from fvq.bench.step import STEP_PARTS, profile_steps, profile_validation
from fvq.cli import main
from fvq.distributed import init_distributed
from fvq.training.config import load_config
from fvq.training.engine import Engine
from fvq.training.tokenizer_task import TokenizerTask

SMALL = [
    "tensorboard=false",
    "data.val_samples=64",
    "val_psnr_images=16",
    "global_batch_size=8",
    "quantizer.codebook_size=256",
    "quantizer.codebook_dim=32",
    "quantizer.projector.hidden_dim=32",
    "quantizer.projector.num_heads=2",
]


@pytest.fixture(scope="module")
def run():
    config = load_config("tiny_fvq", SMALL)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine(config, run_dir, init_distributed(config.device))
        task = TokenizerTask(engine)
        engine.attach(task)
        yield engine, task


def test_parts_cover_the_step(run):
    engine, task = run
    parts, info = profile_steps(engine, task, steps=2, warmup=1)
    assert info["tokens_per_step"] == 8 * 8 * 8 and info["codebook"] == (256, 32)
    for step in range(2):
        measured = {p: parts[p][step] for p in STEP_PARTS if p != "other"}
        # every module's forward and backward was seen (a hook that did not fire would leave its part at zero)
        assert all(seconds > 0 for seconds in measured.values()), measured
        assert sum(measured.values()) <= parts["step"][step] * 1.001
        assert sum(parts[p][step] for p in STEP_PARTS) == pytest.approx(parts["step"][step])
    assert parts["search"][0] > 0
    # the hooks are gone afterwards: training still gets the encoder's gradient, no hook stamps remain
    assert not task.tokenizer.encoder._forward_hooks and not task.tokenizer.encoder._backward_hooks


def test_validation_split(run):
    engine, task = run
    val = profile_validation(engine, task)
    assert val["images"] == 64 and val["decoded"] == 16
    assert val["encoder"] > 0 and val["decoder"] > 0 and val["quantize, count, data"] > 0
    assert val["encoder"] + val["decoder"] < val["total"]


def test_command_prints_both_tables(capsys):
    assert main(["bench", "step", "tiny_fvq", *SMALL, "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    for part in STEP_PARTS:
        assert f"| {part} |" in out
    assert "one validation (64 held-out images, 16 decoded)" in out


def test_bad_input_is_refused_with_the_reason(capsys):
    assert main(["bench", "step", "tiny_fvq", "--steps", "0"]) != 0
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["bench", "step", "gpt_demo_c2i"]) != 0
    assert "gpt_demo_c2i is a generator config" in capsys.readouterr().err
