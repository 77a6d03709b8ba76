"""Training-step options of the engine: channels-last memory format, loader pinning and workers, torch.compile,
and bf16 autocast on CPU."""

import logging

import pytest
import torch
from tiny_runs import TINY_TOKENIZER

from fvq.distributed import DistributedContext
from fvq.training.config import compile_options, load_config
from fvq.training.engine import Engine
from fvq.training.tokenizer_task import TokenizerTask

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = [*TINY_TOKENIZER, "data.samples_per_epoch=16", "data.val_samples=8", "global_batch_size=4", "tensorboard=false"]


def engine_for(tmp_path, *overrides: str) -> Engine:
    config = load_config("tiny_fvq", [*TINY, *overrides])
    engine = Engine(config, tmp_path, CPU)
    engine.attach(TokenizerTask(engine))
    return engine


def run_steps(engine: Engine, steps: int) -> list[float]:
    data = engine.micro_batches()
    losses = []
    for step in range(steps):
        applied, scalars = engine.train_step(next(data), step)
        assert applied
        losses.append(float(scalars["loss"]))
    return losses


def test_channels_last_trains_like_contiguous(tmp_path):
    plain = engine_for(tmp_path / "a")
    nhwc = engine_for(tmp_path / "b", "channels_last=true")
    conv = nhwc.task.tokenizer.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = next(nhwc.micro_batches())[0]
    assert batch.is_contiguous(memory_format=torch.channels_last)
    # same weights, same data: the losses of three steps agree to float rounding (kernels differ by layout)
    assert run_steps(nhwc, 3) == pytest.approx(run_steps(plain, 3), rel=1e-4, abs=1e-6)
    # and the state dict reads back into a contiguous model
    state = nhwc.task.tokenizer.state_dict()
    plain.task.tokenizer.load_state_dict(state)


def test_memory_format_walks_batches(tmp_path):
    engine = engine_for(tmp_path, "channels_last=true")
    images, tokens = torch.zeros(2, 3, 4, 4), torch.zeros(2, 5)
    out = engine.to_memory_format({"x": [images, (tokens,)]})
    assert out["x"][0].is_contiguous(memory_format=torch.channels_last)
    assert out["x"][1][0] is tokens


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_loader_with_workers_and_pinning_yields_the_batches_of_one_process(tmp_path):
    serial = engine_for(tmp_path / "a")
    parallel = engine_for(
        tmp_path / "b", "num_workers=2", "pin_memory=true", "persistent_workers=true", "prefetch_factor=3"
    )
    loader = parallel.train_loader
    assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor == 3
    assert loader.pin_memory  # asked for; without an accelerator PyTorch warns and copies unpinned
    for epoch in range(2):  # persistent workers still see the next epoch's crops
        serial.step = parallel.step = epoch * serial.steps_per_epoch
        a, b = serial.micro_batches(), parallel.micro_batches()
        for _ in range(serial.steps_per_epoch):
            assert torch.equal(next(a)[0], next(b)[0])


def test_loader_options_are_checked():
    with pytest.raises(ValueError, match="prefetch_factor"):
        load_config("tiny_fvq", [*TINY, "prefetch_factor=2"])
    with pytest.raises(ValueError, match="compile"):
        load_config("tiny_fvq", [*TINY, "compile=fast"])
    with pytest.raises(ValueError, match="unknown compile key"):
        load_config("tiny_fvq", [*TINY, "compile.speed=1"])
    assert compile_options(True) == {} and compile_options(False) is None
    assert compile_options({"mode": "max-autotune"}) == {"mode": "max-autotune"}


def test_bf16_autocast_on_cpu_trains_and_warns_without_native_bf16(tmp_path, caplog):
    from fvq.training.engine import cpu_has_native_bf16

    with caplog.at_level(logging.WARNING, logger="fvq.training.engine"):
        engine = engine_for(tmp_path, "precision=bf16")
    assert ("without native bf16" in caplog.text) == (not cpu_has_native_bf16())
    assert engine.autocast_dtype is torch.bfloat16
    losses = run_steps(engine, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        engine_for(tmp_path / "b", "precision=fp16")
