"""``compile:`` compiles the tokenizer's encoder and decoder in place: training runs and checkpoints keep the plain
state-dict keys."""

import copy

import pytest
import torch
from tiny_runs import TINY_TOKENIZER

from fvq.models import Tokenizer
from fvq.runs import latest_checkpoint, load_checkpoint
from fvq.training.config import load_config
from fvq.training.engine import run_training
from fvq.training.logging import read_log
from fvq.training.tokenizer_task import TokenizerTask

TINY = [
    *TINY_TOKENIZER,
    "data.samples_per_epoch=16",
    "global_batch_size=4",
    "max_steps=2",
    "log_every=1",
    "val_every=0",
    "tensorboard=false",
    "device=cpu",
]


def train(run, *overrides: str) -> tuple[list[float], dict]:
    compiled = {}

    def build(engine):
        task = TokenizerTask(engine)
        compiled["encoder"] = getattr(task.tokenizer.encoder, "_compiled_call_impl", None) is not None
        return task

    run_training(load_config("tiny_fvq", [*TINY, *overrides]), run, build)
    losses = [r["train/loss"] for r in read_log(run / "log.jsonl") if "train/loss" in r]
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    return losses, {"compiled": compiled["encoder"], "model": state["model"], "config": state["config"]}


def check_checkpoint(state: dict) -> None:
    assert not [k for k in state["model"] if "_orig_mod" in k or k.startswith("module.")]
    fresh = Tokenizer.from_config({"model": state["config"]["model"], "quantizer": state["config"]["quantizer"]})
    fresh.load_state_dict(state["model"])  # strict: the keys of an uncompiled tokenizer


def test_engine_compiles_in_place_and_keeps_state_dict_keys(tmp_path):
    from fvq.distributed import DistributedContext
    from fvq.training.engine import Engine

    config = load_config("tiny_fvq", [*TINY, "compile.backend=eager"])
    engine = Engine(
        config, tmp_path, DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    )
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    reference = copy.deepcopy(model)
    wrapped = engine.wrap(model, compile_units=[model[0]])
    assert wrapped is model and model[0]._compiled_call_impl is not None and model[2]._compiled_call_impl is None
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 8, 8)
    model(x).square().mean().backward()
    reference(x).square().mean().backward()
    assert torch.allclose(model[0].weight.grad, reference[0].weight.grad)


@pytest.mark.slow
def test_compiled_tokenizer_trains_like_eager_and_saves_plain_keys(tmp_path):
    # the eager backend runs the traced graphs as they are: the dynamo path (guards, graph breaks, in-place
    # compilation, state-dict keys) in seconds, with the eager model's numbers
    plain, _ = train(tmp_path / "plain")
    losses, state = train(tmp_path / "compiled", "compile.backend=eager")
    assert state["compiled"]
    assert losses == pytest.approx(plain, rel=1e-5)
    check_checkpoint(state)


@pytest.mark.slow
def test_inductor_compiled_tokenizer_trains_on_cpu(tmp_path):
    """The default backend (inductor, C++ kernels on CPU): about two minutes of compilation on a 2-core CPU."""
    plain, _ = train(tmp_path / "plain")
    try:
        losses, state = train(tmp_path / "compiled", "compile=true", "channels_last=true")
    except Exception as error:  # e.g. no C++ compiler for inductor's CPU kernels
        if "BackendCompilerFailed" in type(error).__name__ or "InductorError" in type(error).__name__:
            pytest.skip(f"inductor cannot compile here: {error}")
        raise
    assert state["compiled"] and all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(plain, rel=1e-3)
    check_checkpoint(state)
