"""The generator's task on the shared engine: config and presets, the recipe's optimizer, the first step, baselines,
and the inputs it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from training.test_generator_data import (
    CLASSES,
    GRID,
    T,
    V,
    random_store,
    tiny_overrides,
    write_store,
)

from fvq.cli import main
from fvq.data.tokens import TokenDataset
from fvq.distributed import init_distributed
from fvq.training.config import GENERATOR_SCHEDULES, GeneratorTrainConfig, load_config
from fvq.training.engine import Engine
from fvq.training.generator_task import GeneratorTask, class_dropout_generator, unigram_baselines
from fvq.training.lr_schedule import AnnealingSchedule


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stores(tmp_path):
    return random_store(tmp_path / "train", 32), random_store(tmp_path / "val", 12, seed=1)


def make_engine(tmp_path, train, val, *extra: str) -> tuple[Engine, GeneratorTask]:
    config = load_config("gpt_tiny_c2i", [*tiny_overrides(train, val), *extra])
    engine = Engine(config, tmp_path / "run", init_distributed("cpu"))
    task = GeneratorTask(engine)
    engine.attach(task)
    return engine, task


# ---------------------------------------------------------------------------------------------------------------------
# config and presets
def test_defaults_are_llamagens_recipe():
    config = GeneratorTrainConfig.from_dict({"task": "generator", "tokens": "x"})
    config.validate()
    assert config.optim.betas == (0.9, 0.95) and config.optim.weight_decay == 0.05 and config.optim.grad_clip == 1.0
    assert config.optim.base_batch_size == 256 and config.optim.lr == 1e-4 and config.base_lr == 1e-4
    assert config.model == {"preset": "gpt_b"} and config.sharding == "ddp" and config.ema is None
    constant = AnnealingSchedule(total_steps=1000, **vars(config.schedule))
    assert [constant(s) for s in (0, 1, 500, 999)] == [1.0, 1.0, 1.0, 1.0]
    # a partial optim section keeps the generator's defaults, not the tokenizer's
    partial = GeneratorTrainConfig.from_dict({"task": "generator", "tokens": "x", "optim": {"lr": 2e-4}})
    assert partial.optim.base_batch_size == 256 and partial.optim.weight_decay == 0.05


def test_fvq_schedule_preset():
    config = GeneratorTrainConfig.from_dict({"task": "generator", "tokens": "x", "schedule": "fvq"})
    assert vars(config.schedule) == GENERATOR_SCHEDULES["fvq"]
    fvq = AnnealingSchedule(total_steps=1000, **vars(config.schedule))
    assert fvq(0) == fvq(49) == 1.0  # 5 % constant
    assert fvq(50) == 1.0 and 0.01 < fvq(525) < 1.0 and fvq(1000) == pytest.approx(0.01)
    assert fvq(525) == pytest.approx(1.0 + (0.01 - 1.0) * 475 / 950)
    tweaked = GeneratorTrainConfig.from_dict({"schedule": {"preset": "fvq", "final_factor": 0.1}, "tokens": "x"})
    assert tweaked.schedule.final_factor == 0.1 and tweaked.schedule.constant_fraction == 0.05
    round_trip = GeneratorTrainConfig.from_dict(tweaked.to_dict())
    assert round_trip.to_dict() == tweaked.to_dict()


@pytest.mark.parametrize(
    ("preset", "batch", "lr", "epochs", "model"),
    [
        ("gpt_b_c2i", 256, 1e-4, 300, "gpt_b"),
        ("gpt_l_c2i", 2048, 8e-4, 300, "gpt_l"),
        ("gpt_xl_c2i", 1024, 4e-4, 350, "gpt_xl"),
    ],
)
def test_gpu_presets(preset, batch, lr, epochs, model):
    config = load_config(preset)
    assert config.task == "generator" and config.model["preset"] == model
    assert config.global_batch_size == batch and config.base_lr == pytest.approx(lr) and config.epochs == epochs
    assert config.precision == "bf16" and config.optim.weight_decay == 0.05 and config.optim.betas == (0.9, 0.95)
    if preset != "gpt_b_c2i":  # the FVQ runs: 5 % constant then linear to 0.01
        assert vars(config.schedule) == GENERATOR_SCHEDULES["fvq"]


def test_tiny_preset_loads():
    config = load_config("gpt_tiny_c2i", ["tokens=/data/t"])
    assert config.task == "generator" and config.precision == "fp32" and config.model["preset"] == "gpt_tiny"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.vocab_size=64", "come from the token data"),
        ("model.grid=[2,2]", "come from the token data"),
        ("model.num_classes=3", "top-level keys"),
        ("model.width=3", "unknown model key"),
        ("sharding=zero3", "sharding must be one of"),
        ("ema=1.5", "ema must be a decay"),
        ("schedule=cosine", "unknown schedule preset"),
        ("val_samples=0", "val_samples"),
        ("tokens=null", "tokens must name"),
    ],
)
def test_config_refuses(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("gpt_tiny_c2i", ["tokens=/data/t", override])


# ---------------------------------------------------------------------------------------------------------------------
# the task on the engine
def test_first_step_loss_is_ln_vocab(tmp_path, stores):
    engine, task = make_engine(tmp_path, *stores)
    assert task.gpt.config.vocab_size == V and task.gpt.config.grid == GRID and task.gpt.config.num_classes == CLASSES
    applied, scalars = engine.train_step(next(engine.micro_batches()), 0)
    assert applied
    assert float(scalars["loss"]) == pytest.approx(math.log(V), abs=1e-6)  # the zero output head: uniform logits
    assert float(scalars["bits_per_token"]) == pytest.approx(math.log2(V), abs=1e-6)


def test_weight_decay_on_matrices_only(tmp_path, stores):
    engine, task = make_engine(tmp_path, *stores, "optim.weight_decay=0.5")
    optimizer, base_lr = task.optimizers["gpt"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2} and {p.ndim for p in plain["params"]} == {1}
    names = {id(p): n for n, p in task.gpt.named_parameters()}
    assert {names[id(p)] for p in plain["params"]} == {n for n, _ in task.gpt.named_parameters() if "norm" in n}
    assert "token_embedding.weight" in {names[id(p)] for p in decayed["params"]}
    # one AdamW step with zero gradients: only decoupled weight decay moves the weights
    before = {n: p.detach().clone() for n, p in task.gpt.named_parameters()}
    for p in task.gpt.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in task.gpt.named_parameters():
        expected = before[name] * (1 - base_lr * 0.5) if p.ndim >= 2 else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_learning_rate_scales_with_the_batch(tmp_path, stores):
    _, task = make_engine(tmp_path, *stores, "optim.lr=1e-4", "global_batch_size=16")
    assert task.optimizers["gpt"][1] == pytest.approx(1e-4 * 16 / 256)


def test_class_dropout_draws_depend_only_on_seed_step_rank_micro_batch():
    def draws(*key):
        return torch.rand(64, generator=class_dropout_generator(*key, torch.device("cpu")))

    torch.manual_seed(0)
    first = draws(0, 7, 1, 0)
    torch.rand(1000)  # the global RNG does not matter
    assert torch.equal(first, draws(0, 7, 1, 0))
    for other in [(1, 7, 1, 0), (0, 8, 1, 0), (0, 7, 0, 0), (0, 7, 1, 1)]:
        assert not torch.equal(first, draws(*other))


def test_unigram_baselines_known_values():
    # class 0 trains on tokens [0, 0, 1, 1], class 1 on [2, 2, 2, 2]; V = 4
    train = [(torch.tensor([0, 0, 1, 1]), torch.tensor(0)), (torch.tensor([2, 2, 2, 2]), torch.tensor(1))]
    val_tokens, val_labels = torch.tensor([[0, 1, 2, 3]]), torch.tensor([0])
    got = unigram_baselines(train, val_tokens, val_labels, vocab_size=4, num_classes=2)
    # p(v | 0) = (n + 1) / (4 + 4): 3/8, 3/8, 1/8, 1/8
    assert got["class_unigram"] == pytest.approx(-(2 * math.log(3 / 8) + 2 * math.log(1 / 8)) / 4)
    # p(v) = (n + 1) / (8 + 4): 3/12, 3/12, 5/12, 1/12
    assert got["unigram"] == pytest.approx(-(2 * math.log(3 / 12) + math.log(5 / 12) + math.log(1 / 12)) / 4)
    assert got["training_tokens"] == 8


def test_validation_figures_at_initialisation(tmp_path, stores):
    engine, task = make_engine(tmp_path, *stores)
    metrics = task.validate(engine, 0)
    assert metrics["val/loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert metrics["val/bits_per_token"] == pytest.approx(math.log2(V), abs=1e-6)
    assert metrics["val/uniform_bits"] == math.log2(V)
    assert metrics["val/tokens"] == 12 * T and metrics["val/held_out"] == 1.0
    assert (tmp_path / "run" / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# refused inputs
def test_refuses_several_codes_per_position(tmp_path):
    tokens = torch.randint(0, V, (8, 1, T, 2))  # a residual quantizer's two codes per position
    train = write_store(tmp_path / "train", tokens, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="2 codes per position"):
        make_engine(tmp_path, train, train)


def test_refuses_a_dataset_whose_samples_do_not_fill_its_grid(tmp_path, stores):
    dataset = TokenDataset(stores[0], split="train")
    dataset.grid = (4, 5)  # a reader that says 4 x 5 but gives 16 tokens
    config = load_config("gpt_tiny_c2i", tiny_overrides(*stores))
    engine = Engine(config, tmp_path / "run", init_distributed("cpu"))
    with pytest.raises(ValueError, match=r"shape \(20,\)"):
        GeneratorTask(engine, train_set=dataset, val_set=dataset)


def test_refuses_more_classes_than_the_model(tmp_path, stores):
    with pytest.raises(ValueError, match="outside the model's classes"):
        make_engine(tmp_path, *stores, "num_classes=2")


def test_refuses_held_out_tokens_of_another_tokenizer(tmp_path):
    train = random_store(tmp_path / "train", 16)
    val = random_store(tmp_path / "val", 8, identity="tokenizer-b")
    with pytest.raises(ValueError, match="another tokenizer"):
        make_engine(tmp_path, train, val)


def test_refuses_a_store_without_labels(tmp_path, capsys):
    labels = torch.full((16,), -1)  # encoded without --labels
    train = write_store(tmp_path / "train", torch.randint(0, V, (16, 1, T)), labels, num_classes=0)
    val = random_store(tmp_path / "val", 8)
    assert main(["train", "gpt_tiny_c2i", "--out", str(tmp_path / "run"), *tiny_overrides(train, val)]) == 2
    assert "no class labels" in capsys.readouterr().err


def test_refuses_labels_outside_the_classes(tmp_path, capsys):
    labels = torch.full((16,), 7)  # the store says 4 classes: refused when the store is opened
    train = write_store(tmp_path / "train", torch.randint(0, V, (16, 1, T)), labels)
    val = random_store(tmp_path / "val", 8)
    assert main(["train", "gpt_tiny_c2i", "--out", str(tmp_path / "run"), *tiny_overrides(train, val)]) == 2
    assert "labels must be class ids in [0, 3]" in capsys.readouterr().err


def test_refuses_a_checkpoint_of_another_architecture(tmp_path, stores):
    engine, task = make_engine(tmp_path, *stores)
    state = engine.state_dict()
    task.check_checkpoint(state)  # its own checkpoint fits
    wider = {**state, "model": {**state["model"], "head.weight": torch.zeros(V, 128)}}
    with pytest.raises(ValueError, match="another architecture"):
        task.check_checkpoint(wider)
    data = {**state["generator"]["data"], "vocab_size": 64}
    other_data = {**state, "generator": {**state["generator"], "data": data}}
    with pytest.raises(ValueError, match="other token data"):
        task.check_checkpoint(other_data)


def test_resume_refuses_tokens_of_another_tokenizer(tmp_path, capsys):
    train, val = random_store(tmp_path / "train", 32), random_store(tmp_path / "val", 12, seed=1)
    run = str(tmp_path / "run")
    assert main(["train", "gpt_tiny_c2i", "--out", run, "--stop-after", "1", *tiny_overrides(train, val)]) == 0
    random_store(train, 32, codebook_size=64)  # the store is re-encoded with a larger codebook
    random_store(val, 12, seed=1, codebook_size=64)
    assert main(["train", "gpt_tiny_c2i", "--out", run, "--resume", *tiny_overrides(train, val)]) == 2
    assert "other token data" in capsys.readouterr().err


@pytest.mark.parametrize("accum", [1, 2])
def test_host_reads_per_step(tmp_path, stores, accum):
    """No host read: the update and the EMA are masked on the device (the token data checked its ids)."""
    from fvq.training.host_syncs import count_host_syncs

    engine, _ = make_engine(tmp_path, *stores, f"grad_accum_steps={accum}", "ema=0.9")
    batches = engine.micro_batches()
    engine.train_step(next(batches), 0)
    micro = next(batches)
    with count_host_syncs() as reads:
        engine.train_step(micro, 1)
    assert dict(reads) == {}


def test_a_skipped_step_leaves_the_weight_average_as_it_was(tmp_path, stores, monkeypatch):
    engine, task = make_engine(tmp_path, *stores, "ema=0.9")
    batches = engine.micro_batches()
    engine.train_step(next(batches), 0)
    before = [s.clone() for s in task.ema.shadow]
    forward = task.model.forward

    def nan_loss(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(task.model, "forward", nan_loss)  # the next step's loss is NaN: skipped on the device
    engine.train_step(next(batches), 1)
    assert engine.read_guard()[0] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, task.ema.shadow))
    monkeypatch.setattr(task.model, "forward", forward)
    engine.train_step(next(batches), 2)  # a finite step moves it
    assert not any(torch.equal(a, b) for a, b in zip(before, task.ema.shadow))
